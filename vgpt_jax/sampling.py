"""Next-clip sampling: Euler steps on the flow, history guidance, an exact KV cache, long videos.

One clip at a time (the reference's `prompt_condition_frame_block_autoregressive_inference`):
- **Euler on the flow** from noise (t = 0) to data (t = 1): sigma = linspace(0, 1, S + 1), with
  the reference's optional time shift sigma / (sigma + s - s * sigma). The model sees
  t = sigma_i and predicts x1 (`prediction_type="x1"`, then v = (x1_hat - z) / (1 - sigma_i))
  or the velocity v = x1 - eps directly (`"v"`, as the official script samples `model.pt`
  weights); z += (sigma_{i+1} - sigma_i) v.
- **History guidance** v = v_u + s (v_c - v_u): the unconditional branch is the noisy clip
  alone, positions from 0. Both branches run as one [2B] batch, interleaved (rows 2b and
  2b + 1 are video b's conditional and unconditional branch, so a batch-sharded mesh keeps
  both on the device that holds the video): the unconditional rows share the cache with their
  cache tokens marked invalid, so the one mask rule hides the history from them.
  s = 1, or an empty history (where both branches are the same function), runs one branch.
- **Condition guidance** (a model with `model.conditions`): a branch with every condition
  dropped (`Branch(conditions=False)`), whose history is encoded without conditions too (the
  cache holds one row per condition setting). With both guidances the three branches
  v0 = v(c, h), v_h = v(c, no history), v_c = v(no conditions, h) combine as
      v = v0 + (s_h - 1) (v0 - v_h) + (s_c - 1) (v0 - v_c),
  each scale pushing away from the branch that lacks its one input; with one guidance this is
  v_u + s (v0 - v_u) (the form computed), and s = 1 drops that branch.
- **Conditions** are given per video (`class_id`) and per frame (`actions`, context frames then
  generated ones); each call embeds those of every frame it covers, numbered as the call's
  frames are (the no-history branch's clip from frame 0). Condition tokens see only each
  other, so their keys and values are computed once per clip (`VideoGPT.condition_kv`) and
  serve all its Euler steps, in every cache mode.
- **Exact KV cache.** Clean history never attends to noisy tokens, so its keys and values are
  the same at every step: they are computed once (`VideoGPT.build_cache`), every step runs only
  the noisy clip against them (`denoise_with_cache`), and a finished clip's clean copy is
  appended (`extend_cache`). The release recomputes the whole sequence at every step
  (`cache_mode="recompute"` here, kept as the baseline); both compute the same function.
- **Long videos.** "window" (the reference): when history plus the new clip exceed `window`
  frames, keep the newest `window - n` frames with positions restarting at 0 and rebuild the
  cache. "rolling" (beyond the reference): drop the oldest frames after `anchor_frames` sink
  frames from the cache and re-index the rest by rotating their keys (`shift_positions`),
  with no rebuild; kept frames then still carry what they saw of dropped frames. Each cache
  mode is one `_History` policy: the clip loop makes room, denoises, reports, appends.

Invariant: cache slot s holds clean frame s at RoPE frame slot s; the noisy clip follows at
slots H..H+n-1 (H = frames in the history). All layouts come from `layout.clip_layout`.

On a mesh (`Placement`): parameters are sharded by the training rules, the batch of videos
over the `batch` axes (padded to a multiple of them with copies of the last video, dropped from
the output), the KV cache and the activations along the sequence over `context`. Every draw is
made on the host per video, so a video's output does not depend on the mesh or its batch-mates
(up to float summation order).

Noise: fresh per clip and per video (`seeds[b]`, folded with the clip index), so a batch
equals its videos sampled one by one; `same_noise_every_clip` reproduces the release, which
re-seeds identically for every clip; callers may pass every draw (`initial_noise`,
`context_eps`) to reproduce another implementation's run draw for draw. Context noise
(1 - c) x + c eps is applied by default to each generated clip once, when it joins the
history (so from the second clip on, as in the release). The release instead re-noises the
whole context window with fresh draws before every clip after the first, the stored history
staying clean (`renoise_context`); the history then changes every clip, which a cache cannot
hold, so that option runs on the recompute path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from vgpt_jax import conditioning
from vgpt_jax import layout as layout_lib
from vgpt_jax import sharding as shard_lib
from vgpt_jax.config import (DEFAULT_LOGICAL_RULES, ModelConfig, block_len_for, checker,
                             dtype_of)
from vgpt_jax.model import VideoGPT
from vgpt_jax.model.decoder import LayerKV
from vgpt_jax.model.rope import apply_rope, inverse_frequencies
from vgpt_jax.model.video_gpt import KVCache

CACHE_MODES = ("window", "rolling", "recompute")
PREDICTION_TYPES = ("x1", "v")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Defaults are the release's (50 steps, s = 1.5, 80-frame window, no context noise)."""
    steps: int = 50
    guidance: float = 1.5
    time_shift: float = 1.0
    window: int = 80
    cache_mode: str = "window"       # "window" | "rolling" | "recompute" (no cache, the release)
    anchor_frames: int = 0           # rolling mode: sink frames kept at the start of the cache
    context_noise: float = 0.0       # c in (1 - c) x + c eps for generated clips joining history
    same_noise_every_clip: bool = False  # the release's re-seeding quirk
    prediction_type: str = "x1"      # what the network predicts: "x1" or the velocity "v"
    renoise_context: bool = False    # the release: re-noise the whole window before clips k >= 1
    condition_guidance: float = 1.0  # s_c: guidance by the model's conditions (1: none)

    def validate(self) -> None:
        need = checker("sampler", self)
        need(isinstance(self.steps, (int, np.integer)) and self.steps >= 1, "steps",
             "must be an integer >= 1")
        need(math.isfinite(self.guidance) and self.guidance >= 0, "guidance",
             "the guidance scale must be finite and >= 0")
        need(math.isfinite(self.condition_guidance) and self.condition_guidance >= 0,
             "condition_guidance", "the guidance scale must be finite and >= 0")
        need(math.isfinite(self.time_shift) and self.time_shift > 0, "time_shift", "must be > 0")
        need(isinstance(self.window, (int, np.integer)) and self.window >= 1, "window",
             "must be an integer >= 1 (frames)")
        need(self.cache_mode in CACHE_MODES, "cache_mode", f"must be one of {CACHE_MODES}")
        need(isinstance(self.anchor_frames, (int, np.integer)) and self.anchor_frames >= 0,
             "anchor_frames", "must be an integer >= 0")
        need(self.anchor_frames == 0 or self.cache_mode == "rolling", "anchor_frames",
             "anchor (sink) frames need cache_mode='rolling'")
        need(0.0 <= self.context_noise <= 1.0, "context_noise", "must lie in [0, 1]")
        need(self.prediction_type in PREDICTION_TYPES, "prediction_type",
             f"must be one of {PREDICTION_TYPES}")
        need(not self.renoise_context or self.cache_mode == "recompute", "renoise_context",
             "re-noising the whole context before every clip changes the history each clip, "
             "which a KV cache cannot hold: use cache_mode='recompute'")


