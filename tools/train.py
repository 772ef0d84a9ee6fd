"""Train Video-GPT from a config file. (`python tools/train.py --config configs/curriculum.py:stage1 --workdir W`; the same as `vgpt train`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
