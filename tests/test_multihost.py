"""Two processes joined by `jax.distributed` on localhost (4 fake CPU devices each) train and
checkpoint together, and match one process driving all 8 devices.

The pair runs a two-slice hybrid mesh (`mesh.num_slices=2`: fsdp=4 inside a process, data=2
across processes, built by `create_hybrid_device_mesh`); the single process the plain
(data=2, fsdp=4) mesh, which lays the devices out the same way."""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402

MESH = '{"data": 2, "fsdp": 4}'
SLICE_MESH = '{"data": 1, "fsdp": 4}'
STEPS = "4"


def _state(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_two_processes_equal_one_process_on_eight_devices(tmp_path):
    pair = subproc.run_pair(lambda port, pid: [
        "tests/scripts/train_checks.py", "run", str(tmp_path / "pair"), str(tmp_path / "pair.npz"),
        "--steps", STEPS, "--mesh", SLICE_MESH, "--slices", "2", "--port", str(port),
        "--process-id", str(pid)])
    for i, p in enumerate(pair):
        assert p.returncode == 0, f"process {i}:\n{p.stdout[-4000:]}"
    single = subproc.run(["tests/scripts/train_checks.py", "run", str(tmp_path / "single"),
                          str(tmp_path / "single.npz"), "--steps", STEPS, "--mesh", MESH],
                         devices=8)
    assert single.returncode == 0, single.stdout[-4000:]

    a, b = _state(tmp_path / "pair.npz"), _state(tmp_path / "single.npz")
    assert int(a["step"]) == int(b["step"]) == 4
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    keys = [k for k in b if k.startswith(("params", "opt"))]
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # Both processes wrote their shard of the state and their own data-iterator position.
    step_dir = tmp_path / "pair" / "checkpoints" / STEPS
    assert sorted(f for f in os.listdir(step_dir / "data") if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert (step_dir / "commit_success.txt").exists()
    # Only process 0 logs.
    assert len((tmp_path / "pair" / "metrics.jsonl").read_text().splitlines()) == 4
