"""The parameter average (`optim.ema_decay`): the recursion it keeps, that frozen parameters come
through whole, that a run saves it beside the params and that loaders serve it, and that a
resumed run continues it exactly."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vgpt_jax import optim

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from train_checks import make_config, tiny_source  # noqa: E402


def test_average_follows_the_params_the_step_applies():
    decay = 0.75
    tx = optax.chain(optax.sgd(0.1), optim.param_ema(decay))
    params = {"w": jnp.array([1.0, -2.0])}
    state, want = tx.init(params), np.array([1.0, -2.0])
    for g in ([0.5, 0.25], [-1.0, 2.0], [3.0, 0.0]):
        updates, state = tx.update({"w": jnp.array(g)}, state, params)
        params = optax.apply_updates(params, updates)
        want = decay * want + (1 - decay) * np.asarray(params["w"])
        np.testing.assert_allclose(optim.ema_params(state, params)["w"], want, rtol=1e-6)
    assert optim.ema_params(optax.sgd(0.1).init(params), params) is None


def test_frozen_params_come_from_the_params():
    # An adapters-only optimiser averages only what it trains (`finetune.adapters_only`).
    tx = optax.multi_transform({"train": optax.chain(optax.sgd(1.0), optim.param_ema(0.5)),
                                "frozen": optax.set_to_zero()}, {"a": "train", "b": "frozen"})
    params = {"a": jnp.ones(2), "b": jnp.full(3, 7.0)}
    updates, state = tx.update({"a": jnp.ones(2), "b": jnp.ones(3)}, tx.init(params), params)
    params = optax.apply_updates(params, updates)
    ema = optim.ema_params(state, params)
    np.testing.assert_allclose(ema["a"], 0.5 * 1.0 + 0.5 * 0.0)
    np.testing.assert_array_equal(ema["b"], params["b"])


def _pure(model):
    from flax import nnx
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_a_run_saves_the_average_loaders_serve_it_and_resume_continues_it(tmp_path):
    from vgpt_jax import checkpoint, train
    from vgpt_jax.config import ModelConfig
    cfg = make_config(**{"optim.ema_decay": 0.5, "train.steps": 2,
                         "checkpoint.save_interval_steps": 1, "checkpoint.max_to_keep": 5})
    work = str(tmp_path / "work")
    train.train(cfg, work, tiny_source())
    cfg.train.steps = 4
    resumed = train.train(cfg, work, tiny_source())
    straight = train.train(cfg, str(tmp_path / "straight"), tiny_source())
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    model_cfg = ModelConfig.from_config(cfg.model)
    saved = {}  # step -> (params, average)
    for step in range(1, 5):
        step_dir = os.path.join(work, checkpoint.CHECKPOINTS_DIR, str(step))
        saved[step] = tuple(_pure(checkpoint.restore_params(os.path.join(step_dir, item),
                                                            model_cfg))
                            for item in (checkpoint.PARAMS_DIR, checkpoint.EMA_PARAMS_DIR))
    for step in (2, 3, 4):  # average_s = d average_{s-1} + (1 - d) params_s
        jax.tree.map(lambda e, e0, p: np.testing.assert_allclose(e, 0.5 * e0 + 0.5 * p,
                                                                 rtol=1e-5, atol=1e-7),
                     saved[step][1], saved[step - 1][1], saved[step][0])
    # Sampling and export read the average, which is not the last params.
    served = _pure(checkpoint.load_model(work)[0])
    jax.tree.map(np.testing.assert_array_equal, served, saved[4][1])
    assert not np.array_equal(served["decoder"]["qkv_proj"], saved[4][0]["decoder"]["qkv_proj"])
