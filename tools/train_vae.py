"""Train a small KL-VAE on frames and write a diffusers-format folder. (`python tools/train_vae.py --help`; the same as `vgpt train-vae`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.commands.train_vae import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
