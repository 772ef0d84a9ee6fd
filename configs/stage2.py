"""Curriculum stage 2: 48 frames at stride 4, random clip partitions, 25k steps, initialised
from stage 1's params (`--config.checkpoint.init_from=/ckpt/stage1` to change the path).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curriculum import stage_config  # noqa: E402


def get_config():
    return stage_config(num_frames=48, clip_mode="random", stride=(4, 4), steps=25_000,
                        init_from="/ckpt/stage1")