def time_grid(steps: int, time_shift: float = 1.0) -> np.ndarray:
    """sigma_0..sigma_S [S + 1] float32: linspace(0, 1) under the release's time shift."""
    t = np.linspace(0.0, 1.0, steps + 1)
    return (t / (t + time_shift - time_shift * t)).astype(np.float32)


def check_request(model_cfg: ModelConfig, cfg: SamplerConfig, clip_sizes: Sequence[int],
                  context_shape: tuple[int, ...] | None, latent_hw: tuple[int, int],
                  seeds: Sequence[int], batch: int) -> None:
    """Host-side checks of a sampling request; each ValueError names the value (no compile)."""
    cfg.validate()
    if not len(clip_sizes) or any(not isinstance(n, (int, np.integer)) or n < 1
                                  for n in clip_sizes):
        raise ValueError(f"clip_sizes={list(clip_sizes)!r}: need one or more clips of >= 1 frame")
    room = cfg.window - cfg.anchor_frames
    if max(clip_sizes) > room:
        raise ValueError(f"clip_sizes={list(clip_sizes)!r}: a clip of {max(clip_sizes)} frames "
                         f"does not fit the window of {cfg.window} frames"
                         + (f" after {cfg.anchor_frames} anchor frames" if cfg.anchor_frames
                            else ""))
    if cfg.anchor_frames and cfg.anchor_frames > cfg.window - max(clip_sizes):
        raise ValueError(f"sampler: anchor_frames={cfg.anchor_frames} leaves no room for the "
                         f"clips {list(clip_sizes)} in the window of {cfg.window} frames")
    rs = model_cfg.rope_scaling
    if cfg.cache_mode == "rolling" and rs.type == "longrope" and rs.factor_rule == "by_length":
        raise ValueError("sampler: cache_mode='rolling' re-indexes cached keys, which needs "
                         "rope_scaling.factor_rule='always_long' (got 'by_length')")
    h, w = latent_hw
    p = model_cfg.patch_size
    if h % p or w % p or h < p or w < p:
        raise ValueError(f"latent size {h}x{w} is not a positive multiple of the model's "
                         f"patch_size={p}")
    if max(h, w) // p > model_cfg.pos_embed_grid:
        raise ValueError(f"latent size {h}x{w} gives a {h // p}x{w // p} patch grid, larger than "
                         f"the position table's {model_cfg.pos_embed_grid}")
    tokens = cfg.window * block_len_for(model_cfg, h, w)
    if tokens > model_cfg.max_seq_len:
        raise ValueError(f"sampler: window={cfg.window} frames of {h}x{w} latents is {tokens} "
                         f"tokens, more than the model's max_seq_len={model_cfg.max_seq_len}")
    if context_shape is not None:
        if len(context_shape) != 5:
            raise ValueError(f"context latents: expected [batch, frames, h, w, channels], got "
                             f"shape {context_shape}")
        if context_shape[-1] != model_cfg.latent_channels:
            raise ValueError(f"context latents: {context_shape[-1]} channels, but the model has "
                             f"latent_channels={model_cfg.latent_channels}")
        if context_shape[1] > cfg.window:
            raise ValueError(f"context of {context_shape[1]} frames is longer than the window "
                             f"of {cfg.window} frames")
    if len(seeds) != batch:
        raise ValueError(f"seeds: {len(seeds)} seeds for a batch of {batch} videos")
    if any(not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds={list(seeds)!r}: must be integers >= 0")


# ----------------------------------------------------------------------------- placement

KV_AXES = ("layers", "batch", "sequence", "heads", None)   # LayerKV k / v [layers, B, S, KV, D]
META_AXES = ("batch", "sequence")                          # TokenMeta fields [B, S]
BATCH_AXES = ("batch",)                                    # videos [B, ...]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh (axes `sharding.MESH_AXES`) of this process's devices and the logical-axis rules
    that place sampling on it: the training rules, so parameters are split over `fsdp` and
    `tensor` as in training, videos over the `batch` axes (data x fsdp by default), the KV
    cache and the activations along the sequence over `context` and KV heads over `tensor`.
    A mesh axis that does not divide its dimension leaves that dimension whole. Hashable: the
    compiled kernels take it as a static argument (one program per placement)."""
    mesh: Mesh
    rules: tuple

    @classmethod
    def of(cls, mesh: "Placement | Mesh | dict", rules=None, devices=None) -> "Placement":
        """`mesh`: a `Mesh` or axis sizes ({"data": 2, "fsdp": 4}, missing axes 1) over the
        first devices of `devices` (default: this process's). `rules`: [(logical, mesh axes)]
        (default: `config.DEFAULT_LOGICAL_RULES`). A Placement is returned as it is."""
        if isinstance(mesh, Placement):
            return mesh
        if not isinstance(mesh, Mesh):
            mesh = shard_lib.mesh_of_sizes(dict(mesh), devices)
        if tuple(mesh.axis_names) != shard_lib.MESH_AXES:
            raise ValueError(f"mesh axes {mesh.axis_names}: sampling needs the training mesh's "
                             f"{shard_lib.MESH_AXES} (sharding.make_mesh / mesh_of_sizes)")
        foreign = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
        if foreign:
            raise ValueError(f"mesh spans devices of other processes ({foreign[:2]}...): "
                             "sampling runs on a mesh of this process's devices, each process of "
                             "a multi-host run sampling its own videos")
        rules = DEFAULT_LOGICAL_RULES if rules is None else rules
        return cls(mesh, shard_lib.canonical_rules(rules))

    @property
    def batch_multiple(self) -> int:
        """Videos per sampling batch come in multiples of this (the `batch` axes' size)."""
        return shard_lib.batch_shards(self.mesh, self.rules)

    def sharding(self, names, shape) -> NamedSharding:
        spec = shard_lib.logical_to_spec(tuple(names) + (None,) * (len(shape) - len(names)),
                                         self.rules)
        return NamedSharding(self.mesh, shard_lib.fit_spec(spec, shape, self.mesh))

    def put(self, x, names):
        """A host or device array onto the mesh, split by logical axis `names`."""
        return jax.device_put(x, self.sharding(names, np.shape(x)))

    def constrain(self, x, names):
        """Inside a compiled kernel: keep `x` laid out as `put` would."""
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

    def put_cache(self, cache: KVCache, inside_jit: bool = False) -> KVCache:
        place = self.constrain if inside_jit else self.put
        return KVCache(LayerKV(*(place(a, KV_AXES) for a in cache.kv)),
                       layout_lib.TokenMeta(*(place(m, META_AXES) for m in cache.meta)))

    def param_shardings(self, params_state) -> dict:
        """NamedShardings of an `nnx.State` of parameters (abstract or not), as a pure dict:
        what `checkpoint.restore_params` restores straight into."""
        return shard_lib.param_shardings(params_state, self.mesh, self.rules)

    def place_model(self, model: VideoGPT) -> VideoGPT:
        """The model with its parameters on the mesh (a no-op for parameters already there)."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params.replace_by_pure_dict(jax.device_put(params.to_pure_dict(),
                                                   self.param_shardings(params)))
        rest = jax.device_put(rest, shard_lib.replicated(self.mesh))
        return nnx.merge(graphdef, params, rest)

    def activations(self):
        """The context in which the model's `constrain` annotations apply on this mesh."""
        return shard_lib.activation_sharding(self.mesh, self.rules)


def _on(placement: Placement | None):
    return contextlib.nullcontext() if placement is None else placement.activations()


def _pad_batch(x_B: np.ndarray, rows: int) -> np.ndarray:
    """[B, ...] -> [rows, ...]: copies of the last video fill a mesh's batch shards (each
    video is computed independently, so the copies change no other row)."""
    return x_B if len(x_B) == rows else np.concatenate(
        [x_B, np.repeat(x_B[-1:], rows - len(x_B), axis=0)])


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Branch:
    """One guidance branch: does it see the model's conditions, does it see the history."""
    conditions: bool = True
    history: bool = True


UNGUIDED = (Branch(),)
HISTORY_GUIDED = (Branch(), Branch(history=False))


def guidance_branches(history_guided: bool, condition_guided: bool) -> tuple[Branch, ...]:
    """The branches in row order: the full one, then no history, then no conditions."""
    return (Branch(),) + ((Branch(history=False),) if history_guided else ()) + (
        (Branch(conditions=False),) if condition_guided else ())


def _branches(guided) -> tuple[Branch, ...]:
    """`guided`: a tuple of branches, or a bool (True: history guidance alone)."""
    if isinstance(guided, tuple):
        return guided
    return HISTORY_GUIDED if guided else UNGUIDED


def cache_variants(branches: tuple[Branch, ...]) -> tuple[Branch, ...]:
    """The cache's rows per video: one per condition setting that some branch needs."""
    return tuple(Branch(conditions=c) for c in dict.fromkeys(b.conditions for b in branches))


def _interleave(*per_branch):
    """R arrays [B, ...] -> [B * R, ...] with row b * R + r = per_branch[r][b]."""
    return jnp.stack(per_branch, axis=1).reshape(-1, *per_branch[0].shape[1:])


def _stack(*layouts: layout_lib.Layout) -> layout_lib.Layout:
    """Layouts of the same blocks, one per branch, as one [B * R] batch."""
    return jax.tree.map(_interleave, *layouts)


def history_layout(batch: int, frames: int, L: int, guided) -> layout_lib.Layout:
    """The clean history at slots 0..H-1, per branch; a no-history branch's, nothing can see."""
    return _stack(*(layout_lib.clip_layout(batch, frames, L, noisy=False, clip=0,
                                           valid=br.history) for br in _branches(guided)))


def noisy_layout(batch: int, frames: int, history: int, L: int, guided):
    """The noisy clip after the history, per branch; a no-history branch's alone, from slot 0."""
    return _stack(*(layout_lib.clip_layout(
        batch, frames, L, noisy=True, clip=1, first_frame=history if br.history else 0,
        first_position=history if br.history else 0) for br in _branches(guided)))


def window_conditions(model_cfg: ModelConfig, L: int, rows: tuple[Branch, ...], window: int,
                      new: int, class_id_B=None, actions_BWA=None, text=None):
    """The conditions of a call covering `window` frames, the last `new` of them new, for every
    row of each video ([B * R], row b * R + r as `rows[r]` says), or None when none are given.
    A history row numbers the window's frames 0..W-1; a no-history row numbers the new frames
    0..new-1 (as `noisy_layout`), the rest invalid; a no-conditions row has all its condition
    tokens invalid. `actions_BWA`: the window's actions, one per frame. `text`:
    (embeddings [B, N, E], mask [B, N]) or None."""
    if class_id_B is None and actions_BWA is None and text is None:
        return None
    b = next(len(x) for x in (class_id_B, actions_BWA, text and text[0]) if x is not None)
    per_row = []
    for row in rows:
        if row.history:
            frames, seen, acts = np.arange(window), np.ones(window, bool), actions_BWA
        else:
            frames = np.concatenate([np.arange(new), np.zeros(window - new, np.int64)])
            seen = np.arange(window) < new
            acts = None if actions_BWA is None else np.concatenate(
                [actions_BWA[:, window - new:], actions_BWA[:, :window - new]], axis=1)
        frames_BW = np.broadcast_to(frames, (b, window))
        cond = conditioning.make_conditions(model_cfg, frames_BW, frames_BW, L,
                                            class_id=class_id_B, actions=acts,
                                            **dict(zip(("text", "text_mask"), text or ())))
        n_global = cond.layout.num_tokens - (window if actions_BWA is not None else 0)
        valid = np.concatenate([np.ones(n_global, bool),
                                seen if actions_BWA is not None else np.zeros(0, bool)])
        per_row.append(cond.replace(layout=cond.layout.replace(
            valid=cond.layout.valid & jnp.asarray(valid & row.conditions)[None])))
    return jax.tree.map(_interleave, *per_row)


def _block_len(model: VideoGPT, latents_BNhwc) -> int:
    return block_len_for(model.cfg, *latents_BNhwc.shape[2:4])


# ----------------------------------------------------------------------------- the Euler loop


def euler(denoiser: Callable, z0_BNhwc, sigmas, guidance, guided,
          prediction_type: str = "x1"):
    """Integrate z from sigma_0 to sigma_S; `denoiser(z, t)` is the network's output (x1 or v,
    by `prediction_type`) for [B * R] rows, R = len(branches) (`guided`: branches or a bool;
    row b * R + r is video b's branch r). `guidance`: the scale of each branch after the first
    ([R - 1], or a scalar for one), combined as the module docstring says."""
    b, nb = z0_BNhwc.shape[0], len(_branches(guided))
    scales = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (max(nb - 1, 1),))

    def step(i, z):
        s, s_next = sigmas[i], sigmas[i + 1]
        zz = jnp.repeat(z, nb, axis=0) if nb > 1 else z
        out = denoiser(zz, jnp.full(zz.shape[:2], s))
        v = out if prediction_type == "v" else (out - zz) / (1 - s)
        if nb == 2:
            v = v.reshape(b, 2, *v.shape[1:])
            v = v[:, 1] + scales[0] * (v[:, 0] - v[:, 1])
        elif nb > 2:
            v = v.reshape(b, nb, *v.shape[1:])
            v = v[:, 0] + sum((scales[r - 1] - 1) * (v[:, 0] - v[:, r]) for r in range(1, nb))
        return z + (s_next - s) * v

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, z0_BNhwc)


def guided_cache(cache: KVCache, L: int, guided=True) -> KVCache:
    """The [B * R] cache of the branches from one of [B * V] rows (`cache_variants`): each
    branch shares its condition setting's keys/values, a no-history branch's tokens invalid."""
    branches = _branches(guided)
    variants = [v.conditions for v in cache_variants(branches)]
    rows, s = cache.meta.frame.shape
    b = rows // len(variants)
    idx = np.asarray([i * len(variants) + variants.index(br.conditions)
                      for i in range(b) for br in branches])
    sees = jnp.asarray(np.tile([br.history for br in branches], b))[:, None]
    meta = jax.tree.map(lambda m: jnp.take(m, idx, axis=0), cache.meta)
    meta = meta._replace(valid=meta.valid & sees)
    return KVCache(LayerKV(*(jnp.take(a, idx, axis=1) for a in cache.kv)), meta)


def cached_x1_fn(model: VideoGPT, cache: KVCache, num_frames: int, L: int, guided,
                 conditions=None):
    """The denoiser of every step with a cache: the noisy clip's tokens against the history.
    `conditions`: the [B * R] rows' (`window_conditions`, or their `VideoGPT.condition_kv`),
    or None."""
    branches = _branches(guided)
    b = cache.meta.frame.shape[0] // len(cache_variants(branches))
    s = cache.meta.frame.shape[1]
    if branches != UNGUIDED:
        cache = guided_cache(cache, L, branches)
    layout = noisy_layout(b, num_frames, s // L, L, branches)
    return lambda z, t: model.denoise_with_cache(z, t, layout, cache, conditions)


def recompute_x1_fn(model: VideoGPT, history_BHhwc, num_frames: int, L: int, guided,
                    conditions=None):
    """The release's denoiser: the whole [history, noisy clip] sequence at every step."""
    branches = _branches(guided)
    b, hist = history_BHhwc.shape[:2]
    layout = layout_lib.concat(history_layout(b, hist, L, branches),
                               noisy_layout(b, num_frames, hist, L, branches))
    nb = len(branches)
    history = jnp.repeat(history_BHhwc, nb, axis=0) if nb > 1 else history_BHhwc
    t_history = jnp.ones(history.shape[:2], jnp.float32)  # unused by clean blocks

    def x1(z, t):
        blocks = jnp.concatenate([history.astype(z.dtype), z], axis=1)
        return model(blocks, jnp.concatenate([t_history, t], axis=1), layout,
                     output_blocks=slice(hist, None), conditions=conditions)
    return x1


# ----------------------------------------------------------------------------- compiled kernels
# Pure functions of (graphdef, state, arrays); one compiled program per shape and placement.
# With a placement the model's activation constraints apply inside, and caches come out laid
# out as the placement's (`Placement.put_cache`).


def _cache_out(cache: KVCache, placement: Placement | None) -> KVCache:
    return cache if placement is None else placement.put_cache(cache, inside_jit=True)


@functools.partial(jax.jit, static_argnums=0, static_argnames="placement")
def _build_cache(graphdef, state, clean_BHhwc, placement=None, conditions=None) -> KVCache:
    model = nnx.merge(graphdef, state)
    b, hist = clean_BHhwc.shape[:2]
    L = _block_len(model, clean_BHhwc)
    with _on(placement):
        cache = model.build_cache(clean_BHhwc,
                                  layout_lib.clip_layout(b, hist, L, noisy=False, clip=0),
                                  conditions)
    return _cache_out(cache, placement)


@functools.partial(jax.jit, static_argnums=0, static_argnames="placement")
def _extend_cache(graphdef, state, cache: KVCache, clean_BNhwc, placement=None,
                  conditions=None) -> KVCache:
    model = nnx.merge(graphdef, state)
    b, n = clean_BNhwc.shape[:2]
    L = _block_len(model, clean_BNhwc)
    hist = cache.meta.frame.shape[1] // L
    layout = layout_lib.clip_layout(b, n, L, noisy=False, clip=0, first_frame=hist,
                                    first_position=hist)
    with _on(placement):
        cache = model.extend_cache(clean_BNhwc, layout, cache, conditions)
    return _cache_out(cache, placement)


def _denoise(x1_fn_of, graphdef, state, context, z0_BNhwc, sigmas, guided, guidance,
             prediction_type="x1", placement=None, conditions=None):
    """One clip's Euler integration with the denoiser `x1_fn_of(model, context, ...)` builds."""
    model = nnx.merge(graphdef, state)
    L = _block_len(model, z0_BNhwc)
    with _on(placement):
        if conditions is not None:  # the same at every step: the stream runs once per clip
            conditions = model.condition_kv(conditions, L)
        x1_fn = x1_fn_of(model, context, z0_BNhwc.shape[1], L, guided, conditions)
        return euler(x1_fn, z0_BNhwc, sigmas, guidance, guided, prediction_type)


_denoise_jit = functools.partial(jax.jit, static_argnums=(0, 5, 7), static_argnames="placement")
# (graphdef, state, context, z0, sigmas, guided, guidance, prediction_type, placement=,
# conditions=): `context` is the history's KV cache, or for the release's recompute the clean
# history latents [B, H, h, w, C] themselves.
_denoise_cached = _denoise_jit(functools.partial(_denoise, cached_x1_fn))
_denoise_recompute = _denoise_jit(functools.partial(_denoise, recompute_x1_fn))


def shift_positions(x_BTHD, delta: int, model_cfg: ModelConfig):
    """Move keys that already carry RoPE by `delta` positions (the rolling cache's re-indexing).

    RoPE rotations compose, R(p + delta) = R(delta) R(p), so rotating a cached key gives the key
    RoPE would produce at p + delta. The rotation is unscaled (a LongRoPE attention factor is
    already in the key) and uses the long factors: exact for the "always_long" rule only, which
    `check_request` enforces for rolling caches.
    """
    inv = inverse_frequencies(model_cfg, True).astype(np.float64)
    angle = np.concatenate([delta * inv, delta * inv]).astype(np.float32)
    return apply_rope(x_BTHD, jnp.asarray(np.cos(angle))[None, None],
                      jnp.asarray(np.sin(angle))[None, None])


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4), static_argnames="placement")
def _evict(cache: KVCache, num_evict: int, anchors: int, L: int, model_cfg: ModelConfig,
           placement: Placement | None = None):
    """Drop frames anchors..anchors+num_evict-1 and move the later ones down to close the gap."""
    a, e = anchors * L, (anchors + num_evict) * L

    def drop(x, axis, rotate=False):
        tail = jax.lax.slice_in_dim(x, e, x.shape[axis], axis=axis)
        if rotate:  # [layers, B, S, KV, D]: fold layers into the batch for RoPE
            shape = tail.shape
            tail = shift_positions(tail.reshape(-1, *shape[2:]), -num_evict * L,
                                   model_cfg).reshape(shape)
        return jnp.concatenate([jax.lax.slice_in_dim(x, 0, a, axis=axis), tail], axis=axis)

    b, s = cache.meta.frame.shape
    meta = layout_lib.token_meta(layout_lib.clip_layout(b, s // L - num_evict, L, noisy=False,
                                                        clip=0))
    return _cache_out(KVCache(LayerKV(drop(cache.kv.k, 2, rotate=True), drop(cache.kv.v, 2)),
                              meta), placement)


