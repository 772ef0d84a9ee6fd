"""Gaussian noise for jitted programs: `jax.random.normal`'s numbers, cheaper to compile.

XLA:CPU compiles threefry over a many-axis shape slowly: the fused rounds of a 5-axis draw (each
intermediate used 2-3 times) came out of its code generator as megabytes of LLVM IR. Measured on a 2-core AMD EPYC (Zen 3), one
`jax.random.normal(key, (8, 4, 8, 8, 12))` under `jit`: 32 s to compile, against 0.5 s drawn as
[8, 3072]; the tiny test model's whole train step (which draws two of them) 36 s.

Threefry's counters run over the flattened array in either `jax_threefry_partitionable` mode,
so drawing [shape[0], rest] and reshaping gives bitwise the same numbers as drawing `shape`
(tests/test_diffusion.py checks it). The leading axis is kept, so that a batch-sharded draw
stays local to each shard.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def normal(key, shape, dtype=jnp.float32) -> jax.Array:
    """`jax.random.normal(key, shape, dtype)`, the same numbers, drawn over 2 axes."""
    shape = tuple(shape)
    if len(shape) <= 2:
        return jax.random.normal(key, shape, dtype)
    return jax.random.normal(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)
