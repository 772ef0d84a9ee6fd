"""Render physics-world clips to a folder of videos (mp4 or gif), plus their states as .npz.

    python tools/make_physics_videos.py --out physics/ --num-videos 64 --num-frames 32 --split train
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
    p.add_argument("--epsilon", type=float, default=WorldConfig.epsilon, help="take-1 perturbation (test splits)")
    p.add_argument("--scenarios", default=",".join(WorldConfig.scenarios))
    p.add_argument("--format", default="mp4", choices=["mp4", "gif"])
    p.add_argument("--no-states", action="store_true", help="skip the per-clip .npz state files")
    args = p.parse_args(argv)

    config = WorldConfig(fps=args.fps, epsilon=args.epsilon, scenarios=tuple(args.scenarios.split(",")))
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


if __name__ == "__main__":
    sys.exit(main())
