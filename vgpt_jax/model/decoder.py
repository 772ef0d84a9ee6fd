"""The Phi-3 decoder stack, used as a plain transformer (no vocabulary, no LM head).

Per layer: pre-RMSNorm -> fused QKV (no bias) -> RoPE -> masked attention -> o_proj -> residual;
pre-RMSNorm -> fused gate_up -> SwiGLU -> down -> residual. A final RMSNorm closes the stack.

Parameters are stored stacked over layers (a leading `layers` axis): the same tree serves a
`lax.scan` over layers (`scan_layers=True`, one compiled layer) and an unrolled Python loop, and
maps one-to-one onto Hugging Face `Phi3Model` weights. Each parameter carries logical axis names
(`logical_axes` metadata) that `vgpt_jax.sharding` maps to mesh axes.

Optional, both absent in the pretrained model: LoRA adapters on the linears (`vgpt_jax.lora`,
stacked like the kernels), and a condition stream (`vgpt_jax.conditioning`): condition tokens
run through the same layers beside the frame tokens, attending to each other, while frame
tokens add `gate * condition_attention` per head (gates [layers, heads], zero at init; with
`conditions.token_gate` each token's gate is `gate + y W_g`, y its normed layer input and W_g
[layers, hidden, heads] zero at init, so a condition can reach some tokens more than others). As
condition tokens see no frame token, the stream's keys and values can be computed alone, once,
for many calls (`DecoderStack.condition_kv`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vgpt_jax import attention, lora
from vgpt_jax.conditioning import ConditionKV, ConditionParam
from vgpt_jax.config import ModelConfig, dtype_of
from vgpt_jax.layout import ConditionLayout, TokenMeta
from vgpt_jax.model import rope
from vgpt_jax.sharding import constrain

class LayerKV(NamedTuple):
    """Keys and values (after RoPE) of every layer: [layers, B, S, KV, D] each."""
    k: jax.Array
    v: jax.Array


def _merge_leading_axes() -> bool:
    """Whether per-token ops run on 2-D [tokens, features] operands: on a single CPU device,
    where XLA:CPU computes the weight gradients of the batched forms slowly (see `project` and
    `rms_norm`). Elsewhere they keep their axes: on TPU, merging [B, T] is a relayout copy when
    T is not a multiple of 8, and over a mesh of CPU devices merging a batch axis and a
    sequence axis that are sharded differently makes GSPMD reshard."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def project(x_NI, w_IO):
    """`x @ w` over x's last axis, for x of any rank: [..., I] x [I, O] -> [..., O].

    On a single CPU device as one 2-D matmul over the flattened leading axes: XLA:CPU computes
    the weight gradient of the batched form (`btd,bte->de`) 1.65x slower than of the 2-D one,
    10% of the main job's train step.
    """
    if not _merge_leading_axes():
        return jnp.einsum("...i,io->...o", x_NI, w_IO)
    return _matmul(x_NI.reshape(-1, x_NI.shape[-1]), w_IO).reshape(*x_NI.shape[:-1],
                                                                   w_IO.shape[-1])


@jax.custom_vjp
def _matmul(x_NI, w_IO):
    """`x @ w` whose backward computes the weight gradient, then the input gradient. XLA:CPU
    runs the two independent dots at once, and the one that starts beside the other gets one
    core for its whole run: the MLP's input-gradient dot took 37 ms per layer at 48 frames.
    In sequence each gets both cores (18 ms; the 48-frame step 1381-1443 ms against
    1453-1508, interleaved). Unused gradients are still pruned (a frozen base under LoRA)."""
    return x_NI @ w_IO


def _matmul_fwd(x_NI, w_IO):
    return x_NI @ w_IO, (x_NI, w_IO)


def _matmul_bwd(res, g_NO):
    x_NI, w_IO = res
    dw_IO = x_NI.T @ g_NO
    g_NO, dw_IO = jax.lax.optimization_barrier((g_NO, dw_IO))
    return g_NO @ w_IO.T, dw_IO


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def rms_norm(x, weight, eps):
    """Phi-3 RMSNorm: normalise in float32, scale in the input dtype.

    On a single CPU device over the flattened leading axes: with a batch of one, XLA:CPU sums
    the weight's gradient over the middle axis of [1, T, D], 4x slower than over the first axis
    of [T, D] (the norms' gradients were 5% of a 48-frame train step)."""
    shape = x.shape
    if _merge_leading_axes():
        x = x.reshape(-1, shape[-1])
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(x.dtype) * xf.astype(x.dtype)).reshape(shape)


