"""The sampler: cached sampling equals the release's full recomputation, guidance, seeds,
batching, the training-time view of every step, the rolling cache, and input errors."""
from __future__ import annotations

import dataclasses
import functools

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
    over [clean history, noisy clip] and the unconditional one the noisy clip alone from 0. The
    network's output is x1 (v = (x1 - z) / (1 - sigma)) or v itself; guidance combines the v's."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, blocks, t, layout):
        return nnx.merge(graphdef, state)(blocks, t, layout)

    def denoise(history, z, sigmas, guidance, prediction_type):
        b, hist, n = z.shape[0], history.shape[1], z.shape[1]
        cond_layout = layout_lib.concat(
            layout_lib.clip_layout(b, hist, L, noisy=False, clip=0),
            layout_lib.clip_layout(b, n, L, noisy=True, clip=1, first_frame=hist,
                                   first_position=hist))
        alone = layout_lib.clip_layout(b, n, L, noisy=True, clip=0)
        for i in range(len(sigmas) - 1):
            s = sigmas[i]
            t = np.full((b, n), s, np.float32)
            to_v = (lambda out: out) if prediction_type == "v" else (lambda out: (out - z) / (1 - s))
            v = to_v(np.asarray(forward(state, np.concatenate([history, z], 1),
                                        np.concatenate([np.ones((b, hist), np.float32), t], 1),
                                        cond_layout))[:, hist:])
            if guidance != 1.0 and hist:
                v_u = to_v(np.asarray(forward(state, z, t, alone)))
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
            clips.append(denoise(history, z0, sigmas, cfg.guidance, cfg.prediction_type))
            new = clips[-1]
            if cfg.context_noise:
                eps = sampling.context_eps(seeds, new.shape[1:], k)
                new = sampling.add_context_noise(new, eps, cfg.context_noise)
            history = np.concatenate([history, new], 1)
        return np.concatenate(clips, 1)

    sample.denoise = denoise
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


# ----------------------------------------------------------------------------- v-prediction


def test_v_and_x1_sampling_agree_on_the_same_network_output(model, context):
    """A denoiser that outputs v = (x1_hat - z) / (1 - t) of an x1 network, sampled as "v",
    follows the x1 network's trajectory sampled as "x1" (guided and not): the two
    parameterisations are one Euler step."""
    graphdef, state = nnx.split(model)
    cache = sampling._build_cache(graphdef, state, jnp.asarray(context))
    z0 = jnp.asarray(sampling.initial_noise([0, 1], (2, H, W, 4), 0))
    sigmas = jnp.asarray(sampling.time_grid(STEPS))

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def run(state, cache, guided, as_v):
        x1_fn = sampling.cached_x1_fn(nnx.merge(graphdef, state), cache, 2, L, guided)
        fn = (lambda z, t: (x1_fn(z, t) - z) / (1 - t[..., None, None, None])) if as_v else x1_fn
        return sampling.euler(fn, z0, sigmas, jnp.float32(1.5), guided,
                              "v" if as_v else "x1")

    for guided in (False, True):
        assert rel_err(run(state, cache, guided, True), run(state, cache, guided, False)) < 1e-5


def test_prediction_type_reaches_the_euler_step(model, context):
    """sample_video with prediction_type="v" integrates the network's output as the velocity
    (the plain reference), with and without the cache, and differs from x1 sampling."""
    cfg = sampling.SamplerConfig(steps=STEPS, window=WINDOW, prediction_type="v")
    as_v = sampling.sample_video(model, CLIPS, cfg, [0, 1], context_BFhwc=context)
    reference = make_reference(model)(context, CLIPS, cfg, [0, 1])
    assert rel_err(as_v, reference) < 1e-5
    recompute = sampling.sample_video(model, CLIPS, dataclasses.replace(
        cfg, cache_mode="recompute"), [0, 1], context_BFhwc=context)
    assert rel_err(recompute, reference) < 1e-5
    as_x1 = sampling.sample_video(model, CLIPS, dataclasses.replace(cfg, prediction_type="x1"),
                                  [0, 1], context_BFhwc=context)
    assert rel_err(as_x1, as_v) > 1e-2


# ----------------------------------------------------------------------------- release context noise


