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
            impl="auto", block_q=512, block_kv=512, blockwise_tile=256,
            dense_max_tokens=1024)),
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
    block_q: int = 512            # splash (TPU) tile sizes, tokens
    block_kv: int = 512
    # blockwise tile, tokens, rounded to whole frame blocks: 4 blocks of 66 tokens beat 2 and 8
    # at 16 and 48 frames on CPU (fwd + bwd, benchmarks/train_step.py shapes).
    blockwise_tile: int = 256
    # "auto" below this many tokens uses dense attention: at 288 tokens dense and blockwise
    # tie, at 2112 blockwise is ~8x faster (it skips ~2/3 of the tiles).
    dense_max_tokens: int = 1024


@dataclasses.dataclass(frozen=True)
class ConditionConfig:
    """Condition tokens (`vgpt_jax.conditioning`); none by default, which is the pretrained
    model. Each kind adds a zero-initialised path, so a model given no conditions (or every
    condition dropped) computes exactly what the model without them computes."""
    num_classes: int = 0     # > 0: one class token per video, a global condition
    action_dim: int = 0      # > 0: one action token per frame, a per-frame condition
    dropout: float = 0.1     # training: probability of dropping a video's conditions (guidance)

    @property
    def enabled(self) -> bool:
        return self.num_classes > 0 or self.action_dim > 0


LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the decoder's stacked linears (`vgpt_jax.lora`); rank 0: none.
    The update is (alpha / rank) A B (alpha / sqrt(rank) with `rslora`), as peft scales it."""
    rank: int = 0
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = LORA_TARGETS


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
    conditions: ConditionConfig = ConditionConfig()
    lora: LoraConfig = LoraConfig()

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
        nested = {}
        for name, kind in (("conditions", ConditionConfig), ("lora", LoraConfig)):
            fields = dict(d.get(name) or {})
            unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(kind)})
            if unknown:
                raise ValueError(f"model config: unknown field(s) {unknown} in model.{name}")
            if "targets" in fields:
                fields["targets"] = tuple(fields["targets"])
            nested[name] = kind(**fields)
        mc = cls(**{**d, "rope_scaling": rope, "attention": attention, **nested})
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
        need(self.attention.block_q > 0 and self.attention.block_kv > 0
             and self.attention.blockwise_tile > 0, "attention", "block sizes must be positive")
        cond, lora = self.conditions, self.lora
        need(all(isinstance(v, int) and v >= 0 for v in (cond.num_classes, cond.action_dim)),
             "conditions", "num_classes and action_dim must be integers >= 0")
        need(0.0 <= cond.dropout <= 1.0, "conditions", "dropout must lie in [0, 1]")
        need(isinstance(lora.rank, int) and lora.rank >= 0, "lora", "rank must be an integer >= 0")
        need(lora.alpha > 0, "lora", "alpha must be > 0")
        need(bool(lora.targets) and set(lora.targets) <= set(LORA_TARGETS), "lora",
             f"targets must be a non-empty subset of {LORA_TARGETS}")
        rs = self.rope_scaling
        need(rs.type in ("none", "longrope"), "rope_scaling", "type must be 'none' or 'longrope'")
        if rs.type == "longrope":
            half = self.head_dim // 2
            need(len(rs.long_factor) == half and len(rs.short_factor) == half, "rope_scaling",
                 f"long_factor and short_factor need head_dim/2 = {half} entries")
            need(rs.factor_rule in ("always_long", "by_length"), "rope_scaling",
                 "factor_rule must be 'always_long' or 'by_length'")

    def check_latent_shape(self, h: int, w: int, c: int, what: str = "latents") -> None:
        """A ValueError naming `what` when [h, w, c] latent frames do not fit this model."""
        if c != self.latent_channels:
            raise ValueError(f"{what}: {c}-channel latents, but the model config has "
                             f"latent_channels={self.latent_channels}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"{what}: latent size {h}x{w} is not a multiple of patch_size="
                             f"{self.patch_size}")

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


# ---------------------------------------------------------------------------------------------
# Full training runs: `get_train_config()` is the skeleton every `configs/*.py` file edits.

MESH_AXES = ("data", "fsdp", "context", "tensor")
LR_SCHEDULES = ("constant_with_warmup", "cosine", "linear")
CLIP_MODES = ("random", "one_frame", "single", "first_frame")

# Logical axis -> mesh axes. Parameters: matrices are split over `fsdp` on their model dimension
# and over `tensor` on their head/mlp dimension (ZeRO-3 style + Megatron style); the stacked
# `layers` axis stays whole (each scan step needs its full layer). Activations: the batch over
# `data` and `fsdp`, the token sequence over `context`. A logical name missing here is replicated.
DEFAULT_LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("sequence", "context"),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("mlp_in", "tensor"),
    ("time_freq", "tensor"),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("markers", None),
)


def get_train_config(model: str = "tiny") -> ml_collections.ConfigDict:
    """Every knob of a training run, with the recipe's defaults (the paper and the official scripts)."""
    cfg = ml_collections.ConfigDict()
    cfg.model = get_model_config(model)
    cfg.objective = ml_collections.ConfigDict(dict(
        timestep_sampling="uniform", logit_normal_mean=0.0, logit_normal_std=1.0,
        context_noise_beta=0.9, context_noise_gamma_max=0.1,
        prediction_type="x1"))  # "v": the velocity x1 - eps (exports record it for sampling)
    cfg.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip_norm=1.0,
        # The official scripts use constant_with_warmup (320k warmup steps).
        schedule="constant_with_warmup", warmup_steps=0,
        decay_steps=0,          # cosine/linear: steps of decay after warmup; 0 = to train.steps
        end_lr_ratio=0.0,       # cosine/linear: final lr as a fraction of learning_rate
        grad_accum_steps=1))
    cfg.mesh = ml_collections.ConfigDict(dict(
        # Sizes per mesh axis inside a slice (ICI) and across slices (DCN); one entry of each may
        # be -1 to take the remaining devices. num_slices > 1 builds a hybrid (multi-slice) mesh.
        ici=ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1)),
        dcn=ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1)),
        num_slices=1,
        rules=[list(r) for r in DEFAULT_LOGICAL_RULES],
        # Fail start-up when more than this fraction of parameter elements is fully replicated
        # on a multi-device mesh (maxtext's assert_params_sufficiently_sharded).
        unsharded_tolerance=0.05))
    cfg.data = ml_collections.ConfigDict(dict(
        store="",                # path of a latent store (`vgpt_jax.data.store.LatentStore`)
        num_frames=16,
        stride_min=4, stride_max=4,  # stride_max > stride_min: random stride per sample (stage 3/4)
        clip_mode="one_frame",   # random | one_frame | single | first_frame (layout.sample_clip_ids)
        global_batch_size=8,
        seed=0,
        shuffle=True,
        worker_count=0,          # grain mp_prefetch worker processes (0: in the main process)
        worker_buffer_size=2,
        read_threads=2,
        prefetch_buffer_size=4,
        # The store's latent normalisation ({"shift": [C], "scale": [C]}; None: raw latents),
        # recorded from the store's manifest at start-up so every checkpoint and export carries
        # it (vgpt_jax.vae.latent_space.LatentNormalization).
        latent_normalization=ml_collections.config_dict.placeholder(dict),
        # (h, w) of the training latents, recorded at start-up: sampling commands default to the
        # resolution the model was trained at.
        latent_size=ml_collections.config_dict.placeholder(tuple)))
    cfg.checkpoint = ml_collections.ConfigDict(dict(
        save_interval_steps=1000, max_to_keep=3, async_save=True, save_on_preemption=True,
        init_from=""))           # previous stage's workdir or model export: params only
    cfg.train = ml_collections.ConfigDict(dict(
        steps=1000, seed=0, log_every=10,
        # Peak FLOP/s of one device for MFU; 0 measures a matmul once at start-up.
        peak_flops_per_device=0.0,
        progress_bar=True, tensorboard=True))
    cfg.distributed = ml_collections.ConfigDict(dict(
        # "auto": initialize when the environment names a coordinator (JAX_COORDINATOR_ADDRESS,
        # or a cluster JAX detects itself such as SLURM / TPU pods); "always" / "never".
        initialize="auto", coordinator_address="", num_processes=-1, process_id=-1,
        initialization_timeout=300, heartbeat_timeout=100, shutdown_timeout=300))
    return cfg


