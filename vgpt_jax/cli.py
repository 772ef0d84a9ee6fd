"""`vgpt <command> [options]`: the command-line face of vgpt_jax, thin over the library.

    vgpt demo             the main job: physics world -> latents -> training -> evaluation
    vgpt make-physics     write physics-world videos to a folder
    vgpt prepare          encode a folder of videos into a latent store (resumable)
    vgpt train-vae        train a small AutoencoderKL on your frames
    vgpt train            train Video-GPT from a config file (resumable, sharded)
    vgpt sample           continue a video file with a checkpoint, write mp4
    vgpt eval             score a checkpoint on held-out videos against baselines
    vgpt convert-official convert the released PyTorch weights
    vgpt plan             compile the train step / sampler for a TPU topology, print memory

`vgpt <command> --help` lists a command's options.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "vgpt_jax.demo",
    "make-physics": "vgpt_jax.commands.make_physics_videos",
    "prepare": "vgpt_jax.commands.prepare_latents",
    "train-vae": "vgpt_jax.commands.train_vae",
    "train": "vgpt_jax.commands.train",
    "sample": "vgpt_jax.commands.sample",
    "eval": "vgpt_jax.evaluate",
    "convert-official": "vgpt_jax.commands.convert_official",
    "plan": "vgpt_jax.commands.plan_tpu",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vgpt: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"vgpt {command}"  # what argparse and absl print as the program name
    # Imported on demand: `vgpt prepare` should not pay for what `vgpt train` imports.
    return importlib.import_module(COMMANDS[command]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
