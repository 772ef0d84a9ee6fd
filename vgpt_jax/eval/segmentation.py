"""Video object segmentation scores, the DAVIS way: region similarity J and boundary F per frame.

- **J** (region similarity): the IoU |P & G| / |P | G| of a predicted mask P and the truth G;
  1 when both are empty (nothing to find, nothing found).
- **F** (boundary measure): the F-measure of boundary precision and recall with a tolerance.
  The boundary of a mask is its pixels with a background neighbour
  (`skimage.segmentation.find_boundaries(mode="inner")`); a predicted boundary pixel counts as
  correct when it lies within `tolerance` pixels of the true boundary (the true boundary dilated
  by a disc of that radius, `skimage.morphology.disk`), and recall is the same with the roles
  swapped. DAVIS sets the tolerance to 0.8% of the image diagonal, rounded up to whole pixels
  (`boundary_tolerance`): 1 px up to 125 x 125 frames. F is 1 when both boundaries are empty and
  0 when exactly one is.

DAVIS computes the boundary with its own `seg2bmap` (a one-sided pixel-difference map); the
inner boundary used here marks the same contour on the foreground side, so scores agree up to
that one-pixel convention. The masks are boolean `[..., H, W]`; leading axes are frames (and
videos), and every score is per frame.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

DAVIS_BOUNDARY_FRACTION = 0.008  # of the image diagonal (the DAVIS benchmark's bound_th)


def _skimage():
    try:
        import skimage.morphology
        import skimage.segmentation
    except ImportError as e:  # an optional extra: say which
        raise ImportError("the boundary measure F needs scikit-image: pip install "
                          "'vgpt_jax[eval]'") from e
    return skimage


def _check_masks(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim < 2:
        raise ValueError(f"masks: predicted shape {pred.shape} and true shape {truth.shape} must "
                         "be equal, [..., H, W]")
    if pred.dtype != bool or truth.dtype != bool:
        raise ValueError(f"masks: expected boolean masks, got {pred.dtype} and {truth.dtype} "
                         "(threshold them first)")
    return pred, truth


def boundary_tolerance(height: int, width: int) -> int:
    """The DAVIS tolerance in whole pixels: 0.8% of the diagonal, rounded up."""
    return max(1, math.ceil(DAVIS_BOUNDARY_FRACTION * math.hypot(height, width)))


def region_similarity(pred, truth) -> np.ndarray:
    """J per frame: boolean masks `[..., H, W]` -> float64 `[...]`."""
    pred, truth = _check_masks(pred, truth)
    inter = (pred & truth).sum(axis=(-2, -1))
    union = (pred | truth).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def _boundary_f_one(pred_HW: np.ndarray, truth_HW: np.ndarray, disc: np.ndarray) -> float:
    sk = _skimage()
    pb = sk.segmentation.find_boundaries(pred_HW, mode="inner")
    tb = sk.segmentation.find_boundaries(truth_HW, mode="inner")
    if not pb.any() and not tb.any():
        return 1.0
    if not pb.any() or not tb.any():
        return 0.0
    precision = (pb & ndimage.binary_dilation(tb, disc)).sum() / pb.sum()
    recall = (tb & ndimage.binary_dilation(pb, disc)).sum() / tb.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def boundary_f(pred, truth, tolerance: int | None = None) -> np.ndarray:
    """F per frame: boolean masks `[..., H, W]` -> float64 `[...]`; `tolerance` in pixels
    (default `boundary_tolerance` of the frame size)."""
    pred, truth = _check_masks(pred, truth)
    h, w = pred.shape[-2:]
    tolerance = boundary_tolerance(h, w) if tolerance is None else int(tolerance)
    if tolerance < 0:
        raise ValueError(f"boundary tolerance {tolerance}: must be >= 0 pixels")
    disc = _skimage().morphology.disk(tolerance).astype(bool)
    flat_p, flat_t = pred.reshape(-1, h, w), truth.reshape(-1, h, w)
    scores = [_boundary_f_one(p, t, disc) for p, t in zip(flat_p, flat_t)]
    return np.asarray(scores, np.float64).reshape(pred.shape[:-2])


def j_and_f(pred, truth, tolerance: int | None = None) -> dict:
    """The DAVIS summary: {"J", "F": means over every frame, "J&F": their mean, "J_frames",
    "F_frames": the per-frame scores `[...]`}."""
    j, f = region_similarity(pred, truth), boundary_f(pred, truth, tolerance)
    return {"J": float(j.mean()), "F": float(f.mean()), "J&F": float((j.mean() + f.mean()) / 2),
            "J_frames": j, "F_frames": f}
