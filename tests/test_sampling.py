"""The sampler: cached sampling equals the release's full recomputation, guidance, seeds,
batching, the training-time view of every step, the rolling cache, and input errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgpt_jax import checkpoint
from vgpt_jax import layout as layout_lib
from vgpt_jax import sampling
from vgpt_jax.config import ModelConfig, get_model_config
from vgpt_jax.model import VideoGPT

H = W = 4            # latent size: 2x2 patches, block length L = 6
L = 6
STEPS = 3
CONTEXT = 3
CLIPS = (2, 1, 3)    # with window 6: history 3 -> 5 -> 6, then a reset to the newest 3 frames
WINDOW = 6


def random_model(num_layers=2, seed=0, **changes) -> VideoGPT:
    """The tiny model with random values in every parameter (zero-initialised heads and
    embedders would make every prediction 0 and every comparison vacuous). Filled from numpy
    into the abstract model: no per-parameter compiles."""
    cfg = get_model_config("tiny")
    cfg.num_layers = num_layers
    cfg.attention.impl = "dense"
    cfg.update(changes)
    graphdef, state = nnx.split(checkpoint.abstract_model(ModelConfig.from_config(cfg)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32)),
                         state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def context():
    return np.random.default_rng(0).standard_normal((2, CONTEXT, H, W, 4)).astype(np.float32)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# ----------------------------------------------------------------------------- the reference


def make_reference(model):
    """The release's algorithm, written plainly: per step, the conditional branch is one forward
    over [clean history, noisy clip] and the unconditional one the noisy clip alone from 0."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, blocks, t, layout):
        return nnx.merge(graphdef, state)(blocks, t, layout)

    def denoise(history, z, sigmas, guidance):
        b, hist, n = z.shape[0], history.shape[1], z.shape[1]
        cond_layout = layout_lib.concat(
            layout_lib.clip_layout(b, hist, L, noisy=False, clip=0),
            layout_lib.clip_layout(b, n, L, noisy=True, clip=1, first_frame=hist,
                                   first_position=hist))
        alone = layout_lib.clip_layout(b, n, L, noisy=True, clip=0)
        for i in range(len(sigmas) - 1):
            s = sigmas[i]
            t = np.full((b, n), s, np.float32)
            x1_c = np.asarray(forward(state, np.concatenate([history, z], 1),
                                      np.concatenate([np.ones((b, hist), np.float32), t], 1),
                                      cond_layout))[:, hist:]
            v = (x1_c - z) / (1 - s)
            if guidance != 1.0 and hist:
                v_u = (np.asarray(forward(state, z, t, alone)) - z) / (1 - s)
                v = v_u + guidance * (v - v_u)
            z = z + (sigmas[i + 1] - s) * v
        return z

    def sample(context, clip_sizes, cfg: sampling.SamplerConfig, seeds):
        sigmas = sampling.time_grid(cfg.steps, cfg.time_shift)
        history, clips = context, []
        for k, n in enumerate(clip_sizes):
            if history.shape[1] + n > cfg.window:
                history = history[:, history.shape[1] - (cfg.window - n):]
            z0 = sampling.initial_noise(seeds, (n, H, W, 4), k)
            clips.append(denoise(history, z0, sigmas, cfg.guidance))
            new = clips[-1]
            if cfg.context_noise:
                new = sampling.add_context_noise(new, seeds, k, cfg.context_noise)
            history = np.concatenate([history, new], 1)
        return np.concatenate(clips, 1)

    return sample


@pytest.mark.parametrize("guidance,context_noise", [(1.0, 0.0), (1.5, 0.2)])
def test_cached_sampling_equals_full_recomputation(model, context, guidance, context_noise):
    cfg = sampling.SamplerConfig(steps=STEPS, guidance=guidance, window=WINDOW,
                                 context_noise=context_noise)
    cached = sampling.sample_video(model, CLIPS, cfg, [0, 1], context_BFhwc=context)
    reference = make_reference(model)(context, CLIPS, cfg, [0, 1])
    assert cached.shape == (2, sum(CLIPS), H, W, 4)
    assert rel_err(cached, reference) < 1e-5
    if guidance != 1.0:  # the module's no-cache mode (the benchmark's baseline) agrees too
        recompute = sampling.sample_video(model, CLIPS, dataclasses.replace(
            cfg, cache_mode="recompute"), [0, 1], context_BFhwc=context)
        assert rel_err(recompute, reference) < 1e-5


