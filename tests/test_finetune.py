"""Fine-tuning from a pretrained export: new condition and adapter parameters start where the
model computes the pretrained outputs exactly; a LoRA run changes only adapter (and condition)
parameters; adapters export on their own and a merged export equals base + adapters."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgpt_jax import checkpoint, diffusion, finetune, lora, train
from vgpt_jax.config import ModelConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from train_checks import make_config, tiny_source  # noqa: E402

CLASSES, ACTION_DIM = 3, 2


def conditioned_source():
    videos = tiny_source(num_videos=8, frames=6)
    rng = np.random.default_rng(0)
    for i, v in enumerate(videos):
        v["extra"] = {"class_id": i % CLASSES,
                      "actions": rng.standard_normal((6, ACTION_DIM)).tolist()}
    return videos


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny exported model with random values everywhere (zero-initialised heads would make
    every comparison vacuous)."""
    cfg = make_config()
    model_cfg = ModelConfig.from_config(cfg.model)
    graphdef, state = nnx.split(checkpoint.abstract_model(model_cfg))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32)),
                         state)
    where = str(tmp_path_factory.mktemp("pretrained") / "export")
    checkpoint.export_model(where, nnx.merge(graphdef, state), cfg)
    return where, nnx.merge(graphdef, state)


def finetune_config(init_from, steps=2, rank=2):
    cfg = make_config(**{"train.steps": steps, "checkpoint.save_interval_steps": steps,
                         "checkpoint.init_from": init_from, "data.global_batch_size": 4,
                         "optim.learning_rate": 1e-2})
    # token_gate: its W_g is a new zero-initialised parameter too, covered by step 0 exactness
    cfg.model.conditions = dict(num_classes=CLASSES, action_dim=ACTION_DIM, dropout=0.0,
                                token_gate=True)
    cfg.model.lora = dict(rank=rank, alpha=4.0)
    return cfg


def model_of(cfg, params):
    graphdef, state, rest = nnx.split(
        checkpoint.abstract_model(ModelConfig.from_config(cfg.model)), nnx.Param, ...)
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state, rest)


def errors(model, batch, **conditions):
    return np.asarray(jax.jit(lambda m: diffusion.denoising_error(
        m, batch["latents"], batch["clip_ids"], 0.5, jax.random.key(0), **conditions))(model))


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
    """(config, params at step 0, params after 2 steps) of a LoRA + conditions fine-tune."""
    where, _ = pretrained
    cfg = finetune_config(where)
    run = train.build(cfg, conditioned_source())
    data = iter(run.dataset)
    with checkpoint.TrainCheckpointer(str(tmp_path_factory.mktemp("lora_run")),
                                      cfg.checkpoint) as ckpt:
        state, _ = train.initial_state(run, ckpt, data)
    start = jax.device_get(state.params)  # the step donates the state
    for _ in range(2):
        state, _ = run.step_fn(state, run.global_batch_of(next(data)))
    return cfg, start, jax.device_get(state.params)


def test_step_zero_is_the_pretrained_model_exactly(pretrained, lora_run):
    _, base = pretrained
    cfg, start, _ = lora_run
    batch = {"latents": jnp.asarray(np.stack([v["latents"][:4] for v in tiny_source()[:2]])),
             "clip_ids": jnp.asarray([[0, 1, 2, 3], [0, 0, 1, 1]], jnp.int32)}
    conditions = {"class_id": jnp.asarray([0, 2], jnp.int32),
                  "actions": jnp.ones((2, 4, ACTION_DIM), jnp.float32)}
    want = errors(base, batch)
    np.testing.assert_array_equal(errors(model_of(cfg, start), batch, **conditions), want)
    np.testing.assert_array_equal(errors(model_of(cfg, start), batch), want)


def test_lora_changes_only_adapter_and_condition_parameters(pretrained, lora_run):
    cfg, start, end = lora_run
    trainable = lora.trainable_labels(
        checkpoint.abstract_model(ModelConfig.from_config(cfg.model)), start)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), start, end)
    flat_label = jax.tree_util.tree_leaves_with_path(trainable)
    flat_changed = dict(jax.tree_util.tree_leaves_with_path(changed))
    moved = {jax.tree_util.keystr(k) for k, lab in flat_label if flat_changed[k]}
    frozen = {jax.tree_util.keystr(k) for k, lab in flat_label if lab == "frozen"}
    assert moved and not moved & frozen
    assert any("lora_b" in k for k in moved) and any("condition_gate'" in k for k in moved)
    assert any("condition_gate_proj" in k for k in moved)


