"""Sampling on a mesh (8 fake CPU devices in one subprocess, shared by the tests of this
module): the same latents as one device on (data 2 x fsdp 4) and (fsdp 2 x context 2 x tensor
2), cached and recomputed; a batch equals its videos one by one; the arrays' layouts; the
Pipeline's mesh plumbing; mesh flags."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402

from vgpt_jax import sampling, sharding  # noqa: E402

TOL = 1e-5
MESHES = ("data2_fsdp4", "fsdp2_context2_tensor2")


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out, lock = subproc.shared_dir(tmp_path_factory, "sampling_mesh_checks.json")
    with lock():  # one subprocess per test run, whichever xdist worker gets here first
        if not out.exists():
            proc = subproc.run(["tests/scripts/sampling_checks.py", str(out)], devices=8,
                               timeout=900)
            assert proc.returncode == 0, proc.stdout[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("mode", ["cached", "recompute"])
def test_mesh_gives_the_one_device_latents(checks, mesh, mode):
    assert checks["scale"] > 0.1  # the comparison is not between zeros
    assert checks[mesh][mode] < TOL


def test_batch_on_the_mesh_equals_its_videos_one_by_one(checks):
    assert checks["one_by_one"] < TOL
    assert checks["three_of_eight"] < TOL  # a batch that is not a multiple of the shards


def test_rolling_cache_and_generation_from_nothing_on_the_context_mesh(checks):
    assert checks["rolling"] < TOL and checks["from_nothing"] < TOL


def test_layouts_follow_the_training_rules(checks):
    ctx = checks["fsdp2_context2_tensor2"]
    # KV cache [layers, B, S, KV, D]: batch over fsdp, the sequence over context, heads tensor.
    assert ctx["kv_spec"] == "P(None, 'fsdp', 'context', 'tensor')"
    assert ctx["meta_spec"] == "P('fsdp', 'context')"
    assert ctx["batch_multiple"] == 2
    data = checks["data2_fsdp4"]
    assert data["kv_spec"] == "P(None, ('data', 'fsdp'))" and data["batch_multiple"] == 8
    for mesh in MESHES:
        assert checks[mesh]["qkv_spec"] == "P(None, 'fsdp', 'tensor')"


def test_pipeline_restores_into_shards_and_predicts_the_same(checks):
    p = checks["pipeline"]
    assert p["diff"] < TOL
    assert p["qkv_spec"] == "P(None, 'fsdp', 'tensor')" and p["devices"] == 8


def test_mesh_sizes_parse_and_refuse_clearly():
    assert sharding.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="axis=size"):
        sharding.parse_mesh("model=2")
    with pytest.raises(ValueError, match="needs 2 devices, 1 available"):
        sampling.Placement.of({"data": 2})
    with pytest.raises(ValueError, match="unknown axes"):
        sampling.Placement.of({"model": 1})
    one = sampling.Placement.of({})
    assert one.batch_multiple == 1 and one.mesh.size == 1


def test_sample_command_takes_the_mesh_flag(capsys):
    from vgpt_jax.commands import sample
    base = ["--checkpoint", "c", "--input", "i.mp4", "--output", "o.mp4"]
    args = sample.build_parser().parse_args(base + ["--mesh", "fsdp=2,context=2,tensor=2"])
    assert args.mesh == {"fsdp": 2, "context": 2, "tensor": 2}
    assert sample.build_parser().parse_args(base).mesh is None
    with pytest.raises(SystemExit):
        sample.build_parser().parse_args(base + ["--mesh", "fsdp=0"])
    assert "axis=size pairs" in capsys.readouterr().err
