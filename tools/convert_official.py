"""Convert the released Video-GPT PyTorch weights into a vgpt_jax model export. (`python tools/convert_official.py --help`; the same as `vgpt convert-official`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.commands.convert_official import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
