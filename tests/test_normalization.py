"""Latent normalisation: measured at ingestion, carried by store, checkpoint and export, and
refused where a store and a model disagree."""
import os
import sys

import numpy as np
import pytest

from vgpt_jax.data.ingest import ingest_arrays
from vgpt_jax.vae import latent_space as ls

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))


def _videos(n=6, frames=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 60, (n, 1, size, size, 3))  # dark, like the physics world
    return [(np.clip(b + rng.integers(0, 40, (frames, size, size, 3)), 0, 255).astype(np.uint8),
             8.0, f"v{i}") for i, b in enumerate(base)]


def test_measure_shift_and_scale():
    z = np.random.default_rng(0).normal(3.0, 0.25, (64, 4, 4, 5)) * np.arange(1, 6)
    n = ls.LatentNormalization.measure(z, "shift_scale")
    out = n.normalize(z)
    np.testing.assert_allclose(out.reshape(-1, 5).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(-1, 5).std(0), 1, atol=1e-4)
    np.testing.assert_allclose(n.denormalize(out), z, rtol=1e-5, atol=1e-5)
    shift = ls.LatentNormalization.measure(z, "shift")
    assert shift.scale == (1.0,) * 5
    assert ls.LatentNormalization.from_dict(n.to_dict()) == n
    with pytest.raises(ValueError, match="mode"):
        ls.LatentNormalization.measure(z, "whiten")


def test_space_to_depth_round_trip_through_the_normalisation():
    frames = _videos(1)[0][0]
    base = ls.SpaceToDepth(2)
    space = ls.NormalizedSpace(base, ls.LatentNormalization.measure(base.encode(frames),
                                                                    "shift_scale"))
    z = space.encode(frames)
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-2
    np.testing.assert_array_equal(space.decode(z), frames)
    spec = {"kind": "space_to_depth", "downsample": 2, "normalization": space.normalization.to_dict()}
    np.testing.assert_array_equal(ls.make_latent_space(spec).encode(frames), z)


def test_autoencoder_kl_round_trip_through_the_normalisation():
    from vgpt_jax.vae.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from vgpt_jax.vae.latent_space import AutoencoderKLSpace
    from flax import nnx
    cfg = AutoencoderKLConfig(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                              norm_num_groups=4, layers_per_block=1)
    base = AutoencoderKLSpace(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), batch_size=4)
    frames = _videos(1, frames=4)[0][0]
    raw = base.encode(frames)
    space = ls.NormalizedSpace(base, ls.LatentNormalization.measure(raw, "shift_scale"))
    z = space.encode(frames)
    np.testing.assert_allclose(space.normalization.denormalize(z), raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(space.decode(z), base.decode(raw))


def test_store_records_the_measured_normalisation(tmp_path):
    store = ingest_arrays(_videos(), str(tmp_path / "s"), "space_to_depth:2", normalize="shift_scale")
    norm = store.normalization
    assert norm is not None and norm.channels == 12
    latents = np.concatenate([store[i]["latents"] for i in range(len(store))])
    assert abs(latents.mean()) < 0.01 and abs(latents.std() - 1) < 0.05
    assert ingest_arrays(_videos(), str(tmp_path / "raw"), "space_to_depth:2").normalization is None


def test_a_given_normalisation_is_applied_to_the_records(tmp_path):
    """More data for a model: ingested with its normalisation, the records hold that
    normalisation of the raw latents (not raw latents under a manifest that says otherwise)."""
    videos = _videos()
    given = ingest_arrays(_videos(seed=1), str(tmp_path / "model"), "space_to_depth:2",
                          normalize="shift_scale").normalization
    store = ingest_arrays(videos, str(tmp_path / "s"), "space_to_depth:2", normalize=given)
    assert store.normalization == given
    raw = ls.SpaceToDepth(2).encode(videos[0][0])
    np.testing.assert_allclose(store[0]["latents"], given.normalize(raw), atol=2e-3)


def _train_config(store):
    import tiny_test
    cfg = tiny_test.get_config()
    cfg.model.latent_channels = 12
    cfg.data.store = store
    return cfg


def test_training_records_the_store_normalisation_and_refuses_another(tmp_path):
    from vgpt_jax import train
    normalised = str(tmp_path / "n")
    ingest_arrays(_videos(), normalised, "space_to_depth:2", normalize="shift_scale")
    raw = str(tmp_path / "r")
    ingest_arrays(_videos(), raw, "space_to_depth:2")
    cfg = _train_config(normalised)
    train.build(cfg)
    recorded = ls.normalization_of(cfg.data.latent_normalization)
    assert recorded is not None and recorded.channels == 12
    cfg.data.store = raw  # a store that lacks the model's normalisation
    with pytest.raises(ValueError, match="latent normalization mismatch"):
        train.build(cfg)
    other = str(tmp_path / "o")
    ingest_arrays(_videos(seed=1), other, "space_to_depth:2", normalize="shift_scale")
    cfg.data.store = other  # measured on other data: different statistics
    with pytest.raises(ValueError, match="latent normalization mismatch"):
        train.build(cfg)


def test_resume_and_sampling_refuse_a_different_normalisation(tmp_path):
    from vgpt_jax import checkpoint, train
    from vgpt_jax.pipeline import Pipeline
    normalised = str(tmp_path / "n")
    ingest_arrays(_videos(), normalised, "space_to_depth:2", normalize="shift_scale")
    cfg = _train_config(normalised)
    cfg.train.steps = 2
    workdir = str(tmp_path / "w")
    train.train(cfg, workdir)
    pipe = Pipeline.from_checkpoint(workdir, latent_space=ls.SpaceToDepth(2))
    assert ls.normalization_of(pipe.latent_space) == ls.normalization_of(cfg.data.latent_normalization)
    with pytest.raises(ValueError, match="latent normalization mismatch"):
        Pipeline.from_checkpoint(workdir, latent_space=ls.NormalizedSpace(
            ls.SpaceToDepth(2), ls.LatentNormalization((0.0,) * 12, (2.0,) * 12)))
    export = str(tmp_path / "export")
    checkpoint.export_model(export, pipe.model, cfg)
    assert ls.normalization_of(checkpoint.read_config(export).data.latent_normalization) is not None
    raw = str(tmp_path / "r")
    ingest_arrays(_videos(), raw, "space_to_depth:2")
    resumed = _train_config(raw)
    resumed.train.steps = 4
    with pytest.raises(ValueError, match="latent normalization mismatch"):
        train.train(resumed, workdir)