def validate_train_config(cfg) -> None:
    """Check a run config once, before anything is compiled; errors name the field and value."""
    def need(ok, field, msg):
        if not ok:
            value = cfg
            for part in field.split("."):
                value = value.get(part) if hasattr(value, "get") else None
            value = value.to_dict() if hasattr(value, "to_dict") else value
            raise ValueError(f"config: {field}={value!r}: {msg}")
    for section in ("model", "objective", "optim", "mesh", "data", "checkpoint", "train"):
        if section not in cfg:
            raise ValueError(f"config: missing section {section!r}")
    ModelConfig.from_config(cfg.model)
    o, d, t, m, c = cfg.optim, cfg.data, cfg.train, cfg.mesh, cfg.checkpoint
    need(o.learning_rate > 0, "optim.learning_rate", "must be positive")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", "betas must lie in [0, 1)")
    need(o.schedule in LR_SCHEDULES, "optim.schedule", f"must be one of {LR_SCHEDULES}")
    need(o.warmup_steps >= 0 and o.decay_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(isinstance(o.grad_accum_steps, int) and o.grad_accum_steps >= 1,
         "optim.grad_accum_steps", "must be a positive integer")
    need(d.num_frames >= 1, "data.num_frames", "must be >= 1")
    need(1 <= d.stride_min <= d.stride_max, "data.stride_min",
         f"need 1 <= stride_min <= stride_max (stride_max={d.stride_max})")
    need(d.clip_mode in CLIP_MODES, "data.clip_mode", f"must be one of {CLIP_MODES}")
    need(d.global_batch_size >= 1, "data.global_batch_size", "must be >= 1")
    need(d.global_batch_size % o.grad_accum_steps == 0, "data.global_batch_size",
         f"must divide by optim.grad_accum_steps={o.grad_accum_steps}")
    need(t.steps >= 1, "train.steps", "must be >= 1")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(c.save_interval_steps >= 1, "checkpoint.save_interval_steps", "must be >= 1")
    need(c.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1")
    for level in ("ici", "dcn"):
        sizes = m[level]
        need(set(sizes.keys()) == set(MESH_AXES), f"mesh.{level}", f"needs exactly the axes {MESH_AXES}")
        vals = [sizes[a] for a in MESH_AXES]
        need(all(v == -1 or (isinstance(v, int) and v >= 1) for v in vals), f"mesh.{level}",
             "sizes must be positive integers or -1")
        need(vals.count(-1) <= 1, f"mesh.{level}", "at most one axis may be -1")
    need(m.num_slices >= 1, "mesh.num_slices", "must be >= 1")
    for rule in m.rules:
        need(len(rule) == 2, "mesh.rules", f"each rule is [logical_name, mesh_axes], got {rule!r}")
        from vgpt_jax.sharding import mesh_axes  # the one normaliser (sharding imports this module)
        axes = mesh_axes(rule[1])
        need(all(a in MESH_AXES for a in axes), "mesh.rules",
             f"rule {rule!r} names an unknown mesh axis (axes: {MESH_AXES})")