def initial_noise(seeds: Sequence[int], shape, clip_index: int,
                  same_noise_every_clip: bool = False) -> np.ndarray:
    """Each video's starting noise [B, *shape] from its own seed: a batch equals its videos
    one by one. Drawn on the host (numpy): no compile per clip shape."""
    clip = 0 if same_noise_every_clip else clip_index
    return np.stack([np.random.default_rng([s, 0, clip]).standard_normal(shape, np.float32)
                     for s in seeds])


def context_eps(seeds: Sequence[int], shape, clip_index: int) -> np.ndarray:
    """The context noise's eps [B, *shape] at clip `clip_index`, per video from its seed."""
    return np.stack([np.random.default_rng([s, 1, clip_index]).standard_normal(shape, np.float32)
                     for s in seeds])


def add_context_noise(latents_BNhwc: np.ndarray, eps_BNhwc: np.ndarray,
                      level: float) -> np.ndarray:
    """(1 - c) x + c eps: the release's context noise."""
    return ((1 - level) * latents_BNhwc + level * eps_BNhwc).astype(np.float32)


def _draw(given, k: int, shape, what: str, default: Callable[[], np.ndarray]) -> np.ndarray:
    """Clip k's caller-supplied draw (checked against `shape`), else `default()`."""
    if given is None or given[k] is None:
        return default()
    arr = np.asarray(given[k], np.float32)
    if arr.shape != tuple(shape):
        raise ValueError(f"{what}[{k}]: shape {arr.shape}, expected {tuple(shape)}")
    return arr


