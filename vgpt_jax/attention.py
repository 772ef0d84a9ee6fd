"""Attention under the hierarchical next-clip mask, written once as a rule over token metadata.

`visible(q, k, block_len)` is the mask: which key token a query token may attend to. The rule
(verified against the official mask builder, see `../shared/reference/video_gpt.md`):

- clean query: sees every token of clean frames at earlier frames (across clips: clean frames
  are frame-causal), and inside its own frame block: `<img>` sees only itself, image tokens see
  `<img>` and all image tokens, `</img>` sees the whole block; never a noisy token;
- noisy query of clip c: every token of the clean frames of clips < c, and the noisy blocks of
  clip c in every frame of that clip (bidirectional across frames), with the marker rule: key
  offset 0 (`<|diffusion|>`) is visible to all, offset 1 (t) to query offsets >= 1, image keys to
  query offsets >= 2;
- padding: no real token sees a padding token; a padding query sees its own block only (the
  reference lets pad rows see everything; either way they only exist to avoid NaN).

Backends, one signature (`attend`), chosen by `AttentionConfig.impl`:
- "dense": the [B, Tq, Tk] mask and score matrix; the reference for tests, and fastest for
  short sequences on CPU.
- "blockwise": flash-style online softmax over (q-block, k-block) tiles with a custom VJP; the
  mask is computed per tile from metadata and fully masked tiles are skipped, so neither the
  T x T mask nor the score matrix is ever materialised (memory O(T * D)).
- "dot_product": `jax.nn.dot_product_attention` (cuDNN flash attention on GPU) with a dense
  boolean mask: the GPU hook for moderate lengths.
- "splash": the Pallas TPU splash kernel (`vgpt_jax.attention_splash`), the default on TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vgpt_jax.config import AttentionConfig
from vgpt_jax.layout import TokenMeta

_NEG = -1e30  # finite, so fully masked tiles give exp(.) = 0 instead of NaN


def visible(q: TokenMeta, k: TokenMeta, block_len: int) -> jax.Array:
    """The mask rule. `q` and `k` fields broadcast against each other (e.g. [B,T,1] vs [B,1,S])."""
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


def _pad_to(x, axis, multiple, value):
    n = x.shape[axis]
    pad = (-n) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _pad_meta(meta: TokenMeta, multiple: int, pad_frame: int) -> TokenMeta:
    # Padding tokens are invalid with a frame no real block has, so they see nothing and are
    # seen by nothing (their rows are sliced off).
    return TokenMeta(_pad_to(meta.frame, 1, multiple, pad_frame), _pad_to(meta.clip, 1, multiple, 0),
                     _pad_to(meta.noisy, 1, multiple, False), _pad_to(meta.valid, 1, multiple, False),
                     _pad_to(meta.offset, 1, multiple, 0))


def _blocks(x, size):
    """[B, T, ...] -> [T/size, B, size, ...] (leading axis to scan over)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _tile_mask(qm, km, block_len):
    return visible(_expand(qm, 2), _expand(km, 1), block_len)  # [B, bq, bk]


def _flash_forward(q, k, v, qm, km, block_len, bq, bk):
    """Returns o [B,T,H,D] and logsumexp [B,H,T]; q is pre-scaled; T, S are block multiples."""
    kb, vb, kmb = _blocks(k, bk), _blocks(v, bk), TokenMeta(*(_blocks(m, bk) for m in km))

    def one_q_block(args):
        q_i, qm_i = args  # [B,bq,H,D], meta [B,bq]
        b, _, h, d = q_i.shape
        init = (jnp.full((b, h, bq), _NEG, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, d), jnp.float32))

        def step(carry, kv):
            k_j, v_j, km_j = kv
            mask = _tile_mask(qm_i, km_j, block_len)[:, None]  # [B,1,bq,bk]

            def update(carry):
                m, l, acc = carry
                s = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
                s = jnp.where(mask, s, _NEG)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None]) * mask
                corr = jnp.exp(m - m_new)
                acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p.astype(v_j.dtype),
                                                         v_j, preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc

            return jax.lax.cond(mask.any(), update, lambda c: c, carry), None

        (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kmb))
        safe_l = jnp.where(l > 0, l, 1.0)
        o = (acc / safe_l[..., None]).transpose(0, 2, 1, 3)  # [B,bq,H,D]
        lse = jnp.where(l > 0, m + jnp.log(safe_l), jnp.inf)  # inf: fully masked row, p = 0
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(one_q_block, (_blocks(q, bq), TokenMeta(*(_blocks(m, bq) for m in qm))))
    b, h = q.shape[0], q.shape[2]
    o = jnp.moveaxis(o, 0, 1).reshape(q.shape)
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, -1)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, qm, km, block_len, bq, bk):
    return _flash_forward(q, k, v, qm, km, block_len, bq, bk)[0]


