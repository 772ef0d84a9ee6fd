"""Encode a folder of videos into a sharded latent store.

    python tools/prepare_latents.py --input videos/ --output latents/ --latent-space space_to_depth:8
    python tools/prepare_latents.py --input videos/ --output latents/ --latent-space /path/to/sdxl-vae

Rerunning on the same output after a crash resumes where it stopped (same settings required).

The same store, record for record, from three engines (docs/ingestion.md):

    vgpt prepare --input videos/ --output latents/ --shards 64                      # this machine
    vgpt prepare --input videos/ --output latents/ --shards 4096 --distributed      # every host of a slice
    vgpt prepare --input videos/ --output latents/ --shards 4096 --runner beam \
        --beam-options "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
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
                   help="measure a per-channel latent shift (and scale) over every stored frame; "
                        "the store serves normalised latents: for spaces without a scaling factor "
                        "of their own (space_to_depth, a small VAE)")
    p.add_argument("--min-side", type=int, default=128, help="reject sources with a shorter side below this")
    p.add_argument("--max-aspect", type=float, default=4.0)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--min-frames", type=int, default=1, help="after striding")
    p.add_argument("--max-frames", type=int, default=None, help="after striding")
    p.add_argument("--encode-batch", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="decode processes (0: decode in the main process)")
    p.add_argument("--shards", type=int, default=1,
                   help="work shards: the unit of parallelism and of resumption (a finished shard is "
                        "kept by a rerun); use at least a few per process or Beam worker")
    p.add_argument("--runner", choices=["local", "beam"], default="local",
                   help="local: this process and its decode pool; beam: an Apache Beam pipeline "
                        "(pip install -e '.[beam]')")
    p.add_argument("--beam-options", default="",
                   help="Beam pipeline options as one string, e.g. \"--direct_num_workers=2 "
                        "--direct_running_mode=multi_processing\" or a Dataflow/Flink/Spark runner's")
    p.add_argument("--distributed", action="store_true",
                   help="run as one process of a multi-host JAX job: jax.distributed.initialize() "
                        "(auto-detected on TPU VMs and SLURM, else the three options below); each "
                        "process writes its shards, process 0 merges")
    p.add_argument("--coordinator-address", default=None, help="with --distributed: host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed")
    p.add_argument("--text-encoder", default="",
                   help="a T5 or CLIP text encoder (folder or hub id; pip install -e '.[text]'): "
                        "embeds each video's sidecar caption (clip.mp4 + clip.txt) into its "
                        "record, for text-conditioned training (docs/conditioning.md)")
    p.add_argument("--text-tokens", type=int, default=32, help="caption tokens kept")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store or unfinished run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    config = IngestConfig(max_image_size=args.max_image_size, crop_multiple=args.crop_multiple,
                          min_side=args.min_side, max_aspect=args.max_aspect, frame_stride=args.frame_stride,
                          min_frames=args.min_frames, max_frames=args.max_frames,
                          encode_batch=args.encode_batch, num_shards=args.shards, dtype=args.dtype,
                          frame_size=args.frame_size, mixed_sizes=args.mixed_sizes,
                          normalize=args.normalize, text_encoder=args.text_encoder,
                          text_tokens=args.text_tokens)
    if args.distributed and args.runner != "local":
        p.error("--distributed runs the JAX job; it cannot be combined with --runner beam")
    if not args.distributed and (args.coordinator_address or args.num_processes or args.process_id is not None):
        p.error("--coordinator-address, --num-processes and --process-id need --distributed")
    if args.beam_options and args.runner != "beam":
        p.error("--beam-options needs --runner beam")
    if args.distributed:
        from vgpt_jax.data.ingest_distributed import ingest_distributed, initialize

        initialize(args.coordinator_address, args.num_processes, args.process_id)
        summary = ingest_distributed(args.input, args.output, args.latent_space, config,
                                     num_workers=args.num_workers, overwrite=args.overwrite)
    elif args.runner == "beam":
        from vgpt_jax.data.ingest_beam import ingest_beam

        summary = ingest_beam(args.input, args.output, args.latent_space, config,
                              beam_options=shlex.split(args.beam_options), overwrite=args.overwrite)
    else:
        summary = ingest_folder(args.input, args.output, args.latent_space, config, num_workers=args.num_workers,
                                overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("num_files", "num_ingested", "num_skipped", "total_frames",
                                              "resumed", "processed") if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
