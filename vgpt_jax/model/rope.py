"""1-D rotary position embedding as Phi-3 uses it, with optional LongRoPE scaling.

Matches transformers' `Phi3RotaryEmbedding` (rotate-half convention, cos/sin of
`cat(freqs, freqs)`). With LongRoPE the inverse frequencies are divided per dimension by the
long or short factors and cos/sin are scaled by `attention_factor`, by default
`sqrt(1 + ln(max/orig) / ln(orig))`. Which factors apply is a config choice: the official
Video-GPT code always uses the long ones (`factor_rule="always_long"`), stock transformers picks
by sequence length (`"by_length"`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vgpt_jax.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, use_long: bool) -> np.ndarray:
    hd = cfg.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    base_pow = np.float32(cfg.rope_theta) ** exponents
    rs = cfg.rope_scaling
    if rs.type == "longrope":
        # transformers' float32 order of operations, 1 / (factor * base**x): dividing afterwards
        # differs by an ulp, which RoPE multiplies by the position (~3e-4 in cos at 5k positions).
        base_pow = np.asarray(rs.long_factor if use_long else rs.short_factor, np.float32) * base_pow
    return (np.float32(1.0) / base_pow).astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
    rs = cfg.rope_scaling
    if rs.type != "longrope":
        return 1.0
    if rs.attention_factor >= 0:
        return float(rs.attention_factor)
    scale = rs.max_position_embeddings / rs.original_max_position_embeddings
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scale) / math.log(rs.original_max_position_embeddings))


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] (float32) for integer positions [B, T]."""
    rs = cfg.rope_scaling
    pos = positions_BT.astype(jnp.float32)
    if rs.type == "longrope" and rs.factor_rule == "by_length":
        # transformers decides per call from the largest position in the batch.
        use_long = jnp.max(positions_BT) + 1 > rs.original_max_position_embeddings
        inv = jnp.where(use_long, inverse_frequencies(cfg, True), inverse_frequencies(cfg, False))
    else:
        inv = jnp.asarray(inverse_frequencies(cfg, True))
    freqs = pos[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = attention_factor(cfg)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x_BTHD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x_BTHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTHD[..., half:], x_BTHD[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x_BTHD.dtype), sin[:, :, None].astype(x_BTHD.dtype)
    return x_BTHD * cos + rotated * sin
