"""TPU planning without a TPU: compile the real train step and sampler for a pod topology.

libtpu (`pip install "vgpt_jax[tpu]"`) compiles for a named topology (`v5p:4x4x4`, ...) on a
CPU-only machine (`jax.experimental.topologies`). A plan builds the mesh over those devices,
the train state and batch as `ShapeDtypeStruct`s carrying their shardings (nothing is
allocated), lowers and compiles
  - the train step (`train.make_train_step`: loss, gradients, AdamW, donated state), and
  - the sampler's per-clip program: all Euler steps of one clip against a KV cache of the
    context frames, guided (a [2B] batch): the sampler's own compiled kernel with its
    `sampling.Placement` layouts (what `Pipeline(mesh=...)` runs),
and reads the compiler's per-chip memory (arguments, temporaries, outputs) and FLOP estimate.
A compile proves the program fits and what XLA expects it to cost; it says nothing of run time.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from vgpt_jax import checkpoint as ckpt_lib
from vgpt_jax import sampling, train
from vgpt_jax import sharding as shard_lib
from vgpt_jax.config import MESH_AXES, ModelConfig, block_len_for, dtype_of
from vgpt_jax.layout import TokenMeta
from vgpt_jax.model.decoder import LayerKV
from vgpt_jax.model.video_gpt import KVCache

GIB = 2**30
# Per chip: HBM (GiB) and peak bf16 FLOP/s (public Cloud TPU figures).
CHIPS = {
    "v4": (32, 275e12),
    "v5e": (16, 197e12),
    "v5p": (95, 459e12),
    "v6e": (32, 918e12),
}
# 320x176 video through the SD VAE (8x): 22x40 latents, 220 image tokens per frame.
DEFAULT_LATENT_HW = (22, 40)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chip_of(topology: str) -> tuple[str, float, float]:
    """`v5p:4x4x4` -> ("v5p", HBM bytes, peak FLOP/s)."""
    gen = topology.split(":")[0].split("-")[0].lower()
    if gen not in CHIPS:
        raise ValueError(f"topology {topology!r}: unknown TPU generation {gen!r}; known: "
                         f"{sorted(CHIPS)}")
    hbm, peak = CHIPS[gen]
    return gen, hbm * GIB, peak


def topology_devices(topology: str):
    """The devices of a TPU topology, compiled for without hardware (needs libtpu)."""
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu missing, or a name libtpu does not know
        raise RuntimeError(f"cannot describe TPU topology {topology!r} ({e}); it needs libtpu "
                           "(pip install 'vgpt_jax[tpu]') and a name like v5p:4x4x4 or "
                           "v5e:16x16") from e
    return list(topo.devices)


def load_config(name: str):
    """A run config: `stage1`..`stage4` (`configs/curriculum.py:stageN`), `tiny_test`, a
    `configs/*.py` path (`path:argument` as ml_collections takes it), or a model preset
    (`tiny`, `small`, `phi3_mini`) with the training defaults."""
    from vgpt_jax.config import MODEL_PRESETS, get_train_config
    if name in MODEL_PRESETS:
        return get_train_config(name)
    path, _, variant = name.partition(":")
    if path.startswith("stage") and not variant:  # a curriculum stage
        path, variant = "curriculum", path
    path = path if path.endswith(".py") else os.path.join(REPO, "configs", f"{path}.py")
    if not os.path.exists(path):
        raise ValueError(f"config {name!r}: no file {path}; give a configs/*.py path, a stage "
                         f"name (stage1..stage4) or a model preset {MODEL_PRESETS}")
    spec = importlib.util.spec_from_file_location(f"vgpt_plan_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


@dataclasses.dataclass
class ProgramPlan:
    """One compiled program's per-chip figures."""
    name: str
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    compiler_flops: float      # XLA's estimate per chip (custom kernels such as splash count 0)
    compile_s: float
    error: str = ""            # the compiler's out-of-memory refusal (then only temps are known)

    @property
    def peak_bytes(self) -> int:
        """Live at once: arguments, temporaries, and outputs not aliased to donated arguments."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


@dataclasses.dataclass
class Plan:
    topology: str
    chips: int
    mesh: dict
    model: str
    remat: str
    dtype: str
    global_batch: int
    grad_accum: int
    num_frames: int
    tokens_per_sample: int
    hbm_bytes: float
    peak_flops: float
    analytic_flops: float      # matmul FLOPs of one train step, whole pod (3x forward)
    train: ProgramPlan
    sampler: ProgramPlan | None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.tokens_per_sample

    @property
    def tokens_per_chip(self) -> float:
        """Tokens of one microbatch resident on a chip (batch and sequence sharding)."""
        return self.tokens_per_step / self.grad_accum / self.chips * self.mesh["tensor"]

    def fits(self, program: ProgramPlan) -> bool:
        return program.peak_bytes <= self.hbm_bytes

    def step_time(self, mfu: float) -> float:
        return self.analytic_flops / (self.chips * self.peak_flops * mfu)


def _abstract(tree_of_shapes, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree_of_shapes, shardings)


_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)")


def _program_plan(name, lowered_fn) -> ProgramPlan:
    t0 = time.perf_counter()
    lowered = lowered_fn()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program whose temporaries exceed HBM; keep its figure.
        found = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        temp = float(found.group(1)) * 1024 ** " KMGT".index(found.group(2))
        return ProgramPlan(name, 0, int(temp), 0, 0, 0.0, time.perf_counter() - t0,
                           error=str(e).splitlines()[0])
    dt = time.perf_counter() - t0
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return ProgramPlan(name, int(m.argument_size_in_bytes), int(m.temp_size_in_bytes),
                       int(m.output_size_in_bytes), int(getattr(m, "alias_size_in_bytes", 0)),
                       float((cost or {}).get("flops", 0.0)), dt)


def apply_options(config, *, mesh: dict | None = None, remat: str | None = None,
                  dtype: str | None = None, attention: str | None = "splash",
                  global_batch: int | None = None, grad_accum: int | None = None,
                  num_frames: int | None = None):
    """A copy of `config` with the planner's knobs applied (None leaves a field as it is)."""
    cfg = config.copy_and_resolve_references()
    if mesh is not None:
        unknown = set(mesh) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh {mesh}: unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
        for a in MESH_AXES:
            cfg.mesh.ici[a] = int(mesh.get(a, 1))
            cfg.mesh.dcn[a] = 1
        cfg.mesh.num_slices = 1
    if remat is not None:
        cfg.model.remat_policy = remat
    if dtype is not None:
        cfg.model.dtype = dtype
    if attention is not None:
        cfg.model.attention.impl = attention
    if grad_accum is not None:
        cfg.optim.grad_accum_steps = int(grad_accum)
    if num_frames is not None:
        cfg.data.num_frames = int(num_frames)
    if global_batch is not None:
        cfg.data.global_batch_size = int(global_batch)
    return cfg


