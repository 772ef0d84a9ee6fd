"""Attention under the hierarchical next-clip mask, written once as a rule over token metadata.

`visible(q, k, block_len)` is the mask: which key token a query token may attend to. The rule
(verified against the official mask builder by running it):

- clean query: sees every token of clean frames at earlier frames (across clips: clean frames
  are frame-causal), and inside its own frame block: `<img>` sees only itself, image tokens see
  `<img>` and all image tokens, `</img>` sees the whole block; never a noisy token;
- noisy query of clip c: every token of the clean frames of clips < c, and the noisy blocks of
  clip c in every frame of that clip (bidirectional across frames), with the marker rule: key
  offset 0 (`<|diffusion|>`) is visible to all, offset 1 (t) to query offsets >= 1, image keys to
  query offsets >= 2;
- padding: no real token sees a padding token; a padding query sees its own block only (the
  reference lets pad rows see everything; either way they only exist to avoid NaN);
- condition keys (`layout.ConditionLayout`, beyond the reference): a valid condition token is
  seen by every valid query, frame token or condition token, whose frame is >= its frame; global
  conditions sit at frame -1, so every token sees them, and frame f's action is seen from frame
  f on. Condition queries see condition keys only.

Condition keys are attended in a softmax of their own, gated per layer and head (zero at
initialisation, as LLaMA-Adapter's zero-init attention): a frame query's output is
`attend(frame keys) + gate * condition_attention(condition keys)`. So the frame-key attention
runs on any backend unchanged (the condition tokens are few and attended densely), and a model
whose gates are zero, or whose conditions are all dropped (no visible condition key gives 0),
computes exactly what the model without conditions computes.

Backends, one signature (`attend`), chosen by `AttentionConfig.impl`:
- "dense": the [B, Tq, Tk] mask and score matrix; the reference for tests, and fastest for
  short sequences on CPU.
- "blockwise": flash-style online softmax over (q-tile, kv-tile) tiles of whole frame blocks,
  noisy blocks first, with a custom VJP; a per-block visibility table skips fully masked tiles
  and the token mask is computed inside visible tiles only, so neither the T x T mask nor the
  score matrix is ever materialised (memory O(T * D)). On one CPU device in float32 the tiles
  run on a native kernel (`vgpt_jax.attention_cpu`) that keeps every core busy; elsewhere, and
  as the reference, in JAX's tile loops.
- "dot_product": `jax.nn.dot_product_attention` (cuDNN flash attention on GPU) with a dense
  boolean mask: the GPU hook for moderate lengths.
- "splash": the Pallas TPU splash kernel (`vgpt_jax.attention_splash`), the default on TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vgpt_jax import attention_cpu
from vgpt_jax.config import AttentionConfig
from vgpt_jax.layout import ConditionLayout, TokenMeta

# Finite: the blockwise running max starts here, so exp(m - m_new) is never exp(-inf + inf);
# in the condition softmax, masked scores, so a row with no visible key gives 0, not NaN.
_NEG = -1e30


def visible(q: TokenMeta, k: TokenMeta, block_len: int) -> jax.Array:
    """The mask rule. `q` and `k` fields broadcast against each other (e.g. [B,T,1] vs [B,1,S]).
    `q` is frame tokens' `TokenMeta` or a `ConditionLayout`; so is `k` (condition keys)."""
    if isinstance(k, ConditionLayout):
        return q.valid & k.valid & (k.frame <= q.frame)
    last = block_len - 1
    same_frame = k.frame == q.frame
    clean_in_frame = (k.offset == 0) | ((q.offset >= 1) & (k.offset < last)) | (q.offset == last)
    clean_query = ~k.noisy & ((k.frame < q.frame) | (same_frame & clean_in_frame))
    noisy_query = jnp.where(
        k.noisy,
        (k.clip == q.clip) & (jnp.minimum(k.offset, 2) <= jnp.minimum(q.offset, 2)),
        k.clip < q.clip)
    real = q.valid & k.valid & jnp.where(q.noisy, noisy_query, clean_query)
    pad = ~q.valid & ~k.valid & same_frame & (q.noisy == k.noisy)
    return real | pad


def _expand(meta: TokenMeta, axis: int) -> TokenMeta:
    return TokenMeta(*(jnp.expand_dims(m, axis) for m in meta))


def dense_mask(q_meta: TokenMeta, kv_meta: TokenMeta, block_len: int) -> jax.Array:
    """[B, Tq, Tk] boolean mask (materialised: for tests and short sequences only)."""
    return visible(_expand(q_meta, 2), _expand(kv_meta, 1), block_len)


