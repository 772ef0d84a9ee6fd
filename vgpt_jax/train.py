"""The training engine: a jitted, sharded, donated train step and the resumable loop around it.

`train(config, workdir, data_source=None)` runs (or resumes) a run:
  1. validate the config, join the other processes (`jax.distributed`) when asked;
  2. build the step half (`build_step`: the mesh, the state shardings, the optimiser and the
     jitted step; what the TPU planner compiles); refuse a mesh that leaves the params unsharded;
  3. open the data (errors name the store) and check the batch against the mesh;
  4. restore the latest checkpoint of `workdir` (state + data position), or initialise the state
     straight into its shardings (optionally with the previous curriculum stage's params);
  5. loop: step, log (process 0: JSONL, TensorBoard, tqdm), save every
     `checkpoint.save_interval_steps` (async), save and exit cleanly on SIGTERM / preemption,
     stop on a non-finite loss before it can reach a checkpoint.

The train state is a pytree of plain arrays (params as a pure dict, the optax state, the step
and the base PRNG key); the step's key is `fold_in(rng, step)`, so a resumed run draws exactly
the noise an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vgpt_jax import checkpoint as ckpt_lib
from vgpt_jax import diffusion
from vgpt_jax import finetune
from vgpt_jax import optim
from vgpt_jax import sharding as shard_lib
from vgpt_jax.config import (CheckpointConfig, DataConfig, DistributedConfig, LoopConfig,
                             ModelConfig, OptimConfig, block_len_for, validate_train_config)
from vgpt_jax.data import input_pipeline
from vgpt_jax.data.store import atomic_write
from vgpt_jax.model import VideoGPT

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    params: dict          # pure dict of the model's nnx.Param values
    opt_state: optax.OptState
    step: jax.Array       # int32 scalar
    rng: jax.Array        # uint32[2] base key

    def aux(self) -> dict:
        """Everything but the params (the `train_state` checkpoint item)."""
        return {"opt_state": self.opt_state, "step": self.step, "rng": self.rng}


# --------------------------------------------------------------------------- distributed

def maybe_initialize_distributed(dist_cfg) -> None:
    """`jax.distributed.initialize` when the config asks, or ("auto") when the environment names
    a coordinator. Must run before anything touches a JAX device."""
    d = DistributedConfig.from_config(dist_cfg)
    if d.initialize == "never" or jax.distributed.is_initialized():
        return
    explicit = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if d.initialize == "auto" and not explicit:
        return
    kwargs = dict(initialization_timeout=d.initialization_timeout,
                  heartbeat_timeout_seconds=d.heartbeat_timeout,
                  shutdown_timeout_seconds=d.shutdown_timeout)
    if d.coordinator_address:
        kwargs.update(coordinator_address=d.coordinator_address)
    if d.num_processes > 0:
        kwargs.update(num_processes=d.num_processes)
    if d.process_id >= 0:
        kwargs.update(process_id=d.process_id)
    jax.distributed.initialize(**kwargs)


# --------------------------------------------------------------------------- state

def abstract_state(model_cfg: ModelConfig, tx, mesh, rules):
    """(graphdef, TrainState of ShapeDtypeStructs carrying their target shardings)."""
    abstract = ckpt_lib.abstract_model(model_cfg)
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the model has non-parameter state {rest}; the train state holds only "
                         "nnx.Param values")
    p_shard = shard_lib.param_shardings(abs_params, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abs_params), p_shard)
    rep = shard_lib.replicated(mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    # An adapters-only optimiser (`finetune.adapters_only`) holds MaskedNodes for frozen params.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_shard = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, opt_shapes, p_shard,
                                      transform_non_params=lambda _: rep, is_leaf=masked)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             opt_shapes, opt_shard)
    state = TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                       jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
    return graphdef, state


def shardings_of(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def _random_params(model_cfg: ModelConfig, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(VideoGPT(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def init_params(model_cfg: ModelConfig, abstract: TrainState, seed: int) -> dict:
    """The random params of `init_state` alone, created into their shardings (no optimiser
    state is built: what a fine-tune's new parameters start from)."""
    return jax.jit(lambda: _random_params(model_cfg, seed),
                   out_shardings=shardings_of(abstract.params))()


def init_state(model_cfg: ModelConfig, tx, abstract: TrainState, seed: int,
               params=None) -> TrainState:
    """A fresh state, created by one jit directly into its shardings (nothing is gathered on
    one device). `params` (e.g. the previous stage's) replace the random initialisation."""
    def init(params):
        if params is None:
            params = _random_params(model_cfg, seed)
        rng = jax.random.key_data(jax.random.key(seed + 1, impl="threefry2x32"))
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), rng)
    out = shardings_of(abstract)
    if params is None:
        return jax.jit(lambda: init(None), out_shardings=out)()
    return jax.jit(init, in_shardings=(out.params,), out_shardings=out)(params)