def plan_train(config, devices, latent_hw=DEFAULT_LATENT_HW):
    """Compile the train step of `config` on `devices`: the step half of the training engine
    (`train.build_step`, with its checks) lowered on an abstract batch of `latent_hw` latents.

    Returns (ProgramPlan, train.StepSetup)."""
    step = train.build_step(config, devices)
    lower = lambda: step.step_fn.lower(step.abstract, step.abstract_batch(latent_hw))
    return _program_plan("train_step", lower), step


def plan_sampler(model_cfg: ModelConfig, mesh, rules, *, batch: int, context_frames: int,
                 clip_frames: int, steps: int, latent_hw=DEFAULT_LATENT_HW) -> ProgramPlan:
    """Compile one clip of guided sampling as `sampling.sample_video` runs it on `mesh`: the
    sampler's own kernel (`sampling._denoise_cached`, `steps` Euler steps of `clip_frames`
    noisy frames against a KV cache of `context_frames` clean frames, `batch` videos, [2B]
    with guidance) with its `sampling.Placement`'s layouts: parameters in the model's
    param_dtype by the rules, the cache along the sequence over `context`, videos over the
    batch axes."""
    h, w = latent_hw
    s = context_frames * block_len_for(model_cfg, h, w)
    # Built directly: an AOT topology's devices belong to hosts this process is not.
    placement = sampling.Placement(mesh, tuple(rules))
    abstract = ckpt_lib.abstract_model(model_cfg)
    graphdef, params = nnx.split(abstract, nnx.Param)[:2]
    params = _abstract(params.to_pure_dict(), placement.param_shardings(params))
    put = lambda shape, dt, names: jax.ShapeDtypeStruct(shape, dt,
                                                        sharding=placement.sharding(names, shape))
    kv_shape = (model_cfg.num_layers, batch, s, model_cfg.num_kv_heads, model_cfg.head_dim)
    kv = put(kv_shape, dtype_of(model_cfg.dtype), sampling.KV_AXES)
    meta = TokenMeta(*(put((batch, s), dt, sampling.META_AXES)
                       for dt in (jnp.int32, jnp.int32, jnp.bool_, jnp.bool_, jnp.int32)))
    z0 = put((batch, clip_frames, h, w, model_cfg.latent_channels), jnp.float32,
             sampling.BATCH_AXES)
    rep = shard_lib.replicated(mesh)
    sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32, sharding=rep)
    guidance = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    return _program_plan("sampler_clip", lambda: sampling._denoise_cached.lower(
        graphdef, params, KVCache(LayerKV(kv, kv), meta), z0, sigmas, True, guidance, "x1",
        placement=placement))


