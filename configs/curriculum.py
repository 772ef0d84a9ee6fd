"""The shared base of the four curriculum stages of the paper on the Phi-3-mini
backbone: AdamW 1e-4 / (0.9, 0.95) / eps 1e-5 / wd 0.1 / clip 1.0, float32 master params with
bfloat16 compute, full rematerialisation (the official run had gradient checkpointing on),
scan over layers, FSDP over all devices of a host and data parallelism across hosts.

The official scripts warm up for 320k steps with `constant_with_warmup`, longer than any stage,
so the lr never leaves warmup unless the scheduler carries over; we warm up per stage for
`WARMUP` steps instead and say so here (320k looks like a slip in the official scripts).
"""
from vgpt_jax.config import get_train_config

WARMUP = 1000


def stage_config(*, num_frames: int, clip_mode: str, stride: tuple[int, int], steps: int,
                 init_from: str = ""):
    cfg = get_train_config("phi3_mini")
    cfg.model.dtype = "bfloat16"
    cfg.model.param_dtype = "float32"
    cfg.model.remat_policy = "full"
    cfg.model.scan_layers = True
    cfg.model.attention.impl = "auto"
    cfg.data.num_frames = num_frames
    cfg.data.clip_mode = clip_mode
    cfg.data.stride_min, cfg.data.stride_max = stride
    # batch_size_per_device=1 in the official scripts: set to the device count of the run.
    cfg.data.global_batch_size = 8
    cfg.data.worker_count = 4
    cfg.optim.warmup_steps = WARMUP
    cfg.train.steps = steps
    cfg.train.log_every = 10
    cfg.checkpoint.save_interval_steps = 1000
    cfg.checkpoint.init_from = init_from
    cfg.mesh.ici.fsdp = -1
    cfg.mesh.dcn.data = -1
    return cfg