def check_conditions(model_cfg: ModelConfig, batch: int, context_frames: int, generated: int,
                     class_id=None, actions=None, text=None, text_mask=None):
    """Host checks of a request's conditions: (class_id [B] int32, actions [B, context_frames +
    generated, A] float32, (text [B, N, E] float32, text_mask [B, N] bool)), each None when the
    model lacks that kind (all None: an unconditioned request); errors name the input."""
    cc = model_cfg.conditions
    if text_mask is not None and text is None:
        raise conditioning.ConditionError("text_mask", "given without text")
    if class_id is None and actions is None and text is None:
        return None, None, None
    conditioning.check_kinds(cc, class_id, actions, text)
    if class_id is not None:
        class_id = np.asarray(class_id)
        if class_id.shape != (batch,) or not np.issubdtype(class_id.dtype, np.integer):
            raise conditioning.ConditionError(
                "class_id", f"shape {class_id.shape} ({class_id.dtype}), expected ({batch},) "
                "integers")
        conditioning.check_class_ids(class_id, cc.num_classes)
        class_id = class_id.astype(np.int32)
    if actions is not None:
        actions = np.asarray(actions, np.float32)
        frames = context_frames + generated
        if actions.ndim == 3 and actions.shape[1] != frames:
            raise conditioning.ConditionError(
                "actions", f"{actions.shape[1]} frames; the context ({context_frames}) and the "
                f"generated frames ({generated}) need {frames}")
        if actions.shape != (batch, frames, cc.action_dim):
            raise conditioning.ConditionError(
                "actions", f"shape {actions.shape}, expected [videos, context + generated "
                f"frames, action_dim] = {(batch, frames, cc.action_dim)}")
    if text is not None:
        text = np.asarray(text, np.float32)
        mask = np.ones(text.shape[:2], bool) if text_mask is None else np.asarray(text_mask, bool)
        if text.shape != (batch, cc.text_tokens, cc.text_dim) or mask.shape != text.shape[:2]:
            raise conditioning.ConditionError(
                "text", f"shapes {text.shape} (mask {mask.shape}), expected [videos, "
                f"text_tokens, text_dim] = {(batch, cc.text_tokens, cc.text_dim)}")
        text = (text, mask)
    return class_id, actions, text


