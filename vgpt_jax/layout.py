"""The sequence layout of next clip diffusion: frame blocks, per-token metadata, RoPE positions.

A sequence is a list of *frame blocks* of `L = P + 2` tokens each (P image tokens per frame):
    noisy block  NS(f) = [<|diffusion|>, TIME(t), z_t image tokens]   (offsets 0, 1, 2..L-1)
    clean block  CL(f) = [<img>, clean image tokens, </img>]          (offsets 0, 1..P, L-1)

Every block carries metadata (`Layout`, arrays of shape [B, NB]): its frame index (orders clean
frames causally), its clip id, whether it is noisy, whether it is real (not padding), and its
RoPE frame slot. Token metadata and positions follow from the block metadata, and the attention
mask is a rule over token metadata (`vgpt_jax.attention.visible`), so every layout below — the
training sequence, the sampler's context and noisy clip, the unconditional branch — gets its
mask from that one rule.

Training layout. The reference orders blocks `[NS(clip1) CL(clip1) NS(clip2) ... NS(clipK)]`,
whose length depends on the partition. Attention sees order only through positions and the
mask, so we use a static frame-major order instead, `[NS(0) CL(0) NS(1) CL(1) ... NS(F-1)
CL(F-1)]`, and mark the clean copies of the last clip (absent in the reference) as padding:
every sample in a batch then has the same shape, 2F blocks, whatever its partition, and the
outputs of all real tokens equal the reference's (`tests/test_layout.py` checks this against a
reference-order sequence). Positions are the reference's: the noisy and clean copies of frame f
share `f * L + offset`.

Condition tokens (optional; `ConditionLayout`). A sequence may carry condition tokens beside its
frame blocks: *global* ones (a class embedding), at frame `GLOBAL_FRAME` = -1 and visible to
every token, and *per-frame* ones (one action per frame), at their frame's index and visible to
the tokens of that frame and of every later frame (`attention.visible`). Their metadata is per
token, [B, C]: global tokens first, then one token per conditioned frame; a dropped condition is
`valid=False`. A per-frame condition sits at its frame's RoPE slot (`position * L`), a global
one at slot 0.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Token offsets inside a block (see the module docstring).
NOISY_MARKER, TIME_TOKEN, NOISY_IMAGE_START = 0, 1, 2
CLEAN_MARKER, CLEAN_IMAGE_START = 0, 1


@flax.struct.dataclass
class Layout:
    """Per-block metadata; all arrays are [B, NB]. `block_len` is static."""
    frame: jax.Array     # int32: frame index, orders clean frames causally
    clip: jax.Array      # int32: clip id, increasing along the video
    noisy: jax.Array     # bool: noisy copy (True) or clean copy (False)
    valid: jax.Array     # bool: False for padding blocks
    position: jax.Array  # int32: RoPE frame slot; token position = position * L + offset
    block_len: int = flax.struct.field(pytree_node=False)

    @property
    def num_blocks(self) -> int:
        return self.frame.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_len


class TokenMeta(NamedTuple):
    """Per-token metadata, each [B, T] (or broadcastable): the mask rule's whole input."""
    frame: jax.Array
    clip: jax.Array
    noisy: jax.Array
    valid: jax.Array
    offset: jax.Array


def token_meta(layout: Layout) -> TokenMeta:
    """Expand block metadata to tokens: [B, NB] -> [B, NB * L]."""
    L = layout.block_len
    b, nb = layout.frame.shape
    rep = lambda a: jnp.repeat(a, L, axis=1)
    offset = jnp.broadcast_to(jnp.tile(jnp.arange(L, dtype=jnp.int32), nb), (b, nb * L))
    return TokenMeta(rep(layout.frame), rep(layout.clip), rep(layout.noisy), rep(layout.valid),
                     offset)


GLOBAL_FRAME = -1  # the frame of a global condition: before every frame, so seen from all


@flax.struct.dataclass
class ConditionLayout:
    """Per-condition-token metadata, arrays [B, C]: global tokens, then per-frame ones."""
    frame: jax.Array     # int32: GLOBAL_FRAME, or the frame a per-frame condition belongs to
    valid: jax.Array     # bool: False for a dropped condition (or padding)
    position: jax.Array  # int32: RoPE position of the token

    @property
    def num_tokens(self) -> int:
        return self.frame.shape[1]


def condition_layout(frame_BF, position_BF, block_len: int, *, num_global: int,
                     global_valid_B=None, frame_valid_BF=None) -> ConditionLayout:
    """`num_global` global tokens, then one per-frame token per entry of `frame_BF` (the frame
    indices of the conditioned frames, [B, F'] with F' = 0 for none) at RoPE slots
    `position_BF`. Validity defaults to True; a False row drops that video's condition(s);
    `global_valid_B` may also be [B, num_global], one entry per global token (text padding)."""
    frame = jnp.asarray(frame_BF, jnp.int32)
    b = frame.shape[0]
    gv = jnp.ones((b,), bool) if global_valid_B is None else jnp.asarray(global_valid_B, bool)
    gv = gv if gv.ndim == 2 else jnp.broadcast_to(gv[:, None], (b, num_global))
    fv = jnp.ones(frame.shape, bool) if frame_valid_BF is None else jnp.asarray(frame_valid_BF,
                                                                                  bool)
    g = lambda v, dt: jnp.full((b, num_global), v, dt)
    return ConditionLayout(
        frame=jnp.concatenate([g(GLOBAL_FRAME, jnp.int32), frame], axis=1),
        valid=jnp.concatenate([gv, jnp.broadcast_to(fv, frame.shape)], axis=1),
        position=jnp.concatenate([g(0, jnp.int32),
                                  jnp.asarray(position_BF, jnp.int32) * block_len], axis=1))


