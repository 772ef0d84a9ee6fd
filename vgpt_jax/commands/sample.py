"""Predict how a video continues: read a context video, write the prediction as mp4.

    python tools/sample.py --checkpoint exports/run1 --input clip.mp4 --output pred.mp4
    python tools/sample.py --checkpoint exports/run1 --input clip.mp4 --output pred.mp4 \
        --context-frames 56 --frame-stride 4 --clip-sizes 24 24 --guidance 1.5 --steps 50
    python tools/sample.py ... --mesh fsdp=2,context=2,tensor=2    # on 8 devices

The first `--context-frames` frames (after `--frame-stride`, resizing to `--max-image-size` and
center-cropping, as ingestion does) are the context. When the input has more frames than that,
the following ones are the ground truth and `<output>_vs_gt.mp4` shows them left of the
prediction.

A conditioned model (docs/conditioning.md) takes its conditions, each kind it has:

    vgpt sample --checkpoint runs/class/model --input clip.mp4 --output p.mp4 --class 2
    vgpt sample ... --actions actions.npy      # [context + generated frames, action_dim]
    vgpt sample ... --caption "two balls, the red one moves left" [--text-encoder DIR]
    vgpt sample ... --class 2 --condition-guidance 2.0
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from vgpt_jax import sampling
from vgpt_jax.commands import add_sampler_arguments
from vgpt_jax.commands.prepare_latents import width_x_height


def add_mesh_argument(p: argparse.ArgumentParser) -> None:
    """`--mesh`, shared by the commands that sample."""
    p.add_argument("--mesh", default=None, type=_mesh_sizes,
                   help="sample on a mesh of this process's devices: axis=size pairs over data, "
                        "fsdp, context, tensor (e.g. data=2,fsdp=4; missing axes are 1); "
                        "default: one device (docs/sampling.md, 'Choosing a mesh')")


def _mesh_sizes(text: str) -> dict:
    from vgpt_jax.sharding import parse_mesh
    try:
        return parse_mesh(text)
    except ValueError as e:  # argparse shows it as a usage error
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model export folder (config.json + params/)")
    p.add_argument("--input", required=True, help="context video file")
    p.add_argument("--output", required=True, help="prediction video (.mp4 or .gif)")
    p.add_argument("--latent-space", default=None,
                   help="'space_to_depth:<d>' or a VAE folder; default: the checkpoint's")
    p.add_argument("--context-frames", type=int, default=56)
    p.add_argument("--frame-stride", type=int, default=4, help="keep every n-th input frame")
    p.add_argument("--frame-size", type=width_x_height, default=None, metavar="WxH",
                   help="resize the input to cover WxH and center-crop to it (default: the "
                        "resolution the model was trained at, when its export records it)")
    p.add_argument("--max-image-size", type=int, default=320,
                   help="longer side, px, when neither --frame-size nor the export gives a size")
    p.add_argument("--crop-multiple", type=int, default=None,
                   help="center-crop sides to a multiple of this (default: VAE x patch factor)")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--num-frames", type=int, default=None, help="frames to predict (clips of 24)")
    frames.add_argument("--clip-sizes", type=int, nargs="+", default=None,
                        help="frames per generated clip (default: 24 24)")
    add_sampler_arguments(p)
    defaults = sampling.SamplerConfig()
    p.add_argument("--cache-mode", choices=sampling.CACHE_MODES, default=defaults.cache_mode)
    p.add_argument("--anchor-frames", type=int, default=defaults.anchor_frames)
    p.add_argument("--same-noise-every-clip", action="store_true",
                   help="the release's behaviour: identical initial noise for every clip")
    p.add_argument("--reencode", action="store_true",
                   help="decode -> uint8 -> encode each clip before it joins the history")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--class", dest="class_id", type=int, default=None,
                   help="class id, for a model with conditions.num_classes")
    p.add_argument("--actions", default=None, metavar="FILE",
                   help="per-frame actions, .npy or .json: [context + generated frames, "
                        "action_dim], for a model with conditions.action_dim")
    p.add_argument("--caption", default=None, help="text, for a model with conditions.text_dim")
    p.add_argument("--text-encoder", default=None,
                   help="with --caption: the encoder the training captions were embedded with "
                        "(default: the export config's text.encoder)")
    p.add_argument("--condition-guidance", type=float, default=defaults.condition_guidance,
                   help="condition guidance scale (1: none)")
    add_mesh_argument(p)
    p.add_argument("--no-progress", action="store_true")
    return p


def read_context(path: str, stride: int, max_image_size: int, crop_multiple: int, max_frames,
                 frame_size: tuple[int, int] | None = None):
    """(frames uint8 [T, H, W, 3], fps after striding); unreadable files raise a ValueError.
    `frame_size` (H, W): resize to cover it and center-crop to exactly that size."""
    from vgpt_jax.data import ingest, video_io

    if not os.path.isfile(path):
        raise ValueError(f"--input {path!r}: no such file")
    config = ingest.IngestConfig(max_image_size=max_image_size, crop_multiple=crop_multiple,
                                 min_side=1, max_aspect=float("inf"), frame_stride=stride,
                                 max_frames=max_frames, frame_size=frame_size)
    try:
        frames, fps, _ = ingest.load_video_frames(path, config)
    except (video_io.VideoReadError, ingest.SkipVideo) as e:
        raise ValueError(f"--input {path!r}: cannot read the video ({e})") from e
    return frames, fps / stride


def read_actions(path: str) -> np.ndarray:
    """--actions FILE (.npy, or .json: a list of per-frame lists) -> float32 [frames, A]."""
    import json
    if not os.path.isfile(path):
        raise ValueError(f"--actions {path!r}: no such file")
    try:
        if path.endswith(".npy"):
            actions = np.load(path)
        else:
            with open(path) as f:
                actions = np.asarray(json.load(f))
        actions = np.asarray(actions, np.float32)
    except (ValueError, TypeError, OSError) as e:
        raise ValueError(f"--actions {path!r}: not an array of numbers ({e})") from e
    if actions.ndim != 2:
        raise ValueError(f"--actions {path!r}: shape {actions.shape}, expected [frames, "
                         "action_dim]")
    return actions


def conditions_of(args, pipe) -> dict:
    """`Pipeline.predict`'s condition keywords (one video's) from --class / --actions /
    --caption."""
    conditions = {}
    if args.class_id is not None:
        conditions["class_id"] = args.class_id
    if args.actions is not None:
        conditions["actions"] = read_actions(args.actions)
    if args.caption is not None:
        from vgpt_jax import text_encoder
        cc = pipe.model.cfg.conditions
        if not cc.text_dim:
            raise ValueError("--caption: the model has no text conditions "
                             "(model.conditions.text_dim is 0)")
        path = args.text_encoder or (pipe.config or {}).get("text", {}).get("encoder")
        if not path:
            raise ValueError("--caption: give --text-encoder (the export's config names none)")
        emb = text_encoder.load(path, cc.text_tokens).encode([args.caption])[0]
        if emb.shape[1] != cc.text_dim:
            raise ValueError(f"--text-encoder {path!r}: width {emb.shape[1]}, the model's "
                             f"conditions.text_dim is {cc.text_dim}")
        conditions["text"], conditions["text_mask"] = text_encoder.pad(emb, cc.text_tokens)
    elif args.text_encoder:
        raise ValueError("--text-encoder needs --caption")
    return conditions


CONDITION_FLAGS = {"class_id": "--class", "actions": "--actions", "text": "--caption",
                   "text_mask": "--caption"}


def trained_frame_size(pipe) -> tuple[int, int] | None:
    """(H, W) pixels of the model's training latents (`data.latent_size`), or None."""
    size = (pipe.config or {}).get("data", {}).get("latent_size")
    if not size:
        return None
    d = pipe.latent_space.downsample
    return int(size[0]) * d, int(size[1]) * d


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from vgpt_jax.conditioning import ConditionError
    from vgpt_jax.data import video_io
    from vgpt_jax.pipeline import Pipeline, split_frames

    clip_sizes = (args.clip_sizes if args.clip_sizes is not None
                  else split_frames(args.num_frames) if args.num_frames is not None else [24, 24])
    if args.context_frames < 1:
        raise ValueError(f"--context-frames={args.context_frames}: must be >= 1")
    if args.frame_stride < 1:
        raise ValueError(f"--frame-stride={args.frame_stride}: must be >= 1")
    video_io.check_writable(args.output)  # before the minutes of sampling, not after
    latent_space = "auto"  # the checkpoint config's
    if args.latent_space is not None:
        from vgpt_jax.vae.latent_space import make_latent_space
        latent_space = make_latent_space(args.latent_space)
    pipe = Pipeline.from_checkpoint(args.checkpoint, latent_space=latent_space, mesh=args.mesh)
    if pipe.latent_space is None:
        raise ValueError(f"--checkpoint {args.checkpoint!r} has no latent_space section: give "
                         "--latent-space to turn video frames into latents")
    crop = args.crop_multiple or pipe.latent_space.downsample * pipe.model.cfg.patch_size
    total = args.context_frames + sum(clip_sizes)
    frame_size = args.frame_size or trained_frame_size(pipe)
    if args.frame_size is None and frame_size is not None:
        print(f"note: input resized to {frame_size[1]}x{frame_size[0]}, the resolution the model "
              "was trained at (--frame-size WxH changes it)", file=sys.stderr)
    frames, fps = read_context(args.input, args.frame_stride, args.max_image_size, crop, total,
                               frame_size)
    context, truth = frames[:args.context_frames], frames[args.context_frames:]
    if len(frames) < args.context_frames:
        print(f"note: --context-frames={args.context_frames}, but {args.input} has only "
              f"{len(frames)} frames at --frame-stride {args.frame_stride}: all {len(frames)} are "
              "the context and there is no ground truth to compare with", file=sys.stderr)

    conditions = conditions_of(args, pipe)
    if not conditions and args.condition_guidance != 1.0:
        raise ValueError("--condition-guidance needs --class, --actions or --caption")
    with tqdm(total=len(clip_sizes), unit="clip", disable=args.no_progress) as bar:
        try:
            predicted = pipe.predict(
                context, clip_sizes=clip_sizes, steps=args.steps, guidance=args.guidance,
                window=args.window, seed=args.seed, time_shift=args.time_shift,
                cache_mode=args.cache_mode, anchor_frames=args.anchor_frames,
                context_noise=args.context_noise,
                same_noise_every_clip=args.same_noise_every_clip,
                condition_guidance=args.condition_guidance, reencode=args.reencode,
                callback=lambda k, n, clip: bar.update(1), **conditions).frames
        except ConditionError as e:  # the flag, not the keyword, in the message
            if e.condition not in CONDITION_FLAGS:
                raise
            raise ValueError(f"{CONDITION_FLAGS[e.condition]}: {e.problem}") from None
    video_io.write_video(args.output, predicted, fps)
    print(f"wrote {len(predicted)} predicted frames to {args.output}")
    if len(truth):
        stem, ext = os.path.splitext(args.output)
        pred = predicted[:len(truth)]
        side = np.concatenate([truth, pred], axis=2)  # [T, H, 2W, 3]: truth | prediction
        path = video_io.write_video(f"{stem}_vs_gt{ext}", side, fps)
        print(f"wrote ground truth | prediction ({len(truth)} frames) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