# --------------------------------------------------------------------------- step

def make_train_step(graphdef, obj_cfg: diffusion.ObjectiveConfig, tx, schedule, accum_steps: int,
                    state_shardings, batch_shardings, mesh, rules, labels=None):
    """The jitted step `(state, batch) -> (state, metrics)`, state donated (call it, or
    `.lower` it for a compile without running). `labels`: a params tree -> {"train", "frozen"}
    function (adapters-only fine-tuning): frozen parameters get no gradient
    (`finetune.freeze`)."""
    def loss_fn(params, batch, rng):
        if labels is not None:
            params = finetune.freeze(params, labels(params))
        return diffusion.loss(nnx.merge(graphdef, params), batch, rng, obj_cfg)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"),
                                 state.step)
        loss, metrics, grads = optim.accumulate_gradients(loss_fn, state.params, batch, key,
                                                          accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step)}
        return TrainState(params, opt_state, state.step + 1, state.rng), metrics

    def step_fn(state: TrainState, batch):
        # `constrain` inside the model reads the active mesh while jit traces this function
        # (whether the step is called or lowered), so the context lives inside it.
        with shard_lib.activation_sharding(mesh, rules):
            return step(state, batch)

    rep = shard_lib.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, rep), donate_argnums=0)


# --------------------------------------------------------------------------- logging