def make_plan(config_name: str, topology: str, mesh: dict, *, remat: str | None = None,
              dtype: str | None = None, global_batch: int | None = None,
              grad_accum: int | None = None, num_frames: int | None = None,
              latent_hw=DEFAULT_LATENT_HW, sampler: bool = True, context_frames: int = 56,
              clip_frames: int = 24, sampler_steps: int = 50, attention: str = "splash",
              devices=None) -> Plan:
    """Plan one configuration. `mesh`: sizes of (data, fsdp, context, tensor), product = chips.
    `global_batch` defaults to one sample per batch shard (data x fsdp)."""
    gen, hbm, peak = chip_of(topology)
    devices = topology_devices(topology) if devices is None else devices
    mesh = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    if math.prod(mesh.values()) != len(devices):
        raise ValueError(f"mesh {mesh} has {math.prod(mesh.values())} devices but topology "
                         f"{topology} has {len(devices)} chips")
    if global_batch is None:
        global_batch = mesh["data"] * mesh["fsdp"] * (grad_accum or 1)
    config = apply_options(load_config(config_name), mesh=mesh, remat=remat, dtype=dtype,
                           attention=attention, global_batch=global_batch, grad_accum=grad_accum,
                           num_frames=num_frames)
    train_plan, step = plan_train(config, devices, latent_hw)
    model_cfg, f, b = step.model_cfg, step.data_cfg.num_frames, step.global_batch
    tokens = 2 * f * block_len_for(model_cfg, *latent_hw)
    sampler_plan = None
    if sampler:
        sampler_plan = plan_sampler(model_cfg, step.mesh, step.rules,
                                    batch=mesh["data"] * mesh["fsdp"],
                                    context_frames=context_frames, clip_frames=clip_frames,
                                    steps=sampler_steps, latent_hw=latent_hw)
    return Plan(topology, len(devices), mesh, config_name, model_cfg.remat_policy,
                model_cfg.dtype, b, step.optim_cfg.grad_accum_steps, f, tokens, hbm, peak,
                train.flops_per_step(model_cfg, b, tokens), train_plan, sampler_plan)


# ----------------------------------------------------------------------------- reporting


