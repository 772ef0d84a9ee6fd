"""Write per-video features of a checkpoint to a resumable npz store (`vgpt_jax.feature_store`).

    vgpt features --checkpoint runs/demo/model --out feats/trained            # physics world
    vgpt features --checkpoint runs/demo/model --random-init 0 --out feats/random
    vgpt features --pixels --out feats/pixels                                  # raw-pixel baseline
    vgpt features --checkpoint ckpt --input videos/ --frames 16 --out feats/mine

Without --input, the videos are the embedded probing set (`vgpt_jax.eval.physics_probe`:
--physics scenarios x 2 takes from the physics world's validation split) and its simulator
labels go to <out>/labels.csv, ready for `vgpt probe` and `vgpt retrieval`. Every chosen layer
and pool is stored (`layer<i>.<pool>`), so one run serves a whole sweep. Rerunning the same
command resumes at the first missing chunk.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    from vgpt_jax import features
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="store folder")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="model export folder")
    model.add_argument("--pixels", action="store_true",
                       help=f"raw-pixel baseline: frames averaged to {features.PIXEL_GRID}x"
                            f"{features.PIXEL_GRID}x3, pools {list(features.PIXEL_POOLS)}")
    p.add_argument("--random-init", type=int, default=None, metavar="SEED",
                   help="a freshly initialised model of the checkpoint's size (the baseline a "
                        "pretrained model must beat)")
    p.add_argument("--input", default=None, help="a folder of videos instead of the physics world")
    p.add_argument("--physics", type=int, default=512, help="probing-set scenarios (x 2 takes)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (the first ones)")
    p.add_argument("--frame-size", type=int, default=32, help="physics world frame size, px")
    p.add_argument("--max-balls", type=int, default=2, help="physics world: at most this many")
    p.add_argument("--frame-stride", type=int, default=1, help="--input: keep every n-th frame")
    p.add_argument("--max-image-size", type=int, default=320, help="--input: longer side, px")
    p.add_argument("--layers", nargs="+", default=["all"], help="layer indices, or 'all'")
    p.add_argument("--pools", nargs="+", default=None,
                   help=f"pooling(s); default: all, {list(features.POOLS)} (--pixels: "
                        f"{list(features.PIXEL_POOLS)})")
    p.add_argument("--t", type=float, default=None,
                   help="features of one noisy copy at this noise level (1 = clean) instead of "
                        "the clean copies")
    p.add_argument("--seed", type=int, default=0, help="noise seed (video i uses seed + i)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per device per step")
    p.add_argument("--chunk", type=int, default=64, help="videos per stored chunk")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _physics_videos(args):
    from vgpt_jax.eval import physics_probe
    cfg = physics_probe.ProbeSetConfig(num_scenarios=args.physics, num_frames=args.frames,
                                       frame_size=args.frame_size, max_balls=args.max_balls)
    clips, rows = physics_probe.make_probe_set(cfg)
    physics_probe.write_labels(rows, os.path.join(args.out, "labels.csv"))
    frames = np.stack([c.frames for c in clips])
    return [c.name for c in clips], lambda lo, hi: frames[lo:hi], {"physics": vars(cfg)}


def _folder_videos(args, crop_multiple: int):
    from vgpt_jax.data import ingest, video_io
    if not os.path.isdir(args.input):
        raise ValueError(f"--input {args.input!r}: no such folder")
    names = ingest.find_videos(args.input)
    if not names:
        raise ValueError(f"--input {args.input!r}: no video files")
    config = ingest.IngestConfig(max_image_size=args.max_image_size, crop_multiple=crop_multiple,
                                 min_side=1, max_aspect=float("inf"),
                                 frame_stride=args.frame_stride, max_frames=args.frames)

    def load(lo, hi):
        out = []
        for name in names[lo:hi]:
            try:
                frames, _, _ = ingest.load_video_frames(os.path.join(args.input, name), config)
            except (video_io.VideoReadError, ingest.SkipVideo) as e:
                raise ValueError(f"--input: cannot read {name!r} ({e})") from e
            if len(frames) < args.frames:
                raise ValueError(f"--input: {name!r} has {len(frames)} frames at --frame-stride "
                                 f"{args.frame_stride}, fewer than --frames {args.frames}")
            if out and frames.shape != out[0].shape:
                raise ValueError(f"--input: {name!r} is {frames.shape[2]}x{frames.shape[1]}, "
                                 f"the others {out[0].shape[2]}x{out[0].shape[1]}: videos of "
                                 "one store need one frame size")
            out.append(frames)
        return np.stack(out)
    settings = {"input": os.path.abspath(args.input), "frame_stride": args.frame_stride,
                "max_image_size": args.max_image_size}
    return names, load, settings


def _pipeline(args):
    from flax import nnx

    from vgpt_jax.model import VideoGPT
    from vgpt_jax.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    if pipe.latent_space is None:
        raise ValueError(f"--checkpoint {args.checkpoint!r} has no latent_space section, so "
                         "video frames cannot be encoded")
    if args.random_init is not None:
        model = VideoGPT(pipe.model.cfg, rngs=nnx.Rngs(args.random_init))
        pipe = Pipeline(model, pipe.latent_space, pipe.config)
    return pipe


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from vgpt_jax import feature_store, features

    if args.frames < 1:
        raise ValueError(f"--frames={args.frames}: must be >= 1")
    if args.random_init is not None and args.pixels:
        raise ValueError("--random-init needs --checkpoint (whose size it copies), not --pixels")
    pipe = None if args.pixels else _pipeline(args)
    if pipe is None:
        pools = tuple(args.pools or features.PIXEL_POOLS)
        unknown = sorted(set(pools) - set(features.PIXEL_POOLS))
        if unknown:
            raise ValueError(f"--pools {unknown}: with --pixels, one of {features.PIXEL_POOLS}")
    else:
        pools = tuple(args.pools or features.POOLS)
        features.check_pools(pools, args.t is not None)
        layers = features.resolve_layers(
            None if args.layers == ["all"] else [int(i) for i in args.layers],
            pipe.model.cfg.num_layers)
    # Frames must tile into patches of the latent space (the pixel grid needs 8-divisible sides).
    crop = 16 if pipe is None else pipe.latent_space.downsample * pipe.model.cfg.patch_size
    names, load, source = (_folder_videos(args, crop) if args.input else _physics_videos(args))
    settings = {**source, "frames": args.frames, "pools": list(pools),
                "model": "pixels" if pipe is None else os.path.abspath(args.checkpoint),
                "random_init": args.random_init}
    if pipe is not None:
        settings.update(layers=list(layers), t=args.t, seed=args.seed)
    writer = feature_store.FeatureWriter(args.out, names, settings, args.chunk, args.overwrite)
    pending = writer.pending()
    done = len(names) - sum(hi - lo for _, lo, hi in pending)
    with tqdm(total=len(names), initial=done, unit="video", disable=args.no_progress) as bar:
        for index, lo, hi in pending:
            frames = load(lo, hi)
            if pipe is None:
                arrays = {f"pixels.{p}": v for p, v in features.pixel_features(frames, pools).items()}
            else:
                out = pipe.features(frames, layers=layers, pool=pools, t=args.t,
                                    seed=[args.seed + i for i in range(lo, hi)],
                                    batch_size=args.batch_size)
                arrays = {f"layer{l}.{p}": out[p][:, j] for p in pools
                          for j, l in enumerate(layers)}
            writer.write(index, arrays)
            bar.update(hi - lo)
    path = writer.finish()
    print(f"wrote features of {len(names)} videos to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