def test_guidance_scale_one_is_the_conditional_branch(model, context):
    """The batched [2B] path (unconditional half behind invalid cache tokens) at s = 1 equals
    the conditional branch run alone."""
    graphdef, state = nnx.split(model)
    cache = sampling._build_cache(graphdef, state, jnp.asarray(context))
    z0 = sampling.initial_noise([0, 1], (2, H, W, 4), 0)
    sigmas = jnp.asarray(sampling.time_grid(STEPS))
    both = sampling._denoise_cached(graphdef, state, cache, z0, sigmas, True, jnp.float32(1.0))
    alone = sampling._denoise_cached(graphdef, state, cache, z0, sigmas, False, jnp.float32(1.0))
    assert rel_err(both, alone) < 1e-6
    guided = sampling._denoise_cached(graphdef, state, cache, z0, sigmas, True, jnp.float32(3.0))
    assert rel_err(guided, alone) > 1e-3  # guidance does something


def test_seed_reproducible_and_batched_equals_one_by_one(model, context):
    cfg = sampling.SamplerConfig(steps=STEPS, window=WINDOW)
    batched = sampling.sample_video(model, (2,), cfg, [3, 7], context_BFhwc=context)
    again = sampling.sample_video(model, (2,), cfg, [3, 7], context_BFhwc=context)
    np.testing.assert_array_equal(batched, again)
    for b, seed in enumerate([3, 7]):
        one = sampling.sample_video(model, (2,), cfg, [seed], context_BFhwc=context[b:b + 1])
        assert rel_err(one[0], batched[b]) < 1e-5
    other = sampling.sample_video(model, (2,), cfg, [4, 7], context_BFhwc=context)
    assert rel_err(other[0], batched[0]) > 1e-2 and rel_err(other[1], batched[1]) < 1e-5


def test_noise_is_fresh_per_clip_unless_asked_otherwise():
    shape = (2, H, W, 4)
    fresh = [sampling.initial_noise([5, 6], shape, k) for k in (0, 1)]
    same = [sampling.initial_noise([5, 6], shape, k, same_noise_every_clip=True) for k in (0, 1)]
    assert not np.allclose(fresh[0], fresh[1]) and not np.allclose(fresh[0][0], fresh[0][1])
    np.testing.assert_array_equal(same[0], same[1])
    np.testing.assert_array_equal(same[0], fresh[0])
    np.testing.assert_array_equal(sampling.initial_noise([6], shape, 1)[0], fresh[1][1])


def test_time_grid():
    np.testing.assert_allclose(sampling.time_grid(4), [0, 0.25, 0.5, 0.75, 1], atol=1e-7)
    shifted = sampling.time_grid(4, 3.0)
    np.testing.assert_allclose(shifted, [0, 0.25 / 2.5, 0.5 / 2, 0.75 / 1.5, 1], atol=1e-7)


def test_each_step_sees_what_training_showed(model, context):
    """One step's x1 predictions equal the training forward pass on the same tokens: the
    conditional half against the training sequence [NS CL]* with clip ids [0]*C + [1]*n and
    clean copies equal to the context; the unconditional half against a one-clip sequence."""
    graphdef, state = nnx.split(model)
    n, sigma = 2, 0.4
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, n, H, W, 4)).astype(np.float32)
    cache = sampling._build_cache(graphdef, state, jnp.asarray(context))

    @jax.jit
    def step(state, cache, z, t):
        m = nnx.merge(graphdef, state)
        return sampling.cached_x1_fn(m, cache, n, L, guided=True)(z, t)

    x1 = step(state, cache, jnp.concatenate([z, z]), jnp.full((4, n), sigma))

    def training_forward(clip_ids, noisy, clean, t_noisy):
        f = len(clip_ids)
        blocks = np.stack([noisy, clean], axis=2).reshape(2, 2 * f, H, W, 4)
        t = np.stack([t_noisy, np.ones_like(t_noisy)], axis=2).reshape(2, 2 * f)
        layout = layout_lib.training_layout(jnp.asarray(np.tile(clip_ids, (2, 1))), L)
        return model(jnp.asarray(blocks), jnp.asarray(t), layout)[:, 0::2]

    f = CONTEXT + n
    junk = rng.standard_normal((2, f, H, W, 4)).astype(np.float32)  # never visible to clip 1
    noisy = np.concatenate([junk[:, :CONTEXT], z], 1)
    clean = np.concatenate([context, junk[:, CONTEXT:]], 1)
    t_noisy = np.concatenate([rng.uniform(size=(2, CONTEXT)), np.full((2, n), sigma)], 1)
    train_cond = training_forward(np.array([0] * CONTEXT + [1] * n), noisy, clean, t_noisy)
    assert rel_err(x1[:2], train_cond[:, CONTEXT:]) < 1e-5
    train_alone = training_forward(np.zeros(n, int), z, junk[:, :n], np.full((2, n), sigma))
    assert rel_err(x1[2:], train_alone) < 1e-5


