"""Predict how a video continues: read a context video, write the prediction as mp4. (`python tools/sample.py --help`; the same as `vgpt sample`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.commands.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
