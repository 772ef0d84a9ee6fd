"""Resumable training: SIGKILL and SIGTERM mid-run resume bitwise, `load_model` reads a training
workdir, stages chain through `init_from`, and mismatched checkpoints fail with clear errors.

The runs are subprocesses (one per train() call, as a real restart is), sharing a persistent
compilation cache so only the first one compiles.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402
from train_checks import make_config, tiny_source  # noqa: E402

STEPS = 6


def _run(workdir, out, *extra, ok=True):
    proc = subproc.run(["tests/scripts/train_checks.py", "run", str(workdir), str(out),
                        "--steps", str(STEPS), *extra])
    if ok:
        assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def _state(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_bitwise_equal(a, b):
    keys = [k for k in a if k.startswith(("params", "opt"))]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(("params", "opt")))
    for k in keys:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d, lock = subproc.shared_dir(tmp_path_factory, "uninterrupted")
    with lock():  # one uninterrupted run per test run, shared by the xdist workers
        if not (d / "out.npz").exists():
            d.mkdir(exist_ok=True)
            _run(d / "work", d / "out.npz")
    return d / "work", _state(d / "out.npz")


def test_resume_after_sigkill_is_bitwise_exact(reference, tmp_path):
    killed = _run(tmp_path / "work", tmp_path / "unused.npz", "--kill-at", "5", ok=False)
    assert killed.returncode == -9, killed.stdout[-2000:]
    steps = sorted(int(s) for s in os.listdir(tmp_path / "work" / "checkpoints") if s.isdigit())
    assert steps and max(steps) <= 4  # step 5 was never saved
    _run(tmp_path / "work", tmp_path / "out.npz")
    got, want = _state(tmp_path / "out.npz"), reference[1]
    assert int(got["step"]) == STEPS
    _assert_bitwise_equal(got, want)


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(reference, tmp_path):
    _run(tmp_path / "work", tmp_path / "first.npz", "--term-at", "3")
    first = _state(tmp_path / "first.npz")
    assert bool(first["preempted"]) and int(first["step"]) == 3
    assert "3" in os.listdir(tmp_path / "work" / "checkpoints")  # saved at once, not at step 4
    _run(tmp_path / "work", tmp_path / "out.npz")
    got = _state(tmp_path / "out.npz")
    assert int(got["step"]) == STEPS and not bool(got["preempted"])
    _assert_bitwise_equal(got, reference[1])


def test_metrics_jsonl_has_the_run_scalars(reference):
    lines = [json.loads(l) for l in (reference[0] / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_time_s"):
        assert all(np.isfinite(l[key]) for l in lines), key
    assert lines[0]["lr"] == 0.0 and lines[-1]["lr"] == pytest.approx(1e-3)  # 2 warmup steps


def test_load_model_reads_a_training_workdir(reference):
    from flax import nnx
    from vgpt_jax import checkpoint
    model, config = checkpoint.load_model(str(reference[0]))
    assert config.train.steps == STEPS
    params = nnx.state(model, nnx.Param).to_pure_dict()
    np.testing.assert_array_equal(np.asarray(params["decoder"]["qkv_proj"]),
                                  reference[1]["params['decoder']['qkv_proj']"])
    model4, _ = checkpoint.load_model(str(reference[0]), step=4)
    assert not np.array_equal(np.asarray(nnx.state(model4, nnx.Param).to_pure_dict()
                                         ["decoder"]["qkv_proj"]),
                              reference[1]["params['decoder']['qkv_proj']"])


def test_mismatched_checkpoint_names_the_parameter(reference, tmp_path):
    import shutil
    from vgpt_jax import checkpoint, train
    from vgpt_jax.config import ModelConfig
    cfg = make_config()
    cfg.model.mlp_dim = 96
    with pytest.raises(ValueError, match=r"gate_up_proj.*checkpoint \(2, 64, 256\) vs config "
                                         r"\(2, 64, 192\)"):
        checkpoint.load_params(str(reference[0]), ModelConfig.from_config(cfg.model))
    # Resuming a workdir with a changed model fails at restore, before any step.
    cfg.train.steps = STEPS + 1
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"does not match the model config.*gate_up_proj"):
        train.train(cfg, str(tmp_path), tiny_source())


def test_next_stage_starts_from_previous_params(reference, tmp_path):
    from vgpt_jax import checkpoint, train
    cfg = make_config(**{"checkpoint.init_from": str(reference[0]), "data.clip_mode": "one_frame"})
    setup = train.build(cfg, tiny_source())
    with checkpoint.TrainCheckpointer(str(tmp_path), cfg.checkpoint) as ckpt:
        state, start = train.initial_state(setup, ckpt, iter(setup.dataset))
    assert start == 0 and int(state.step) == 0
    assert int(state.opt_state[1][0].count) == 0  # params only: a fresh optimiser
    np.testing.assert_array_equal(np.asarray(state.params["markers"]),
                                  reference[1]["params['markers']"])
    np.testing.assert_array_equal(np.asarray(state.params["decoder"]["qkv_proj"]),
                                  reference[1]["params['decoder']['qkv_proj']"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path):
    import shutil
    shutil.copytree(reference[0], tmp_path / "work")
    for s in os.listdir(tmp_path / "work" / "checkpoints"):
        if s.isdigit() and int(s) > 4:
            shutil.rmtree(tmp_path / "work" / "checkpoints" / s)
    proc = _run(tmp_path / "work", tmp_path / "out.npz", "--nan", ok=False)
    assert proc.returncode == 1
    assert "FloatingPointError: non-finite loss nan at step 5" in proc.stdout
    assert "last good checkpoint is step 4" in proc.stdout
    assert max(int(s) for s in os.listdir(tmp_path / "work" / "checkpoints") if s.isdigit()) == 4