def test_release_context_noise_matches_the_official_formulas(model, context):
    """`renoise_context`: before every clip after the first, the whole context window is
    re-noised with fresh draws, (1 - c) x + c eps, while the stored history stays clean. With
    every draw injected, the per-clip outputs equal a plain loop written from the official
    pipeline's formulas (window trim, then noise, then 50-step-style Euler with guidance)."""
    c, guidance = 0.3, 1.5
    rng = np.random.default_rng(7)
    noise = [rng.standard_normal((2, n, H, W, 4)).astype(np.float32) for n in CLIPS]
    reference = make_reference(model)
    sigmas = sampling.time_grid(STEPS)
    history, expected, eps_used = context, [], []
    for k, n in enumerate(CLIPS):
        if history.shape[1] + n > WINDOW:
            history = history[:, history.shape[1] - (WINDOW - n):]
        eps = rng.standard_normal(history.shape).astype(np.float32) if k > 0 else None
        eps_used.append(eps)
        seen = history if k == 0 else (1 - c) * history + c * eps
        expected.append(reference.denoise(seen, noise[k], sigmas, guidance, "x1"))
        history = np.concatenate([history, expected[-1]], 1)  # the clean clip joins
    cfg = sampling.SamplerConfig(steps=STEPS, guidance=guidance, window=WINDOW,
                                 cache_mode="recompute", context_noise=c, renoise_context=True)
    clips = []
    out = sampling.sample_video(model, CLIPS, cfg, [0, 1], context_BFhwc=context,
                                noise_per_clip=noise, context_eps_per_clip=eps_used,
                                on_clip=lambda k, clip: clips.append(clip))
    for k, (ours, theirs) in enumerate(zip(clips, expected)):
        assert rel_err(ours, theirs) < 1e-5, f"clip {k}"
    np.testing.assert_array_equal(out, np.concatenate(clips, 1))
    # Our default (each clip noised once as it joins) sees other contexts from clip 1 on.
    once = sampling.sample_video(model, CLIPS, dataclasses.replace(cfg, renoise_context=False),
                                 [0, 1], context_BFhwc=context, noise_per_clip=noise)
    assert rel_err(once[:, :CLIPS[0]], out[:, :CLIPS[0]]) < 1e-6
    assert rel_err(once[:, CLIPS[0]:], out[:, CLIPS[0]:]) > 1e-3


def test_injected_noise_replaces_the_seeded_draws(model, context):
    cfg = sampling.SamplerConfig(steps=STEPS, window=WINDOW)
    seeded = sampling.sample_video(model, (2, 1), cfg, [3, 4], context_BFhwc=context)
    given = [sampling.initial_noise([3, 4], (n, H, W, 4), k) for k, n in enumerate((2, 1))]
    injected = sampling.sample_video(model, (2, 1), cfg, [0, 0], context_BFhwc=context,
                                     noise_per_clip=given)
    np.testing.assert_array_equal(injected, seeded)
    with pytest.raises(ValueError, match=r"noise_per_clip\[1\]: shape \(2, 2"):
        sampling.sample_video(model, (2, 1), cfg, [0, 0], context_BFhwc=context,
                              noise_per_clip=[given[0], given[0]])
    with pytest.raises(ValueError, match="renoise_context"):
        sampling.sample_video(model, (2,), dataclasses.replace(cfg, renoise_context=True), [0],
                              context_BFhwc=context[:1])


def test_guidance_scale_one_is_the_conditional_branch(model, context):
    """The batched [2B] path (unconditional rows behind invalid cache tokens) at s = 1 equals
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
    conditional rows (2b) against the training sequence [NS CL]* with clip ids [0]*C + [1]*n
    and clean copies equal to the context; the unconditional rows (2b + 1) against a one-clip
    sequence."""
    graphdef, state = nnx.split(model)
    n, sigma = 2, 0.4
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, n, H, W, 4)).astype(np.float32)
    cache = sampling._build_cache(graphdef, state, jnp.asarray(context))

    @jax.jit
    def step(state, cache, z, t):
        m = nnx.merge(graphdef, state)
        return sampling.cached_x1_fn(m, cache, n, L, guided=True)(z, t)

    x1 = step(state, cache, jnp.repeat(z, 2, axis=0), jnp.full((4, n), sigma))

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
    assert rel_err(x1[0::2], train_cond[:, CONTEXT:]) < 1e-5  # rows 2b: conditional
    train_alone = training_forward(np.zeros(n, int), z, junk[:, :n], np.full((2, n), sigma))
    assert rel_err(x1[1::2], train_alone) < 1e-5


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
