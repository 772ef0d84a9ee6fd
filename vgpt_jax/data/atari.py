"""Atari episodes with their actions, a world no one here wrote (`pip install -e '.[atari]'`:
ale-py, which ships the game ROMs).

An episode is `num_frames` frames of the game's screen, resized to `size` x `size`, one every
`frame_skip` emulator frames, and the action before each frame: `actions[f]` is the one-hot
(over the game's minimal action set) of the action held for the `frame_skip` emulator frames
between frame f - 1 and frame f; `actions[0]` is zero. The policy is random (a uniform action,
held for a geometric number of agent steps, `hold` on average), from a seeded generator; the
emulator is deterministic (`repeat_action_probability` 0), so an episode is a function of
(game, seed, index). An episode that ends (game over) before `num_frames` is dropped and another
seed drawn.

    vgpt make-atari --game breakout --output runs/atari/latents --episodes 256 --frames 16 --size 32
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Episode:
    """One recorded episode: frames uint8 [T, S, S, 3], actions [T, A] one-hot (float32)."""
    name: str
    frames: np.ndarray
    actions: np.ndarray
    fps: float
    game: str
    action_names: tuple[str, ...]


def _ale():
    try:
        import ale_py
        import ale_py.roms  # noqa: F401  (a submodule: not imported by the package)
    except ImportError as e:
        raise ImportError("Atari episodes need ale-py: pip install -e '.[atari]'") from e
    return ale_py


def _open(game: str, seed: int):
    ale_py = _ale()
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", int(seed) % (2 ** 31))
    ale.setFloat("repeat_action_probability", 0.0)
    try:
        path = ale_py.roms.get_rom_path(game)
    except Exception as e:  # ale-py names no games in its error
        raise ValueError(f"Atari game {game!r}: not among ale-py's ROMs (e.g. breakout, pong, "
                         "space_invaders)") from e
    if path is None:
        raise ValueError(f"Atari game {game!r}: not among ale-py's ROMs (e.g. breakout, pong)")
    ale.loadROM(str(path))
    return ale


def _resize(screen_HW3: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(screen_HW3).resize((size, size), Image.BILINEAR))


def record_episode(game: str, num_frames: int, size: int, seed: int, frame_skip: int = 4,
                   hold: float = 4.0) -> Episode | None:
    """One episode of `num_frames` (None when the game ends first)."""
    ale = _open(game, seed)
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(seed)
    frames = [_resize(ale.getScreenRGB(), size)]
    onehot = np.zeros((num_frames, len(actions)), np.float32)
    current = int(rng.integers(len(actions)))
    for f in range(1, num_frames):
        if rng.uniform() < 1.0 / max(hold, 1.0):
            current = int(rng.integers(len(actions)))
        for _ in range(frame_skip):
            ale.act(actions[current])
        if ale.game_over():
            return None
        onehot[f, current] = 1.0
        frames.append(_resize(ale.getScreenRGB(), size))
    return Episode(f"{game}-{seed:08d}", np.stack(frames), onehot, 60.0 / frame_skip, game,
                   tuple(a.name for a in actions))


def record_episodes(game: str, num_episodes: int, num_frames: int, size: int = 64,
                    seed: int = 0, split: str = "train", frame_skip: int = 4,
                    hold: float = 4.0) -> list[Episode]:
    """`num_episodes` episodes; deterministic in the arguments (split-separated seeds)."""
    from vgpt_jax.data.physics_world import video_seed
    out, index = [], 0
    while len(out) < num_episodes:
        s = video_seed(seed, split, index)
        index += 1
        ep = record_episode(game, num_frames, size, s, frame_skip, hold)
        if ep is None:
            if index > 10 * num_episodes + 10:
                raise ValueError(f"{game}: the game ends within {num_frames} "
                                 "agent steps in most episodes; record shorter ones")
            continue
        out.append(ep)
    return out

