"""`vgpt eval`: score a checkpoint on held-out videos against copy-the-last-frame and linear
extrapolation (`vgpt_jax.evaluate`); writes report.json, report.md and grid gifs.

    vgpt eval --checkpoint runs/demo/model --physics 64 --out report/ --clip-frames 1 \
        --steps 20 --guidance 1.5 --time-shift 20 --window 16 --context-noise 0.1
"""
from __future__ import annotations

import os

from vgpt_jax import evaluate
from vgpt_jax.commands import add_sampler_arguments


def main(argv=None) -> int:
    """`vgpt eval`: score a checkpoint on held-out videos; writes report.json / report.md."""
    import argparse
    p = argparse.ArgumentParser(prog="vgpt eval", description=main.__doc__)
    p.add_argument("--checkpoint", required=True, help="a model export or training workdir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder of held-out videos (NAME.mp4, NAME.take2.mp4)")
    src.add_argument("--physics", type=int, metavar="N",
                     help="N test scenarios of the physics world (two takes each), generated "
                          "with the checkpoint config's `world` settings")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--context-frames", type=int, default=4)
    p.add_argument("--predict-frames", type=int, default=4)
    p.add_argument("--clip-frames", type=int, default=0, help="0: one clip")
    add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fvd", action="store_true", help="also FVD (needs the eval extra)")
    p.add_argument("--max-grids", type=int, default=8)
    args = p.parse_args(argv)

    from vgpt_jax import demo
    from vgpt_jax.data.physics_world import make_world
    from vgpt_jax.pipeline import Pipeline
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    pipeline = Pipeline.from_checkpoint(args.checkpoint)
    if pipeline.latent_space is None:
        raise ValueError(f"checkpoint {args.checkpoint!r} has no latent_space section; "
                         "evaluation compares pixels")
    total = args.context_frames + args.predict_frames
    if args.videos:
        videos = evaluate.load_video_folder(args.videos, total)
    else:
        cfg = demo.demo_config()
        if pipeline.config is not None and "world" in pipeline.config:
            cfg.world.update(pipeline.config.world)
        cfg.world.num_test_videos, cfg.world.num_frames = args.physics, total
        videos = evaluate.held_out_videos(make_world(cfg.world)[1])
    report, predictions = evaluate.evaluate(
        pipeline, videos, context_frames=args.context_frames, predict_frames=args.predict_frames,
        clip_frames=args.clip_frames or None, steps=args.steps, guidance=args.guidance,
        seed=args.seed, fvd=args.fvd,
        predict_options=dict(window=args.window, context_noise=args.context_noise,
                             time_shift=args.time_shift))
    report["checkpoint"] = os.path.abspath(args.checkpoint)
    evaluate.write_report(report, args.out, videos, predictions, args.context_frames,
                          args.max_grids)
    print(evaluate.markdown_report(report))
    return 0
