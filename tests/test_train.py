"""Optimiser, schedules, gradient accumulation, run-config validation, and the `tools/train.py`
command line on a real latent store."""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgpt_jax import optim
from vgpt_jax.config import get_train_config, validate_train_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402
from train_checks import tiny_source  # noqa: E402


def optim_cfg(**kw):
    cfg = get_train_config().optim
    cfg.update(kw)
    return cfg


def test_recipe_defaults():
    o = get_train_config().optim
    assert (o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip_norm) == \
        (1e-4, 0.9, 0.95, 1e-5, 0.1, 1.0)


@pytest.mark.parametrize("schedule,expect", [
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466]),
])
def test_schedules_warm_up_then_decay(schedule, expect):
    fn = optim.make_schedule(optim_cfg(learning_rate=1.0, warmup_steps=2, schedule=schedule), 6)
    np.testing.assert_allclose([float(fn(s)) for s in range(6)], expect, rtol=1e-5, atol=1e-7)


def test_adamw_step_matches_the_formula():
    tx, _ = optim.make_optimizer(optim_cfg(learning_rate=0.1, grad_clip_norm=1e9), 10)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    upd, _ = tx.update(g, tx.init(p), p)
    # First Adam step: m_hat / (sqrt(v_hat) + eps) = sign(g) (up to eps); decoupled decay 0.1.
    want = -0.1 * (np.sign([0.5, 0.25]) * np.abs([0.5, 0.25]) / (np.abs([0.5, 0.25]) + 1e-5)
                   + 0.1 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(upd["w"], want, rtol=1e-6)


def test_gradient_clipping_bounds_the_update_norm():
    tx, _ = optim.make_optimizer(optim_cfg(learning_rate=1.0, b1=0.0, weight_decay=0.0), 10)
    p = {"w": jnp.zeros(3)}
    big = {"w": jnp.array([300.0, 400.0, 0.0])}
    clipped = optax_first_update(tx, p, big)
    unclipped_dir = np.array([0.6, 0.8, 0.0])
    np.testing.assert_allclose(-clipped, np.sign(unclipped_dir), atol=1e-4)


def optax_first_update(tx, p, g):
    upd, _ = tx.update(g, tx.init(p), p)
    return np.asarray(upd["w"])


def test_accumulated_gradients_equal_full_batch_gradients():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])

    def loss_fn(params, batch, rng):
        err = batch["x"] @ params["w"] - batch["y"]
        value = jnp.mean(err**2)
        return value, {"loss": value}

    params = {"w": jnp.array([0.1, 0.2, 0.3])}
    batch = {"x": x, "y": y}
    full = optim.accumulate_gradients(loss_fn, params, batch, jax.random.key(1), 1)
    acc = optim.accumulate_gradients(loss_fn, params, batch, jax.random.key(1), 4)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(acc)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    mb = optim.split_microbatches(batch, 4)
    np.testing.assert_array_equal(mb["x"][1], x[1::4])  # rows i, i + 4: keeps the sharding


@pytest.mark.parametrize("field,value,message", [
    ("optim.schedule", "step", "optim.schedule='step': must be one of"),
    ("data.clip_mode", "two", "data.clip_mode='two'"),
    ("data.stride_min", 5, "need 1 <= stride_min <= stride_max"),
    ("optim.grad_accum_steps", 3, "data.global_batch_size=8: must divide by optim.grad_accum_steps=3"),
    ("mesh.rules", [["embed", "model"]], "names an unknown mesh axis"),
])
def test_config_validation_names_the_field(field, value, message):
    cfg = get_train_config()
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_train_config(cfg)


def test_mesh_with_two_wildcards_is_rejected():
    cfg = get_train_config()
    cfg.mesh.ici.data = -1
    with pytest.raises(ValueError, match="mesh.ici.*at most one axis may be -1"):
        validate_train_config(cfg)


def test_stage_configs_follow_the_curriculum():
    sys.path.insert(0, os.path.join(subproc.ROOT, "configs"))
    import importlib
    want = {"stage1": (16, 4, 4, "one_frame"), "stage2": (48, 4, 4, "random"),
            "stage3": (48, 4, 12, "random"), "stage4": (80, 4, 12, "random")}
    for name, (frames, lo, hi, mode) in want.items():
        cfg = importlib.import_module("curriculum").get_config(name)
        validate_train_config(cfg)
        d = cfg.data
        assert (d.num_frames, d.stride_min, d.stride_max, d.clip_mode) == (frames, lo, hi, mode)
        assert cfg.model.hidden_size == 3072 and cfg.model.dtype == "bfloat16"
        assert cfg.model.param_dtype == "float32"
        assert (name == "stage1") == (cfg.checkpoint.init_from == "")


def test_cli_trains_from_a_store_with_overrides(tmp_path):
    """`vgpt train` (and the `tools/train.py` wrapper) with `--config.x=y` overrides."""
    store = pytest.importorskip("vgpt_jax.data.store")
    store.write_store(str(tmp_path / "store"), tiny_source())
    args = ["-m", "vgpt_jax", "train", "--config", "configs/tiny_test.py",
            "--workdir", str(tmp_path / "run"),
            f"--config.data.store={tmp_path / 'store'}", "--config.train.steps=3",
            "--config.train.tensorboard=False"]
    proc = subproc.run(args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["data"]["store"] == str(tmp_path / "store")
    # A missing store fails before any step, naming the path.
    bad = subproc.run(["tools/train.py"] + args[3:6] + [str(tmp_path / "run2"),
                                                        "--config.data.store=/no/such/store"])
    assert bad.returncode != 0 and "/no/such/store" in bad.stdout
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


@pytest.mark.parametrize("change, message", [
    (lambda cfg: setattr(cfg.model, "latent_channels", 8), "4-channel latents, but the model config has latent_channels=8"),
    (lambda cfg: setattr(cfg.model, "patch_size", 3), "not a multiple of patch_size=3"),
    (lambda cfg: setattr(cfg.model, "max_seq_len", 32), "over model.max_seq_len=32"),
])
def test_latents_that_do_not_fit_the_model_fail_before_compiling(change, message):
    from train_checks import make_config
    from vgpt_jax import train
    cfg = make_config()
    change(cfg)
    with pytest.raises(ValueError, match=message):
        train.build(cfg, tiny_source())
