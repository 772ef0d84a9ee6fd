"""Logical-axis sharding: parameters and activations carry names, config rules map them to mesh axes.

Activations are annotated with `constrain(x, names)`; outside an active mesh (single device,
tests) it is the identity, so model code never branches on the device setup.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vgpt_jax.config import MESH_AXES

_ACTIVE = contextvars.ContextVar("vgpt_sharding", default=None)


def mesh_axes(entry) -> tuple[str, ...]:
    """A rule's or a PartitionSpec entry's mesh axes as a tuple: None -> (), "fsdp" ->
    ("fsdp",), a sequence -> its tuple."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def spec_entry(axes) -> str | tuple[str, ...] | None:
    """The inverse, PartitionSpec's form: () -> None, one axis -> its name, more -> the tuple."""
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def canonical_rules(rules) -> tuple:
    """Rules [(logical, mesh axes), ...] as a hashable tuple, each entry None, a name or a tuple."""
    return tuple((r[0], r[1] if r[1] is None or isinstance(r[1], str) else tuple(r[1]))
                 for r in rules)


def logical_to_spec(names, rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec with a rules list [(logical, mesh_axes), ...]."""
    table = dict((k, v) for k, v in rules)
    used, out = set(), []
    for name in names:
        # a mesh axis shards one dimension only
        axes = tuple(a for a in mesh_axes(table.get(name)) if a not in used)
        used.update(axes)
        out.append(spec_entry(axes))
    return PartitionSpec(*out)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context, `constrain` applies `with_sharding_constraint` on `mesh`."""
    token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding():
    """The `(mesh, rules)` of the enclosing `activation_sharding` context, or None."""
    return _ACTIVE.get()


def constrain(x, names):
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


# ---------------------------------------------------------------------------------------------
# The training mesh and the shardings of the train state.
#
# Axis types: every mesh axis is `AxisType.Auto` (GSPMD propagation), a deliberate choice: the
# model annotates activations with `with_sharding_constraint` (via `constrain`) and lets XLA
# propagate the rest, which only Auto axes allow; Explicit axes would need `out_sharding` on
# every ambiguous op inside the model and `reshard` instead of constraints. The axes are
# `config.MESH_AXES`.


def _resolve(sizes: dict, total: int, what: str) -> list[int]:
    """Fill the one -1 entry so the product is `total`; errors name the config field."""
    vals = [int(sizes[a]) for a in MESH_AXES]
    known = math.prod(v for v in vals if v != -1)
    if -1 in vals:
        if total % known:
            raise ValueError(f"mesh.{what}={dict(zip(MESH_AXES, vals))}: the fixed sizes (product "
                             f"{known}) do not divide the {total} devices available")
        vals[vals.index(-1)] = total // known
    if math.prod(vals) != total:
        raise ValueError(f"mesh.{what}={dict(zip(MESH_AXES, vals))}: product {math.prod(vals)} "
                         f"does not match the {total} devices available")
    return vals


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The ('data', 'fsdp', 'context', 'tensor') mesh from `config.mesh` (all axes Auto)."""
    devices = list(jax.devices() if devices is None else devices)
    slices = int(mesh_cfg.num_slices)
    if len(devices) % slices:
        raise ValueError(f"mesh.num_slices={slices} does not divide the {len(devices)} devices")
    ici = _resolve(mesh_cfg.ici, len(devices) // slices, "ici")
    dcn = _resolve(mesh_cfg.dcn, slices, "dcn")
    if slices > 1:
        # TPU slices carry distinct `slice_index`es; elsewhere (GPU nodes, CPU processes) the
        # devices report one slice and each process is one granule of the outer network.
        slice_ids = {getattr(d, "slice_index", None) for d in devices}
        arr = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=len(slice_ids) != slices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError):  # unknown topology: plain device order
            arr = np.asarray(devices).reshape(ici)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_of(mesh_cfg) -> tuple:
    return canonical_rules(mesh_cfg.rules)


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (those dims stay replicated)."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        kept, size = [], 1
        for a in mesh_axes(entry):
            if shape[i] % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(spec_entry(kept))
    return PartitionSpec(*out)


def param_shardings(abstract_params_state, mesh: Mesh, rules):
    """NamedShardings for an `nnx.State` of `nnx.Param`s from their `logical_axes` metadata,
    as a pure dict (the layout of the train state's params)."""
    from flax import nnx

    def one(var):
        names = var.get_metadata().get("logical_axes")
        if names is None:
            raise ValueError(f"parameter of shape {var.shape} has no logical_axes metadata")
        return NamedSharding(mesh, fit_spec(logical_to_spec(names, rules), var.shape, mesh))
    tree = jax.tree.map(one, abstract_params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Inputs [B, ...]: the batch over the mesh axes of the `batch` logical axis."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in mesh_axes(logical_to_spec(("batch",), rules)[0]))


def check_sufficiently_sharded(params, mesh: Mesh, tolerance: float) -> float:
    """Fail when more than `tolerance` of the parameter elements are replicated on every device
    while the mesh has parameter-sharding axes (`fsdp`, `tensor`) larger than 1: a missing rule
    or an indivisible dimension. Pure data parallelism replicates on purpose. Returns the
    unsharded fraction."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return 0.0
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(math.prod(x.shape) for _, x in leaves)
    unsharded = [(jax.tree_util.keystr(p), x) for p, x in leaves
                 if all(s is None for s in x.sharding.spec)]
    frac = sum(math.prod(x.shape) for _, x in unsharded) / max(total, 1)
    if frac > tolerance:
        worst = sorted(unsharded, key=lambda kv: -math.prod(kv[1].shape))[:5]
        raise ValueError(
            f"{frac:.1%} of parameter elements are unsharded on mesh {dict(mesh.shape)} (> "
            f"mesh.unsharded_tolerance={tolerance}); largest: "
            f"{[(k, tuple(x.shape)) for k, x in worst]}. Add logical-axis rules or pick mesh "
            "sizes that divide these dimensions.")
    return frac


def parse_mesh(text: str) -> dict:
    """`fsdp=8,context=8` -> {"fsdp": 8, "context": 8} (the `--mesh` flags)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs with axes {MESH_AXES}")
        out[name] = int(value)
    return out


def mesh_of_sizes(sizes: dict, devices=None) -> Mesh:
    """The four-axis mesh of `sizes` (missing axes are 1) over the first prod(sizes) of
    `devices` (default: this process's devices, so every process of a multi-host run builds its
    own mesh). Errors name the sizes and the device count."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh {sizes}: unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    devices = list(jax.local_devices() if devices is None else devices)
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if min(shape) < 1 or math.prod(shape) > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: needs {math.prod(shape)} devices, "
                         f"{len(devices)} available")
    devices = devices[:math.prod(shape)]
    try:
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError):  # unknown topology or a subset: plain order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
