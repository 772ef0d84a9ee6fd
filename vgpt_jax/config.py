"""Configs as data: ml_collections presets, validated once into frozen dataclasses.

`get_model_config(name)` returns a `ConfigDict` (what `configs/*.py` files and command-line
overrides edit); `ModelConfig.from_config(cfg)` checks it once and gives the hashable, typed
view that the model and jitted functions use as a static argument. The dataclasses hold the
defaults: the presets and `get_train_config`'s sections are built from them, and
`OptimConfig` / `DataConfig` / `LoopConfig` / ... `.from_config(section)` are the typed views
the engine reads (each field cast to its type once). `checker` is the one way a config's
`validate` reports a bad field.
"""
from __future__ import annotations

import dataclasses
import typing

import ml_collections

ATTENTION_IMPLS = ("auto", "dense", "blockwise", "dot_product", "splash")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")


def field_value(config, field: str):
    """The value at dotted `field` of a ConfigDict, mapping or dataclass (None where a part is
    missing); a ConfigDict value comes back as a plain dict."""
    value = config
    for part in field.split("."):
        value = value.get(part) if hasattr(value, "get") else getattr(value, part, None)
    return value.to_dict() if hasattr(value, "to_dict") else value


def checker(what: str, config):
    """`need(ok, field, msg)` for a `validate`: unless `ok`, a ValueError
    "{what}: {field}={value!r}: {msg}" with the field's value in `config`."""
    def need(ok, field: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"{what}: {field}={field_value(config, field)!r}: {msg}")
    return need


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    impl: str = "auto"
    block_q: int = 512            # splash (TPU) tile sizes, tokens
    block_kv: int = 512
    # blockwise tile, tokens, rounded to whole frame blocks: 4 blocks of 66 tokens beat 2 and 8
    # at 16 and 48 frames on CPU (fwd + bwd, benchmarks/train_step.py shapes).
    blockwise_tile: int = 256
    # kv tiles (forward) or q tiles (backward) per step of the blockwise tile loops, joined into
    # one wider tile (a row's remainder goes one tile per step). At 48 frames, 4 heads, on 2 CPU
    # cores the forward took 76 ms with 2, 112 ms with 1 and 83 ms with 3 (best of 10
    # interleaved runs; forward + backward 226, 253 and 228 ms); the main job's step is the same
    # with 1 and 2 (266 ms best of 45 each).
    blockwise_tiles_per_step: int = 2
    # Blockwise attention on one CPU device runs its tiles on a native kernel
    # (`vgpt_jax.attention_cpu`: all cores on every tile; XLA:CPU runs the tile loops' small
    # dots on one). False, or where the kernel cannot run, the JAX tile loops.
    blockwise_cpu_kernel: bool = True
    # "auto" up to this many tokens uses dense attention: at 288 tokens dense and blockwise
    # tie; at 576 (the main job's 16 frames) blockwise is 1.2x faster per train step, at 2112
    # ~8x (it skips ~2/3 of the tiles).
    dense_max_tokens: int = 384


