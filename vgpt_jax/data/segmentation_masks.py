"""Segmentation masks as video: the true ball masks of the physics world, rendered as frames a
video model can denoise, and read back from the frames it produces.

The paper fine-tunes Video-GPT to output segmentation masks *rendered as video*; here a mask
frame is the mask colour (default white) on the mask background (default black), RGB uint8, so
it goes through the same latent space as the source video. Reading a frame back assigns each
pixel to whichever of the two colours is nearer.

The true mask of a frame is every pixel whose centre lies within a body's radius of its centre:
the renderer's coverage `clamp(r - d + 0.5)` is >= 0.5 there (`physics_world.render`), so the
mask is the ball as drawn, thresholded at half coverage. Pendulum rods are not in it.
"""
from __future__ import annotations

import numpy as np


def disc_masks(centers_Tn2: np.ndarray, radii_px_n: np.ndarray, height: int,
               width: int) -> np.ndarray:
    """Union of discs per frame: centres `[T, n, 2]` (x, y) px, radii `[n]` px -> bool `[T, H, W]`.

    Pixel (i, j) has its centre at (i + 0.5, j + 0.5), as `PhysicsClip.pixel_positions`.
    """
    centers = np.asarray(centers_Tn2, np.float64)
    radii = np.asarray(radii_px_n, np.float64)
    if centers.ndim != 3 or centers.shape[-1] != 2 or radii.shape != centers.shape[1:2]:
        raise ValueError(f"disc masks: centres {centers.shape} must be [T, n, 2] and radii "
                         f"{radii.shape} [n]")
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    dx = xs[None, None, None, :] - centers[:, :, 0, None, None]      # [T, n, 1, W]
    dy = ys[None, None, :, None] - centers[:, :, 1, None, None]      # [T, n, H, 1]
    inside = dx ** 2 + dy ** 2 <= radii[None, :, None, None] ** 2     # [T, n, H, W]
    return inside.any(axis=1)


def clip_masks(clip) -> np.ndarray:
    """The true masks of a `physics_world.PhysicsClip`: bool `[T, H, W]` (all its bodies)."""
    _, h, w, _ = clip.frames.shape
    return disc_masks(clip.pixel_positions(), clip.radii * h, h, w)


def render_masks(masks_THW: np.ndarray, color=(255, 255, 255),
                 background=(0, 0, 0)) -> np.ndarray:
    """bool `[..., H, W]` -> uint8 RGB frames `[..., H, W, 3]`: `color` on `background`."""
    masks = np.asarray(masks_THW, bool)[..., None]
    return np.where(masks, np.asarray(color, np.uint8), np.asarray(background, np.uint8))


def read_masks(frames_HW3: np.ndarray, color=(255, 255, 255),
               background=(0, 0, 0)) -> np.ndarray:
    """uint8 RGB frames `[..., H, W, 3]` -> bool `[..., H, W]`: pixels nearer `color` than
    `background`."""
    x = np.asarray(frames_HW3, np.float32)
    to = lambda c: np.sum((x - np.asarray(c, np.float32)) ** 2, axis=-1)
    return to(color) < to(background)


def threshold_masks(frames_HW3: np.ndarray, background, threshold: float) -> np.ndarray:
    """The trivial segmenter: pixels farther than `threshold` (RGB Euclidean, 0-255) from the
    world's background colour. uint8 `[..., H, W, 3]` -> bool `[..., H, W]`."""
    x = np.asarray(frames_HW3, np.float32)
    return np.linalg.norm(x - np.asarray(background, np.float32), axis=-1) > threshold
