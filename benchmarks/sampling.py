"""Time per generated clip: the exact KV cache against full recomputation (the release's way).

    python benchmarks/sampling.py                       # 56 context frames, a 24-frame clip, 50 steps
    python benchmarks/sampling.py --steps 10 --histories 8 16 32 56
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sampling.py \
        --mesh data=2,fsdp=4 --batch 8                  # a batch of videos on a mesh

A small-width model with random weights (timing does not depend on the values) on whatever
device JAX finds. Each setting runs once to compile, then `--repeats` timed runs (the median is
reported): the cached time includes building the cache from the history. Clips per second
count the `--batch` videos' clips; `--mesh` samples on a mesh of the local devices
(`sampling.Placement`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vgpt_jax import checkpoint, sampling  # noqa: E402
from vgpt_jax.sharding import parse_mesh  # noqa: E402
from vgpt_jax.config import ModelConfig, block_len_for, get_model_config  # noqa: E402


def bench_model(hidden: int, layers: int, heads: int, mlp: int, seed: int = 0):
    cfg = get_model_config("tiny")
    cfg.update(dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                    mlp_dim=mlp))
    graphdef, state = nnx.split(checkpoint.abstract_model(ModelConfig.from_config(cfg)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: 0.02 * rng.standard_normal(x.shape, np.float32), state)
    return nnx.merge(graphdef, state)


def time_clip(model, history: int, clip: int, latent: int, cfg: sampling.SamplerConfig,
              repeats: int, batch: int = 1, placement=None) -> float:
    context = np.random.default_rng(1).standard_normal(
        (batch, history, latent, latent, model.cfg.latent_channels)).astype(np.float32)
    run = lambda: sampling.sample_video(model, (clip,), cfg, list(range(batch)),
                                        context_BFhwc=context, placement=placement)
    run()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--clip", type=int, default=24, help="frames per generated clip")
    p.add_argument("--context", type=int, default=56, help="history for the headline ratio")
    p.add_argument("--histories", type=int, nargs="*", default=[8, 16, 32, 56])
    p.add_argument("--latent", type=int, default=8, help="latent side (patch 2: (side/2)^2 + 2 "
                                                         "tokens per frame)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="videos sampled together")
    p.add_argument("--mesh", default=None, help="axis=size pairs, e.g. data=2,fsdp=4")
    args = p.parse_args(argv)

    model = bench_model(args.hidden, args.layers, args.heads, args.mlp)
    placement = None if args.mesh is None else sampling.Placement.of(parse_mesh(args.mesh))
    if placement is not None:
        model = placement.place_model(model)
    L = block_len_for(model.cfg, args.latent, args.latent)
    window = max([args.context, *args.histories]) + args.clip
    print(f"device: {jax.devices()[0].device_kind}; model: {args.layers} layers x {args.hidden} "
          f"wide; {L} tokens per frame; {args.clip}-frame clip; {args.steps} steps; guidance "
          f"{args.guidance}; {args.batch} video(s) on "
          f"{'one device' if placement is None else dict(placement.mesh.shape)}")
    modes = {m: sampling.SamplerConfig(steps=args.steps, guidance=args.guidance, window=window,
                                       cache_mode=m) for m in ("window", "recompute")}
    rows = {}
    for history in sorted({args.context, *args.histories}):
        rows[history] = {m: time_clip(model, history, args.clip, args.latent, cfg, args.repeats,
                                      args.batch, placement) for m, cfg in modes.items()}
    print(f"\n{'history':>8} {'tokens':>7} {'cached s/clip':>14} {'recompute s/clip':>17} "
          f"{'speed-up':>9} {'cached clips/s':>15}")
    for history, t in rows.items():
        print(f"{history:>8} {(history + args.clip) * L:>7} {t['window']:>14.3f} "
              f"{t['recompute']:>17.3f} {t['recompute'] / t['window']:>8.2f}x "
              f"{args.batch / t['window']:>15.3f}")
    t = rows[args.context]
    print(f"\n{args.context} context frames + a {args.clip}-frame clip: cached "
          f"{t['window']:.3f} s, full recomputation {t['recompute']:.3f} s, ratio "
          f"{t['recompute'] / t['window']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