@dataclasses.dataclass(frozen=True)
class ConditionConfig:
    """Condition tokens (`vgpt_jax.conditioning`); none by default, which is the pretrained
    model. Each kind adds a zero-initialised path, so a model given no conditions (or every
    condition dropped) computes exactly what the model without them computes."""
    num_classes: int = 0     # > 0: one class token per video, a global condition
    action_dim: int = 0      # > 0: one action token per frame, a per-frame condition
    dropout: float = 0.1     # training: probability of dropping a video's conditions (guidance)
    text_dim: int = 0        # > 0: text embeddings of this width (a frozen encoder's), global
    text_tokens: int = 0     # with text_dim: text tokens per video (padded / truncated to this)
    # True: each frame token's per-head gate on the condition attention is `gate + y W_g`, y the
    # token's normed layer input (W_g zero-initialised), so how much of a condition a token
    # takes in can depend on where it is and what it shows (a push on one ball reaches that
    # ball's tokens); False: one gate per layer and head for every token.
    token_gate: bool = False
    # True: DiT's adaLN conditioning as well. Each condition token's embedding, through a small
    # MLP whose output layer starts at zero, is added to the time embedding that scales and
    # shifts the output head's features: a global condition's in every frame, an action's in
    # its own frame. The condition attention adds one vector to every token of a frame; a
    # scale per feature lets the condition select what each token shows (a kick moves the
    # kicked ball's tokens, not the others'). Off by default: at the recipes' CPU budgets it
    # helped neither class-to-video nor the kicked world (docs/conditioning.md).
    head_modulation: bool = False

    @property
    def enabled(self) -> bool:
        return self.num_classes > 0 or self.action_dim > 0 or self.text_dim > 0


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
    type: str = "none"                  # "none" | "longrope"
    long_factor: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 4096
    max_position_embeddings: int = 4096
    attention_factor: float = -1.0      # < 0: derive it as transformers does
    # The official code calls rotary_emb(seq_len=5000), so a LongRoPE checkpoint uses the long
    # factors at every length ("always_long"); "by_length" is stock transformers (long only
    # when the sequence is longer than original_max_position_embeddings).
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
    # The SD3-style 2-D sin-cos table of the reference: a 192x192 grid with coordinates i/3.
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
        need = checker("model config", self)
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
        att = self.attention
        need(min(att.block_q, att.block_kv, att.blockwise_tile, att.blockwise_tiles_per_step) > 0,
             "attention", "block sizes and tiles per step must be positive")
        cond, lora = self.conditions, self.lora
        need(all(isinstance(v, int) and v >= 0 for v in (cond.num_classes, cond.action_dim,
                                                           cond.text_dim, cond.text_tokens)),
             "conditions", "num_classes, action_dim, text_dim and text_tokens must be integers >= 0")
        need((cond.text_dim > 0) == (cond.text_tokens > 0), "conditions",
             "text_dim and text_tokens are given together")
        need(0.0 <= cond.dropout <= 1.0, "conditions", "dropout must lie in [0, 1]")
        need(isinstance(cond.token_gate, bool), "conditions", "token_gate must be a bool")
        need(isinstance(cond.head_modulation, bool), "conditions", "head_modulation must be a bool")
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


# The model presets' sizes; every other field takes `ModelConfig`'s default.
MODEL_SIZES = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, mlp_dim=128),
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, mlp_dim=1024),
    "phi3_mini": dict(num_layers=32, hidden_size=3072, num_heads=32, num_kv_heads=32,
                      mlp_dim=8192),
}
MODEL_PRESETS = tuple(MODEL_SIZES)
# Sections of `ModelConfig` a preset leaves out (added by configs that use them).
_OPTIONAL_MODEL_SECTIONS = ("conditions", "lora")


def get_model_config(name: str = "tiny") -> ml_collections.ConfigDict:
    """Model presets: a preset's sizes and `ModelConfig`'s defaults for the rest (without the
    optional `conditions` and `lora` sections). `phi3_mini` is the published backbone (3.66B
    without the unused vocab)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model preset {name!r}; choose one of {MODEL_PRESETS}")
    defaults = {f.name: _plain(f.default) for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING and f.name not in _OPTIONAL_MODEL_SECTIONS}
    return ml_collections.ConfigDict({**MODEL_SIZES[name], **defaults})


def _plain(value):
    """A dataclass default as ConfigDict data: nested dataclasses become dicts."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


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


def cast_to_fields(cls, given: dict, types=(int, float, bool)) -> dict:
    """`given` (field name -> value) with each value of a `cls` dataclass field whose type is
    one of `types` cast to it, the rest as given (field types resolved, not their strings)."""
    hints = typing.get_type_hints(cls)
    return {k: hints[k](v) if hints.get(k) in types else v for k, v in given.items()}