def empty_cache(model_cfg: ModelConfig, batch: int) -> KVCache:
    """A cache with no history (generation from nothing)."""
    kv = jnp.zeros((model_cfg.num_layers, batch, 0, model_cfg.num_kv_heads, model_cfg.head_dim),
                   dtype_of(model_cfg.dtype))
    meta = layout_lib.token_meta(layout_lib.clip_layout(batch, 0, 1, noisy=False, clip=0))
    return KVCache(LayerKV(kv, kv), meta)


# ----------------------------------------------------------------------------- the history


@dataclasses.dataclass(frozen=True)
class _Run:
    """The device side of one `sample_video` call: its model (split), placement, padded batch
    and conditions, and the compiled kernels bound to them."""
    graphdef: object
    state: object
    model_cfg: ModelConfig
    cfg: SamplerConfig
    sigmas: jax.Array
    L: int
    batch: int
    rows: int                      # the device batch: `batch` padded to whole batch shards
    placement: Placement | None
    class_id: np.ndarray | None
    actions: np.ndarray | None
    variants: tuple[Branch, ...]   # the cache's rows per video (`cache_variants`)
    text: tuple[np.ndarray, np.ndarray] | None = None  # (embeddings [B, N, D], mask [B, N])

    def dev(self, x_B):
        """Host [B, ...] -> the device batch (on a mesh: padded and split over `batch`)."""
        return x_B if self.placement is None else self.placement.put(
            _pad_batch(x_B, self.rows), BATCH_AXES)

    def dev_variants(self, x_B):
        """Host [B, ...] -> the cache's device rows, `len(variants)` per video, interleaved."""
        x = _pad_batch(x_B, self.rows)
        x = np.repeat(x, len(self.variants), axis=0) if len(self.variants) > 1 else x
        return x if self.placement is None else self.placement.put(x, BATCH_AXES)

    def conditions(self, row_kinds, ids, new):
        """The conditions of a call over the frames `ids` (absolute indices), `new` of them new."""
        if self.class_id is None and self.actions is None and self.text is None:
            return None
        cond = window_conditions(
            self.model_cfg, self.L, row_kinds, len(ids), new,
            None if self.class_id is None else _pad_batch(self.class_id, self.rows),
            None if self.actions is None else _pad_batch(self.actions[:, ids], self.rows),
            None if self.text is None else tuple(_pad_batch(a, self.rows) for a in self.text))
        if cond is None or self.placement is None:
            return cond
        return jax.tree.map(lambda a: self.placement.put(a, BATCH_AXES), cond)

    def build_cache(self, frames, ids) -> KVCache:
        if frames.shape[1]:
            return _build_cache(self.graphdef, self.state, self.dev_variants(frames),
                                placement=self.placement,
                                conditions=self.conditions(self.variants, ids, 0))
        cache = empty_cache(self.model_cfg, self.rows * len(self.variants))
        return cache if self.placement is None else self.placement.put_cache(cache)

    def extend_cache(self, cache, new, ids) -> KVCache:
        """`cache` with the clean frames `new` after it; `ids`: the whole history's, `new` last."""
        return _extend_cache(self.graphdef, self.state, cache, self.dev_variants(new),
                             placement=self.placement,
                             conditions=self.conditions(self.variants, ids, new.shape[1]))

    def evict(self, cache, drop: int, anchors: int) -> KVCache:
        return _evict(cache, drop, anchors, self.L, self.model_cfg, placement=self.placement)

    def denoise_cached(self, cache, z0, branches, guidance, conditions):
        return _denoise_cached(self.graphdef, self.state, cache, z0, self.sigmas, branches,
                               guidance, self.cfg.prediction_type, placement=self.placement,
                               conditions=conditions)

    def denoise_recompute(self, frames, z0, branches, guidance, conditions):
        return _denoise_recompute(self.graphdef, self.state, self.dev(frames), z0, self.sigmas,
                                  branches, guidance, self.cfg.prediction_type,
                                  placement=self.placement, conditions=conditions)


