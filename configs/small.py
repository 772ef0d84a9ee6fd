"""The `small` model (4 layers, width 256) on 16-frame clips: a single-GPU sanity run.

    python tools/train.py --config configs/small.py --workdir /tmp/small \
        --config.data.store=/path/to/latents
"""
from vgpt_jax.config import get_train_config


def get_config():
    cfg = get_train_config("small")
    cfg.data.num_frames = 16
    cfg.data.stride_min = cfg.data.stride_max = 4
    cfg.data.clip_mode = "random"
    cfg.data.global_batch_size = 16
    cfg.data.worker_count = 2
    cfg.optim.learning_rate = 3e-4
    cfg.optim.warmup_steps = 500
    cfg.optim.schedule = "cosine"
    cfg.train.steps = 20_000
    cfg.train.log_every = 50
    cfg.checkpoint.save_interval_steps = 1000
    return cfg
