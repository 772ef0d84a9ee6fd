"""The embedded probing set: physics-world videos with labels read off the simulator.

Scenarios come from the `validation` split (independent of the `train` split a model is
pretrained on, and of the demo's `test` split), each in two takes that differ by the world's
tiny `epsilon` perturbation. Labels per video:

    scenario   "balls" or "pendulum"
    num_balls  1..max_balls (balls only)
    collision  whether two balls touch during the clip (videos with >= 2 balls only): the
               clip is re-simulated at substep resolution from its first state, since
               contacts last less than a frame
    group      the scenario index: both takes share it (held-out splits are by group, so no
               take's twin is in the other split; retrieval's target is the other take)

A missing label is an empty string.
"""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from vgpt_jax.data import physics_world
from vgpt_jax.data.store import atomic_write

LABELS = ("scenario", "num_balls", "collision")
COLUMNS = ("name", "group", "take") + LABELS


@dataclasses.dataclass(frozen=True)
class ProbeSetConfig:
    """The probing world: 32 px, 16 fps, up to 2 balls, plus pendulums (the main job's world
    runs at 32 fps; pass fps=32.0 to probe a model on its own frame rate)."""
    num_scenarios: int = 512
    num_frames: int = 16
    frame_size: int = 32
    fps: float = 16.0
    max_balls: int = 2
    scenarios: tuple[str, ...] = physics_world.SCENARIOS
    seed: int = 0
    split: str = "validation"


def world_config(cfg: ProbeSetConfig) -> physics_world.WorldConfig:
    return physics_world.WorldConfig(size=cfg.frame_size, fps=cfg.fps, max_balls=cfg.max_balls,
                                     scenarios=tuple(cfg.scenarios))


def collided(clip: physics_world.PhysicsClip, world: physics_world.WorldConfig) -> bool:
    """Whether any two balls of a balls clip touch at some substep."""
    pos, _ = physics_world.simulate_balls(clip.positions[None, 0], clip.velocities[None, 0],
                                          clip.radii[None], len(clip.frames), world,
                                          record_substeps=True)
    n = len(clip.radii)
    for i in range(n):
        for j in range(i + 1, n):
            gap = np.linalg.norm(pos[0, :, i] - pos[0, :, j], axis=-1) - clip.radii[i] - clip.radii[j]
            if gap.min() <= 1e-9:  # resolved contacts end exactly touching
                return True
    return False


def labels_of(clip: physics_world.PhysicsClip, world: physics_world.WorldConfig) -> dict:
    balls = clip.scenario == "balls"
    n = len(clip.radii)
    return {"name": clip.name, "group": clip.name.rsplit("-take", 1)[0], "take": clip.take,
            "scenario": clip.scenario,
            "num_balls": n if balls else "",
            "collision": ("yes" if collided(clip, world) else "no") if balls and n >= 2 else ""}


def make_probe_set(cfg: ProbeSetConfig) -> tuple[list[physics_world.PhysicsClip], list[dict]]:
    """(clips, one label row per clip), both in the order of `make_dataset`."""
    world = world_config(cfg)
    clips = physics_world.make_dataset(cfg.num_scenarios, cfg.num_frames, cfg.frame_size,
                                       cfg.seed, cfg.split, config=world, num_takes=2)
    return clips, [labels_of(c, world) for c in clips]


def write_labels(rows: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def read_labels(path: str) -> dict[str, np.ndarray]:
    """A labels CSV (a `name` column, any others) -> {column: str array [N]} in file order."""
    if not os.path.isfile(path):
        raise ValueError(f"labels {path!r}: no such file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "name" not in rows[0]:
        raise ValueError(f"labels {path!r}: expected a CSV with a header row naming a 'name' "
                         "column (the video names of the feature store)")
    return {k: np.asarray([r[k] or "" for r in rows], dtype=object) for k in rows[0]}
