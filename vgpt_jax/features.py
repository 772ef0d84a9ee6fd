"""Frozen Video-GPT features: pooled hidden states of chosen decoder layers, per video.

A video's latents [F, h, w, C] enter as clean copies `[CL(0) ... CL(F-1)]` (the history the
sampler conditions on; clean frames are frame-causal, so frame f's tokens have seen frames
0..f), or with `t` as one noisy clip at noise level t, `x_t = t x + (1 - t) eps` (the first
clip of a training sequence: no history, bidirectional within the clip). The residual stream
after each decoder layer (before the final norm) is pooled inside the forward pass, so only
[layers, B, frames, D] ever leaves the decoder:

    mean        mean over the image tokens of every frame
    last_frame  mean over the image tokens of the last frame (it has seen the whole video)
    end_token   the last frame's `</img>` token (clean copies only: its block's summary slot)

Batches are placed as sampling places them (`sampling.Placement`: parameters by the training
rules, videos over the batch axes; by default every local device holds a slice of the batch and
a replica of the parameters). Every video's result depends on that video alone: a batch is
padded with copies of its last video to one compiled shape, and noise comes from each video's
own seed.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vgpt_jax import layout as layout_lib
from vgpt_jax import sampling
from vgpt_jax.config import block_len_for
from vgpt_jax.model import VideoGPT

POOLS = ("mean", "last_frame", "end_token")
PIXEL_POOLS = ("mean", "last_frame", "all")
PIXEL_GRID = 8  # raw-pixel baseline: frames area-averaged to 8x8x3


def resolve_layers(layers, num_layers: int) -> tuple[int, ...]:
    """None or "all" -> every layer; ints may be negative (-1 = the last layer)."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return tuple(range(num_layers))
    out = []
    for i in ([layers] if isinstance(layers, (int, np.integer)) else layers):
        if not isinstance(i, (int, np.integer)) or not -num_layers <= i < num_layers:
            raise ValueError(f"layers: {i!r} is not a layer of this {num_layers}-layer model "
                             f"(0..{num_layers - 1}, or negative from the end)")
        out.append(int(i) % num_layers)
    if not out:
        raise ValueError("layers: empty")
    return tuple(out)


def check_pools(pools: Sequence[str], noisy: bool) -> None:
    for p in pools:
        if p not in POOLS:
            raise ValueError(f"pool {p!r}: one of {POOLS}")
        if p == "end_token" and noisy:
            raise ValueError("pool 'end_token' reads the clean copies' </img> token; a noisy "
                             "copy (t given) has none: use 'mean' or 'last_frame'")


def noise(seeds: Sequence[int], shape) -> np.ndarray:
    """Per-video eps [B, *shape]: video b's from its own seed, whatever batch it is in."""
    return np.stack([np.random.default_rng([int(s), 0x5EA7]).standard_normal(shape)
                     .astype(np.float32) for s in seeds])