class MetricsWriter:
    """JSONL + TensorBoard on process 0; a no-op elsewhere.

    A run resumed at `start_step` first drops the JSONL lines past it (steps the restart will
    log again, and a line cut off by a kill), so every step appears once. TensorBoard appends a
    new event file per process start (tensorboardX cannot reopen one); `purge_step` makes
    TensorBoard hide the old events past the resumed step, so its curves do not repeat either.
    """

    def __init__(self, workdir: str, tensorboard: bool, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.jsonl = self.tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        _truncate_metrics(path, start_step)
        self.jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the JSONL lines of steps <= `last_step` (atomically; no file, nothing to do)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut off by a kill
                continue
    with atomic_write(path) as f:
        f.writelines(kept)


def measure_peak_flops(device=None, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on one device: a stand-in for the peak when none is given."""
    device = device or jax.local_devices()[0]
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        y = f(x)
    y.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def flops_per_step(model_cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward) over the whole training sequence; a
    token attends to about half the sequence under the block-causal mask."""
    return 3.0 * batch * seq_len * model_cfg.matmul_flops_per_token(seq_len / 2)


# --------------------------------------------------------------------------- preemption

class PreemptionWatch:
    """SIGTERM -> save and exit cleanly. One process: our own handler sets a flag (JAX installs
    no notifier without `jax.distributed`). Several processes: JAX's preemption service catches
    SIGTERM and `reached_preemption_sync_point` makes every process agree on the same step."""

    def __init__(self, enabled: bool):
        self.flag, self.previous = False, None
        self.multi = jax.process_count() > 1
        if enabled and not self.multi:
            try:
                self.previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler, rely on the default
                self.previous = None

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self.flag

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# --------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    metrics: dict            # the last logged scalars
    preempted: bool
    workdir: str


def _objective(cfg) -> diffusion.ObjectiveConfig:
    obj = diffusion.ObjectiveConfig(**cfg.objective.to_dict())
    obj.validate()
    return obj


def _check_latents(source, name: str, model_cfg: ModelConfig,
                   data_cfg: DataConfig) -> tuple[int, int]:
    """The data's latent geometry against the model, before anything is compiled; returns the
    latents' (h, w), which the run config records (`data.latent_size`)."""
    if len(source) == 0:
        raise ValueError(f"data source {name!r} holds no videos")
    shape = tuple(np.shape(source[0]["latents"]))
    if len(shape) != 4:
        raise ValueError(f"data source {name!r}: latents have shape {shape}, expected [F, h, w, C]")
    _, h, w, c = shape
    model_cfg.check_latent_shape(h, w, c, what=f"data source {name!r}")
    tokens = 2 * data_cfg.num_frames * block_len_for(model_cfg, h, w)
    if tokens > model_cfg.max_seq_len:
        raise ValueError(f"data.num_frames={data_cfg.num_frames} at {h}x{w} latents makes "
                         f"{tokens} tokens, over model.max_seq_len={model_cfg.max_seq_len}")
    return int(h), int(w)


def _adopt_normalization(config, source, name: str) -> None:
    """Record the store's latent normalisation in `config.data.latent_normalization` (so
    checkpoints and exports carry it), or refuse a store whose normalisation differs from the
    one the config already names (a model trained on other latents)."""
    from vgpt_jax.vae import latent_space as ls
    if not hasattr(source, "normalization"):  # an in-memory source: its latents are as given
        return
    ours = ls.normalization_of(config.data.get("latent_normalization"))
    if ours is None and source.normalization is not None:
        config.data.latent_normalization = source.normalization.to_dict()
        return
    ls.check_same_normalization(ours, source.normalization, "config data.latent_normalization",
                                f"latent store {name!r}")


def check_batch(data_cfg: DataConfig, optim_cfg: OptimConfig, mesh, rules) -> None:
    """The global batch (each microbatch of it) against the batch shards of the mesh."""
    b, accum = data_cfg.global_batch_size, optim_cfg.grad_accum_steps
    shards = shard_lib.batch_shards(mesh, rules)
    if (b // accum) % shards:
        raise ValueError(
            f"config: data.global_batch_size={b} (microbatch {b // accum} with optim."
            f"grad_accum_steps={accum}) is not divisible by the {shards} batch shards of mesh "
            f"{dict(mesh.shape)} (the 'batch' rule maps to {shard_lib.logical_to_spec(('batch',), rules)[0]})")


def batch_shardings(model_cfg: ModelConfig, mesh, rules) -> dict:
    """The shardings of a global batch's arrays: the latents and clip ids, and the conditions
    the model takes (`class_id`, `actions`, `text` and `text_mask`)."""
    out = {"latents": shard_lib.batch_sharding(mesh, rules, 5),
           "clip_ids": shard_lib.batch_sharding(mesh, rules, 2)}
    if model_cfg.conditions.num_classes:
        out["class_id"] = shard_lib.batch_sharding(mesh, rules, 1)
    if model_cfg.conditions.action_dim:
        out["actions"] = shard_lib.batch_sharding(mesh, rules, 3)
    if model_cfg.conditions.text_dim:
        out["text"] = shard_lib.batch_sharding(mesh, rules, 3)
        out["text_mask"] = shard_lib.batch_sharding(mesh, rules, 2)
    return out


@dataclasses.dataclass
class StepSetup:
    """The step half of a run: the compiled program and what it runs on, from the config alone
    (no data). What `plan.plan_train` compiles for a TPU topology."""
    config: object
    model_cfg: ModelConfig
    optim_cfg: OptimConfig
    data_cfg: DataConfig
    loop_cfg: LoopConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    graphdef: object
    abstract: TrainState            # ShapeDtypeStructs with the target shardings
    batch_shardings: dict
    step_fn: object                 # jitted (state, global batch) -> (state, metrics)

    @property
    def global_batch(self) -> int:
        return self.data_cfg.global_batch_size

    def init(self, params=None) -> TrainState:
        return init_state(self.model_cfg, self.tx, self.abstract, self.loop_cfg.seed, params)

    def global_batch_of(self, local_batch: dict) -> dict:
        return input_pipeline.to_global(local_batch, self.batch_shardings, self.global_batch)

    def abstract_batch(self, latent_hw: tuple[int, int]) -> dict:
        """A global batch of `data.num_frames` frames of `latent_hw` latents as
        ShapeDtypeStructs with their shardings (what `step_fn.lower` takes)."""
        b, f, (h, w) = self.global_batch, self.data_cfg.num_frames, latent_hw
        cc = self.model_cfg.conditions
        shapes = {"latents": ((b, f, h, w, self.model_cfg.latent_channels), jnp.float32),
                  "clip_ids": ((b, f), jnp.int32), "class_id": ((b,), jnp.int32),
                  "actions": ((b, f, cc.action_dim), jnp.float32),
                  "text": ((b, cc.text_tokens, cc.text_dim), jnp.float32),
                  "text_mask": ((b, cc.text_tokens), jnp.bool_)}
        return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=sh)
                for k, sh in self.batch_shardings.items()}


@dataclasses.dataclass
class Setup(StepSetup):
    """Everything a run needs (the step half and the data), built and checked before the first
    compile."""
    dataset: object                 # grain IterDataset of this process's rows


def build_step(config, devices=None) -> StepSetup:
    """The step half of `build`: validate the config (the objective too), make the mesh, the
    optimiser, the abstract state and its shardings, and the jitted step (nothing runs).

    Errors (bad config, mesh vs devices, batch vs mesh, unsharded params) are raised here.
    """
    validate_train_config(config)
    model_cfg = ModelConfig.from_config(config.model)
    obj_cfg = _objective(config)
    optim_cfg = OptimConfig.from_config(config.optim)
    data_cfg = DataConfig.from_config(config.data)
    loop_cfg = LoopConfig.from_config(config.train)
    mesh = shard_lib.make_mesh(config.mesh, devices)
    rules = shard_lib.rules_of(config.mesh)
    check_batch(data_cfg, optim_cfg, mesh, rules)
    tx, schedule = optim.make_optimizer(optim_cfg, loop_cfg.steps)
    labels = None
    if finetune.trains_adapters_only(config.optim, model_cfg):
        labels = finetune.labels_for(model_cfg)
        tx = finetune.adapters_only(tx, labels)
    graphdef, abstract = abstract_state(model_cfg, tx, mesh, rules)
    shard_lib.check_sufficiently_sharded(abstract.params, mesh, config.mesh.unsharded_tolerance)
    batch_sh = batch_shardings(model_cfg, mesh, rules)
    step_fn = make_train_step(graphdef, obj_cfg, tx, schedule, optim_cfg.grad_accum_steps,
                              shardings_of(abstract), batch_sh, mesh, rules, labels)
    return StepSetup(config, model_cfg, optim_cfg, data_cfg, loop_cfg, mesh, rules, tx, schedule,
                     graphdef, abstract, batch_sh, step_fn)


def build(config, data_source=None, devices=None) -> Setup:
    """Validate the config, make the mesh, shardings and step (`build_step`), then the data
    pipeline (nothing runs).

    Errors (bad config, mesh vs devices, batch vs mesh, unsharded params, missing or corrupt
    store) are raised here, before anything is compiled.
    """
    validate_train_config(config)  # before joining other processes (build_step checks it too)
    maybe_initialize_distributed(config.distributed)
    step = build_step(config, devices)
    source = data_source if data_source is not None else input_pipeline.open_source(config.data.store)
    name = config.data.store or type(source).__name__
    config.data.latent_size = _check_latents(source, name, step.model_cfg, step.data_cfg)
    _adopt_normalization(config, source, name)
    rows = input_pipeline.process_rows(step.batch_shardings["latents"], step.global_batch)
    dataset = input_pipeline.make_dataset(source, step.data_cfg, rows=rows, name=name,
                                          conditions=step.model_cfg.conditions)
    return Setup(**{f.name: getattr(step, f.name) for f in dataclasses.fields(step)},
                 dataset=dataset)


def initial_state(run: Setup, ckpt: ckpt_lib.TrainCheckpointer, data_iter, *,
                  allow_config_change: bool = False) -> tuple[TrainState, int]:
    """Resume the newest checkpoint that verifies (state and data position) if there is one;
    else a fresh state, with the params of `checkpoint.init_from` (the previous curriculum
    stage) if set.

    A corrupt checkpoint is skipped with a warning and, once an older one has restored, moved
    to `corrupt_checkpoints/` (so its step can be saved again); when none verifies, nothing is
    moved and the error lists them all. A changed config is checked by
    `checkpoint.check_resume_config` and is never a reason to fall back.
    """
    abstract, skipped = run.abstract, []
    for step in ckpt.all_steps():
        where = ckpt.step_dir(step)
        try:
            saved = ckpt.restore_config(step)
            # A model trained on other latents never resumes, whatever allow_config_change says.
            _check_same_data_normalization(run.config, saved, f"checkpoint step {step} in "
                                           f"{ckpt.directory}")
            ckpt_lib.check_resume_config(saved, run.config, where, allow_config_change)
            params, aux = ckpt.restore(step, abstract.params, abstract.aux(), data_iter)
        except ckpt_lib.CorruptCheckpointError as e:
            log.warning("skipping checkpoint step %d: %s", step, e)
            skipped.append((step, str(e)))
            continue
        for bad, _ in skipped:
            log.warning("moved corrupt checkpoint step %d to %s", bad, ckpt.quarantine(bad))
        log.info("resumed %s at step %d", ckpt.directory, step)
        if skipped:
            log.warning("resumed from step %d, the newest checkpoint that verifies (skipped "
                        "step %s)", step, ", ".join(str(b) for b, _ in skipped))
        return TrainState(params, aux["opt_state"], aux["step"], aux["rng"]), step
    if skipped:
        reasons = "; ".join(reason for _, reason in skipped)
        raise ckpt_lib.CorruptCheckpointError(
            ckpt.directory, f"no checkpoint verifies: {reasons}. Delete the workdir's "
            "checkpoints/ to start over")
    init_from, params = run.config.checkpoint.init_from, None
    if init_from:
        _check_same_data_normalization(run.config, ckpt_lib.resolve_params(init_from)[1],
                                       f"checkpoint.init_from {init_from!r}")
        # New condition / adapter parameters keep this run's initialisation (finetune).
        params = finetune.pretrained_params(
            init_from, run.model_cfg, init_params(run.model_cfg, abstract, run.loop_cfg.seed),
            shardings_of(abstract.params))
        log.info("initialised params from %s", init_from)
    return run.init(params), 0


def _check_same_data_normalization(config, other_config, other_name: str) -> None:
    from vgpt_jax.vae import latent_space as ls
    theirs = other_config.get("data", {}).get("latent_normalization")
    ls.check_same_normalization(ls.normalization_of(theirs),
                                ls.normalization_of(config.data.get("latent_normalization")),
                                other_name, f"the data of this run ({config.data.store or 'source'})")


def train(config, workdir: str, data_source=None, *, on_step=None, devices=None,
          allow_config_change: bool = False) -> TrainResult:
    """Run or resume the training run of `config` in `workdir` (see the module docstring).

    `data_source`: a random-access source (`len`, `[i] -> dict(latents, ...)`) used instead of
    `config.data.store`. `on_step(step, metrics)` is called after each step is dispatched
    (metrics are unfetched device arrays), e.g. for progress reporting. `devices`: the devices
    of the mesh (default: all). `allow_config_change`: resume a checkpoint whose config differs
    in what the run learns (`checkpoint.check_resume_config`).
    """
    run = build(config, data_source, devices)
    model_cfg, mesh = run.model_cfg, run.mesh
    data_iter = iter(run.dataset)
    ckpt = ckpt_lib.TrainCheckpointer(workdir, config.checkpoint)
    try:
        state, start = initial_state(run, ckpt, data_iter,
                                     allow_config_change=allow_config_change)
    except BaseException:
        ckpt.close()
        raise
    loop, saving = run.loop_cfg, CheckpointConfig.from_config(config.checkpoint)
    writer = MetricsWriter(workdir, loop.tensorboard, start)
    if writer.enabled:
        ckpt_lib.write_config(workdir, config)
    peak = loop.peak_flops_per_device or measure_peak_flops()
    watch = PreemptionWatch(saving.save_on_preemption)
    total, b = loop.steps, run.global_batch
    bar = _progress_bar(loop, start, total)
    interval, log_every = saving.save_interval_steps, loop.log_every
    last, preempted, step = {}, False, start
    last_finite = start  # the newest step whose whole state was checked finite (saves check it)
    t_last, step_last, seq_len = time.perf_counter(), start, None
    history_window = []  # (first-clip, with-history) loss arrays since the last log, unfetched
    try:
        while step < total:
            batch = run.global_batch_of(next(data_iter))
            if seq_len is None:
                _, f, h, w, _ = batch["latents"].shape
                seq_len = 2 * f * block_len_for(model_cfg, h, w)
            state, metrics = run.step_fn(state, batch)
            history_window.append((metrics["loss_first_clip"], metrics["loss_with_history"]))
            step += 1
            if on_step is not None:
                on_step(step, metrics)
            preempted = watch.reached(step)
            save = preempted or step % interval == 0 or step == total
            if save or step % log_every == 0:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                # First-clip loss over with-history loss, summed over the steps since the last
                # log: above 1 when the model reads its history (one batch alone is too noisy).
                first, with_history = np.sum(jax.device_get(history_window), axis=0)
                scalars["history_gain"] = float(first / max(with_history, 1e-12))
                history_window = []
                for key, other in (("loss", "grad_norm"), ("grad_norm", "loss")):
                    if not np.isfinite(scalars[key]):
                        _stop_non_finite(f"non-finite {key} {scalars[key]} at step {step} "
                                         f"({other} {scalars[other]})", last_finite, ckpt)
                now = time.perf_counter()
                dt = (now - t_last) / max(step - step_last, 1)
                t_last, step_last = now, step
                scalars.update(step_time_s=dt, tokens_per_s=b * seq_len / dt,
                               mfu=flops_per_step(model_cfg, b, seq_len) / dt / (peak * mesh.size))
                last = scalars
                if step % log_every == 0 or step == total:
                    writer.write(step, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if save:
                try:
                    ckpt.save(step, state.params, state.aux(), data_iter, config)
                except ckpt_lib.NonFiniteStateError as e:
                    _stop_non_finite(f"non-finite train state at step {step}: {e}", last_finite,
                                     ckpt)
                last_finite = step
            if preempted:
                log.warning("preemption requested: saved step %d, exiting", step)
                break
    finally:
        watch.close()
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    return TrainResult(state, step, last, preempted, os.path.abspath(workdir))


def _stop_non_finite(what: str, last_finite: int, ckpt: ckpt_lib.TrainCheckpointer):
    """Raise FloatingPointError for a non-finite step; it never reaches a checkpoint."""
    ckpt.wait()
    raise FloatingPointError(
        f"{what}; stopping without saving it. The newest state checked finite is step "
        f"{last_finite}; the last good checkpoint is step {ckpt.latest_step()} in "
        f"{ckpt.directory}")


def _progress_bar(loop: LoopConfig, start: int, total: int):
    if not (loop.progress_bar and jax.process_index() == 0 and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