def advice(plan: Plan, program: ProgramPlan) -> list[str]:
    """What moves a plan that does not fit (empty when it fits)."""
    over = program.peak_bytes - plan.hbm_bytes
    if over <= 0:
        return []
    m = plan.mesh
    out = [f"{program.name} does not fit: {program.peak_bytes / GIB:.2f} GiB per chip, "
           f"{over / GIB:.2f} GiB over the {plan.hbm_bytes / GIB:.0f} GiB of HBM"]
    if program.argument_bytes > program.temp_bytes:
        out.append(f"arguments dominate ({program.argument_bytes / GIB:.2f} GiB: params and "
                   f"AdamW moments): raise fsdp (now {m['fsdp']}; arguments scale ~1/fsdp), or "
                   "use bfloat16 params")
    else:
        per_shard = plan.global_batch // plan.grad_accum // (m["data"] * m["fsdp"])
        out.append(f"temporaries dominate ({program.temp_bytes / GIB:.2f} GiB: activations): "
                   f"raise context (now {m['context']}; activations scale ~1/context)"
                   + ("" if plan.remat == "full" else f", use remat 'full' (now {plan.remat!r})")
                   + (f", or micro-batch (optim.grad_accum_steps, now {plan.grad_accum}; "
                      f"{per_shard} samples per shard per microbatch)" if per_shard > 1 else ""))
    return out


def _gib(n):
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan, mfu: float = 0.4) -> str:
    mesh = " x ".join(f"{a}={plan.mesh[a]}" for a in MESH_AXES)
    lines = [f"plan: {plan.model} on {plan.topology} ({plan.chips} chips, "
             f"{plan.hbm_bytes / GIB:.0f} GiB HBM each), mesh {mesh}",
             f"  model dtype {plan.dtype}, remat {plan.remat}, global batch {plan.global_batch} "
             f"(grad accumulation {plan.grad_accum}), {plan.num_frames} frames = "
             f"{plan.tokens_per_sample} tokens per sample",
             f"  tokens per step {plan.tokens_per_step}, per chip {plan.tokens_per_chip:.0f}"]
    for p in (plan.train, plan.sampler):
        if p is None:
            continue
        state = "fits" if plan.fits(p) else "DOES NOT FIT"
        if p.error:
            lines.append(f"  {p.name}: the compiler refused it: {p.error}")
        lines.append(f"  {p.name}: per chip arguments {_gib(p.argument_bytes)} GiB, temporaries "
                     f"{_gib(p.temp_bytes)} GiB, outputs {_gib(p.output_bytes)} GiB (aliased "
                     f"{_gib(p.alias_bytes)}) -> peak {_gib(p.peak_bytes)} / "
                     f"{plan.hbm_bytes / GIB:.0f} GiB: {state}; compiled in {p.compile_s:.1f} s; "
                     f"XLA FLOPs/chip {p.compiler_flops:.3g}")
        lines.extend("    " + a for a in advice(plan, p))
    lines.append(f"  train step: {plan.analytic_flops:.3g} matmul FLOPs (pod); at {mfu:.0%} MFU "
                 f"a step takes {plan.step_time(mfu):.2f} s "
                 f"({plan.tokens_per_step / plan.step_time(mfu):.0f} tokens/s)")
    return "\n".join(lines)


TABLE_HEADER = ("| config | topology | mesh (data x fsdp x context x tensor) | remat "
                "| global batch | tokens per chip | train GiB/chip | sampler GiB/chip | fits "
                "| command |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(plan: Plan, command: str) -> str:
    """One row of the guide's table (`TABLE_HEADER`): per-chip peak bytes of each program."""
    mesh = " x ".join(str(plan.mesh[a]) for a in MESH_AXES)
    programs = [p for p in (plan.train, plan.sampler) if p is not None]
    sampler = _gib(plan.sampler.peak_bytes) if plan.sampler else "-"
    fits = "yes" if all(plan.fits(p) for p in programs) else "no"
    return (f"| {plan.model} | {plan.topology} | {mesh} | {plan.remat} | {plan.global_batch} "
            f"| {plan.tokens_per_chip:.0f} | {_gib(plan.train.peak_bytes)} | {sampler} | {fits} "
            f"| `{command}` |")
