"""Curriculum stage 4: 80 frames at a random stride in [4, 12] per sample, random clip
partitions, 20k steps, initialised from stage 3's params. Sequences reach ~35k tokens: the
blockwise / splash attention and the `context` mesh axis matter here.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curriculum import stage_config  # noqa: E402


def get_config():
    cfg = stage_config(num_frames=80, clip_mode="random", stride=(4, 12), steps=20_000,
                       init_from="/ckpt/stage3")
    return cfg