class _History:
    """The frames the next clip sees, in one owner: host latents [B, H, h, w, C] (they reach
    the device only when a kernel needs them) and each frame's absolute index (which actions
    it carries). The clip loop calls `make_room(n)`, `denoise(...)`, then `append(new, ids)`;
    each cache mode is one subclass, saying how room is made and what the denoiser sees."""

    def __init__(self, run: _Run, frames: np.ndarray):
        self.run, self.frames = run, frames
        self.ids = np.arange(frames.shape[1])

    def __len__(self) -> int:
        return self.frames.shape[1]

    def make_room(self, n: int) -> None:
        """Before a clip of `n` frames: evict what does not fit the window (the one decision)."""
        drop = len(self) + n - self.run.cfg.window
        if drop > 0:
            self.evict(drop)

    def evict(self, drop: int) -> None:
        """The mode's reset: by default the newest frames stay."""
        self._cut(0, drop)

    def _cut(self, first: int, drop: int) -> None:
        """Drop `drop` frames from frame `first` on (the host side of every mode's reset)."""
        self.frames = np.concatenate([self.frames[:, :first], self.frames[:, first + drop:]],
                                     axis=1)
        self.ids = np.concatenate([self.ids[:first], self.ids[first + drop:]])

    def append(self, new: np.ndarray, ids: np.ndarray) -> None:
        """A finished clip's clean (or context-noised) latents join the history."""
        self.frames = np.concatenate([self.frames, new], axis=1)
        self.ids = np.concatenate([self.ids, ids])

    def denoise(self, k: int, z0, branches, guidance, conditions):
        raise NotImplementedError


