"""The physics world with a controlled ball: an action per frame kicks ball 0.

Frame f (f >= 1) is the state one frame after the kick `actions[f]` was given to ball 0 at
frame f - 1: a nonzero action replaces the ball's velocity (world units / s), a zero one leaves
it to the physics; `actions[0]` is zero. Each frame a kick happens with probability
`kick_prob`, in a uniform direction with speed `kick_speed`; the rest of the world is
`physics_world`'s balls scenario (gravity, elastic walls and collisions), so the kick is the
one thing a model cannot predict from the past: action-conditioned prediction must read it.

Why a kick sets the velocity instead of adding to it: added kicks make a random walk of the
velocity, and within 16 frames the ball outran the frame. Why ball 0 is always red (hue 0,
the others evenly spread after it): with every ball in a random hue, which ball an action
moves could only be told from earlier kicks. Red is one of the main job's colours, so a model
fine-tuned from its export has seen balls of it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vgpt_jax.data import physics_world as pw

ACTION_DIM = 2


@dataclasses.dataclass
class KickedClip:
    """One rendered simulation and its actions [T, 2] (frame f's kick, given before it)."""
    clip: pw.PhysicsClip
    actions: np.ndarray


def draw_actions(rng: np.random.Generator, num_frames: int, kick_speed: float,
                 kick_prob: float) -> np.ndarray:
    """[T, 2] kicks: zero at frame 0, else speed `kick_speed` with probability `kick_prob`."""
    angle = rng.uniform(0, 2 * np.pi, num_frames)
    on = rng.uniform(size=num_frames) < kick_prob
    on[0] = False
    return (kick_speed * on[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1))


def simulate_kicks(positions, velocities, radii, actions_BT2, config: pw.WorldConfig):
    """Balls [B, n, 2] under per-frame kicks of ball 0 -> positions, velocities [B, T, n, 2]."""
    pos, vel = np.array(positions, np.float64), np.array(velocities, np.float64)
    out_pos, out_vel = [pos], [vel]
    for f in range(1, actions_BT2.shape[1]):
        vel = vel.copy()
        kicked = np.any(actions_BT2[:, f] != 0, axis=-1)
        vel[:, 0] = np.where(kicked[:, None], actions_BT2[:, f], vel[:, 0])
        p, v = pw.simulate_balls(pos, vel, radii, 2, config)
        pos, vel = p[:, 1], v[:, 1]
        out_pos.append(pos)
        out_vel.append(vel)
    return np.stack(out_pos, 1), np.stack(out_vel, 1)


def make_dataset(num_videos: int, num_frames: int, size: int, seed: int = 0,
                 split: str = "train", config: pw.WorldConfig | None = None,
                 kick_speed: float = 1.0, kick_prob: float = 0.5) -> list[KickedClip]:
    """`num_videos` kicked-ball videos `[num_frames, size, size, 3]` uint8 with their actions;
    deterministic in the arguments (per-video seeds as `physics_world.video_seed`)."""
    config = dataclasses.replace(config or pw.WorldConfig(), size=size, scenarios=("balls",))
    groups: dict[int, list] = {}
    for index in range(num_videos):
        s = pw.video_seed(seed, split, index)
        rng = np.random.default_rng(s)
        positions, velocities, radii = pw.sample_balls(rng, config)
        colors = pw.palette(rng, len(radii), first_hue=0.0)
        actions = draw_actions(rng, num_frames, kick_speed, kick_prob)
        groups.setdefault(len(radii), []).append((index, s, positions, velocities, radii, colors,
                                                  actions))
    out = {}
    for members in groups.values():
        pos0, vel0, radii, colors, actions = (np.stack([m[k] for m in members])
                                              for k in (2, 3, 4, 5, 6))
        pos, vel = simulate_kicks(pos0, vel0, radii, actions, config)
        frames = pw.render(pos, radii, colors, config)
        for b, (index, s, *_) in enumerate(members):
            clip = pw.PhysicsClip(
                name=f"{split}-{index:05d}-kick", scenario="balls", seed=s, take=0,
                fps=config.fps, frames=frames[b], positions=pos[b], velocities=vel[b],
                radii=radii[b], masses=radii[b] ** 2,
                params={"gravity": config.gravity, "kick_speed": kick_speed,
                        "kick_prob": kick_prob}, colors=colors[b])
            out[index] = KickedClip(clip, actions[b].astype(np.float32))
    return [out[i] for i in sorted(out)]
