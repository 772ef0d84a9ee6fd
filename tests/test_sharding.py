"""Mesh construction, logical-axis shardings, and sharded == unsharded training (8 fake CPU
devices in one subprocess, shared by the tests of this module)."""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402

from vgpt_jax import sharding  # noqa: E402
from vgpt_jax.config import DEFAULT_LOGICAL_RULES, get_train_config  # noqa: E402


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out, lock = subproc.shared_dir(tmp_path_factory, "sharded_checks.json")
    with lock():  # one subprocess per test run, whichever xdist worker gets here first
        if not out.exists():
            proc = subproc.run(["tests/scripts/train_checks.py", "sharded", str(out)], devices=8,
                               timeout=600)
            assert proc.returncode == 0, proc.stdout[-4000:]
    return json.loads(out.read_text())


def test_data_fsdp_mesh_matches_one_device(checks):
    got = checks["data2_fsdp4"]
    np.testing.assert_allclose(got["losses"], checks["ref_losses"], rtol=2e-6)
    assert got["max_param_diff"] < 1e-6
    assert got["qkv_spec"] == "P(None, 'fsdp', 'tensor')"


def test_fsdp_context_tensor_mesh_matches_one_device(checks):
    got = checks["fsdp2_context2_tensor2"]
    np.testing.assert_allclose(got["losses"], checks["ref_losses"], rtol=2e-6)
    assert got["max_param_diff"] < 1e-6


def test_checkpoint_restores_onto_another_mesh(checks):
    r = checks["reshard"]
    assert r["params_equal"] and r["opt_equal"] and r["step"] == 4
    assert r["qkv_spec"] == "P(None, 'fsdp', 'tensor')"  # the (2, 4) mesh's layout, not (8, 1)'s
    assert r["count_spec"] == "P()"  # Adam's count: replicated, not a single-device scalar
    assert r["resumed_step"] == 6 and r["resumed_loss_finite"]


def test_blockwise_attention_runs_inside_shard_map(checks):
    # Under shard_map every carry of the tile loops must be varying over the mesh axes like q
    # (a carry made from constants is not, and the loop fails to trace).
    got = checks["shard_map_attention"]
    assert got["out"] < 1e-5 and got["grads"] < 1e-4, got


def test_bad_meshes_fail_before_the_first_step(checks):
    e = checks["errors"]
    assert "mesh.ici" in e["mesh_vs_devices"] and "8 devices" in e["mesh_vs_devices"]
    assert "data.global_batch_size=4" in e["batch_vs_mesh"] and "8 batch shards" in e["batch_vs_mesh"]
    assert "unsharded" in e["unsharded"] and "gate_up_proj" in e["unsharded"]


def test_mesh_sizes_resolve_minus_one_and_name_the_field():
    assert sharding._resolve(dict(data=2, fsdp=-1, context=1, tensor=2), 16, "ici") == [2, 4, 1, 2]
    with pytest.raises(ValueError, match=r"mesh\.ici=.*do not divide the 8 devices"):
        sharding._resolve(dict(data=3, fsdp=-1, context=1, tensor=1), 8, "ici")


def test_one_device_mesh_has_all_axes_auto():
    mesh = sharding.make_mesh(get_train_config().mesh, jax.devices()[:1])
    assert mesh.axis_names == sharding.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_default_rules_map_params_and_activations():
    rules = DEFAULT_LOGICAL_RULES
    assert sharding.logical_to_spec(("layers", "embed", "qkv"), rules) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "mlp", "embed"), rules) == P(None, "tensor", "fsdp")
    # The batch takes fsdp first, so the activation's embed dimension stays whole.
    assert sharding.logical_to_spec(("batch", "sequence", "embed"), rules) == \
        P(("data", "fsdp"), "context", None)


def test_fit_spec_drops_axes_that_do_not_divide():
    class FakeMesh:
        shape = {"data": 2, "fsdp": 4, "context": 1, "tensor": 2}
    assert sharding.fit_spec(P("fsdp", "tensor"), (3, 8), FakeMesh) == P(None, "tensor")
    assert sharding.fit_spec(P(("data", "fsdp")), (4,), FakeMesh) == P("data")