def condition_attention(q, k, v, q_meta, cond: ConditionLayout, block_len: int):
    """Queries [B,T,H,D] (metadata `TokenMeta` or `ConditionLayout` [B,T]) attending to condition
    tokens alone, k/v [B,C,KV,D] -> [B,T,H,D]: a dense softmax over the C visible condition keys;
    a query that sees none gets exactly 0. Scores and softmax in float32."""
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    expand = lambda meta, axis: jax.tree.map(lambda a: jnp.expand_dims(a, axis), meta)
    mask = visible(expand(q_meta, 2), expand(cond, 1), block_len)[:, None]  # [B, 1, T, C]
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask, s * (q.shape[-1] ** -0.5), _NEG)
    p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True))) * mask
    p = p / jnp.maximum(p.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v)


def _repeat_kv(k, num_heads):
    return jnp.repeat(k, num_heads // k.shape[2], axis=2) if k.shape[2] != num_heads else k


def dense_attention(q, k, v, q_meta, kv_meta, block_len):
    """q [B,T,H,D], k/v [B,S,KV,D] -> [B,T,H,D]. Scores and softmax in float32."""
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    mask = dense_mask(q_meta, kv_meta, block_len)
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    s = s * (q.shape[-1] ** -0.5)
    s = jnp.where(mask[:, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v)


def dot_product_attention(q, k, v, q_meta, kv_meta, block_len):
    """`jax.nn.dot_product_attention` with the dense mask (cuDNN on GPU, XLA elsewhere)."""
    mask = dense_mask(q_meta, kv_meta, block_len)
    impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) \
        else None
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)


# ----------------------------------------------------------------------------- blockwise
#
# Tiles are whole frame blocks (`tile` blocks of L tokens each) of a per-sample reordering that
# puts noisy blocks first (stable). In that order the mask is tile-sparse: clean queries never
# see noisy keys (a whole quadrant), clean-clean is frame-causal and noisy-noisy is confined to
# a clip, so at 16-48 frames about a third of the tiles are visible against ~95% in the
# interleaved training order (measured with 512-token tiles). Which tiles are visible comes from
# a per-block table computed once per call; the tile loops run over each row's (column's)
# visible tiles only, so a skipped tile costs nothing, and `tiles_per_step` of them per step as
# one wider tile (wider dots use the CPU's cores better). The table also marks the tiles whose
# every pair is visible (clean keys of earlier frames: 23 of the 52 visible 512-token tiles at
# 48 frames), which skip the token mask and its selects; a row visits those first, so that its
# groups are all FULL where they can be. Masked scores are -inf, so exp gives exactly 0 for them
# without a second pass over the tile.


def _pad_to(x, axis, multiple, value):
    n = x.shape[axis]
    pad = (-n) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _block_meta(meta: TokenMeta, L: int) -> TokenMeta:
    """[B, T] token fields -> [B, T / L] block fields (metadata is constant within a block)."""
    return TokenMeta(*(m[:, ::L] for m in meta))


def _noisy_first(meta: TokenMeta, L: int) -> jax.Array:
    """Per-sample block order [B, NB]: noisy blocks, then clean ones, each in layout order."""
    return jnp.argsort(~meta.noisy[:, ::L], axis=1, stable=True)


