"""Render physics-world clips to a folder of videos (mp4 or gif), plus their states as .npz.

    python tools/make_physics_videos.py --out physics/ --num-videos 64 --num-frames 32 --split train

--release-fps N writes the two-take test corpus as a Physics-IQ release instead (the layout
`vgpt physics-iq generate` and `vgpt eval physics-iq` read): every 3 consecutive test scenarios
are the 3 views of one release scenario, each take (3 + 5) * N frames of the world's --fps,
labelled N FPS (3 N conditioning + 5 N testing frames); --num-videos must be a multiple of 3.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from vgpt_jax.data.physics_world import WorldConfig, make_dataset
from vgpt_jax.data.video_io import write_video


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num-videos", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "test", "validation"])
    p.add_argument("--max-balls", type=int, default=WorldConfig.max_balls)
    p.add_argument("--epsilon", type=float, default=WorldConfig.epsilon, help="take-1 perturbation (test splits)")
    p.add_argument("--scenarios", default=",".join(WorldConfig.scenarios))
    p.add_argument("--format", default="mp4", choices=["mp4", "gif"])
    p.add_argument("--no-states", action="store_true", help="skip the per-clip .npz state files")
    p.add_argument("--release-fps", type=int, default=None,
                   help="write the test split's two takes as a Physics-IQ release labelled this FPS")
    args = p.parse_args(argv)

    config = WorldConfig(fps=args.fps, epsilon=args.epsilon, max_balls=args.max_balls,
                         scenarios=tuple(args.scenarios.split(",")))
    if args.release_fps is not None:
        return write_release(args, config)
    start = time.time()
    clips = make_dataset(args.num_videos, args.num_frames, args.size, args.seed, args.split, config)
    simulated = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    for clip in clips:
        write_video(os.path.join(args.out, f"{clip.name}.{args.format}"), clip.frames, clip.fps)
        if not args.no_states:
            np.savez_compressed(os.path.join(args.out, f"{clip.name}.npz"), positions=clip.positions,
                                velocities=clip.velocities, radii=clip.radii, masses=clip.masses)
    with open(os.path.join(args.out, "physics_config.json"), "w") as f:
        json.dump({"config": {k: getattr(config, k) for k in config.__dataclass_fields__}, "seed": args.seed,
                   "split": args.split, "num_videos": args.num_videos, "num_frames": args.num_frames,
                   "size": args.size, "clips": [c.name for c in clips]}, f, indent=2)
    print(f"{len(clips)} clips: simulated+rendered in {simulated:.2f} s, written in "
          f"{time.time() - start - simulated:.2f} s -> {args.out}")
    return 0


def release_scenes(clips, group: int = 3) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Two-take clips (take 0, take 1 of each scenario, in order) -> {scene: `group` (take 1,
    take 2) pairs of uint8 [T, H, W, 3] frames}: scenarios 3k, 3k+1, 3k+2 are the views of scene
    `world-{k:03d}`."""
    takes: dict[str, dict[int, np.ndarray]] = {}
    for clip in clips:
        takes.setdefault(clip.name.rsplit("-take", 1)[0], {})[clip.take] = clip.frames
    pairs = [(t[0], t[1]) for _, t in sorted(takes.items())]
    if not pairs or len(pairs) % group:
        raise ValueError(f"{len(pairs)} two-take scenarios: a release needs a multiple of {group} "
                         "(one per view)")
    return {f"world-{k:03d}": pairs[group * k:group * (k + 1)] for k in range(len(pairs) // group)}


def write_release(args, config: WorldConfig) -> int:
    """The test split's two takes in the Physics-IQ release layout (see the module docstring)."""
    from vgpt_jax.eval import physics_iq

    if args.split == "train":
        raise ValueError("--release-fps needs two takes per scenario: use --split test or validation")
    frames = (3 + physics_iq.SECONDS) * args.release_fps
    clips = make_dataset(args.num_videos, frames, args.size, args.seed, args.split, config, num_takes=2)
    ids = physics_iq.write_release(args.out, release_scenes(clips), args.release_fps)
    print(f"{len(ids)} samples ({len(ids) // 3} scenes x 3 views, {frames} frames of {args.fps:g} "
          f"FPS world time labelled {args.release_fps} FPS) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
