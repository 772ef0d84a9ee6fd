"""The splash backend (Pallas interpret mode on CPU) against the dense reference: outputs and
gradients at every query, on random clip partitions with the marker tokens, at lengths that are
and are not kernel-block multiples, on the sampler's guided cross-attention layout; and a
layout that breaks the clip-order invariant poisons the output instead of attending wrongly.

Compiles dominate (interpret-mode Pallas): one jitted function per shape, partitions are data.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")

from vgpt_jax import attention, attention_splash, layout as layout_lib  # noqa: E402
from vgpt_jax.config import AttentionConfig  # noqa: E402

CFG = AttentionConfig(impl="splash", block_q=128, block_kv=128)
H, KV, D = 4, 2, 8  # grouped-query heads: two query heads per kv head


def _qkv(b, t, s, seed):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, H, D))
    k = jax.random.normal(ks[1], (b, s, KV, D))
    v = jax.random.normal(ks[2], (b, s, KV, D))
    w = jax.random.normal(ks[3], (b, t, H, D))  # a random cotangent
    return q, k, v, w


def _both(q, k, v, w, q_meta, kv_meta, L):
    """(splash, dense) outputs and gradients wrt q, k, v of <out, w>."""
    def run(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, q_meta, kv_meta, L) * w)
        return fn(q, k, v, q_meta, kv_meta, L), jax.grad(loss, (0, 1, 2))(q, k, v)
    return (run(lambda *a: attention_splash.splash_attention(*a, CFG)),
            run(attention.dense_attention))


@pytest.fixture(scope="module")
def training_pair():
    """Jitted (splash, dense) on the training layout, the clip ids [B, F] as data."""
    @jax.jit
    def f(clip_ids, q, k, v, w, L_arr):
        L = L_arr.shape[0]
        meta = layout_lib.token_meta(layout_lib.training_layout(clip_ids, L))
        return _both(q, k, v, w, meta, meta, L)
    return f


@pytest.mark.parametrize("frames,block_len", [(3, 6), (8, 8)], ids=["ragged", "block_multiple"])
def test_training_layout_matches_dense(training_pair, frames, block_len):
    t = 2 * frames * block_len
    assert (t % 128 == 0) == (block_len == 8)
    rng = np.random.default_rng(frames)
    ids = np.stack([layout_lib.sample_clip_ids(rng, frames, "random"),
                    layout_lib.sample_clip_ids(rng, frames, "one_frame")])
    q, k, v, w = _qkv(2, t, t, seed=frames)
    (o_s, g_s), (o_d, g_d) = training_pair(jnp.asarray(ids), q, k, v, w, jnp.zeros(block_len))
    np.testing.assert_allclose(o_s, o_d, atol=1e-5, rtol=0)
    for a, b, name in zip(g_s, g_d, "qkv"):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"d{name}")
    # A second partition through the same compiled kernel (the mask is data, not a constant).
    ids2 = np.stack([layout_lib.sample_clip_ids(rng, frames, "single"),
                     layout_lib.sample_clip_ids(rng, frames, "random")])
    (o_s, g_s), (o_d, g_d) = training_pair(jnp.asarray(ids2), q, k, v, w, jnp.zeros(block_len))
    np.testing.assert_allclose(o_s, o_d, atol=1e-5, rtol=0)
    np.testing.assert_allclose(g_s[1], g_d[1], atol=1e-5, rtol=0)


def test_broken_clip_order_is_poisoned_not_wrong(training_pair):
    """Clip ids that decrease along frames break the code's range shape: NaN, loudly."""
    q, k, v, w = _qkv(2, 36, 36, seed=3)
    bad = jnp.asarray([[0, 1, 0], [0, 0, 1]], jnp.int32)
    (o_s, _), _ = training_pair(bad, q, k, v, w, jnp.zeros(6))
    assert np.isnan(np.asarray(o_s[0])).all()
    assert np.isfinite(np.asarray(o_s[1])).all()


def test_sampler_guided_cross_attention_matches_dense():
    """The cached denoiser's layout: a noisy clip against [history, clip], the second half of
    the batch (unconditional) with its history marked invalid."""
    L, hist, n, b = 6, 3, 2, 1
    cache = layout_lib.token_meta(layout_lib.concat(
        jax.tree.map(lambda x, y: jnp.concatenate([x, y]),
                     layout_lib.clip_layout(b, hist, L, noisy=False, clip=0),
                     layout_lib.clip_layout(b, hist, L, noisy=False, clip=0, valid=False))))
    noisy = layout_lib.token_meta(jax.tree.map(
        lambda x, y: jnp.concatenate([x, y]),
        layout_lib.clip_layout(b, n, L, noisy=True, clip=1, first_frame=hist,
                               first_position=hist),
        layout_lib.clip_layout(b, n, L, noisy=True, clip=1)))
    kv_meta = layout_lib.TokenMeta(*(jnp.concatenate([c, m], 1) for c, m in zip(cache, noisy)))
    q, k, v, _ = _qkv(2 * b, n * L, (hist + n) * L, seed=5)
    fwd = jax.jit(lambda q, k, v: attention_splash.splash_attention(q, k, v, noisy, kv_meta, L,
                                                                    CFG))
    np.testing.assert_allclose(fwd(q, k, v), attention.dense_attention(q, k, v, noisy, kv_meta, L),
                               atol=1e-5, rtol=0)


def test_rejects_partial_frame_blocks():
    meta = layout_lib.token_meta(layout_lib.training_layout(jnp.zeros((1, 2), jnp.int32), 6))
    q = jnp.zeros((1, 23, H, D))
    with pytest.raises(ValueError, match="whole frame blocks of 6 tokens"):
        attention_splash.splash_attention(q, q, q, meta, meta, 6, CFG)
