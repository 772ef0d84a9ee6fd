"""Train-step time over mesh shapes on 8 fake CPU devices (overheads, not speedups: the fake
devices share the host's cores), with the 1-device step as the reference of the same run.

    python benchmarks/train_scaling.py [--steps 5] [--model tiny] [--frames 8] [--latent 8]
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vgpt_jax import train  # noqa: E402
from vgpt_jax.config import block_len_for, get_train_config  # noqa: E402

MESHES = [  # (data, fsdp, context, tensor); the first is the 1-device reference
    (1, 1, 1, 1), (8, 1, 1, 1), (1, 8, 1, 1), (2, 4, 1, 1), (2, 2, 1, 2), (2, 2, 2, 1),
]


def source(frames: int, latent: int, n: int = 16):
    rng = np.random.default_rng(0)
    return [dict(latents=rng.normal(size=(frames, latent, latent, 4)).astype(np.float32),
                 fps=30.0, source=f"v{i}", num_frames=frames) for i in range(n)]


def bench(mesh, args, src):
    cfg = get_train_config(args.model)
    cfg.model.attention.impl = "dense"
    cfg.data.update(num_frames=args.frames, stride_min=1, stride_max=1, clip_mode="random",
                    global_batch_size=args.batch, read_threads=1)
    cfg.mesh.ici.update(dict(zip(("data", "fsdp", "context", "tensor"), mesh)))
    cfg.mesh.unsharded_tolerance = 1.0
    n = int(np.prod(mesh))
    setup = train.build(cfg, src, devices=jax.devices()[:n])
    it = iter(setup.dataset)
    batches = [setup.global_batch_of(next(it)) for _ in range(args.steps + 1)]
    state = setup.init()
    t0 = time.perf_counter()
    state, m = setup.step_fn(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches[1:]:
        state, m = setup.step_fn(state, b)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t0) / args.steps
    seq = 2 * args.frames * block_len_for(setup.model_cfg, args.latent, args.latent)
    return n, compile_s, step_s, args.batch * seq / step_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--model", default="tiny")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    src = source(args.frames, args.latent)
    print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].platform}, model "
          f"{args.model}, batch {args.batch}, {args.frames} frames of {args.latent}x{args.latent} "
          f"latents")
    print(f"{'mesh (data,fsdp,context,tensor)':<34}{'devices':>8}{'compile s':>11}"
          f"{'step ms':>10}{'tokens/s':>11}{'vs 1 dev':>10}")
    ref = None
    for mesh in MESHES:
        n, compile_s, step_s, tps = bench(mesh, args, src)
        ref = ref or step_s
        print(f"{str(mesh):<34}{n:>8}{compile_s:>11.1f}{step_s * 1e3:>10.1f}{tps:>11.0f}"
              f"{ref / step_s:>9.2f}x")


if __name__ == "__main__":
    main()
