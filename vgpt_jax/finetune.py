"""Fine-tuning a pretrained model: new parameters beside loaded ones, what the optimiser sees,
and the exports of a LoRA run.

- `pretrained_params`: the params of `checkpoint.init_from` (an export or a workdir) laid into a
  freshly initialised model whose config may add conditions (`model.conditions`) and adapters
  (`model.lora`): every stored parameter is loaded as it is, and the parameters the new config
  adds must be condition or adapter parameters (`lora.TRAINABLE`), which start where their
  zero-initialised paths make the model compute the pretrained model's outputs exactly.
- `optim.trainable`: "all" (full fine-tuning), "adapters" (the `lora.TRAINABLE` parameters
  alone: an `optax.multi_transform` whose frozen part has no optimiser state, and the frozen
  parameters under `stop_gradient` so no gradient is computed for them), or "auto" (adapters
  when the model has LoRA adapters, else all).
- `export_adapters` writes the adapters and condition parameters on their own (a small export
  that `load_with_adapters` lays onto its base); `export_merged` writes the plain model with
  every adapter merged into its kernel (`lora.merge`).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import optax
from flax import nnx

from vgpt_jax import checkpoint as ckpt_lib
from vgpt_jax import lora
from vgpt_jax.config import ModelConfig
from vgpt_jax.data.store import atomic_write

TRAINABLE_MODES = ("auto", "all", "adapters")
ADAPTERS_DIR = "adapters"


def trains_adapters_only(optim_cfg, model_cfg: ModelConfig) -> bool:
    mode = optim_cfg.get("trainable", "auto")
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"config: optim.trainable={mode!r}: must be one of {TRAINABLE_MODES}")
    if mode == "adapters" and model_cfg.lora.rank == 0 and not model_cfg.conditions.enabled:
        raise ValueError("config: optim.trainable='adapters', but the model has neither LoRA "
                         "adapters (model.lora.rank) nor conditions (model.conditions)")
    return mode == "adapters" or (mode == "auto" and model_cfg.lora.rank > 0)


def labels_for(model_cfg: ModelConfig):
    """params pure dict -> {"train" | "frozen"} per leaf (`lora.TRAINABLE` trains)."""
    abstract = ckpt_lib.abstract_model(model_cfg)
    return lambda params: lora.trainable_labels(abstract, params)


def adapters_only(tx: optax.GradientTransformation, labels) -> optax.GradientTransformation:
    """`tx` on the "train" leaves; frozen leaves get zero updates and keep no state."""
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def freeze(params: dict, labels: dict) -> dict:
    """Frozen leaves under `stop_gradient`: their gradients are zeros, never computed."""
    return jax.tree.map(lambda p, l: p if l == "train" else jax.lax.stop_gradient(p),
                        params, labels)


def _pure_paths(tree) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def pretrained_params(init_from: str, model_cfg: ModelConfig, fresh_params: dict,
                      shardings: dict | None = None) -> dict:
    """`fresh_params` (this run's initialisation, a pure dict) with every parameter stored in
    `init_from` loaded over it. Parameters of this config that the checkpoint lacks must be
    condition or adapter parameters (else ValueError naming them); a stored parameter this
    config lacks, or one of another shape, is refused by the restore's shape check."""
    _, saved = ckpt_lib.resolve_params(init_from)
    stored_cfg = ModelConfig.from_config(saved.model)
    base_cfg = dataclasses.replace(model_cfg, conditions=stored_cfg.conditions,
                                   lora=stored_cfg.lora)
    base_abstract = nnx.to_pure_dict(nnx.state(ckpt_lib.abstract_model(base_cfg), nnx.Param))
    wanted = _pure_paths(base_abstract)
    abstract = ckpt_lib.abstract_model(model_cfg)
    current = _pure_paths(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    extra = sorted(set(wanted) - set(current))
    if extra:
        raise ValueError(f"checkpoint.init_from {init_from!r} holds parameters this config "
                         f"lacks: {extra[:5]} (merge its LoRA adapters first: vgpt export-lora "
                         "--merge)")
    new = set(current) - set(wanted)
    trainable = set(_pure_paths(nnx.to_pure_dict(nnx.state(abstract, lora.TRAINABLE))))
    if new - trainable:
        raise ValueError(f"checkpoint.init_from {init_from!r} lacks parameters this config "
                         f"needs that are not condition or adapter parameters: "
                         f"{sorted(new - trainable)[:5]}")
    base_shardings = None
    if shardings is not None:
        flat_shardings = _pure_paths(shardings)
        base_shardings = jax.tree_util.tree_map_with_path(
            lambda path, _: flat_shardings[jax.tree_util.keystr(path)], base_abstract)
    loaded = _pure_paths(ckpt_lib.load_params(init_from, base_cfg, base_shardings))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: loaded.get(jax.tree_util.keystr(path), x), fresh_params)


def export_adapters(directory: str, model, config) -> str:
    """The adapters and condition parameters alone (`config.json` + `adapters/`)."""
    import json
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, ADAPTERS_DIR), lora.adapter_params(model), force=True)
    with atomic_write(os.path.join(directory, ckpt_lib.CONFIG_FILE)) as f:
        json.dump(config.to_dict(), f, indent=2, default=list)
    return directory


def load_with_adapters(base_dir: str, adapters_dir: str):
    """(model, config): the base export with an `export_adapters` folder laid onto it."""
    import orbax.checkpoint as ocp
    config = ckpt_lib.read_config(adapters_dir)
    model_cfg = ModelConfig.from_config(config.model)
    abstract = ckpt_lib.abstract_model(model_cfg)
    fresh = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    fresh = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), fresh)
    params = pretrained_params(base_dir, model_cfg, fresh)
    target = lora.adapter_params(abstract)
    with ocp.StandardCheckpointer() as ckptr:
        adapters = _pure_paths(ckptr.restore(os.path.join(adapters_dir, ADAPTERS_DIR), target))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: adapters.get(jax.tree_util.keystr(path), x), params)
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state, rest), config


def export_merged(directory: str, model, config: ml_collections.ConfigDict) -> str:
    """The plain model (adapters merged into the kernels, `model.lora.rank` 0) as an export."""
    merged, merged_config = lora.merge(model, config)
    return ckpt_lib.export_model(directory, merged, merged_config)
