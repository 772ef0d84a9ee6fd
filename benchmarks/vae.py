"""Encode/decode throughput of AutoencoderKLSpace on this host, and peak host memory.

  python benchmarks/vae.py                        # small VAE (d=4) and SDXL-sized VAE, 176x320 frames
  python benchmarks/vae.py --which small --batches 5 --batch-size 8

Weights are random (throughput does not depend on them). The first batch (compile) is timed separately.
`cpu_s` is the process CPU time per batch (user+sys, all threads): on a shared host it is the steadier number;
`batch_s` / `fps` are wall clock.
Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` after each phase; it only grows, so the value
after a phase bounds that phase's peak (the process also holds jax, the weights and the frames).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.vae.autoencoder_kl import AutoencoderKLConfig, init_autoencoder_kl  # noqa: E402
from vgpt_jax.vae.latent_space import AutoencoderKLSpace  # noqa: E402
from vgpt_jax.vae.train import default_small_config  # noqa: E402

SDXL = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
            norm_num_groups=32, scaling_factor=0.13025, sample_size=1024)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def bench(name, cfg, h, w, batch_size, batches, dtype):
    import jax.numpy as jnp

    space = AutoencoderKLSpace(init_autoencoder_kl(cfg), batch_size=batch_size,
                               dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(space._state))
    frames = np.random.default_rng(0).integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8)
    rows = []
    for op in ("encode", "decode"):
        fn = space.encode if op == "encode" else space.decode
        arg = frames if op == "encode" else space.encode(frames)
        t = time.perf_counter()
        fn(arg)
        first = time.perf_counter() - t
        times, cpu = [], []
        for _ in range(batches):
            t, c = time.perf_counter(), time.process_time()
            fn(arg)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        per_batch = float(np.median(times))
        rows.append(dict(model=name, params_M=n_params / 1e6, op=op, res=f"{h}x{w}", batch=batch_size,
                         dtype=dtype, first_s=first, batch_s=per_batch, cpu_s=float(np.median(cpu)),
                         fps=batch_size / per_batch,
                         maxrss_MiB=_maxrss_mib()))
        print(_fmt(rows[-1]), flush=True)
    return rows


_COLS = ["model", "params_M", "op", "res", "batch", "dtype", "first_s", "batch_s", "cpu_s", "fps", "maxrss_MiB"]


def _fmt(r):
    return " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in _COLS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=("small", "sdxl", "both"), default="both")
    p.add_argument("--height", type=int, default=176)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=3, help="timed batches after the compile batch (small VAE)")
    p.add_argument("--sdxl-batch-size", type=int, default=1)
    p.add_argument("--sdxl-batches", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = p.parse_args(argv)

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} host CPUs; "
          f"maxrss at start {_maxrss_mib():.0f} MiB")
    print(" | ".join(_COLS))
    rows = []
    if a.which in ("small", "both"):
        rows += bench("small d4 (32,64,64)", default_small_config(4), a.height, a.width, a.batch_size,
                      a.batches, a.dtype)
    if a.which in ("sdxl", "both"):
        rows += bench("sdxl-sized d8", AutoencoderKLConfig(**SDXL), a.height, a.width, a.sdxl_batch_size,
                      a.sdxl_batches, a.dtype)
    print("\n| " + " | ".join(_COLS) + " |\n|" + "---|" * len(_COLS))
    for r in rows:
        print("| " + _fmt(r) + " |")


if __name__ == "__main__":
    main()
