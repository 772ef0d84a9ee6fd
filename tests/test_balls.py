"""Ball metrics: the detector on rendered physics-world frames, and what the metric rewards."""
import numpy as np

from vgpt_jax.data import physics_world
from vgpt_jax.eval import balls as balls_lib


def _clips(n=24, size=32):
    world = physics_world.WorldConfig(size=size, scenarios=("balls",), max_balls=2)
    return physics_world.make_dataset(n, 8, size, seed=3, split="test", config=world,
                                      num_takes=1), world


def _balls(clip, world):
    return balls_lib.Balls(clip.pixel_positions(), clip.radii * clip.frames.shape[1],
                           clip.colors, np.asarray(world.background))


def _apart(clip, t):
    """Balls at frame t do not touch (overlap hides part of one)."""
    p = clip.pixel_positions()[t]
    r = clip.radii * clip.frames.shape[1]
    return all(np.linalg.norm(p[i] - p[j]) > r[i] + r[j] + 1
               for i in range(len(r)) for j in range(i))


def test_detector_finds_every_ball_within_a_pixel():
    clips, world = _clips()
    checked = 0
    for clip in clips:
        balls = _balls(clip, world)
        for t in range(len(clip.frames)):
            if not _apart(clip, t):
                continue
            found = balls_lib.detect(clip.frames[t], balls.colors_n3, balls.background)
            assert np.all(np.isfinite(found)), clip.name
            np.testing.assert_array_less(np.linalg.norm(found - balls.centers_Tn2[t], axis=-1), 1.0)
            checked += 1
    assert checked > 100


def test_metric_is_zero_for_the_truth_and_large_for_a_wrong_colour_or_place():
    clips, world = _clips(8)
    for clip in clips:
        balls = _balls(clip, world)
        if not all(_apart(clip, t) for t in range(len(clip.frames))):
            continue
        truth = balls_lib.score(clip.frames, balls)
        assert truth["position_error_px"] < 0.5 and truth["detection_rate"] == 1.0
        assert truth["color_error"] < 0.02
        # Same shapes, every ball in another colour: not detected, colour far off.
        recoloured = clip.frames.copy()
        fg = np.abs(clip.frames.astype(int) - world.background).max(-1) > 30
        recoloured[fg] = 255 - recoloured[fg]
        wrong = balls_lib.score(recoloured, balls)
        assert wrong["detection_rate"] < 0.5 and wrong["color_error"] > 0.15
        assert wrong["position_error_px"] > 5
        # An empty frame: every ball missed, counted at the penalty (half the frame).
        empty = np.broadcast_to(np.asarray(world.background, np.uint8), clip.frames.shape)
        assert balls_lib.score(empty, balls)["position_error_px"] == clip.frames.shape[1] / 2