def token_positions(layout: Layout) -> jax.Array:
    """RoPE position ids [B, T]: the block's frame slot times L plus the offset in the block."""
    L = layout.block_len
    b, nb = layout.frame.shape
    offset = jnp.tile(jnp.arange(L, dtype=jnp.int32), nb)
    return jnp.repeat(layout.position.astype(jnp.int32) * L, L, axis=1) + offset[None]


def concat(*layouts: Layout) -> Layout:
    """Concatenate layouts along blocks (e.g. clean context then a noisy clip)."""
    L = {l.block_len for l in layouts}
    if len(L) != 1:
        raise ValueError(f"cannot concatenate layouts with different block lengths {sorted(L)}")
    cat = lambda f: jnp.concatenate([getattr(l, f) for l in layouts], axis=1)
    return Layout(cat("frame"), cat("clip"), cat("noisy"), cat("valid"), cat("position"),
                  block_len=layouts[0].block_len)


def check_clip_ids(clip_ids_BF, num_frames: int | None = None, what: str = "clip_ids") -> None:
    """Validate a per-frame clip assignment [B, F]; a ValueError names what is wrong.

    A valid assignment covers every frame with contiguous clips numbered 0, 1, 2, ... in order
    (each frame's id equals the previous frame's or exceeds it by one). Traced arrays are checked
    for shape only (their values are unknown at trace time); the input pipeline and the sampler
    check concrete values on the host before anything is compiled.
    """
    shape = np.shape(clip_ids_BF)
    if len(shape) != 2:
        raise ValueError(f"{what}: expected shape [batch, frames], got {shape}")
    if num_frames is not None and shape[1] != num_frames:
        raise ValueError(f"{what}: assigns {shape[1]} frames but the latents have {num_frames}; "
                         "the clip assignment must cover every frame")
    if isinstance(clip_ids_BF, jax.core.Tracer):
        return
    ids = np.asarray(clip_ids_BF)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what}: expected integer clip ids, got dtype {ids.dtype}")
    if shape[1] == 0:
        raise ValueError(f"{what}: no frames")
    bad_start = np.nonzero(ids[:, 0] != 0)[0]
    if bad_start.size:
        raise ValueError(f"{what}: sample {bad_start[0]} starts with clip {ids[bad_start[0], 0]}, "
                         "not 0")
    steps = np.diff(ids, axis=1)
    bad = np.argwhere((steps != 0) & (steps != 1))
    if bad.size:
        b, f = bad[0]
        raise ValueError(f"{what}: sample {b} is not contiguous at frame {f + 1} (clip "
                         f"{ids[b, f]} -> {ids[b, f + 1]}); clips must be contiguous runs "
                         "numbered 0, 1, 2, ...")


def training_layout(clip_ids_BF: jax.Array, block_len: int) -> Layout:
    """The training sequence for a clip assignment [B, F]: 2F blocks, frame-major.

    Block 2f is NS(f), block 2f+1 is CL(f); CL of the last clip is padding. Works on traced
    clip ids (the structure is static, only the metadata depends on the partition).
    """
    check_clip_ids(clip_ids_BF)
    clip = jnp.asarray(clip_ids_BF, jnp.int32)
    b, f = clip.shape
    frame = jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), (b, f))
    inter = lambda noisy_val, clean_val: jnp.stack([noisy_val, clean_val], axis=2).reshape(b, 2 * f)
    is_last_clip = clip == clip[:, -1:]
    return Layout(
        frame=inter(frame, frame),
        clip=inter(clip, clip),
        noisy=inter(jnp.ones_like(frame, bool), jnp.zeros_like(frame, bool)),
        valid=inter(jnp.ones_like(frame, bool), ~is_last_clip),
        position=inter(frame, frame),
        block_len=block_len,
    )


def clip_layout(batch: int, num_frames: int, block_len: int, *, noisy: bool, clip: int,
                first_frame: int = 0, first_position: int = 0, valid: bool = True) -> Layout:
    """A run of `num_frames` blocks of one kind: the sampler's context (clean) or new clip (noisy)."""
    frame = jnp.broadcast_to(jnp.arange(num_frames, dtype=jnp.int32), (batch, num_frames))
    full = lambda v, dt: jnp.full((batch, num_frames), v, dt)
    return Layout(frame=frame + first_frame, clip=full(clip, jnp.int32),
                  noisy=full(noisy, bool), valid=full(valid, bool),
                  position=frame + first_position, block_len=block_len)


def sample_clip_ids(rng: np.random.Generator, num_frames: int, mode: str = "random") -> np.ndarray:
    """Draw a clip assignment [F] for one sample, as the reference does.

    "random": K ~ U{2..F}, then K-1 distinct cut points from {1..F-1}: K contiguous clips of
    random length >= 1 (the composition of stages 2-4). "one_frame": one frame per clip
    (stage 1, next-frame diffusion). "single": the whole sample is one clip (a deviation, for
    image-to-video style training; not in the recipe). "first_frame": frame 0 is clip 0, the
    rest clip 1 (one frame in, a video out: the image-animation fine-tune; not in the recipe).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if mode == "one_frame":
        return np.arange(num_frames, dtype=np.int32)
    if mode == "single" or num_frames == 1:
        return np.zeros(num_frames, np.int32)
    if mode == "first_frame":
        return (np.arange(num_frames) > 0).astype(np.int32)
    if mode != "random":
        raise ValueError(f"clip mode must be 'random', 'one_frame', 'single' or 'first_frame', "
                         f"got {mode!r}")
    k = rng.integers(2, num_frames + 1)
    cuts = rng.choice(np.arange(1, num_frames), size=k - 1, replace=False)
    starts = np.zeros(num_frames, np.int32)
    starts[cuts] = 1
    return np.cumsum(starts).astype(np.int32)