def _block_tap(noisy: bool, block_len: int):
    """Residual stream [B, T, D] -> per frame (image-token mean, last token): [B, NB, 2, D]."""
    start = layout_lib.NOISY_IMAGE_START if noisy else layout_lib.CLEAN_IMAGE_START
    stop = block_len if noisy else block_len - 1  # a clean block ends with </img>

    def tap(x_BTD):
        b, t, d = x_BTD.shape
        x = x_BTD.reshape(b, t // block_len, block_len, d).astype(jnp.float32)
        return jnp.stack([x[:, :, start:stop].mean(axis=2), x[:, :, -1]], axis=2)
    return tap


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _pooled(graphdef, state, latents_BFhwc, t_B, layers: tuple[int, ...], noisy: bool,
            placement: sampling.Placement):
    """Every pool of the chosen layers: {pool: [B, len(layers), D]}."""
    with placement.activations():
        return _pooled_on(nnx.merge(graphdef, state), latents_BFhwc, t_B, layers, noisy)


def _pooled_on(model: VideoGPT, latents_BFhwc, t_B, layers, noisy):
    b, f, h, w, _ = latents_BFhwc.shape
    L = block_len_for(model.cfg, h, w)
    layout = layout_lib.clip_layout(b, f, L, noisy=noisy, clip=0)
    t_BF = jnp.broadcast_to(t_B[:, None], (b, f))
    model.check_inputs(latents_BFhwc, t_BF, layout)
    x = model.embed(latents_BFhwc, t_BF, layout)
    per_layer = model.decoder(x, layout_lib.token_positions(layout),
                              layout_lib.token_meta(layout), L, tap=_block_tap(noisy, L))
    per_layer = per_layer[jnp.asarray(layers)].transpose(1, 0, 2, 3, 4)  # [B, nL, F, 2, D]
    return {"mean": per_layer[:, :, :, 0].mean(axis=2),
            "last_frame": per_layer[:, :, -1, 0],
            "end_token": per_layer[:, :, -1, 1]}


def default_placement() -> sampling.Placement:
    """Data parallel over every local device: features need no parameter sharding below the
    size of a single device's memory."""
    return sampling.Placement.of({"data": jax.local_device_count()})


def extract(model: VideoGPT, latents_BFhwc: np.ndarray, *, layers=None,
            pools: Sequence[str] = ("mean",), t: float | None = None,
            seeds: Sequence[int] | None = None, batch_size: int = 8,
            placement: sampling.Placement | None = None,
            on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Pooled features {pool: float32 [B, len(layers), D]} of latents [B, F, h, w, C].

    layers: indices (see `resolve_layers`), in the order given. t: None for the clean copies,
    else the noise level in [0, 1] of one noisy clip (t = 1 is clean data); `seeds` (one per
    video, default 0..B-1) draw its noise. batch_size: videos per batch shard per step.
    placement: where to run (`default_placement()` if None). on_batch(n) runs after each batch
    of n videos (progress bars).
    """
    latents = np.asarray(latents_BFhwc, np.float32)
    if latents.ndim != 5 or latents.shape[0] == 0 or latents.shape[1] == 0:
        raise ValueError(f"latents: expected [videos >= 1, frames >= 1, h, w, C], got shape "
                         f"{latents.shape}")
    noisy = t is not None
    pools = tuple(pools)
    check_pools(pools, noisy)
    if noisy and not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t={t}: a noise level in [0, 1] (1 = clean)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    layers = resolve_layers(layers, model.cfg.num_layers)
    n = latents.shape[0]
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"seeds: {len(seeds)} for {n} videos")
    placement = placement or default_placement()
    graphdef, state = nnx.split(placement.place_model(model))
    step = batch_size * placement.batch_multiple
    out = {p: [] for p in pools}
    for lo in range(0, n, step):
        chunk = latents[lo:lo + step]
        if noisy:
            eps = noise(seeds[lo:lo + step], chunk.shape[1:])
            chunk = float(t) * chunk + (1.0 - float(t)) * eps
        real = len(chunk)
        pad = np.repeat(chunk[-1:], step - real, axis=0)  # one compiled shape for every batch
        chunk = placement.put(np.concatenate([chunk, pad]), ("batch",))
        t_B = placement.put(np.full((step,), 1.0 if t is None else t, np.float32), ("batch",))
        pooled = _pooled(graphdef, state, chunk, t_B, layers, noisy, placement)
        for p in pools:
            out[p].append(np.asarray(pooled[p])[:real])
        if on_batch is not None:
            on_batch(real)
    return {p: np.concatenate(v) for p, v in out.items()}


def pixel_features(frames_BFHW3: np.ndarray, pools: Sequence[str] = PIXEL_POOLS,
                   grid: int = PIXEL_GRID) -> dict[str, np.ndarray]:
    """The raw-pixel baseline: frames area-averaged to grid x grid x 3 in [-1, 1], then
    {"mean": over frames [B, g*g*3], "last_frame": [B, g*g*3], "all": frames concatenated
    [B, F*g*g*3]}."""
    x = np.asarray(frames_BFHW3)
    if x.ndim != 5 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 [videos, frames, H, W, 3], got {x.dtype} "
                         f"{x.shape}")
    b, f, hh, ww, _ = x.shape
    if hh % grid or ww % grid:
        raise ValueError(f"frames: {hh}x{ww} is not a multiple of the {grid}x{grid} grid")
    x = x.astype(np.float32) / 127.5 - 1.0
    x = x.reshape(b, f, grid, hh // grid, grid, ww // grid, 3).mean(axis=(3, 5))
    x = x.reshape(b, f, -1)
    table = {"mean": x.mean(axis=1), "last_frame": x[:, -1], "all": x.reshape(b, -1)}
    unknown = [p for p in pools if p not in table]
    if unknown:
        raise ValueError(f"pixel pools {unknown}: one of {PIXEL_POOLS}")
    return {p: table[p] for p in pools}
