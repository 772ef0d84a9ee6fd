"""Plan a training run on a TPU pod from this (CPU-only) machine (`python tools/plan_tpu.py --help`; the same as `vgpt plan`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.commands.plan_tpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