class _RecomputeHistory(_History):
    """`cache_mode="recompute"` (the release): the whole history runs at every Euler step; a
    full window keeps its newest frames. `renoise(k, frames)`: the history as clip k sees it
    (`renoise_context`), or None."""

    def __init__(self, run: _Run, frames: np.ndarray, renoise=None):
        super().__init__(run, frames)
        self.renoise = renoise

    def denoise(self, k, z0, branches, guidance, conditions):
        seen = self.frames if self.renoise is None or k == 0 else self.renoise(k, self.frames)
        return self.run.denoise_recompute(seen, z0, branches, guidance, conditions)


class _CachedHistory(_History):
    """The cache modes: the history's exact KV cache, built once, extended by each clip that
    joins. The newest `uncached` frames are not in it yet: they are added when the cache is
    next needed (a window reset in between drops them unencoded)."""

    def __init__(self, run: _Run, frames: np.ndarray):
        super().__init__(run, frames)
        self.cache, self.uncached = None, 0  # built lazily: after a reset positions restart at 0

    def append(self, new, ids):
        super().append(new, ids)
        self.uncached += new.shape[1]

    def cached(self) -> KVCache:
        """The cache of the whole history, brought up to date."""
        if self.cache is None:
            self.cache = self.run.build_cache(self.frames, self.ids)
        elif self.uncached:
            new = self.frames[:, len(self) - self.uncached:]
            self.cache = self.run.extend_cache(self.cache, new, self.ids)
        self.uncached = 0
        return self.cache

    def denoise(self, k, z0, branches, guidance, conditions):
        return self.run.denoise_cached(self.cached(), z0, branches, guidance, conditions)


class _WindowHistory(_CachedHistory):
    """`cache_mode="window"` (the reference): a full window keeps its newest frames, positions
    restarting at 0, and the cache is rebuilt."""

    def evict(self, drop):
        super().evict(drop)
        self.cache, self.uncached = None, 0


class _RollingHistory(_CachedHistory):
    """`cache_mode="rolling"`: a full window drops its oldest frames after the anchors from the
    cache and re-indexes the rest (`_evict`), with no rebuild."""

    def evict(self, drop):
        anchors = self.run.cfg.anchor_frames
        if self.cache is not None:  # kept frames carry what they saw of the dropped ones
            self.cache = self.run.evict(self.cached(), drop, anchors)
        self._cut(anchors, drop)


# ----------------------------------------------------------------------------- the clip loop