def _arrange(x, order, L, tiles_of, fill):
    """[B, T, ...] -> [B, T', ...]: blocks gathered in `order`, padded with `fill` to a multiple
    of `tiles_of` blocks."""
    b, t = x.shape[:2]
    xb = x.reshape(b, t // L, L, *x.shape[2:])
    idx = order.reshape(b, -1, *([1] * (xb.ndim - 2)))
    xb = _pad_to(jnp.take_along_axis(xb, idx, axis=1), 1, tiles_of, fill)
    return xb.reshape(b, -1, *x.shape[2:])


def _restore(x, order, L, t):
    """Inverse of `_arrange`: [B, T', ...] in `order` -> the first T tokens in layout order."""
    b = x.shape[0]
    xb = x[:, :t].reshape(b, t // L, L, *x.shape[2:])
    idx = jnp.argsort(order, axis=1).reshape(b, -1, *([1] * (xb.ndim - 2)))
    return jnp.take_along_axis(xb, idx, axis=1).reshape(b, t, *x.shape[2:])


def _arrange_meta(meta: TokenMeta, order, L, tiles_of, pad_frame) -> TokenMeta:
    # Padding blocks are invalid with a frame no real block has, so they see nothing and are
    # seen by nothing (their rows are sliced off).
    fills = (pad_frame, 0, False, False, 0)
    return TokenMeta(*(_arrange(m, order, L, tiles_of, f) for m, f in zip(meta, fills)))


SKIP, PARTIAL, FULL = 0, 1, 2  # a tile pair: nothing visible, some pairs, every pair


def _offset_classes(L: int):
    """(representative offsets [R], each offset's class [L]): `visible` reads offsets only
    through comparisons with 0, 1, 2 and L - 1, so offsets 2..L-2 all behave like 2, and one
    representative per class gives each block pair's visibility exactly."""
    reps = sorted({0, 1, min(2, L - 1), L - 1})
    classes = [reps.index(o if o in reps else 2) for o in range(L)]
    return jnp.asarray(reps, jnp.int32), jnp.asarray(classes, jnp.int32)


def _block_pairs(qm: TokenMeta, km: TokenMeta, L: int) -> jax.Array:
    """[B, NBq, NBk, R, R] bool: whether query offset class r of block a sees key offset class
    s of block c (`_offset_classes`); O(NBq * NBk), against the O(T * S) token mask."""
    reps, _ = _offset_classes(L)

    def per_offset(meta, axes):  # block fields [B, NB] x offsets [R], expanded on `axes`
        bm = _block_meta(meta, L)
        shape = bm.frame.shape + (reps.shape[0],)
        fields = [jnp.broadcast_to(f[..., None], shape) for f in bm[:4]]
        fields.append(jnp.broadcast_to(reps, shape))
        return TokenMeta(*(jnp.expand_dims(f, axes) for f in fields))

    return visible(per_offset(qm, (2, 4)), per_offset(km, (1, 3)), L)


def _tile_table(qm: TokenMeta, km: TokenMeta, L: int, tile_q: int, tile_k: int) -> jax.Array:
    """[nq, nk] int32: SKIP where no query of q tile i (in any sample) sees a key of kv tile j,
    FULL where every query sees every key (no mask to compute), else PARTIAL."""
    pairs = _block_pairs(qm, km, L)
    b, nbq, nbk = pairs.shape[:3]
    tiles = pairs.reshape(b, nbq // tile_q, tile_q, nbk // tile_k, tile_k, -1)
    any_, all_ = tiles.any((0, 2, 4, 5)), tiles.all((0, 2, 4, 5))
    return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, SKIP)).astype(jnp.int32)


def _tiles(x, size):
    """[B, T, H, D] -> [T/size, B, H, size, D]; [B, T] -> [T/size, B, size]."""
    b, t = x.shape[:2]
    x = x.reshape(b, t // size, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0) if x.ndim == 3 else jnp.moveaxis(x, 1, 0).swapaxes(2, 3)


def _untile(x):
    """[n, B, H, size, D] -> [B, n * size, H, D]."""
    n, b, h, s, d = x.shape
    return jnp.moveaxis(x.swapaxes(2, 3), 0, 1).reshape(b, n * s, h, d)


def _tile_mask(qm, km, block_len):
    return visible(_expand(qm, 2), _expand(km, 1), block_len)[:, None]  # [B, 1, bq, bk]


def _visible_first(table):
    """Tile classes [n, m] -> (each row's column indices [n, m]: its FULL tiles, then its
    PARTIAL ones, then the skipped ones; each row's count of visible tiles [n]). The tile loops
    visit visible tiles only, so a skipped tile costs nothing (at 48 frames 2/3 of them), and a
    group of them (`_visit`) is all FULL wherever it can be."""
    rank = jnp.where(table == FULL, 0, jnp.where(table == PARTIAL, 1, 2))
    cols = jnp.argsort(rank, axis=1, stable=True).astype(jnp.int32)
    return cols, (table != SKIP).sum(1).astype(jnp.int32)


def _visit(slots, count, group, step, carry):
    """`carry = step(idx, carry)` over the first `count` of `slots` (a row of `_visible_first`):
    `group` tiles per step (idx [group]), then the remainder one per step (idx [1]), so that no
    step computes a padding tile (with 1 or 2 visible tiles per row, as in the main job's 576
    tokens, padding made the step 12% slower)."""
    group = min(group, slots.shape[0])

    def grouped(n, c):
        return step(jax.lax.dynamic_slice_in_dim(slots, n * group, group), c)

    def single(n, c):
        return step(jax.lax.dynamic_slice_in_dim(slots, n, 1), c)

    whole = count // group
    carry = jax.lax.fori_loop(0, whole, grouped, carry)
    return jax.lax.fori_loop(whole * group, count, single, carry) if group > 1 else carry


def _token_axis(x):
    """The token axis of a stacked tile leaf: 3 of [n, B, H, s, D] and [n, B, H, s], 2 of
    [n, B, s]."""
    return 2 if x.ndim == 3 else 3


def _gather(tree, idx):
    """Tiles `idx` [G] of every leaf of `tree` (tiles stacked on the leading axis), joined along
    the token axis: [n, B, H, s, D] -> [B, H, G * s, D], [n, B, s] -> [B, G * s]."""
    def one(x):
        axis = _token_axis(x)
        g = jnp.moveaxis(x[idx], 0, axis - 1)
        return g.reshape(*g.shape[:axis - 1], -1, *g.shape[axis + 1:])
    return jax.tree.map(one, tree)


def _scatter_add(x, idx, update):
    """`x.at[idx].add` for an `update` joined like `_gather(x, idx)` ([B, H, G * s, D])."""
    b, h, _, d = update.shape
    return x.at[idx].add(jnp.moveaxis(update.reshape(b, h, idx.shape[0], -1, d), 2, 0))


def _flash_forward(q, k, v, qm, km, table, L, bq, bk, group):
    """Arranged, padded inputs (q pre-scaled) -> o [n, B, H, bq, D] (float32), lse [n, B, H, bq].

    Each step attends a q tile to `group` of its visible kv tiles at once, as one wider tile:
    the forward tile step alone ran at 1.7x the FLOP rate at 264 x 528 tokens as at 264 x 264
    (4 heads, 2 CPU cores: XLA:CPU keeps both cores busy on the wider dots); the whole forward
    gains less (`AttentionConfig.blockwise_tiles_per_step`)."""
    kt, vt = _tiles(k, bk), _tiles(v, bk)
    kmt = TokenMeta(*(_tiles(m, bk) for m in km))
    cols, counts = _visible_first(table)

    def one_q_tile(args):
        i, q_i, qm_i = args  # [B, H, bq, D], meta [B, bq]
        # From q_i, so the carry has q's type under shard_map (varying over its mesh axes).
        row = jnp.zeros_like(q_i[..., 0], jnp.float32)
        init = (row + _NEG, row, jnp.zeros_like(q_i, jnp.float32))

        def step(js, carry):
            k_j, v_j, km_j = _gather((kt, vt, kmt), js)  # [B, H, len(js) * bk, D]

            def update(masked: bool):
                m, l, acc = carry
                s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
                if masked:
                    # -inf, not _NEG: exp(-inf - m_new) = 0 even in a row that has seen no key
                    # yet (m_new = _NEG, finite), so p needs no second pass with the mask.
                    s = jnp.where(_tile_mask(qm_i, km_j, L), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                acc = acc * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_j.dtype),
                                                         v_j, preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc

            return jax.lax.cond(jnp.all(table[i, js] == FULL), lambda: update(masked=False),
                                lambda: update(masked=True))

        m, l, acc = _visit(cols[i], counts[i], group, step, init)
        safe_l = jnp.where(l > 0, l, 1.0)
        lse = jnp.where(l > 0, m + jnp.log(safe_l), jnp.inf)  # inf: fully masked row, p = 0
        return (acc / safe_l[..., None]).astype(q.dtype), lse

    qt = _tiles(q, bq)
    qmt = TokenMeta(*(_tiles(m, bq) for m in qm))
    return jax.lax.map(one_q_tile, (jnp.arange(qt.shape[0]), qt, qmt))


def _arranged(q, k, v, qm, km, L, tile_q, tile_k):
    """Noisy-first block order, padded to whole tiles: (q, k, v, qm, km, q order, kv order)."""
    q_order, kv_order = _noisy_first(qm, L), _noisy_first(km, L)
    q, qm = _arrange(q, q_order, L, tile_q, 0), _arrange_meta(qm, q_order, L, tile_q, -1)
    k, v = (_arrange(x, kv_order, L, tile_k, 0) for x in (k, v))
    km = _arrange_meta(km, kv_order, L, tile_k, -2)
    return q, k, v, qm, km, q_order, kv_order


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, qm, km, L, tile_q, tile_k, group, kernel):
    return _flash_fwd(q, k, v, qm, km, L, tile_q, tile_k, group, kernel)[0]


# Named, so that a profile (benchmarks/train_step.py --profile) finds the tile loops' ops.
@functools.partial(jax.named_call, name="blockwise_attention_fwd")
def _flash_fwd(q, k, v, qm, km, L, tile_q, tile_k, group, kernel):
    # Under a differentiated `lax.scan` (scanned layers) JAX hoists loop-invariant work out of
    # the scan body: everything that depends on the metadata alone, i.e. every tile's mask,
    # stacked over all (q tile, kv tile) pairs: an O(T * S) array. Tying the metadata to q keeps
    # the masks inside the tile loops.
    q, qm, km = jax.lax.optimization_barrier((q, qm, km))
    t = q.shape[1]
    qa, ka, va, qma, kma, q_order, kv_order = _arranged(q, k, v, qm, km, L, tile_q, tile_k)
    if kernel:  # `attention_cpu`: the same tiles, visited by a native CPU kernel
        pairs = _block_pairs(qma, kma, L)
        o, lse = attention_cpu.forward(qa, ka, va, pairs, _offset_classes(L)[1], L, tile_q,
                                       tile_k)
        return _restore(o, q_order, L, t), (qa, ka, va, pairs, o, lse, q_order, kv_order)
    table = _tile_table(qma, kma, L, tile_q, tile_k)
    o, lse = _flash_forward(qa, ka, va, qma, kma, table, L, tile_q * L, tile_k * L, group)
    out = _restore(_untile(o), q_order, L, t)
    return out, (qa, ka, va, qma, kma, table, o, lse, q_order, kv_order)


@functools.partial(jax.named_call, name="blockwise_attention_bwd")
def _flash_bwd(L, tile_q, tile_k, group, kernel, res, do):
    """FlashAttention-2 backward: recompute each tile's probabilities from the saved logsumexp,
    for `group` q tiles against one kv tile per step (as the forward groups kv tiles)."""
    if kernel:
        return _kernel_bwd(L, tile_q, tile_k, res, do)
    q, k, v, qm, km, table, o, lse, q_order, kv_order = res
    bq, bk = tile_q * L, tile_k * L
    t = do.shape[1]
    do_t = _tiles(_arrange(do, q_order, L, tile_q, 0), bq)  # [nq, B, H, bq, D]
    delta = jnp.einsum("nbhqd,nbhqd->nbhq", do_t.astype(jnp.float32), o.astype(jnp.float32))
    qt = _tiles(q, bq)
    qmt = TokenMeta(*(_tiles(m, bq) for m in qm))

    rows, counts = _visible_first(table.T)  # per kv tile: the q tiles that see it

    def one_k_tile(dq, xs):
        j, k_j, v_j, km_j = xs
        kf, vf = k_j.astype(jnp.float32), v_j.astype(jnp.float32)

        def step(is_, carry):
            dk, dv, dq = carry
            q_i, do_i, qm_i, lse_i, delta_i = _gather((qt, do_t, qmt, lse, delta), is_)

            def update(masked: bool):
                s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
                if masked:
                    s = jnp.where(_tile_mask(qm_i, km_j, L), s, -jnp.inf)  # as the forward
                p = jnp.exp(s - lse_i[..., None])
                dof = do_i.astype(jnp.float32)
                ds = p * (jnp.einsum("bhqd,bhkd->bhqk", dof, vf) - delta_i[..., None])
                return (dk + jnp.einsum("bhqk,bhqd->bhkd", ds, q_i.astype(jnp.float32)),
                        dv + jnp.einsum("bhqk,bhqd->bhkd", p, dof),
                        jnp.einsum("bhqk,bhkd->bhqd", ds, kf))

            dk, dv, dq_i = jax.lax.cond(jnp.all(table[is_, j] == FULL),
                                        lambda: update(masked=False), lambda: update(masked=True))
            # Outside the cond, so the full dq buffer is updated in place, never copied per tile.
            return dk, dv, _scatter_add(dq, is_, dq_i)

        zeros = jnp.zeros_like(k_j, jnp.float32)
        dk, dv, dq = _visit(rows[j], counts[j], group, step, (zeros, zeros, dq))
        return dq, (dk, dv)

    kt, vt = _tiles(k, bk), _tiles(v, bk)
    kmt = TokenMeta(*(_tiles(m, bk) for m in km))
    dq0 = jnp.zeros_like(qt, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(one_k_tile, dq0, (jnp.arange(kt.shape[0]), kt, vt, kmt))
    return _restored_grads(_untile(dq), _untile(dk), _untile(dv), q_order, kv_order, L, t,
                           q.dtype)


def _restored_grads(dq, dk, dv, q_order, kv_order, L, t, dtype):
    """Arranged gradients [B, T', H, D] -> the custom VJP's cotangents in layout order."""
    s_len = kv_order.shape[1] * L
    none = TokenMeta(*(None for _ in TokenMeta._fields))
    return (_restore(dq, q_order, L, t).astype(dtype),
            _restore(dk, kv_order, L, s_len).astype(dtype),
            _restore(dv, kv_order, L, s_len).astype(dtype), none, none)


def _kernel_bwd(L, tile_q, tile_k, res, do):
    """`_flash_bwd` on the native CPU kernel's residuals."""
    q, k, v, pairs, o, lse, q_order, kv_order = res
    do_a = _arrange(do, q_order, L, tile_q, 0).astype(jnp.float32)  # [B, T', H, D]
    delta = jnp.einsum("bthd,bthd->bht", do_a, o)
    dq, dk, dv = attention_cpu.backward(q, k, v, pairs, _offset_classes(L)[1], lse, do_a, delta,
                                        L, tile_q, tile_k)
    return _restored_grads(dq, dk, dv, q_order, kv_order, L, do.shape[1], q.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_blocks(tokens: int, block_len: int, num_blocks: int) -> int:
    """Frame blocks per tile for tiles of about `tokens` tokens, evened out over the sequence so
    that padding stays under one block per tile."""
    tiles = -(-num_blocks // max(1, round(tokens / block_len)))
    return -(-num_blocks // tiles)


def blockwise_attention(q, k, v, q_meta, kv_meta, block_len, block_q=256, block_kv=256,
                        tiles_per_step=2, cpu_kernel=True):
    """Memory-efficient attention: equal to `dense_attention`, without any T x S array.

    Metadata must come from `layout.token_meta` (T and S whole frame blocks of `block_len`
    tokens); tiles are `block_q` / `block_kv` tokens rounded to whole blocks, and each tile loop
    step takes `tiles_per_step` visible tiles at once (`AttentionConfig.blockwise_tiles_per_step`).
    `cpu_kernel`: run the tiles on the native CPU kernel where `attention_cpu.usable` says it
    can (`AttentionConfig.blockwise_cpu_kernel`); otherwise, and always for False, JAX's loops.
    """
    L = block_len
    if q.shape[1] % L or k.shape[1] % L:
        raise ValueError(f"blockwise attention needs whole frame blocks of {L} tokens, got "
                         f"{q.shape[1]} queries and {k.shape[1]} keys")
    tq = tile_blocks(block_q, L, q.shape[1] // L)
    tk = tile_blocks(block_kv, L, k.shape[1] // L)
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    kernel = cpu_kernel and attention_cpu.usable(q.dtype)
    return _flash(q, k, v, q_meta, kv_meta, L, tq, tk, tiles_per_step, kernel)


def resolve_impl(cfg: AttentionConfig, num_tokens: int) -> str:
    """The backend for `impl="auto"`: splash on TPU, dense up to `dense_max_tokens`, else
    blockwise (measured on CPU; see `AttentionConfig`)."""
    if cfg.impl != "auto":
        return cfg.impl
    if jax.default_backend() == "tpu":
        return "splash"
    return "dense" if num_tokens <= cfg.dense_max_tokens else "blockwise"


def attend(q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta, block_len: int,
           cfg: AttentionConfig = AttentionConfig()):
    """Masked attention: q [B,T,H,D], k/v [B,S,KV,D], metadata [B,T] / [B,S] -> [B,T,H,D]."""
    impl = resolve_impl(cfg, max(q.shape[1], k.shape[1]))
    if impl == "dense":
        return dense_attention(q, k, v, q_meta, kv_meta, block_len)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_meta, kv_meta, block_len, cfg.blockwise_tile,
                                   cfg.blockwise_tile, cfg.blockwise_tiles_per_step,
                                   cfg.blockwise_cpu_kernel)
    if impl == "dot_product":
        return dot_product_attention(q, k, v, q_meta, kv_meta, block_len)
    if impl == "splash":
        from vgpt_jax import attention_splash  # the Pallas TPU kernel, imported on demand
        return attention_splash.splash_attention(q, k, v, q_meta, kv_meta, block_len, cfg)
    raise ValueError(f"unknown attention impl {impl!r}")