def test_adapters_export_alone_and_merge_into_base(pretrained, lora_run, tmp_path):
    where, _ = pretrained
    cfg, _, end = lora_run
    tuned = model_of(cfg, end)
    alone = finetune.export_adapters(str(tmp_path / "adapters"), tuned, cfg)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(alone) for f in fs)
    base_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(where)
                    for f in fs)
    assert size < base_size
    reloaded, _ = finetune.load_with_adapters(where, alone)
    batch = {"latents": jnp.asarray(np.stack([v["latents"][:4] for v in tiny_source()[:2]])),
             "clip_ids": jnp.asarray([[0, 1, 2, 3], [0, 0, 1, 1]], jnp.int32)}
    conditions = {"class_id": jnp.asarray([1, 2], jnp.int32),
                  "actions": jnp.ones((2, 4, ACTION_DIM), jnp.float32)}
    want = errors(tuned, batch, **conditions)
    np.testing.assert_array_equal(errors(reloaded, batch, **conditions), want)
    merged_dir = finetune.export_merged(str(tmp_path / "merged"), tuned, cfg)
    merged, merged_cfg = checkpoint.load_model(merged_dir)
    assert merged.decoder.lora is None and merged_cfg.model.lora.rank == 0
    np.testing.assert_allclose(errors(merged, batch, **conditions), want, rtol=1e-5)
    scale = tuned.decoder.lora.scale
    for target in ("qkv_proj", "down_proj"):
        a = np.asarray(end["decoder"]["lora"][f"{target}_lora_a"])
        b = np.asarray(end["decoder"]["lora"][f"{target}_lora_b"])
        np.testing.assert_allclose(np.asarray(merged.decoder.__getattribute__(target)[...]),
                                   end["decoder"][target] + scale * np.einsum("lir,lro->lio", a, b),
                                   rtol=1e-6, atol=1e-7)


def test_init_from_refuses_unknown_new_parameters(pretrained):
    where, _ = pretrained
    cfg = finetune_config(where)
    cfg.model.mlp_dim = 256  # another architecture: not a fine-tune of this export
    run = train.build(cfg, conditioned_source())
    with pytest.raises(ValueError, match="mismatched shapes|does not match"):
        finetune.pretrained_params(where, run.model_cfg, run.init().params, None)


def test_export_lora_command(pretrained, lora_run, tmp_path):
    """`vgpt export-lora`: adapters alone from a fine-tune's export, merged from it or from
    base + adapters (the same kernels), and one-line refusals."""
    from vgpt_jax.commands import export_lora
    where, _ = pretrained
    cfg, _, tuned_params = lora_run
    tuned = checkpoint.export_model(str(tmp_path / "tuned"), model_of(cfg, tuned_params), cfg)
    run = lambda *a: export_lora.main([*a])
    assert run("--checkpoint", tuned, "--output", str(tmp_path / "ad")) == 0
    assert run("--checkpoint", tuned, "--output", str(tmp_path / "m1"), "--merge") == 0
    assert run("--base", where, "--adapters", str(tmp_path / "ad"), "--output",
               str(tmp_path / "m2"), "--merge") == 0
    m1, c1 = checkpoint.load_model(str(tmp_path / "m1"))
    m2, _ = checkpoint.load_model(str(tmp_path / "m2"))
    assert c1.model.lora.rank == 0
    p1, p2 = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (m1, m2))
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    with pytest.raises(ValueError, match="--merge: the model has no LoRA"):
        run("--checkpoint", where, "--output", str(tmp_path / "x"), "--merge")
    with pytest.raises(ValueError, match="no LoRA adapters or condition parameters"):
        run("--checkpoint", where, "--output", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="already holds an export"):
        run("--checkpoint", tuned, "--output", str(tmp_path / "m1"))
    with pytest.raises(ValueError, match="--base and --adapters go together"):
        run("--base", where, "--output", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no adapters/ folder"):
        run("--base", where, "--adapters", where, "--output", str(tmp_path / "x"))
