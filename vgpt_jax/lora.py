"""LoRA on the decoder's linears, stacked over layers like the kernels they adapt.

The decoder stores each linear's kernel stacked, W [layers, in, out], applied by one einsum
per layer under a scan. An adapter here is stacked the same way: factors a [layers, in, r] and
b [layers, r, out] held as flax's `nnx.LoRAParam` (as `nnx.LoRA` holds its `lora_a` /
`lora_b`, with its initialisers: a He-uniform per layer, b zero), and a layer computes
`y W + scale (y a) b`, scale = alpha / r (alpha / sqrt(r) with `rslora`: `lora_scale`, which
`peft_lora` also merges official adapters with). b = 0 at initialisation, so an adapted model computes exactly the base
model's outputs before its first update.

nnx filters select what trains: `TRAINABLE` (the adapters and the condition paths) is what a
LoRA run's optimiser sees (`trainable_labels`); everything else stays as loaded. Adapters save
on their own (`adapter_params`, a small export) and merge into the kernels on export
(`merge`: W + scale a b, the model without adapters).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vgpt_jax.conditioning import ConditionParam
from vgpt_jax.config import ModelConfig, dtype_of

TRAINABLE = nnx.Any(nnx.LoRAParam, ConditionParam)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The update's scale, as peft computes it: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _factor_names(target: str) -> tuple[str, str]:
    return f"{target}_lora_a", f"{target}_lora_b"


class StackedLoRA(nnx.Module):
    """Adapters for `cfg.lora.targets` of a decoder whose kernels are `kernels` (name -> Param)."""

    def __init__(self, cfg: ModelConfig, kernels: dict, *, rngs: nnx.Rngs):
        r, pdt = cfg.lora.rank, dtype_of(cfg.param_dtype)
        self.scale = lora_scale(cfg.lora.alpha, r, cfg.lora.rslora)
        a_init = nnx.initializers.he_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        for target in cfg.lora.targets:
            kernel = kernels[target]
            n, din, dout = kernel.shape
            layers_axis, in_axis, out_axis = kernel.logical_axes
            a_name, b_name = _factor_names(target)
            setattr(self, a_name, nnx.LoRAParam(a_init(rngs.params(), (n, din, r), pdt),
                                                logical_axes=(layers_axis, in_axis, None)))
            setattr(self, b_name, nnx.LoRAParam(jnp.zeros((n, r, dout), pdt),
                                                logical_axes=(layers_axis, None, out_axis)))
        self.targets = tuple(cfg.lora.targets)

    def layer_params(self) -> dict:
        """{"<target>_lora_a" / "_lora_b": [layers, ...]}: sliced per layer with the kernels."""
        out = {}
        for target in self.targets:
            for name in _factor_names(target):
                out[name] = getattr(self, name)[...]
        return out


def adapt(out_BTO, y_BTI, layer_params: dict, target: str, scale: float):
    """A layer's linear output `y W` plus its adapter's `scale (y a) b` when it has one."""
    a_name, b_name = _factor_names(target)
    if a_name not in layer_params:
        return out_BTO
    low = jnp.einsum("bti,ir->btr", y_BTI, layer_params[a_name])
    return out_BTO + scale * jnp.einsum("btr,ro->bto", low, layer_params[b_name])


def merged_kernel(kernel, a, b, scale: float):
    """W + scale a b for stacked [layers, in, out] kernels, summed in float32."""
    delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge(model, config):
    """(model without adapters, its config): every adapted kernel becomes W + scale a b.

    `config` is the run's ConfigDict (its `model.lora.rank` is set to 0 in the returned copy),
    so the merged export loads as a plain model and samples with no adapter arithmetic."""
    from vgpt_jax.model import VideoGPT
    cfg = ModelConfig.from_config(config.model)
    if cfg.lora.rank == 0:
        raise ValueError("merge: the model has no LoRA adapters (model.lora.rank is 0)")
    merged_config = config.copy_and_resolve_references()
    merged_config.model.lora.rank = 0
    plain_cfg = ModelConfig.from_config(merged_config.model)
    stack = model.decoder
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    decoder = params["decoder"]
    adapters = decoder.pop("lora")
    for target in cfg.lora.targets:
        a_name, b_name = _factor_names(target)
        decoder[target] = merged_kernel(decoder[target], adapters[a_name], adapters[b_name],
                                        stack.lora.scale)
    plain = nnx.eval_shape(lambda: VideoGPT(plain_cfg, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(plain, nnx.Param, ...)
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state, rest), merged_config


def adapter_params(model) -> dict:
    """The adapters and condition parameters alone (pure dict): what a LoRA run adds."""
    return nnx.to_pure_dict(nnx.state(model, TRAINABLE))


def trainable_labels(abstract_model, params: dict) -> dict:
    """The `optax.multi_transform` labels of a params pure dict: "train" for `TRAINABLE`
    leaves, "frozen" for the rest."""
    paths = {path for path, _ in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(abstract_model, TRAINABLE)))[0]}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if path in paths else "frozen", params)
