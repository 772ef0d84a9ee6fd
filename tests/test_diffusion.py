"""The next-clip-diffusion objective."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vgpt_jax import config, diffusion, layout, noise
from vgpt_jax.model import VideoGPT


def test_noising_follows_the_recipe():
    rng = np.random.default_rng(0)
    clip_ids = jnp.asarray(np.stack([layout.sample_clip_ids(rng, 8) for _ in range(64)]))
    x1 = jnp.ones((64, 8, 2, 2, 4))
    inputs = diffusion.make_training_inputs(x1, clip_ids, jax.random.key(0),
                                            diffusion.ObjectiveConfig(), 4)
    t_noisy, level = np.asarray(inputs.t_BN[:, 0::2]), np.asarray(inputs.t_BN[:, 1::2])
    ids = np.asarray(clip_ids)
    for b in range(64):  # one t per clip, shared by its frames
        for c in np.unique(ids[b]):
            assert np.ptp(t_noisy[b][ids[b] == c]) == 0
    assert len(np.unique(t_noisy)) > 64
    assert 0.9 <= level.min() and level.max() <= 1.0 and len(np.unique(level)) == level.size
    noisy = np.asarray(inputs.blocks_BNhwc[:, 0::2])
    # x_t = t x1 + (1 - t) eps: with x1 = 1 the mean over elements recovers t.
    # The noise mean over 16 elements has std (1 - t) / 4: allow 6 sigma.
    assert np.all(np.abs(noisy.mean((2, 3, 4)) - t_noisy) <= 1.5 * (1 - t_noisy) + 1e-6)


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("shape,dtype", [((3, 4, 2, 5, 6), jnp.float32),
                                         ((2, 3, 7), jnp.bfloat16), ((5, 6), jnp.float32)])
def test_noise_is_jax_random_normal_drawn_over_two_axes(shape, dtype, partitionable):
    """The training noise's cheaper-to-compile draw gives jax.random.normal's numbers, under
    either threefry mode (a change here would silently change every seeded run)."""
    key = jax.random.key(7)
    with jax.threefry_partitionable(partitionable):
        got = jax.jit(noise.normal, static_argnums=(1, 2))(key, shape, dtype)
        want = jax.random.normal(key, shape, dtype)
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_v_prediction_target_is_the_velocity():
    """prediction_type="v": the target is v = x1 - eps, so x_t + (1 - t) v = x1 exactly; the
    noising itself is the same draw as for x1-prediction."""
    rng = np.random.default_rng(1)
    clip_ids = jnp.asarray(np.stack([layout.sample_clip_ids(rng, 4) for _ in range(2)]))
    x1 = jnp.asarray(rng.standard_normal((2, 4, 2, 2, 4)), jnp.float32)
    make = lambda pt: diffusion.make_training_inputs(
        x1, clip_ids, jax.random.key(3), diffusion.ObjectiveConfig(prediction_type=pt), 4)
    as_v, as_x1 = make("v"), make("x1")
    np.testing.assert_array_equal(as_v.blocks_BNhwc, as_x1.blocks_BNhwc)
    np.testing.assert_array_equal(as_x1.target_BFhwc, x1)
    t = np.asarray(as_v.t_BN[:, 0::2])[:, :, None, None, None]
    noisy = np.asarray(as_v.blocks_BNhwc[:, 0::2])
    np.testing.assert_allclose(noisy + (1 - t) * np.asarray(as_v.target_BFhwc), x1, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        diffusion.ObjectiveConfig(prediction_type="eps").validate()


def test_unknown_timestep_sampling_is_rejected():
    with pytest.raises(ValueError, match="timestep_sampling"):
        diffusion.ObjectiveConfig(timestep_sampling="cosine").validate()


def test_non_contiguous_clips_are_rejected_before_compiling():
    model = VideoGPT(config.ModelConfig.from_config(config.get_model_config("tiny")),
                     rngs=nnx.Rngs(0))
    batch = {"latents": jnp.zeros((1, 3, 4, 4, 4)), "clip_ids": np.array([[0, 2, 2]])}
    with pytest.raises(ValueError, match="not contiguous"):
        diffusion.loss(model, batch, jax.random.key(0))


def test_loss_falls_on_tiny_synthetic_latents():
    """A minimal single-device loop: 60 AdamW steps on videos whose frames share a colour."""
    cfg = config.ModelConfig.from_config(config.get_model_config("tiny"))
    model = VideoGPT(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(3e-3, b2=0.95), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch, key):
        (value, _), grads = nnx.value_and_grad(diffusion.loss, has_aux=True)(model, batch, key)
        opt.update(model, grads)
        return value

    rng, key, losses = np.random.default_rng(0), jax.random.key(0), []
    for _ in range(60):
        colour = rng.normal(size=(8, 1, 1, 1, 4))
        batch = {"latents": jnp.asarray(np.broadcast_to(colour, (8, 4, 4, 4, 4)), jnp.float32),
                 "clip_ids": jnp.asarray(np.stack([layout.sample_clip_ids(rng, 4)
                                                   for _ in range(8)]))}
        key, sub = jax.random.split(key)
        losses.append(float(step(model, opt, batch, sub)))
    assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:10]), losses
