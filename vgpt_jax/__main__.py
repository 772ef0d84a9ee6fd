"""`python -m vgpt_jax <command>`: the same as the `vgpt` console script."""
import sys

from vgpt_jax.cli import entry

sys.exit(entry())
