"""Memory-efficient and library attention equal the dense reference, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgpt_jax import attention, attention_cpu, layout

dense = jax.jit(attention.dense_attention, static_argnums=5)
blockwise = jax.jit(attention.blockwise_attention, static_argnums=(5, 6, 7, 8, 9))
# Blockwise attention on the native CPU kernel (where it builds: `attention_cpu`) and on JAX's
# tile loops, both against the dense reference.
BACKENDS = pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "jax_loops"])


def random_problem(seed, batch=2, heads=2, kv_heads=2, dim=8):
    rng = np.random.default_rng(seed)
    F, L = int(rng.integers(2, 6)), int(rng.integers(3, 8))
    ids = np.stack([layout.sample_clip_ids(rng, F) for _ in range(batch)])
    lay = layout.training_layout(ids, L)
    meta = layout.token_meta(lay)
    T = lay.num_tokens
    q = jnp.asarray(rng.normal(size=(batch, T, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, T, kv_heads, dim)), jnp.float32) for _ in "kv")
    return q, k, v, meta, L


# 2 and 3 tiles per step: a row's (column's) count that the group does not divide leaves a
# remainder, visited one tile per step.
@pytest.mark.parametrize("seed, bq, bk, per_step", [(0, 8, 8, 1), (1, 8, 8, 2), (2, 7, 13, 2),
                                                    (3, 6, 6, 3), (4, 5, 64, 2),
                                                    (5, 1024, 1024, 2)])
@BACKENDS
def test_blockwise_equals_dense(seed, bq, bk, per_step, cpu_kernel):
    q, k, v, meta, L = random_problem(seed)
    want = dense(q, k, v, meta, meta, L)
    got = blockwise(q, k, v, meta, meta, L, bq, bk, per_step, cpu_kernel)
    real = np.asarray(meta.valid)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_tile_table_classes_agree_with_the_dense_mask(seed):
    """SKIP: no visible pair in the tile (over the batch); FULL: every pair visible; PARTIAL:
    the rest. The training layout's clean keys of earlier frames make FULL tiles."""
    q, k, v, meta, L = random_problem(seed)
    tq = tk = 1
    qa, ka, va, qm, km, *_ = attention._arranged(q, k, v, meta, meta, L, tq, tk)
    table = np.asarray(attention._tile_table(qm, km, L, tq, tk))
    mask = np.asarray(attention.dense_mask(qm, km, L))  # [B, T, S]
    b, t, s_len = mask.shape
    tiles = mask.reshape(b, t // (tq * L), tq * L, s_len // (tk * L), tk * L)
    want = np.where(tiles.all((0, 2, 4)), attention.FULL,
                    np.where(tiles.any((0, 2, 4)), attention.PARTIAL, attention.SKIP))
    np.testing.assert_array_equal(table, want)
    assert (table == attention.FULL).any() and (table == attention.SKIP).any()


@pytest.mark.parametrize("seed, bq, bk, per_step", [(6, 8, 16, 1), (7, 9, 7, 2), (8, 6, 6, 3)])
@BACKENDS
def test_blockwise_gradients_equal_dense(seed, bq, bk, per_step, cpu_kernel):
    q, k, v, meta, L = random_problem(seed, kv_heads=1)
    w = jnp.asarray(np.random.default_rng(seed).normal(size=q.shape), jnp.float32)
    w = w * meta.valid[..., None, None]  # padding rows carry no loss, as in the model
    f_dense = lambda q, k, v: jnp.sum(attention.dense_attention(q, k, v, meta, meta, L) * w)
    f_block = lambda q, k, v: jnp.sum(
        attention.blockwise_attention(q, k, v, meta, meta, L, bq, bk, per_step, cpu_kernel) * w)
    g_dense = jax.grad(f_dense, argnums=(0, 1, 2))(q, k, v)
    g_block = jax.jit(jax.grad(f_block, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_block, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@BACKENDS
def test_blockwise_with_a_cache_and_invalid_history(cpu_kernel):
    """Queries shorter than keys (the sampler), with the history masked out for half the batch."""
    rng = np.random.default_rng(3)
    L, ctx, new = 6, 4, 3
    history = layout.clip_layout(2, ctx, L, noisy=False, clip=0)
    history = history.replace(valid=history.valid.at[1].set(False))
    clip = layout.clip_layout(2, new, L, noisy=True, clip=1, first_frame=ctx)
    qm, km = layout.token_meta(clip), layout.token_meta(layout.concat(history, clip))
    q = jnp.asarray(rng.normal(size=(2, new * L, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, (ctx + new) * L, 2, 8)), jnp.float32) for _ in "kv")
    full = dense(q, k, v, qm, km, L)
    np.testing.assert_allclose(blockwise(q, k, v, qm, km, L, 8, 8, 2, cpu_kernel), full,
                               atol=1e-5)
    # Without its history the second sample equals attention over the noisy clip alone.
    second = lambda meta: layout.TokenMeta(*(m[1:] for m in meta))
    alone = dense(q[1:], k[1:, ctx * L:], v[1:, ctx * L:], second(qm), second(qm), L)
    np.testing.assert_allclose(full[1:], alone, atol=1e-6)


def _lowers_to_the_kernel(dtype, cpu_kernel=True):
    q, k, v, meta, L = random_problem(0)
    f = lambda q, k, v: attention.blockwise_attention(q, k, v, meta, meta, L, 8, 8, 2, cpu_kernel)
    args = (x.astype(dtype) for x in (q, k, v))
    return "vgpt_blockwise_attention_fwd" in jax.jit(f).lower(*args).as_text()


def test_the_cpu_kernel_runs_where_it_can_and_only_there():
    """On one CPU device in float32 the blockwise backend calls the kernel (so the tests above
    compare it with the dense reference); in bfloat16, or switched off, JAX's tile loops."""
    assert attention_cpu.available(), "the kernel should build on the test machine"
    assert _lowers_to_the_kernel(jnp.float32)
    assert not _lowers_to_the_kernel(jnp.float32, cpu_kernel=False)
    assert not _lowers_to_the_kernel(jnp.bfloat16)


def test_kernel_gradients_are_bitwise_reproducible():
    """The training loop's resume equality needs the same gradients from the same inputs: the
    kernel's backward sums each dq tile in a fixed order, whatever thread runs it."""
    q, k, v, meta, L = random_problem(11, batch=2, heads=3, kv_heads=3)
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.blockwise_attention(q, k, v, meta, meta,
                                                                          L, 6, 6)))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    first = [np.asarray(g) for g in grad(q, k, v)]
    for _ in range(5):
        for a, b in zip(first, grad(q, k, v)):
            np.testing.assert_array_equal(np.asarray(b), a)


def test_the_kernel_refuses_inconsistent_shapes():
    q, k, v, meta, L = random_problem(0)
    qa, ka, va, qm, km, *_ = attention._arranged(q, k, v, meta, meta, L, 1, 1)
    pairs = attention._block_pairs(qm, km, L)
    classes = attention._offset_classes(L)[1]
    with pytest.raises(Exception, match="pairs must be"):
        jax.block_until_ready(attention_cpu.forward(qa, ka, va, pairs[:, 1:], classes, L, 1, 1))


def test_a_failed_kernel_build_names_the_compiler():
    with pytest.raises(RuntimeError, match="no C.. compiler 'no-such-c..'"):
        attention_cpu.build("no-such-c++")


def test_dot_product_backend_equals_dense():
    q, k, v, meta, L = random_problem(8)
    lib = jax.jit(attention.dot_product_attention, static_argnums=5)(q, k, v, meta, meta, L)
    np.testing.assert_allclose(lib, dense(q, k, v, meta, meta, L), atol=1e-5)
