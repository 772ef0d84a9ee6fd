"""Plan a training run on a TPU pod from this (CPU-only) machine: compile the real train step
and the sampler's per-clip program for a topology and print per-chip memory and cost.

    python tools/plan_tpu.py --config stage4 --topology v5p:4x4x4 --mesh fsdp=8,context=8
    python tools/plan_tpu.py --config tiny_test --topology v5e:2x2 --mesh fsdp=2,context=2 \
        --frames 4 --latent_hw 8,8

Needs libtpu (`pip install "vgpt_jax[tpu]"`); nothing runs on, or is allocated for, a TPU.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgpt plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True,
                   help="stage1..stage4 (configs/curriculum.py), tiny_test, a configs/*.py[:argument] "
                        "path, or a model preset")
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5p:8x8x4, v5e:16x16")
    p.add_argument("--mesh", required=True, help="axis=size pairs, e.g. fsdp=8,context=8")
    p.add_argument("--remat", default=None,
                   help="none | full | dots_saveable | dots_with_no_batch_dims_saveable")
    p.add_argument("--dtype", default=None, help="compute dtype (float32 | bfloat16)")
    p.add_argument("--attention", default="splash", help="attention impl to compile")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (default: one sample per data x fsdp shard)")
    p.add_argument("--grad_accum", type=int, default=None, help="microbatches per step")
    p.add_argument("--frames", type=int, default=None, help="frames per sample (config's)")
    p.add_argument("--latent_hw", default="22,40", help="latent height,width (320x176 video)")
    p.add_argument("--no_sampler", action="store_true", help="skip the sampler program")
    p.add_argument("--context_frames", type=int, default=56)
    p.add_argument("--clip_frames", type=int, default=24)
    p.add_argument("--sampler_steps", type=int, default=50)
    p.add_argument("--mfu", type=float, default=0.4, help="MFU for the step-time estimate")
    p.add_argument("--markdown", action="store_true",
                   help="also print the plan as a row of docs/tpu.md's table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from vgpt_jax import plan as plan_lib
    from vgpt_jax.sharding import parse_mesh
    h, w = (int(x) for x in args.latent_hw.split(","))
    plan = plan_lib.make_plan(
        args.config, args.topology, parse_mesh(args.mesh), remat=args.remat,
        dtype=args.dtype, global_batch=args.batch, grad_accum=args.grad_accum,
        num_frames=args.frames, latent_hw=(h, w), sampler=not args.no_sampler,
        context_frames=args.context_frames, clip_frames=args.clip_frames,
        sampler_steps=args.sampler_steps, attention=args.attention)
    print(plan_lib.format_plan(plan, args.mfu))
    if args.markdown:
        command = "python tools/plan_tpu.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--markdown")
        print(plan_lib.markdown_row(plan, command))
    programs = [p for p in (plan.train, plan.sampler) if p is not None]
    return 0 if all(plan.fits(p) for p in programs) else 1


if __name__ == "__main__":
    sys.exit(main())
