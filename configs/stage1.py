"""Curriculum stage 1: 16 frames at stride 4, one frame per clip (next-frame diffusion), 300k steps.

    python tools/train.py --config configs/stage1.py --workdir /ckpt/stage1 \
        --config.data.store=/data/latents
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curriculum import stage_config  # noqa: E402


def get_config():
    return stage_config(num_frames=16, clip_mode="one_frame", stride=(4, 4), steps=300_000)
