"""Video-to-video segmentation: fine-tune the demo's world model to render ball masks as video.

    vgpt segment-finetune --config configs/segmentation.py --workdir runs/segment/pretrained
    vgpt segment-finetune --config configs/segmentation.py --workdir runs/segment/scratch \
        --config.from_scratch=True
    vgpt segment-finetune --config configs/segmentation.py:quick --workdir /tmp/seg \
        --config.init_from=<export>

The fields are `vgpt_jax.segmentation.SegmentationConfig`'s (validated there once). The default
is the measured budget of docs/representations.md: 300 steps of batch 16 on 4 + 4 frames.
"""
import dataclasses

import ml_collections

from vgpt_jax.segmentation import SegmentationConfig


def get_config(size: str = "default"):
    cfg = ml_collections.ConfigDict(dataclasses.asdict(SegmentationConfig()))
    if size == "quick":  # the end-to-end test: seconds on a CPU
        cfg.world.num_train_videos, cfg.world.num_test_videos = 4, 2
        cfg.world.num_frames = 6
        cfg.source_frames = 2
        cfg.eval_starts = (0, 4)
        cfg.steps, cfg.batch_size, cfg.warmup_steps, cfg.log_every = 2, 2, 1, 1
        cfg.sample_steps = 2
    elif size != "default":
        raise ValueError(f"segmentation config size {size!r}: 'default' or 'quick'")
    return cfg
