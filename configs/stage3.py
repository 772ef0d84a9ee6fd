"""Curriculum stage 3: 48 frames at a random stride in [4, 12] per sample, random clip
partitions, 40k steps, initialised from stage 2's params.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curriculum import stage_config  # noqa: E402


def get_config():
    return stage_config(num_frames=48, clip_mode="random", stride=(4, 12), steps=40_000,
                        init_from="/ckpt/stage2")
