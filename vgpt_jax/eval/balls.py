"""Ball metrics: where the predicted balls are and what colour they have, against the simulator.

Pixel metrics reward blur (MSE, PSNR) and stillness (SSIM on a mostly empty frame): a model that
smears a ball along its path or leaves it where it was can still score well. The physics world
knows every ball's centre, radius and colour, so a prediction can be scored on the objects:

- **position error** (pixels): for each true ball, the prediction's pixels closer in colour to
  that ball's colour than to the background and to every other ball (and within
  `color_tolerance`) are found; the centroid of the largest connected blob of them
  (`scipy.ndimage.label`) is the detected centre, and the error is its distance to the true
  centre. A ball with fewer than `min_pixels` such pixels is *missed* and counts as
  `miss_penalty` (default half the frame size: as bad as a ball far away), which also caps
  every error;
- **detection rate**: the fraction of true balls not missed;
- **colour error** in [0, 1]: the distance between the true colour and the prediction's mean
  colour over the true ball's core (pixels within `radius - 1` of its centre, at least the
  centre pixel), divided by the largest RGB distance (255 * sqrt 3). It is 0 for the ground truth
  and large for a ball of the wrong colour, a missing ball or a ball elsewhere.

Pixel coordinates are (x, y) with y down; pixel (i, j) has its centre at (i + 0.5, j + 0.5), the
convention of `data.physics_world.PhysicsClip.pixel_positions`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

MAX_RGB_DISTANCE = 255.0 * np.sqrt(3.0)


@dataclasses.dataclass(frozen=True)
class Balls:
    """The true balls of one video: centres `[T, n, 2]` px (x, y), radii `[n]` px, colours
    `[n, 3]` RGB 0-255, and the background colour `[3]`."""
    centers_Tn2: np.ndarray
    radii_n: np.ndarray
    colors_n3: np.ndarray
    background: np.ndarray

    def frames(self, start: int, stop: int) -> "Balls":
        return dataclasses.replace(self, centers_Tn2=self.centers_Tn2[start:stop])

    @classmethod
    def of_clip(cls, clip, background) -> "Balls":
        """The balls of a physics-world clip (`data.physics_world.PhysicsClip`), in pixels."""
        return cls(clip.pixel_positions(), clip.radii * clip.frames.shape[1], clip.colors,
                   np.asarray(background))

    def first(self, n: int | None) -> "Balls":
        """Only the first `n` balls (None: all)."""
        keep = slice(None, n)
        return dataclasses.replace(self, centers_Tn2=self.centers_Tn2[:, keep],
                                   radii_n=self.radii_n[keep], colors_n3=self.colors_n3[keep])


def detect(frame_HW3: np.ndarray, colors_n3: np.ndarray, background: np.ndarray, *,
           color_tolerance: float = 80.0, min_pixels: int = 3) -> np.ndarray:
    """Detected centres `[n, 2]` (x, y) px of balls of the given colours; NaN where missed."""
    pixels = np.asarray(frame_HW3, np.float32)
    references = np.concatenate([np.asarray(background, np.float32)[None],
                                 np.asarray(colors_n3, np.float32)])            # [n + 1, 3]
    distance = np.linalg.norm(pixels[:, :, None, :] - references, axis=-1)      # [H, W, n + 1]
    nearest = distance.argmin(-1)
    centers = np.full((len(colors_n3), 2), np.nan)
    for k in range(len(colors_n3)):
        mask = (nearest == k + 1) & (distance[..., k + 1] < color_tolerance)
        labels, count = ndimage.label(mask)
        if not count:
            continue
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        best = int(np.argmax(sizes)) + 1
        if sizes[best - 1] < min_pixels:
            continue
        ys, xs = np.nonzero(labels == best)
        centers[k] = (xs.mean() + 0.5, ys.mean() + 0.5)
    return centers


def core_colors(frame_HW3: np.ndarray, centers_n2: np.ndarray, radii_n: np.ndarray) -> np.ndarray:
    """Mean colour `[n, 3]` of `frame` over each ball's core disc (radius - 1, at least the
    pixel under the centre)."""
    h, w, _ = frame_HW3.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    out = np.empty((len(radii_n), 3))
    for k, ((cx, cy), r) in enumerate(zip(centers_n2, radii_n)):
        core = np.hypot(xs - cx, ys - cy) <= max(r - 1.0, 0.0)
        if not core.any():
            core = np.zeros((h, w), bool)
            core[min(max(int(cy), 0), h - 1), min(max(int(cx), 0), w - 1)] = True
        out[k] = frame_HW3[core].astype(np.float64).mean(0)
    return out


def score(prediction_THW3: np.ndarray, balls: Balls, *, miss_penalty: float | None = None,
          **detect_options) -> dict[str, float]:
    """Position error (px), detection rate and colour error of a predicted video
    `[T, H, W, 3]` against its true balls (`balls.centers_Tn2` has the same T), averaged over
    frames and balls."""
    t, h, w, _ = prediction_THW3.shape
    if balls.centers_Tn2.shape[0] != t:
        raise ValueError(f"ball metrics: {t} predicted frames but {balls.centers_Tn2.shape[0]} "
                         "frames of true ball positions")
    penalty = min(h, w) / 2 if miss_penalty is None else miss_penalty
    errors, colors = [], []
    for frame, centers in zip(prediction_THW3, balls.centers_Tn2):
        found = detect(frame, balls.colors_n3, balls.background, **detect_options)
        dist = np.linalg.norm(found - centers, axis=-1)
        errors.append(np.where(np.isnan(dist), np.inf, dist))
        seen = core_colors(frame, centers, balls.radii_n)
        colors.append(np.linalg.norm(seen - balls.colors_n3, axis=-1) / MAX_RGB_DISTANCE)
    errors = np.stack(errors)
    return {"position_error_px": float(np.mean(np.minimum(errors, penalty))),
            "detection_rate": float(np.mean(np.isfinite(errors))),
            "color_error": float(np.mean(colors))}
