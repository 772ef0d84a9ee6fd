"""Shared helpers for the benchmarks: timing, a measured matmul peak, the attended-key count."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def time_call(fn, *args, warmup=2, repeats=5):
    """Median wall seconds of `fn(*args)` after warmup (results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measured_matmul_peak(dtype=jnp.float32, n=None) -> float:
    """FLOP/s of a large square matmul on the default device: the MFU denominator."""
    n = n or (8192 if jax.default_backend() != "cpu" else 2048)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    seconds = time_call(f, a, warmup=2, repeats=5)
    return 2 * n**3 / seconds


def mean_attended_keys(mask_BTS) -> float:
    """Average number of visible keys per real query: the useful attention work."""
    m = np.asarray(mask_BTS)
    return float(m.sum(-1).mean())
