"""The four curriculum stages of the paper on the Phi-3-mini backbone, one config file:

    vgpt train --config configs/curriculum.py:stage1 --workdir runs/stage1 \
        --config.data.store=/data/latents

(ml_collections' `path:argument` form: `get_config("stage2")`). Shared by every stage: AdamW
1e-4 / (0.9, 0.95) / eps 1e-5 / wd 0.1 / clip 1.0, float32 master params with bfloat16 compute,
full rematerialisation (the official run had gradient checkpointing on), scan over layers, FSDP
over all devices of a host and data parallelism across hosts.

| stage | frames | stride | clip partitions | steps |
|---|---|---|---|---|
| stage1 | 16 | 4 | one frame per clip (next-frame diffusion) | 300k |
| stage2 | 48 | 4 | random | 25k |
| stage3 | 48 | random in [4, 12] per sample | random | 40k |
| stage4 | 80 | random in [4, 12] per sample | random | 20k |

Stage N+1 starts from stage N's params, by default from `runs/stage<N>` (the workdir the command
above names, relative to where you run it); `--config.checkpoint.init_from=<workdir or export>`
changes it. Stage 4's sequences reach ~35k tokens: the blockwise / splash attention and the
`context` mesh axis matter there.

The official scripts warm up for 320k steps with `constant_with_warmup`, longer than any stage,
so the lr never leaves warmup unless the scheduler carries over; we warm up per stage for
`WARMUP` steps instead and say so here (320k looks like a slip in the official scripts).
"""
from vgpt_jax.config import get_train_config

WARMUP = 1000
# stage: (frames, clip_mode, (stride_min, stride_max), steps)
STAGES = {
    "stage1": (16, "one_frame", (4, 4), 300_000),
    "stage2": (48, "random", (4, 4), 25_000),
    "stage3": (48, "random", (4, 12), 40_000),
    "stage4": (80, "random", (4, 12), 20_000),
}


def get_config(stage: str | None = None):
    if stage not in STAGES:
        raise ValueError(f"curriculum stage {stage!r}: name one of {list(STAGES)} after the "
                         "file, as in --config configs/curriculum.py:stage2")
    num_frames, clip_mode, stride, steps = STAGES[stage]
    names = list(STAGES)
    previous = names[names.index(stage) - 1] if names.index(stage) else None
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
    cfg.checkpoint.init_from = f"runs/{previous}" if previous else ""
    cfg.mesh.ici.fsdp = -1
    cfg.mesh.dcn.data = -1
    return cfg
