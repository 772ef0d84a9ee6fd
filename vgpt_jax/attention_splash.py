"""The Pallas TPU splash-attention backend for the hierarchical next-clip mask.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) skips masked tiles using
a block-sparsity table and masks the rest inside the kernel. Its masks are meant to be static
and shared by the whole batch; ours depend on each sample's clip partition and validity. What
the jax 0.10.2 kernel offers, and what we use:

- a *computable* mask: the kernel calls `mask_function(q_ids, kv_ids)` per tile, where `kv_ids`
  are kv positions and `q_ids` come from the `MaskInfo.q_sequence` array. That array is data,
  so we fill it with a per-sample *query code* instead of positions;
- block-sparsity tables (`MaskInfo.data_next / block_mask`) are arrays too: we compute them per
  sample on device from the codes (`process_dynamic_mask` on a one-entry-per-tile mask), so
  tiles are skipped exactly, with no static superset and no T x S array at any length
  (`NumpyMask` and dense dynamic masks are O(T * S); at stage 4, 35k tokens, that is 1.2 GB
  per sample and head).

The query code. Per sample, kv frame blocks are stably sorted by (noisy, invalid, frame), and
keys/values permuted accordingly (a gather per layer, O(S * D)). In that order every query's
visible keys (`attention.visible`, evaluated here once per (query block, kv block) pair) are
  [0, A * L)  (whole blocks: clean history)  +  blocks [lo, hi) at in-block offsets <= limit
(the query's own clean frame, its clip's noisy blocks, or a padding query's own block). A, lo,
hi (9 bits each, so at most 511 kv blocks) and a 2-bit limit class pack into one int32; the
kernel decodes it against the kv position (block = pos // L, offset = pos % L). That the
visible set has this shape relies on the layout invariant that clip ids never decrease along
frames (`layout.check_clip_ids`); the shape is checked on device and a violation poisons the
output with NaN instead of silently attending to the wrong keys.

Sequence sharding follows maxtext: inside a mesh (`sharding.activation_sharding`), a
`shard_map` runs the kernel per device with queries split over `context`, heads over `tensor`,
the batch over the `batch` rule's axes, and keys/values all-gathered along the sequence. Each
shard computes its queries' codes and tile table locally. Queries are scaled by 1/sqrt(d)
before the kernel (splash applies no scaling). Off TPU the kernel runs in Pallas interpret
mode (slow; for tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash, splash_attention_mask_info as mask_info_lib)
from jax.sharding import PartitionSpec as P

from vgpt_jax import attention
from vgpt_jax import sharding as shard_lib
from vgpt_jax.config import AttentionConfig
from vgpt_jax.layout import TokenMeta

_FIELD_BITS = 9
MAX_KV_BLOCKS = 2**_FIELD_BITS - 1
_LANES = 128


@dataclasses.dataclass(frozen=True)
class QueryCodeMask:
    """The in-kernel mask: decodes a query code against kv positions (hashable: a static arg)."""
    block_len: int

    def __call__(self, code, kv_pos):
        L = self.block_len
        # pos // L through float32: exact for positions < 2**21, and cheaper on the TPU VPU than
        # integer division.
        block = jnp.floor((kv_pos.astype(jnp.float32) + 0.5) * (1.0 / L)).astype(jnp.int32)
        offset = kv_pos - block * L
        mask = (1 << _FIELD_BITS) - 1
        prefix = (code >> 2) & mask
        lo = (code >> (2 + _FIELD_BITS)) & mask
        hi = (code >> (2 + 2 * _FIELD_BITS)) & mask
        lim = code & 3
        limit = jnp.where(lim == 0, 0, jnp.where(lim == 1, 1, jnp.where(lim == 2, L - 2, L - 1)))
        return (block < prefix) | ((block >= lo) & (block < hi) & (offset <= limit))


def _block_meta(meta: TokenMeta, L: int) -> TokenMeta:
    return TokenMeta(*(m[::L] for m in meta))


def kv_block_order(kv_meta: TokenMeta, L: int) -> jax.Array:
    """Per-sample order of kv frame blocks [NBk]: valid clean, invalid clean, valid noisy,
    invalid noisy, each by frame (stable). One sample: fields [S]."""
    kb = _block_meta(kv_meta, L)
    group = kb.noisy.astype(jnp.int32) * 2 + (~kb.valid).astype(jnp.int32)
    return jnp.lexsort((kb.frame, group))


def query_codes(q_meta: TokenMeta, kv_meta: TokenMeta, L: int):
    """Per-sample query codes [T] and a flag saying the visible sets have the decoded shape.

    One sample: q fields [T], kv fields [S]; T, S multiples of L.
    """
    order = kv_block_order(kv_meta, L)
    kb = TokenMeta(*(m[order] for m in _block_meta(kv_meta, L)))
    qb = _block_meta(q_meta, L)
    expand = lambda m, axis: TokenMeta(*(jnp.expand_dims(x, axis) for x in m))
    q1, k1 = expand(qb, 1), expand(kb, 0)  # [NBq, 1] vs [1, NBk]
    # `visible` evaluated per (query block, kv block) with representative offsets: a query's
    # last offset sees every key offset of every block it can see at all. Blocks seen whole by
    # every query of the block (clean history: earlier frames / earlier clips) form the prefix;
    # the rest (own clean frame, the clip's noisy blocks, a padding block itself) the range.
    rep_off = lambda qm, off: qm._replace(offset=jnp.full_like(qm.offset, off))
    nbk = kb.frame.shape[0]
    pos = jnp.arange(nbk)[None]
    own_block = (k1.frame == q1.frame) & (k1.noisy == q1.noisy)
    whole = attention.visible(rep_off(q1, L - 1), rep_off(k1, 1), L) & ~own_block & ~(
        q1.noisy & k1.noisy)  # [NBq, NBk]
    own = attention.visible(rep_off(q1, L - 1), rep_off(k1, 0), L) & ~whole  # [NBq, NBk]
    prefix = whole.sum(1)
    lo = jnp.where(own.any(1), jnp.argmax(own, axis=1), 0)
    hi = jnp.where(own.any(1), lo + own.sum(1), 0)
    shape_ok = jnp.all(whole == (pos < prefix[:, None])) & jnp.all(
        own == ((pos >= lo[:, None]) & (pos < hi[:, None])))
    # Offset class of each query token: the largest key offset it sees in a partially visible
    # block (0, 1, L - 2 or everything).
    off, noisy, valid = q_meta.offset, q_meta.noisy, q_meta.valid
    lim = jnp.where(noisy, jnp.where(off == 0, 0, jnp.where(off == 1, 1, 3)),
                    jnp.where(off == 0, 0, jnp.where(off == L - 1, 3, 2)))
    lim = jnp.where(valid, lim, 3)
    rep = lambda x: jnp.repeat(x.astype(jnp.int32), L)
    code = (lim | (rep(prefix) << 2) | (rep(lo) << (2 + _FIELD_BITS))
            | (rep(hi) << (2 + 2 * _FIELD_BITS)))
    return code.astype(jnp.int32), order, shape_ok


def _round_up(n, m):
    return -(-n // m) * m


def _tile_mask(code, t_pad, s_pad, bq, bk, L):
    """[1, nq, nk] bool: tiles holding any visible (query, key) pair, from the codes alone."""
    mask = (1 << _FIELD_BITS) - 1
    prefix_end = ((code >> 2) & mask) * L
    lo = ((code >> (2 + _FIELD_BITS)) & mask) * L
    hi = ((code >> (2 + 2 * _FIELD_BITS)) & mask) * L
    start = jnp.arange(0, s_pad, bk)[None]  # [1, nk]
    hit = (start < prefix_end[:, None]) | ((lo[:, None] < start + bk) & (hi[:, None] > start)
                                           & (hi > lo)[:, None])
    return hit.reshape(t_pad // bq, bq, -1).any(1)[None]


def _one_sample(q_HTD, k_KSD, v_KSD, q_meta, kv_meta, L, bq, bk, interpret):
    """Splash attention for one sample: q [H, T, D] (scaled), k/v [KV, S, D] -> [H, T, D]."""
    h, t, d = q_HTD.shape
    kvh, s, _ = k_KSD.shape
    code, order, shape_ok = query_codes(q_meta, kv_meta, L)
    perm = lambda x: x.reshape(kvh, s // L, L, d)[:, order].reshape(kvh, s, d)
    k_KSD, v_KSD = perm(k_KSD), perm(v_KSD)
    t_pad, s_pad = _round_up(t, bq), _round_up(s, bk)
    # Padding queries see kv block 0 (no empty rows, no NaN); padding keys lie past every range.
    code = jnp.pad(code, (0, t_pad - t), constant_values=3 | (1 << 2))
    q_HTD = jnp.pad(q_HTD, ((0, 0), (0, t_pad - t), (0, 0)))
    k_KSD = jnp.pad(k_KSD, ((0, 0), (0, s_pad - s), (0, 0)))
    v_KSD = jnp.pad(v_KSD, ((0, 0), (0, s_pad - s), (0, 0)))
    tiles = _tile_mask(code, t_pad, s_pad, bq, bk, L)

    def info(process):
        mi, _ = process(tiles, (1, 1))
        return mi._replace(partial_mask_blocks=None, q_sequence=code, is_dynamic_mask=None)

    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                              block_kv_dkv=bk, block_kv_dkv_compute=bk, use_fused_bwd_kernel=True)
    kernel = splash.SplashAttentionKernel(
        info(mask_info_lib.process_dynamic_mask), None,
        info(mask_info_lib.process_dynamic_mask_dkv),
        block_sizes=sizes, is_mqa=False, save_residuals=False,
        mask_value=splash.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
        residual_checkpoint_name=None, mask_function=QueryCodeMask(L), interpret=interpret)
    out = kernel(q_HTD, k_KSD, v_KSD)[:, :t]
    return jnp.where(shape_ok, out, jnp.nan)


def _local_splash(q, k, v, q_meta, kv_meta, L, bq, bk, interpret):
    """[B, T, H, D] x [B, S, KV, D] -> [B, T, H, D] on one device (or one shard)."""
    t, s = q.shape[1], k.shape[1]
    if s // L > MAX_KV_BLOCKS:
        raise ValueError(f"splash attention: {s // L} kv frame blocks exceed the query code's "
                         f"limit of {MAX_KV_BLOCKS}")
    bq = min(bq, _round_up(t, 8))
    bk = min(bk, _round_up(s, _LANES))
    scaled = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    fn = functools.partial(_one_sample, L=L, bq=bq, bk=bk, interpret=interpret)
    out = jax.vmap(fn)(scaled.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                       v.transpose(0, 2, 1, 3), q_meta, kv_meta)
    return out.transpose(0, 2, 1, 3)


def splash_attention(q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta, block_len: int,
                     cfg: AttentionConfig = AttentionConfig(), *, interpret: bool | None = None):
    """Masked attention with the splash kernel: q [B,T,H,D], k/v [B,S,KV,D] -> [B,T,H,D].

    Equal to `attention.dense_attention` at every query (padding queries included). T and S
    must be multiples of `block_len` (whole frame blocks). Inside `sharding.activation_sharding`
    the kernel is shard_mapped over the mesh (see the module docstring).
    """
    L = block_len
    if q.shape[1] % L or k.shape[1] % L:
        raise ValueError(f"splash attention: sequence lengths {q.shape[1]} (q) and {k.shape[1]} "
                         f"(kv) must be whole frame blocks of {L} tokens")
    active = shard_lib.active_sharding()
    if interpret is None:  # compile for the mesh's devices (e.g. an AOT TPU topology), else run
        platform = (active[0].devices.flat[0].platform if active is not None
                    else jax.default_backend())
        interpret = platform != "tpu"
    local = functools.partial(_local_splash, L=L, bq=cfg.block_q, bk=cfg.block_kv,
                              interpret=interpret)
    if active is None:
        return local(q, k, v, q_meta, kv_meta)
    mesh, rules = active
    b, t, h, _ = q.shape
    # A mesh axis that does not divide its dimension is dropped (`fit_spec`): the sequence
    # splits in whole frame blocks, and one head split must divide both q's and kv's heads.
    batch, seq, heads = shard_lib.fit_spec(
        shard_lib.logical_to_spec(("batch", "sequence", "heads"), rules),
        (b, t // L, math.gcd(h, k.shape[2])), mesh)
    q_spec, kv_spec = P(batch, seq, heads, None), P(batch, None, heads, None)
    meta_q = TokenMeta(*(P(batch, seq) for _ in q_meta))
    meta_kv = TokenMeta(*(P(batch, None) for _ in kv_meta))
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, meta_q, meta_kv),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_meta, kv_meta)
