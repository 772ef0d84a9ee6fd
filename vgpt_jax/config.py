"""Configs as data: ml_collections presets, validated once into frozen dataclasses.

`get_model_config(name)` returns a `ConfigDict` (what `configs/*.py` files and command-line
overrides edit); `ModelConfig.from_config(cfg)` checks it once and gives the hashable, typed
view that the model and jitted functions use as a static argument.
"""
from __future__ import annotations

import dataclasses
import ml_collections

MODEL_PRESETS = ("tiny", "small", "phi3_mini")
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "dot_product", "splash")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")


def _rope_scaling_none() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        type="none",  # "none" | "longrope"
        long_factor=(),
        short_factor=(),
        original_max_position_embeddings=4096,
        max_position_embeddings=4096,
        attention_factor=-1.0,  # < 0: derive it as transformers does
        # The official code calls rotary_emb(seq_len=5000), so a LongRoPE checkpoint uses the long
        # factors at every length ("always_long"); "by_length" is stock transformers (long only
        # when the sequence is longer than original_max_position_embeddings).
        factor_rule="always_long",
    ))


def get_model_config(name: str = "tiny") -> ml_collections.ConfigDict:
    """Model presets. `phi3_mini` is the published backbone (3.66B without the unused vocab)."""
    base = dict(
        num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, mlp_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=_rope_scaling_none(),
        latent_channels=4, patch_size=2,
        # The SD3-style 2-D sin-cos table of the reference: a 192x192 grid with coordinates i/3.
        pos_embed_grid=192, pos_embed_base_size=64, pos_embed_interpolation_scale=1.0,
        time_freq_dim=256, init_std=0.02, final_layer_eps=1e-6,
        max_seq_len=40960,
        dtype="float32", param_dtype="float32",
        attention=ml_collections.ConfigDict(dict(
            impl="auto", block_q=512, block_kv=512, dense_max_tokens=4096)),
        scan_layers=True, remat_policy="none",
    )
    sizes = {
        "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, mlp_dim=128),
        "small": dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, mlp_dim=1024),
        "phi3_mini": dict(num_layers=32, hidden_size=3072, num_heads=32, num_kv_heads=32,
                          mlp_dim=8192),
    }
    if name not in sizes:
        raise ValueError(f"unknown model preset {name!r}; choose one of {MODEL_PRESETS}")
    base.update(sizes[name])
    return ml_collections.ConfigDict(base)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    impl: str = "auto"
    block_q: int = 512
    block_kv: int = 512
    dense_max_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    type: str = "none"
    long_factor: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 4096
    max_position_embeddings: int = 4096
    attention_factor: float = -1.0
    factor_rule: str = "always_long"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Validated, hashable model config (a static argument of jitted functions)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    latent_channels: int = 4
    patch_size: int = 2
    pos_embed_grid: int = 192
    pos_embed_base_size: int = 64
    pos_embed_interpolation_scale: float = 1.0
    time_freq_dim: int = 256
    init_std: float = 0.02
    final_layer_eps: float = 1e-6
    max_seq_len: int = 40960
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: AttentionConfig = AttentionConfig()
    scan_layers: bool = True
    remat_policy: str = "none"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, cfg) -> "ModelConfig":
        """Check a model ConfigDict (or dict) once; errors name the offending field."""
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {unknown}")
        rope = d.get("rope_scaling") or {}
        rope = RopeScaling(**{**rope, "long_factor": tuple(rope.get("long_factor", ())),
                              "short_factor": tuple(rope.get("short_factor", ()))})
        attention = AttentionConfig(**(d.get("attention") or {}))
        mc = cls(**{**d, "rope_scaling": rope, "attention": attention})
        mc.validate()
        return mc

    def validate(self) -> None:
        def need(ok, field, msg):
            if not ok:
                raise ValueError(f"model config: {field}={getattr(self, field, None)!r}: {msg}")
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "mlp_dim",
                  "latent_channels", "patch_size", "max_seq_len"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
                 "must be a positive integer")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", "must divide by num_heads")
        need(self.head_dim % 2 == 0, "num_heads", "head_dim must be even for RoPE")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads")
        need(self.time_freq_dim % 2 == 0, "time_freq_dim", "must be even")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy",
             f"must be one of {REMAT_POLICIES}")
        need(self.attention.impl in ATTENTION_IMPLS, "attention",
             f"impl must be one of {ATTENTION_IMPLS}")
        need(self.attention.block_q > 0 and self.attention.block_kv > 0, "attention",
             "block sizes must be positive")
        rs = self.rope_scaling
        need(rs.type in ("none", "longrope"), "rope_scaling", "type must be 'none' or 'longrope'")
        if rs.type == "longrope":
            half = self.head_dim // 2
            need(len(rs.long_factor) == half and len(rs.short_factor) == half, "rope_scaling",
                 f"long_factor and short_factor need head_dim/2 = {half} entries")
            need(rs.factor_rule in ("always_long", "by_length"), "rope_scaling",
                 "factor_rule must be 'always_long' or 'by_length'")

    def num_params(self) -> int:
        """Analytic parameter count (the model has no vocabulary: 3 marker embeddings only)."""
        d, m, hd = self.hidden_size, self.mlp_dim, self.head_dim
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * hd
        layer = qkv + self.num_heads * hd * d + d * 2 * m + m * d + 2 * d
        patch_in = self.patch_size**2 * self.latent_channels
        embed = 2 * (patch_in * d + d)
        time = 2 * (self.time_freq_dim * d + d + d * d + d)
        final = d * 2 * d + 2 * d + d * patch_in + patch_in
        return self.num_layers * layer + d + embed + time + final + 3 * d

    def matmul_flops_per_token(self, attended_tokens: float) -> float:
        """Forward FLOPs per token of the decoder matmuls plus attention over `attended_tokens`."""
        d, hd = self.hidden_size, self.head_dim
        dense = 2 * (d * (self.num_heads + 2 * self.num_kv_heads) * hd
                     + self.num_heads * hd * d + 3 * d * self.mlp_dim)
        attn = 4 * self.num_heads * hd * attended_tokens
        return self.num_layers * (dense + attn)


def dtype_of(name: str):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def num_image_tokens(cfg: ModelConfig, latent_h: int, latent_w: int) -> int:
    p = cfg.patch_size
    return (latent_h // p) * (latent_w // p)


def block_len_for(cfg: ModelConfig, latent_h: int, latent_w: int) -> int:
    """Tokens per frame block: the image tokens plus two markers (`[<diff>, t, img]` or `[<img>, img, </img>]`)."""
    return num_image_tokens(cfg, latent_h, latent_w) + 2