class _Section:
    """A typed view of one flat section of a run config (a frozen dataclass of ints, floats,
    bools and strs). Its defaults are the section's: `get_train_config` builds the section from
    `defaults()`."""

    @classmethod
    def from_config(cls, section):
        """The view of a ConfigDict section or mapping (an instance passes through): each field
        cast to its type once, a missing field at its default. Keys the view does not name are
        other readers' (e.g. `optim.trainable`, read by `finetune`) and are left to them."""
        if isinstance(section, cls):
            return section
        given = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**cast_to_fields(cls, {k: v for k, v in given.items() if k in names}))

    @classmethod
    def defaults(cls) -> dict:
        return dataclasses.asdict(cls())


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    """`optim`: AdamW, clipping, the learning-rate schedule (`vgpt_jax.optim`)."""
    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    # The official scripts use constant_with_warmup (320k warmup steps).
    schedule: str = "constant_with_warmup"
    warmup_steps: int = 0
    decay_steps: int = 0          # cosine/linear: steps of decay after warmup; 0 = to train.steps
    end_lr_ratio: float = 0.0     # cosine/linear: final lr as a fraction of learning_rate
    grad_accum_steps: int = 1
    # > 0: keep an average of the params, `ema <- d ema + (1 - d) params` after every step, for
    # sampling and export (`optim.param_ema`). The recipe keeps none (`--use_ema` unset).
    ema_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """`data`: the latent store and how the input pipeline reads it
    (`vgpt_jax.data.input_pipeline`). The section also records, at start-up, the store's
    `latent_normalization` and the `latent_size` the model trains at (not part of this view)."""
    store: str = ""               # path of a latent store (`vgpt_jax.data.store.LatentStore`)
    num_frames: int = 16
    stride_min: int = 4           # stride_max > stride_min: random stride per sample (stage 3/4)
    stride_max: int = 4
    clip_mode: str = "one_frame"  # random | one_frame | single | first_frame (see
    #                               layout.sample_clip_ids)
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    worker_count: int = 0         # grain mp_prefetch worker processes (0: in the main process)
    worker_buffer_size: int = 2
    read_threads: int = 2
    prefetch_buffer_size: int = 4


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
    """`checkpoint`: saving and the initialisation of a new run."""
    save_interval_steps: int = 1000
    max_to_keep: int = 3
    async_save: bool = True
    save_on_preemption: bool = True
    init_from: str = ""           # previous stage's workdir or model export: params only


@dataclasses.dataclass(frozen=True)
class LoopConfig(_Section):
    """`train`: the training loop."""
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    # Peak FLOP/s of one device for MFU; 0 measures a matmul once at start-up.
    peak_flops_per_device: float = 0.0
    progress_bar: bool = True
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedConfig(_Section):
    """`distributed`: "auto" initializes `jax.distributed` when the environment names a
    coordinator (JAX_COORDINATOR_ADDRESS, or a cluster JAX detects itself such as SLURM / TPU
    pods); "always" / "never"."""
    initialize: str = "auto"
    coordinator_address: str = ""
    num_processes: int = -1
    process_id: int = -1
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100
    shutdown_timeout: int = 300


def get_train_config(model: str = "tiny") -> ml_collections.ConfigDict:
    """Every knob of a training run, with the recipe's defaults (the paper and the official
    scripts): each section from its dataclass above (the objective from
    `diffusion.ObjectiveConfig`)."""
    from vgpt_jax.diffusion import ObjectiveConfig  # diffusion imports this module
    section = lambda d: ml_collections.ConfigDict(d)
    cfg = ml_collections.ConfigDict()
    cfg.model = get_model_config(model)
    cfg.objective = section(dataclasses.asdict(ObjectiveConfig()))
    cfg.optim = section(OptimConfig.defaults())
    cfg.mesh = section(dict(
        # Sizes per mesh axis inside a slice (ICI) and across slices (DCN); one entry of each may
        # be -1 to take the remaining devices. num_slices > 1 builds a hybrid (multi-slice) mesh.
        ici=section(dict(data=1, fsdp=-1, context=1, tensor=1)),
        dcn=section(dict(data=-1, fsdp=1, context=1, tensor=1)),
        num_slices=1,
        rules=[list(r) for r in DEFAULT_LOGICAL_RULES],
        # Fail start-up when more than this fraction of parameter elements is fully replicated
        # on a multi-device mesh (maxtext's assert_params_sufficiently_sharded).
        unsharded_tolerance=0.05))
    cfg.data = section(dict(
        DataConfig.defaults(),
        # The store's latent normalisation ({"shift": [C], "scale": [C]}; None: raw latents),
        # recorded from the store's manifest at start-up so every checkpoint and export carries
        # it (vgpt_jax.vae.latent_space.LatentNormalization).
        latent_normalization=ml_collections.config_dict.placeholder(dict),
        # (h, w) of the training latents, recorded at start-up: sampling commands default to the
        # resolution the model was trained at.
        latent_size=ml_collections.config_dict.placeholder(tuple)))
    cfg.checkpoint = section(CheckpointConfig.defaults())
    cfg.train = section(LoopConfig.defaults())
    cfg.distributed = section(DistributedConfig.defaults())
    return cfg


def validate_train_config(cfg) -> None:
    """Check a run config once, before anything is compiled; errors name the field and value."""
    need = checker("config", cfg)
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
    need(0 <= OptimConfig.from_config(o).ema_decay < 1, "optim.ema_decay", "must lie in [0, 1)")
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