def _flash_fwd(q, k, v, qm, km, block_len, bq, bk):
    o, lse = _flash_forward(q, k, v, qm, km, block_len, bq, bk)
    return o, (q, k, v, qm, km, o, lse)


def _flash_bwd(block_len, bq, bk, res, do):
    """FlashAttention-2 backward: recompute each tile's probabilities from the saved logsumexp."""
    q, k, v, qm, km, o, lse = res
    b, t, h, d = q.shape
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    qb, dob = _blocks(q, bq), _blocks(do, bq)
    qmb = TokenMeta(*(_blocks(m, bq) for m in qm))
    lseb = jnp.moveaxis(lse.reshape(b, h, t // bq, bq), 2, 0)      # [nq,B,H,bq]
    deltab = jnp.moveaxis(delta.reshape(b, h, t // bq, bq), 2, 0)

    def one_k_block(dq, kv):
        k_j, v_j, km_j = kv

        def step(carry, xs):
            dk, dv, dq = carry
            i, q_i, do_i, qm_i, lse_i, delta_i = xs
            mask = _tile_mask(qm_i, km_j, block_len)[:, None]

            def update(carry):
                dk, dv, dq = carry
                s = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
                p = jnp.exp(jnp.where(mask, s, _NEG) - lse_i[..., None]) * mask
                dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p, do_i.astype(jnp.float32))
                dp = jnp.einsum("bqhd,bkhd->bhqk", do_i.astype(jnp.float32), v_j.astype(jnp.float32))
                ds = p * (dp - delta_i[..., None])
                dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds, q_i.astype(jnp.float32))
                dq_i = jnp.einsum("bhqk,bkhd->bqhd", ds, k_j.astype(jnp.float32))
                dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
                return dk, dv, dq

            return jax.lax.cond(mask.any(), update, lambda c: c, carry), None

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        nq = qb.shape[0]
        (dk, dv, dq), _ = jax.lax.scan(
            step, (zeros, zeros, dq), (jnp.arange(nq), qb, dob, qmb, lseb, deltab))
        return dq, (dk, dv)

    dq0 = jnp.zeros((t // bq, b, bq, h, d), jnp.float32)
    kmb = TokenMeta(*(_blocks(m, bk) for m in km))
    dq, (dk, dv) = jax.lax.scan(one_k_block, dq0, (_blocks(k, bk), _blocks(v, bk), kmb))
    unblock = lambda x, like: jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)
    none_meta = TokenMeta(*(None for _ in qm))
    return unblock(dq, q), unblock(dk, k), unblock(dv, v), none_meta, TokenMeta(*(None for _ in km))


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, q_meta, kv_meta, block_len, block_q=512, block_kv=512):
    """Memory-efficient attention: equal to `dense_attention`, without any T x S array."""
    t, s = q.shape[1], k.shape[1]
    bq, bk = min(block_q, t), min(block_kv, s)
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    qp = _pad_to(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), 1, bq, 0)
    kp, vp = _pad_to(k, 1, bk, 0), _pad_to(v, 1, bk, 0)
    qm = _pad_meta(q_meta, bq, pad_frame=-1)
    km = _pad_meta(kv_meta, bk, pad_frame=-2)
    return _flash(qp, kp, vp, qm, km, block_len, bq, bk)[:, :t]


def resolve_impl(cfg: AttentionConfig, num_tokens: int) -> str:
    """The backend for `impl="auto"`: splash on TPU, dense for short sequences, else blockwise."""
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
        return blockwise_attention(q, k, v, q_meta, kv_meta, block_len, cfg.block_q, cfg.block_kv)
    if impl == "dot_product":
        return dot_product_attention(q, k, v, q_meta, kv_meta, block_len)
    if impl == "splash":
        from vgpt_jax import attention_splash  # the Pallas TPU kernel, imported on demand
        return attention_splash.splash_attention(q, k, v, q_meta, kv_meta, block_len, cfg)
    raise ValueError(f"unknown attention impl {impl!r}")