# ----------------------------------------------------------------------------- rolling cache


@pytest.fixture(scope="module")
def one_layer_model():
    # With one layer a cached key/value depends on its own frame only, so a rolling cache after
    # eviction must equal a cache built from scratch over the kept frames.
    return random_model(num_layers=1, seed=3)


def test_rolling_eviction_reindexes_exactly(one_layer_model):
    graphdef, state = nnx.split(one_layer_model)
    frames = np.random.default_rng(2).standard_normal((1, 6, H, W, 4)).astype(np.float32)
    cache = sampling._build_cache(graphdef, state, jnp.asarray(frames))
    rolled = sampling._evict(cache, 2, 1, L, one_layer_model.cfg)
    kept = np.concatenate([frames[:, :1], frames[:, 3:]], 1)
    fresh = sampling._build_cache(graphdef, state, jnp.asarray(kept))
    for a, b in zip(rolled.kv, fresh.kv):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5
    for a, b in zip(rolled.meta, fresh.meta):
        np.testing.assert_array_equal(a, b)


def test_rolling_sampling_keeps_anchors_and_newest_frames(one_layer_model):
    ctx = np.random.default_rng(4).standard_normal((1, 3, H, W, 4)).astype(np.float32)
    cfg = sampling.SamplerConfig(steps=STEPS, window=5, cache_mode="rolling", anchor_frames=1)
    out = sampling.sample_video(one_layer_model, (2, 2), cfg, [0], context_BFhwc=ctx)
    # Clip 1 sees anchor frame 0 and the newest two frames (clip 0) at slots 0, 1, 2.
    graphdef, state = nnx.split(one_layer_model)
    history = jnp.asarray(np.concatenate([ctx[:, :1], out[:, :2]], 1))
    z0 = sampling.initial_noise([0], (2, H, W, 4), 1)
    expected = sampling._denoise_recompute(graphdef, state, history, z0,
                                           jnp.asarray(sampling.time_grid(STEPS)), True,
                                           jnp.float32(cfg.guidance))
    assert rel_err(out[:, 2:], expected) < 1e-5


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change,clips,ctx_shape,message", [
    (dict(steps=0), (2,), (1, 3, H, W, 4), "steps=0"),
    (dict(guidance=-0.5), (2,), (1, 3, H, W, 4), "guidance=-0.5"),
    (dict(window=4), (2,), (1, 5, H, W, 4), "context of 5 frames is longer than the window of 4"),
    ({}, (2,), (1, 3, H, W, 3), "3 channels"),
    ({}, (2,), (1, 3, 5, 4, 4), "latent size 5x4"),
    ({}, (0,), (1, 3, H, W, 4), "clip_sizes"),
    (dict(window=4), (5,), (1, 3, H, W, 4), "does not fit the window"),
    (dict(anchor_frames=1), (2,), (1, 3, H, W, 4), "anchor"),
    (dict(cache_mode="kv"), (2,), (1, 3, H, W, 4), "cache_mode"),
])
def test_bad_requests_fail_before_compiling(model, change, clips, ctx_shape, message):
    cfg = dataclasses.replace(sampling.SamplerConfig(steps=STEPS), **change)
    with pytest.raises(ValueError, match=message):
        sampling.sample_video(model, clips, cfg, [0], context_BFhwc=np.zeros(ctx_shape, np.float32))
