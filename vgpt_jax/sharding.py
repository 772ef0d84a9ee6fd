"""Logical-axis sharding: parameters and activations carry names, config rules map them to mesh axes.

Activations are annotated with `constrain(x, names)`; outside an active mesh (single device,
tests) it is the identity, so model code never branches on the device setup.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import NamedSharding, PartitionSpec

_ACTIVE = contextvars.ContextVar("vgpt_sharding", default=None)


def logical_to_spec(names, rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec with a rules list [(logical, mesh_axes), ...]."""
    table = dict((k, v) for k, v in rules)
    used, out = set(), []
    for name in names:
        axes = table.get(name)
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dimension only
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context, `constrain` applies `with_sharding_constraint` on `mesh`."""
    token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, names):
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