def sample_video(model: VideoGPT, clip_sizes: Sequence[int], cfg: SamplerConfig,
                 seeds: Sequence[int], *, context_BFhwc=None, latent_hw=None,
                 on_clip: Callable[[int, np.ndarray], None] | None = None,
                 to_context: Callable[[int, np.ndarray], np.ndarray] | None = None,
                 noise_per_clip: Sequence[np.ndarray | None] | None = None,
                 context_eps_per_clip: Sequence[np.ndarray | None] | None = None,
                 placement: Placement | None = None, class_id=None,
                 actions=None, text=None, text_mask=None) -> np.ndarray:
    """Generate `sum(clip_sizes)` frames after `context_BFhwc` (or from nothing): [B, N, h, w, C].

    seeds: one per video. on_clip(k, latents_BNhwc) runs after clip k (progress, saving).
    to_context(k, latents_BNhwc) -> latents: what a finished clip contributes to the history (the
    pipeline's decode -> uint8 -> encode round trip); the sampler's output by default.
    noise_per_clip: one entry per clip, clip k's starting noise [B, n_k, h, w, C] (None: drawn
    from the seeds). context_eps_per_clip: one per clip, the eps of clip k's context noise: with
    `renoise_context` the whole window it sees [B, H_k, h, w, C] (k >= 1), else clip k itself
    as it joins the history [B, n_k, h, w, C] (None: drawn from the seeds).
    placement: the mesh to sample on (`Placement`; None: the default device). The model's
    parameters are put on it (a no-op when `Placement.place_model` already did).
    class_id [B] / actions [B, F + N, A] (the context's F frames, then the N generated): the
    conditions of a model with `model.conditions`, given exactly when it has that kind.
    text [B, text_tokens, text_dim] (text_mask [B, text_tokens], default all real): stored
    text embeddings (`text_encoder`), for a model with `conditions.text_dim`.
    """
    model_cfg: ModelConfig = model.cfg
    if context_BFhwc is not None:
        context_BFhwc = np.asarray(context_BFhwc, np.float32)
        if context_BFhwc.ndim == 5:
            latent_hw = context_BFhwc.shape[2:4]
    if latent_hw is None:
        raise ValueError("sample_video: give context latents or latent_hw for generation "
                         "from nothing")
    batch = len(seeds) if context_BFhwc is None else context_BFhwc.shape[0]
    check_request(model_cfg, cfg, clip_sizes,
                  None if context_BFhwc is None else tuple(context_BFhwc.shape),
                  tuple(latent_hw), seeds, batch)
    for name, given in (("noise_per_clip", noise_per_clip),
                        ("context_eps_per_clip", context_eps_per_clip)):
        if given is not None and len(given) != len(clip_sizes):
            raise ValueError(f"{name}: {len(given)} entries for {len(clip_sizes)} clips")
    h, w = latent_hw
    c = model_cfg.latent_channels
    L = block_len_for(model_cfg, h, w)
    context_frames = 0 if context_BFhwc is None else context_BFhwc.shape[1]
    class_id, actions, text = check_conditions(model_cfg, batch, context_frames,
                                               sum(clip_sizes), class_id, actions, text, text_mask)
    if placement is not None:
        model = placement.place_model(model)
    graphdef, state = nnx.split(model)
    # On a mesh the device batch is padded to whole batch shards; host arrays keep B rows.
    multiple = 1 if placement is None else placement.batch_multiple
    rows = -(-batch // multiple) * multiple
    # Condition guidance encodes the history twice (with and without conditions): the cache
    # holds `len(variants)` rows per video, interleaved.
    conditioned = class_id is not None or actions is not None or text is not None
    cond_guided = cfg.condition_guidance != 1.0 and conditioned
    run = _Run(graphdef, state, model_cfg, cfg, jnp.asarray(time_grid(cfg.steps, cfg.time_shift)),
               L, batch, rows, placement, class_id, actions,
               cache_variants(guidance_branches(False, cond_guided)), text)

    def noised(k, x):
        """(1 - c) x + c eps with clip k's context eps (given, or drawn from the seeds)."""
        eps = _draw(context_eps_per_clip, k, x.shape, "context_eps_per_clip",
                    lambda: context_eps(seeds, x.shape[1:], k))
        return add_context_noise(x, eps, cfg.context_noise)

    frames = (np.zeros((batch, 0, h, w, c), np.float32) if context_BFhwc is None
              else context_BFhwc)
    if cfg.cache_mode == "recompute":
        history = _RecomputeHistory(
            run, frames, noised if cfg.renoise_context and cfg.context_noise > 0 else None)
    elif cfg.cache_mode == "rolling":
        history = _RollingHistory(run, frames)
    else:
        history = _WindowHistory(run, frames)
    clips = []
    for k, n in enumerate(clip_sizes):
        history.make_room(n)
        history_guided = cfg.guidance != 1.0 and len(history) > 0
        branches = guidance_branches(history_guided, cond_guided)
        scales = ([cfg.guidance] if history_guided else []) + (
            [cfg.condition_guidance] if cond_guided else [])
        guidance = jnp.asarray(scales or [1.0], jnp.float32)
        start = context_frames + sum(clip_sizes[:k])
        clip_ids = np.arange(start, start + n)
        clip_conditions = run.conditions(branches, np.concatenate([history.ids, clip_ids]), n)
        z0 = _draw(noise_per_clip, k, (batch, n, h, w, c), "noise_per_clip",
                   lambda: initial_noise(seeds, (n, h, w, c), k, cfg.same_noise_every_clip))
        clip = history.denoise(k, run.dev(z0), branches, guidance, clip_conditions)
        clips.append(np.asarray(clip)[:batch])
        if on_clip is not None:
            on_clip(k, clips[-1])
        if k + 1 == len(clip_sizes):
            break
        new = np.asarray(to_context(k, clips[-1]) if to_context is not None else clips[-1],
                         np.float32)
        if cfg.context_noise > 0 and not cfg.renoise_context:
            new = noised(k, new)
        history.append(new, clip_ids)
    return np.concatenate(clips, axis=1)
