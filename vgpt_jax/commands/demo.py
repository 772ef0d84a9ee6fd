"""`vgpt demo`: the main job (`vgpt_jax.demo`): physics world -> latents -> training ->
evaluation, in one command."""
from __future__ import annotations

from vgpt_jax import demo


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="vgpt demo", description=demo.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--size", default="default", choices=("default", "long", "quick"))
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
    args = p.parse_args(argv)
    cfg = demo.demo_config(args.size)
    if args.steps:
        cfg.train.steps = args.steps
    demo.run(cfg, args.workdir)
    return 0
