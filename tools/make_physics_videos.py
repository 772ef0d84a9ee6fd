"""Render physics-world clips to a folder of videos (mp4 or gif), plus their states as .npz. (`python tools/make_physics_videos.py --help`; the same as `vgpt make-physics`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.commands.make_physics_videos import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
