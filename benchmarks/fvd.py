"""Time I3D feature extraction (the cost of FVD) on this machine.

Usage (repo root, or after `pip install -e .[eval]`): PYTHONPATH=. python benchmarks/fvd.py [--videos 16] [--frames 16] [--size 64] [--batch 8]
Prints compile time, warm seconds per video and the Fréchet-distance (sqrtm) time.
"""
import argparse
import time

import numpy as np

from vgpt_jax.eval import fvd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input side; I3D always sees 224x224")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (args.videos, args.frames, args.size, args.size, 3), dtype=np.uint8)
    kwargs = dict(num_frames=args.frames, batch_size=args.batch)

    start = time.perf_counter()
    fvd.i3d_features(videos[: args.batch], **kwargs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    features = fvd.i3d_features(videos, **kwargs)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    fvd.frechet_distance(features, features[::-1] + 0.1)
    distance = time.perf_counter() - start
    print(f"first batch (load + compile + run): {first:.1f} s")
    print(f"warm: {warm / args.videos:.2f} s/video ({args.frames} frames, batch {args.batch})")
    print(f"frechet_distance (400-d sqrtm): {distance:.2f} s")


if __name__ == "__main__":
    main()
