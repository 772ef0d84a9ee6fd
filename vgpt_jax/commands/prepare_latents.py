"""Encode a folder of videos into a sharded latent store.

    python tools/prepare_latents.py --input videos/ --output latents/ --latent-space space_to_depth:8
    python tools/prepare_latents.py --input videos/ --output latents/ --latent-space /path/to/sdxl-vae

Rerunning on the same output after a crash resumes where it stopped (same settings required).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vgpt_jax.data.ingest import IngestConfig, ingest_folder


def width_x_height(text: str) -> tuple[int, int]:
    """'320x176' -> (176, 320): IngestConfig.frame_size is (H, W)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 320x176") from None
    return height, width


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of video files (searched recursively)")
    p.add_argument("--output", required=True, help="latent store folder")
    p.add_argument("--latent-space", default="space_to_depth:8",
                   help="'space_to_depth:<d>' or a diffusers AutoencoderKL folder")
    p.add_argument("--max-image-size", type=int, default=320, help="longer side after resizing, px")
    p.add_argument("--crop-multiple", type=int, default=16)
    p.add_argument("--frame-size", type=width_x_height, default=None, metavar="WxH",
                   help="resize every video to cover WxH and center-crop it to exactly that (one "
                        "store holds one frame size; without this, videos whose size differs from "
                        "the most common one are skipped)")
    p.add_argument("--mixed-sizes", action="store_true",
                   help="keep videos of every frame size (a store for per-video evaluation; "
                        "training needs one size)")
    p.add_argument("--normalize", choices=["none", "shift", "shift_scale"], default="none",
                   help="measure a per-channel latent shift (and scale) over the first "
                        "--normalize-sample-frames frames and store normalised latents: for spaces "
                        "without a scaling factor of their own (space_to_depth, a small VAE)")
    p.add_argument("--normalize-sample-frames", type=int, default=4096)
    p.add_argument("--min-side", type=int, default=128, help="reject sources with a shorter side below this")
    p.add_argument("--max-aspect", type=float, default=4.0)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--min-frames", type=int, default=1, help="after striding")
    p.add_argument("--max-frames", type=int, default=None, help="after striding")
    p.add_argument("--encode-batch", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="decode processes (0: decode in the main process)")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store or unfinished run")
    p.add_argument("--keep-work", action="store_true", help="keep the per-video journal after finishing")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    config = IngestConfig(max_image_size=args.max_image_size, crop_multiple=args.crop_multiple,
                          min_side=args.min_side, max_aspect=args.max_aspect, frame_stride=args.frame_stride,
                          min_frames=args.min_frames, max_frames=args.max_frames,
                          encode_batch=args.encode_batch, num_shards=args.shards, dtype=args.dtype,
                          frame_size=args.frame_size, mixed_sizes=args.mixed_sizes,
                          normalize=args.normalize,
                          normalize_sample_frames=args.normalize_sample_frames)
    summary = ingest_folder(args.input, args.output, args.latent_space, config, num_workers=args.num_workers,
                            overwrite=args.overwrite, keep_work=args.keep_work, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("num_files", "num_ingested", "num_skipped", "total_frames",
                                              "resumed", "processed") if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
