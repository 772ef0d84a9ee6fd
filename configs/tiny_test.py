"""The test and demo config: the `tiny` model on tiny latents, a few steps, in seconds on CPU.

    python tools/train.py --config configs/tiny_test.py --workdir /tmp/run \
        --config.data.store=/path/to/store --config.train.steps=20
"""
from vgpt_jax.config import get_train_config


def get_config():
    cfg = get_train_config("tiny")
    cfg.model.attention.impl = "dense"
    cfg.data.num_frames = 4
    cfg.data.stride_min = cfg.data.stride_max = 1
    cfg.data.clip_mode = "random"
    cfg.data.global_batch_size = 8
    cfg.data.read_threads = 1
    cfg.data.prefetch_buffer_size = 2
    cfg.optim.learning_rate = 1e-3
    cfg.optim.warmup_steps = 2
    cfg.train.steps = 6
    cfg.train.log_every = 1
    cfg.train.peak_flops_per_device = 1e11  # skip the start-up matmul measurement
    cfg.train.progress_bar = False
    cfg.checkpoint.save_interval_steps = 2
    cfg.checkpoint.max_to_keep = 2
    cfg.mesh.ici.fsdp = -1
    return cfg
