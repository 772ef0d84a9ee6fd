"""Encode a folder of videos into a sharded latent store. (`python tools/prepare_latents.py --help`; the same as `vgpt prepare`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.commands.prepare_latents import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
