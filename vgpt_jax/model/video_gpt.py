"""Video-GPT: clip embedders and marker/time tokens around the Phi-3 stack, a DiT output head.

Inputs are frame blocks (see `vgpt_jax.layout`): latents [B, NB, h, w, C] with a noise level
per block and a `Layout`. Noisy blocks are embedded by `noisy_embed` (zero-initialised, as in
the reference), clean blocks by `clean_embed` (xavier-uniform); both add the fixed 2-D sin-cos
table. A noisy block becomes `[<|diffusion|>, time_token(t), image tokens]`, a clean one
`[<img>, image tokens, </img>]`. The head (`FinalLayer`: non-affine LayerNorm, adaLN from a
second time embedder, both zero-initialised) decodes the noisy image tokens to the x1
prediction, unpatchified in (p, q, c) order.

Every entry point takes optional `conditions` (`conditioning.Conditions`, for a model whose
config has `conditions`): embedded by `condition_embed` and run by the decoder as a condition
stream. They are not in the KV cache: each call covers the conditions of every frame it sees
(history and new frames), a few tokens. Condition tokens see only condition tokens, so calls
with the same conditions (a clip's denoising steps) can share the stream's keys and values:
`condition_kv`, given as `conditions` to any entry point, runs it once.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vgpt_jax import layout as layout_lib
from vgpt_jax.conditioning import ConditionEmbed, ConditionKV, Conditions, block_modulation
from vgpt_jax.config import ModelConfig, dtype_of
from vgpt_jax.model.decoder import DecoderStack, LayerKV, project


class KVCache(NamedTuple):
    """The clean history as the decoder sees it: per-layer keys/values and their token metadata."""
    kv: LayerKV                     # k, v: [layers, B, S, KV, D]
    meta: layout_lib.TokenMeta      # [B, S]


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_2d(cfg: ModelConfig, grid_h: int, grid_w: int) -> np.ndarray:
    """The reference's fixed table, center-cropped to a grid_h x grid_w patch grid: [gh*gw, D].

    A `pos_embed_grid`^2 grid with coordinates i / (grid / base_size) / interpolation_scale; the
    first half of the channels encodes the width coordinate (as the official table does).
    """
    g = cfg.pos_embed_grid
    if grid_h > g or grid_w > g:
        raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds the position table's {g}x{g}")
    coords = np.arange(g, dtype=np.float64) / (g / cfg.pos_embed_base_size)
    coords = coords / cfg.pos_embed_interpolation_scale
    top, left = (g - grid_h) // 2, (g - grid_w) // 2
    hh, ww = np.meshgrid(coords[top:top + grid_h], coords[left:left + grid_w], indexing="ij")
    d = cfg.hidden_size
    table = np.concatenate([sincos_1d(d // 2, ww), sincos_1d(d // 2, hh)], axis=1)
    return table.astype(np.float32)


def timestep_features(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal features of t in [0, 1] (not scaled by 1000), `[cos, sin]` order: [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _param(rngs, init, shape, axes, dtype):
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class Dense(nnx.Module):
    """y = x @ kernel + bias, with logical axis names on both."""

    def __init__(self, din, dout, axes, init, *, rngs, dtype):
        self.kernel = _param(rngs, init, (din, dout), axes, dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, (dout,), axes[1:], dtype)

    def __call__(self, x):
        return project(x, self.kernel[...].astype(x.dtype)) + self.bias[...].astype(x.dtype)


class TimestepEmbedder(nnx.Module):
    """sinusoidal(256) -> Linear -> SiLU -> Linear, weights N(0, 0.02)."""

    def __init__(self, cfg: ModelConfig, *, rngs):
        d, pdt = cfg.hidden_size, dtype_of(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.init_std)
        self.freq_dim = cfg.time_freq_dim
        self.fc1 = Dense(cfg.time_freq_dim, d, ("time_freq", "embed"), init, rngs=rngs, dtype=pdt)
        self.fc2 = Dense(d, d, ("mlp_in", "embed"), init, rngs=rngs, dtype=pdt)

    def __call__(self, t, dtype):
        return self.fc2(jax.nn.silu(self.fc1(timestep_features(t, self.freq_dim).astype(dtype))))


class PatchEmbed(nnx.Module):
    """The reference's Conv2d(C -> D, kernel p, stride p) as patchify + matmul; kernel rows (p, q, c)."""

    def __init__(self, cfg: ModelConfig, init, *, rngs):
        p, c, d = cfg.patch_size, cfg.latent_channels, cfg.hidden_size
        self.patch = p
        self.proj = Dense(p * p * c, d, ("patch", "embed"), init, rngs=rngs,
                          dtype=dtype_of(cfg.param_dtype))

    def __call__(self, latents_BNhwc):
        b, n, h, w, c = latents_BNhwc.shape
        p = self.patch
        x = latents_BNhwc.reshape(b, n, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return self.proj(x.reshape(b, n, (h // p) * (w // p), p * p * c))


class FinalLayer(nnx.Module):
    """DiT head: LayerNorm (no affine) -> x*(1+scale)+shift from adaLN(SiLU(t_emb)) -> Linear."""

    def __init__(self, cfg: ModelConfig, *, rngs):
        d, pdt = cfg.hidden_size, dtype_of(cfg.param_dtype)
        zeros = nnx.initializers.zeros
        out = cfg.patch_size**2 * cfg.latent_channels
        self.eps = cfg.final_layer_eps
        self.adaln = Dense(d, 2 * d, ("embed", "mlp"), zeros, rngs=rngs, dtype=pdt)
        self.linear = Dense(d, out, ("embed", "patch"), zeros, rngs=rngs, dtype=pdt)

    def __call__(self, x_BNPD, t_emb_BND):
        shift, scale = jnp.split(self.adaln(jax.nn.silu(t_emb_BND)), 2, axis=-1)
        xf = x_BNPD.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = ((xf - mean) ** 2).mean(-1, keepdims=True)
        x = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).astype(x_BNPD.dtype)
        x = x * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.linear(x)


class VideoGPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        self.noisy_embed = PatchEmbed(cfg, nnx.initializers.zeros, rngs=rngs)
        self.clean_embed = PatchEmbed(cfg, nnx.initializers.xavier_uniform(), rngs=rngs)
        # Rows: <|diffusion|>, <img>, </img> (rows of the LLM embedding table in the reference).
        self.markers = _param(rngs, nnx.initializers.normal(cfg.init_std),
                              (3, cfg.hidden_size), ("markers", "embed"), pdt)
        self.time_token = TimestepEmbedder(cfg, rngs=rngs)
        self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
        self.decoder = DecoderStack(cfg, rngs=rngs)
        self.final_layer = FinalLayer(cfg, rngs=rngs)
        self.condition_embed = (ConditionEmbed(cfg, rngs=rngs) if cfg.conditions.enabled
                                else None)

    # ------------------------------------------------------------------ pieces

    def check_inputs(self, latents_BNhwc, t_BN, layout: layout_lib.Layout) -> None:
        """Shape checks at trace time; each error names the offending input."""
        cfg = self.cfg
        if latents_BNhwc.ndim != 5:
            raise ValueError(f"latents: expected [batch, blocks, h, w, channels], got shape "
                             f"{latents_BNhwc.shape}")
        b, n, h, w, c = latents_BNhwc.shape
        cfg.check_latent_shape(h, w, c)
        if layout.frame.shape != (b, n) or t_BN.shape != (b, n):
            raise ValueError(f"layout {layout.frame.shape} and t {t_BN.shape} must both be "
                             f"[batch, blocks] = {(b, n)}")
        expected_len = (h // cfg.patch_size) * (w // cfg.patch_size) + 2
        if layout.block_len != expected_len:
            raise ValueError(f"layout.block_len={layout.block_len}, but {h}x{w} latents give "
                             f"{expected_len} tokens per frame block")
        if layout.num_tokens > cfg.max_seq_len:
            raise ValueError(f"sequence of {layout.num_tokens} tokens exceeds max_seq_len="
                             f"{cfg.max_seq_len}")

    def embed(self, latents_BNhwc, t_BN, layout: layout_lib.Layout):
        """Token embeddings [B, NB * L, D]."""
        cfg = self.cfg
        cdt = dtype_of(cfg.dtype)
        x = latents_BNhwc.astype(cdt)
        b, n, h, w, _ = x.shape
        pos = jnp.asarray(pos_embed_2d(cfg, h // cfg.patch_size, w // cfg.patch_size), cdt)
        img_noisy = self.noisy_embed(x) + pos
        img_clean = self.clean_embed(x) + pos
        mk = self.markers[...].astype(cdt)
        d = cfg.hidden_size
        bcast = lambda v: jnp.broadcast_to(v, (b, n, 1, d))
        time_tok = self.time_token(t_BN, cdt)[:, :, None]
        noisy = jnp.concatenate([bcast(mk[0]), time_tok, img_noisy], axis=2)
        clean = jnp.concatenate([bcast(mk[1]), img_clean, bcast(mk[2])], axis=2)
        tokens = jnp.where(layout.noisy[:, :, None, None], noisy, clean)
        return tokens.reshape(b, n * layout.block_len, d)

    def condition_tokens(self, conditions: Conditions | ConditionKV | None):
        """(embeddings [B, C, D], layout) for the decoder, or None without conditions; a
        `ConditionKV` (`condition_kv`) as it is."""
        if conditions is None or isinstance(conditions, ConditionKV):
            return conditions
        if self.condition_embed is None:
            raise ValueError("conditions given, but the model config has no conditions "
                             "(model.conditions)")
        return self.condition_embed(conditions, dtype_of(self.cfg.dtype)), conditions.layout

    def condition_kv(self, conditions: Conditions, block_len: int) -> ConditionKV:
        """The condition stream's per-layer keys/values for blocks of `block_len` tokens
        (`DecoderStack.condition_kv`) and the head embeddings: given as `conditions` to any
        entry point instead of `conditions` themselves, the same outputs with no condition
        stream run."""
        tokens = self.condition_tokens(conditions)
        modulation = self._condition_head(tokens)
        kv = self.decoder.condition_kv(tokens, block_len)
        return kv if modulation is None else kv._replace(head=modulation[0])

    def _condition_head(self, tokens):
        """(head embeddings [B, C, D], their layout) of condition_tokens' output, or None."""
        if tokens is None or not self.cfg.conditions.head_modulation:
            return None
        if isinstance(tokens, ConditionKV):
            if tokens.head is None:
                raise ValueError("this ConditionKV has no head embeddings (conditions."
                                 "head_modulation): make it with this model's condition_kv")
            return tokens.head, tokens.layout
        return self.condition_embed.head(tokens[0]), tokens[1]

    def head(self, hidden_BTD, t_BN, layout, latent_hw, blocks=None, conditions=None):
        """Decode noisy image tokens to x1 predictions [B, NB', h, w, C] for `blocks` (static);
        `conditions` (condition_tokens' output) modulate it with `head_modulation`."""
        cfg = self.cfg
        b = hidden_BTD.shape[0]
        L, p, c = layout.block_len, cfg.patch_size, cfg.latent_channels
        hidden = hidden_BTD.reshape(b, -1, L, cfg.hidden_size)
        frame_BN = layout.frame
        if blocks is not None:
            hidden, t_BN, frame_BN = hidden[:, blocks], t_BN[:, blocks], frame_BN[:, blocks]
        t_emb = self.t_embedder(t_BN, hidden.dtype)
        modulation = self._condition_head(conditions)
        if modulation is not None:
            head_BCD, condition_layout = modulation
            t_emb = t_emb + block_modulation(head_BCD.astype(t_emb.dtype), condition_layout,
                                             frame_BN)
        out = self.final_layer(hidden[:, :, layout_lib.NOISY_IMAGE_START:], t_emb)
        h, w = latent_hw
        n = out.shape[1]
        out = out.reshape(b, n, h // p, w // p, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return out.reshape(b, n, h, w, c).astype(jnp.float32)

    # ------------------------------------------------------------------ entry points

    def __call__(self, latents_BNhwc, t_BN, layout: layout_lib.Layout, *, output_blocks=None,
                 conditions: Conditions | ConditionKV | None = None):
        """Full forward over a sequence of blocks; returns x1 predictions [B, NB', h, w, C].

        `output_blocks` (a static index array or slice) selects which blocks to decode, e.g.
        the noisy ones; all blocks by default (outputs at clean blocks are meaningless).
        """
        self.check_inputs(latents_BNhwc, t_BN, layout)
        x = self.embed(latents_BNhwc, t_BN, layout)
        tokens = self.condition_tokens(conditions)
        hidden = self.decoder(x, layout_lib.token_positions(layout), layout_lib.token_meta(layout),
                              layout.block_len, conditions=tokens)
        return self.head(hidden, t_BN, layout, latents_BNhwc.shape[2:4], output_blocks, tokens)

    def build_cache(self, clean_latents_BNhwc, layout: layout_lib.Layout,
                    conditions: Conditions | None = None) -> KVCache:
        """Keys/values of a clean history: computed once, reused at every denoising step."""
        t = jnp.ones(layout.frame.shape, jnp.float32)  # unused by clean blocks
        self.check_inputs(clean_latents_BNhwc, t, layout)
        x = self.embed(clean_latents_BNhwc, t, layout)
        meta = layout_lib.token_meta(layout)
        _, kv = self.decoder(x, layout_lib.token_positions(layout), meta, layout.block_len,
                             return_kv=True, conditions=self.condition_tokens(conditions))
        return KVCache(kv, meta)

    def extend_cache(self, clean_latents_BNhwc, layout: layout_lib.Layout,
                     cache: KVCache, conditions: Conditions | None = None) -> KVCache:
        """Append clean frames to a cache: they attend to the cached history (frame-causal), and
        their keys/values join it. Equal to `build_cache` over the history and the new frames."""
        t = jnp.ones(layout.frame.shape, jnp.float32)  # unused by clean blocks
        self.check_inputs(clean_latents_BNhwc, t, layout)
        x = self.embed(clean_latents_BNhwc, t, layout)
        meta = layout_lib.token_meta(layout)
        _, kv = self.decoder(x, layout_lib.token_positions(layout), meta, layout.block_len,
                             cache=cache.kv, cache_meta=cache.meta, return_kv=True,
                             conditions=self.condition_tokens(conditions))
        return KVCache(LayerKV(*(jnp.concatenate([c, n], axis=2) for c, n in zip(cache.kv, kv))),
                       layout_lib.TokenMeta(*(jnp.concatenate([c, m], axis=1)
                                              for c, m in zip(cache.meta, meta))))

    def denoise_with_cache(self, noisy_latents_BNhwc, t_BN, layout: layout_lib.Layout,
                           cache: KVCache, conditions: Conditions | ConditionKV | None = None):
        """x1 prediction for noisy blocks that attend to a cached history: [B, NB, h, w, C]."""
        self.check_inputs(noisy_latents_BNhwc, t_BN, layout)
        x = self.embed(noisy_latents_BNhwc, t_BN, layout)
        tokens = self.condition_tokens(conditions)
        hidden = self.decoder(x, layout_lib.token_positions(layout), layout_lib.token_meta(layout),
                              layout.block_len, cache=cache.kv, cache_meta=cache.meta,
                              conditions=tokens)
        return self.head(hidden, t_BN, layout, noisy_latents_BNhwc.shape[2:4], conditions=tokens)