class DecoderStack(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n, d, m = cfg.num_layers, cfg.hidden_size, cfg.mlp_dim
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        pdt = dtype_of(cfg.param_dtype)
        normal = nnx.initializers.normal(cfg.init_std)
        param = lambda shape, axes, init=normal: nnx.Param(
            init(rngs.params(), shape, pdt), logical_axes=axes)
        ones = lambda k, s, dt: jnp.ones(s, dt)
        self.input_norm = param((n, d), ("layers", "norm"), ones)
        self.qkv_proj = param((n, d, qkv), ("layers", "embed", "qkv"))
        self.o_proj = param((n, cfg.num_heads * cfg.head_dim, d), ("layers", "heads", "embed"))
        self.post_attention_norm = param((n, d), ("layers", "norm"), ones)
        self.gate_up_proj = param((n, d, 2 * m), ("layers", "embed", "mlp"))
        self.down_proj = param((n, m, d), ("layers", "mlp", "embed"))
        self.final_norm = param((d,), ("norm",), ones)
        self.condition_gate = (ConditionParam(jnp.zeros((n, cfg.num_heads), pdt),
                                              logical_axes=("layers", "heads"))
                               if cfg.conditions.enabled else None)
        # Zero-initialised like the gates, so that the gate `condition_gate + y W_g` starts as
        # exactly the per-head gate (the pretrained model at a fine-tune's step 0).
        self.condition_gate_proj = (ConditionParam(jnp.zeros((n, d, cfg.num_heads), pdt),
                                                   logical_axes=("layers", "embed", "heads"))
                                    if cfg.conditions.enabled and cfg.conditions.token_gate
                                    else None)
        self.lora = (lora.StackedLoRA(cfg, {t: getattr(self, t) for t in cfg.lora.targets},
                                      rngs=rngs) if cfg.lora.rank else None)

    def _layer_params(self):
        params = dict(input_norm=self.input_norm[...], qkv_proj=self.qkv_proj[...],
                      o_proj=self.o_proj[...], post_attention_norm=self.post_attention_norm[...],
                      gate_up_proj=self.gate_up_proj[...], down_proj=self.down_proj[...])
        for name in ("condition_gate", "condition_gate_proj"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)[...]
        if self.lora is not None:
            params.update(self.lora.layer_params())
        return params

    def __call__(self, x_BTD, positions_BT, meta: TokenMeta, block_len: int, *,
                 cache: LayerKV | None = None, cache_meta: TokenMeta | None = None,
                 return_kv: bool = False, tap: Callable | None = None,
                 conditions: tuple[jax.Array, ConditionLayout] | ConditionKV | None = None):
        """Run the stack.

        x_BTD: input embeddings; positions_BT: RoPE positions; meta: token metadata [B, T].
        cache / cache_meta: keys and values of earlier tokens that the T tokens also attend to
        (the sampler's clean history), prepended to each layer's own keys and values.
        Returns hidden states [B, T, D] after the final norm, and with `return_kv` this call's
        own per-layer keys and values (to build a cache).
        tap: a function of the residual stream [B, T, D] after each layer (e.g. a pooling, so
        that no [layers, B, T, D] stack is ever held); with it, the call returns only its
        outputs, stacked over layers: [layers, ...].
        conditions: (condition token embeddings [B, C, D], their `ConditionLayout`): the
        condition stream runs beside the frame tokens; or the stream's `ConditionKV`
        (`condition_kv`): frame tokens attend to it, the stream is not run again; or None.
        x_BTD None (conditions: embeddings): the condition stream alone; returns its
        per-layer keys and values, a `LayerKV` (what `condition_kv` wraps).
        """
        cfg = self.cfg
        cdt = dtype_of(cfg.dtype)
        frames = x_BTD is not None
        if frames:
            cos, sin = rope.rope_tables(cfg, positions_BT)
            kv_meta = meta if cache is None else TokenMeta(
                *(jnp.concatenate([c, m], axis=1) for c, m in zip(cache_meta, meta)))
        stream = conditions is not None and not isinstance(conditions, ConditionKV)
        b = (x_BTD if frames else conditions[0]).shape[0]
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lora_scale = self.lora.scale if self.lora is not None else 0.0
        if stream:
            x_cond, cond_layout = conditions
            cos_c, sin_c = rope.rope_tables(cfg, cond_layout.position)
        elif conditions is not None:
            cond_layout = conditions.layout

        def layer(carry, per_layer_inputs):
            p, layer_cache, layer_condition_kv = per_layer_inputs
            p = jax.tree.map(lambda a: a.astype(cdt), p)
            x, xc = carry  # frame tokens, condition tokens (None: not run here)

            def linear(y, name):
                return lora.adapt(project(y, p[name]), y, p, name, lora_scale)

            def qkv_of(x, cos, sin):
                """(q, k, v) after RoPE, and the normed input y [B, n, D] they come from."""
                n = x.shape[1]
                y = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
                qkv = linear(y, "qkv_proj")
                q = qkv[..., : h * hd].reshape(b, n, h, hd)
                k = qkv[..., h * hd: (h + kvh) * hd].reshape(b, n, kvh, hd)
                v = qkv[..., (h + kvh) * hd:].reshape(b, n, kvh, hd)
                return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v, y

            def attention_out_and_mlp(x, o):
                x = x + linear(o.reshape(*x.shape[:2], h * hd), "o_proj")
                y = rms_norm(x, p["post_attention_norm"], cfg.rms_norm_eps)
                gate, up = jnp.split(linear(y, "gate_up_proj"), 2, axis=-1)
                return x + linear(up * jax.nn.silu(gate), "down_proj")

            if stream:  # condition tokens attend to condition tokens only
                qc, kc, vc, _ = qkv_of(xc, cos_c, sin_c)
                xc = attention_out_and_mlp(xc, attention.condition_attention(
                    qc, kc, vc, cond_layout, cond_layout, block_len))
            elif conditions is not None:
                kc, vc = layer_condition_kv
            if not frames:
                return (x, xc), LayerKV(kc, vc)
            q, k, v, y = qkv_of(x, cos, sin)
            k_all, v_all = k, v
            if layer_cache is not None:
                k_all = jnp.concatenate([layer_cache.k.astype(cdt), k], axis=1)
                v_all = jnp.concatenate([layer_cache.v.astype(cdt), v], axis=1)
            o = attention.attend(q, k_all, v_all, meta, kv_meta, block_len, cfg.attention)
            if conditions is not None:
                gate = p["condition_gate"][None, None, :, None]        # [1, 1, H, 1]
                if "condition_gate_proj" in p:  # per token: [B, T, H, 1]; the same y as QKV
                    gate = gate + project(y, p["condition_gate_proj"])[..., None]
                o = o + gate * attention.condition_attention(q, kc, vc, meta, cond_layout,
                                                             block_len)
            x = constrain(attention_out_and_mlp(x, o), ("batch", "sequence", "embed"))
            if tap is not None:
                return (x, xc), tap(x)
            return (x, xc), (LayerKV(k, v) if return_kv else None)

        if cfg.remat_policy != "none":  # a `config.REMAT_POLICIES` name
            layer = jax.checkpoint(layer, policy=None if cfg.remat_policy == "full" else
                                   getattr(jax.checkpoint_policies, cfg.remat_policy))
        params = self._layer_params()
        x = constrain(x_BTD.astype(cdt), ("batch", "sequence", "embed")) if frames else None
        carry = (x, x_cond.astype(cdt) if stream else None)
        inputs = (params, cache,
                  None if stream or conditions is None else (conditions.k, conditions.v))
        if cfg.scan_layers:
            carry, per_layer = jax.lax.scan(layer, carry, inputs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                carry, out_i = layer(carry, jax.tree.map(lambda a: a[i], inputs))
                outs.append(out_i)
            per_layer = (jax.tree.map(lambda *a: jnp.stack(a), *outs)
                         if return_kv or tap is not None or not frames else None)
        if tap is not None or not frames:
            return per_layer
        x = rms_norm(carry[0], self.final_norm[...].astype(cdt), cfg.rms_norm_eps)
        return (x, per_layer) if return_kv else x

    def condition_kv(self, conditions: tuple[jax.Array, ConditionLayout],
                     block_len: int) -> ConditionKV:
        """The condition stream alone (embeddings [B, C, D], their layout) -> its per-layer
        keys/values. Condition tokens attend only to condition tokens, so these are the ones
        the stream computes beside any frame tokens: given as `conditions` to `__call__`, the
        same outputs without running the stream again (the sampler's every Euler step)."""
        return ConditionKV(*self(None, None, None, block_len, conditions=conditions),
                           conditions[1])
