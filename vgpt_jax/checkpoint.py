"""Checkpoints with orbax.

Model exports (what the sampler, converter and `from_checkpoint` read and write): a folder with
`config.json` (the run's ConfigDict as JSON; its `model` section builds the model) and
`params/` (an orbax PyTree checkpoint of the model's `nnx.Param` state). `load_model` also
accepts a training workdir (see the CheckpointManager layout below) and takes the params of its
latest (or a given) step.

Training checkpoints carry an integrity record (a content hash of every array and JSON item,
computed from the values being saved); a restore recomputes it from what came back, so a flipped
bit or a lost file is a `CorruptCheckpointError`, never a silently different state. A state with
a non-finite array is refused at save time (`NonFiniteStateError`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from vgpt_jax import optim
from vgpt_jax.config import ModelConfig, get_train_config
from vgpt_jax.data.store import atomic_write
from vgpt_jax.model import VideoGPT

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# A run with a parameter average (`optim.ema_decay`) also saves the average in the params
# format: what `resolve_params` serves for sampling and export. Resuming reads the copy inside
# the optimiser state (`train_state/`), which the integrity record covers with the rest.
EMA_PARAMS_DIR = "ema_params"


class CorruptCheckpointError(Exception):
    """A checkpoint that cannot be read back as it was written (unreadable or missing files,
    content that differs from its integrity record). Training falls back to an older one."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"corrupt/unreadable checkpoint {where!r}: {reason}")


class NonFiniteStateError(FloatingPointError):
    """A train state holding NaN or inf, refused before anything reaches disk."""

    def __init__(self, bad: dict[str, int], num_arrays: int):
        self.bad = bad
        listed = ", ".join(f"{k} ({n} values)" for k, n in list(bad.items())[:5])
        super().__init__(f"{len(bad)} of {num_arrays} state arrays are non-finite: {listed}"
                         + (", ..." if len(bad) > 5 else ""))


def abstract_model(model_cfg: ModelConfig) -> VideoGPT:
    """The model with ShapeDtypeStruct leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: VideoGPT(model_cfg, rngs=nnx.Rngs(0)))


def write_config(directory: str, config: ml_collections.ConfigDict | dict) -> None:
    """`directory/config.json` from a ConfigDict or dict, written atomically (a reader never
    sees half a file, a crash keeps the old one)."""
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    with atomic_write(os.path.join(directory, CONFIG_FILE)) as f:
        json.dump(config_dict, f, indent=2, default=list)


def export_model(directory: str, model: VideoGPT, config: ml_collections.ConfigDict | dict) -> str:
    """Write `config.json` and `params/` to `directory` (atomically, via orbax's temp dirs)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if "model" not in config_dict:
        raise ValueError("export_model: the config needs a 'model' section")
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    write_config(directory, config_dict)
    return directory


def read_config(directory: str) -> ml_collections.ConfigDict:
    if not os.path.exists(directory):
        raise FileNotFoundError(f"checkpoint {directory!r} does not exist")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory!r}: not a vgpt_jax checkpoint")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_params(params_dir: str, model_cfg: ModelConfig, shardings=None) -> VideoGPT:
    """Restore a params PyTree into a fresh model; a shape mismatch names the parameter."""
    abstract = abstract_model(model_cfg)
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    target = abs_params.to_pure_dict()
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              target, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
        stored = getattr(meta, "item_metadata", meta)
        stored = getattr(stored, "tree", stored)
        _check_shapes(target, stored, params_dir)
        restored = ckptr.restore(params_dir, target)
    abs_params.replace_by_pure_dict(restored)
    return nnx.merge(graphdef, abs_params, rest)


def _check_shapes(target, stored, where):
    flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(target)}
    flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
        stored, is_leaf=lambda x: hasattr(x, "shape"))}
    missing = sorted(set(flat_t) - set(flat_s))
    extra = sorted(set(flat_s) - set(flat_t))
    wrong = [f"{k}: checkpoint {tuple(flat_s[k].shape)} vs config {tuple(flat_t[k].shape)}"
             for k in flat_t if k in flat_s and tuple(flat_s[k].shape) != tuple(flat_t[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"checkpoint {where!r} does not match the model config: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}, mismatched shapes {wrong[:5]}")


# ---------------------------------------------------------------------------------------------
# Content hashes. An array's hash is two sums (mod 2^32) over its elements of a bijective mix of
# (element bits, position): integer sums are exact and order-free, so the hash is the same on any
# mesh and any number of processes, and changing any one element always changes it.

HASH_NAME = "fmix32-position-sum-2x32"


def _fmix32(h):
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x):
    """An array's raw bits as a flat uint32 vector (64-bit elements give two words)."""
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    narrow = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, narrow).reshape(-1).astype(jnp.uint32)


@jax.jit
def _inspect(leaves):
    """[(hash uint32[2], number of non-finite elements)] of a list of arrays, in one pass."""
    def one(x):
        words = _words(x)
        pos = _fmix32(jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
                      + jnp.uint32(1))
        a = _fmix32(words ^ pos)
        b = _fmix32(a ^ jnp.uint32(0x5BD1E995))
        digest = jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])
        bad = (jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
               if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros((), jnp.int32))
        return digest, bad
    return [one(x) for x in leaves]


def inspect_arrays(tree) -> tuple[dict[str, str], dict[str, int]]:
    """({path: content hash}, {path: non-finite count} for the leaves that have any)."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree))
    hashes, bad = {}, {}
    for path, (digest, n) in zip(paths, jax.device_get(_inspect(list(leaves)))):
        key = jax.tree_util.keystr(path)
        hashes[key] = "%08x%08x" % (int(digest[0]), int(digest[1]))
        if int(n):
            bad[key] = int(n)
    return hashes, bad


def json_hash(obj) -> str:
    """Hash of a JSON value, independent of key order and formatting."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def _compare_hashes(expected: dict, got: dict, item: str) -> list[str]:
    problems = [f"{item}{k}: content hash differs from the one written with the checkpoint"
                for k in expected if k in got and got[k] != expected[k]]
    problems += [f"{item}{k}: missing" for k in expected if k not in got]
    return problems


def load_model(directory: str, shardings=None, step: int | None = None
               ) -> tuple[VideoGPT, ml_collections.ConfigDict]:
    """Load a model export (`config.json` + `params/`) or a training workdir (the params of its
    latest checkpoint, or of `step`) -> (model, config)."""
    params_dir, config = resolve_params(directory, step)
    model_cfg = ModelConfig.from_config(config.model)
    return restore_params(params_dir, model_cfg, shardings), config


def resolve_params(directory: str, step: int | None = None) -> tuple[str, ml_collections.ConfigDict]:
    """(params directory, run config) of a model export or of a training workdir's checkpoint:
    of a run that keeps a parameter average (`optim.ema_decay`), the average's, so sampling,
    export and the next stage's `init_from` all read the averaged weights."""
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, CHECKPOINTS_DIR)):
        with TrainCheckpointer(directory, read_only=True) as ckpt:
            step = ckpt.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"training workdir {directory!r} has no checkpoint yet")
            config = ckpt.restore_config(step)
        step_dir = ckpt.step_dir(step)
        ema_dir = os.path.join(step_dir, EMA_PARAMS_DIR)
        return (ema_dir if os.path.isdir(ema_dir) else os.path.join(step_dir, PARAMS_DIR)), config
    config = read_config(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"no {PARAMS_DIR}/ in {directory!r}")
    return params_dir, config


# ---------------------------------------------------------------------------------------------
# Training checkpoints: one orbax CheckpointManager per workdir, under `workdir/checkpoints/`.
# Each step directory holds five items:
#   params/       the model's params (a pure dict; the same format as an export's `params/`)
#   train_state/  {"opt_state", "step", "rng"}
#   ema_params/   only with `optim.ema_decay`: the parameter average, in the params format
#   data/         the grain iterator state, one JSON per process
#   config/       the run ConfigDict as JSON
#   integrity/    content hashes of the above (see "Content hashes"), written in the same commit
# Restores always target abstract arrays carrying the *current* mesh's shardings, so a
# checkpoint restores onto any mesh, and any process count whose devices cover it.

CHECKPOINTS_DIR = "checkpoints"
INTEGRITY = "integrity"
# Where corrupt checkpoints are moved (next to `checkpoints/`), out of the manager's way.
QUARANTINE_DIR = "corrupt_checkpoints"


def _config_json(config) -> dict:
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(config_dict, default=list))


def _data_file() -> str:
    """The grain handler's file name for this process."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class TrainCheckpointer:
    """Save / restore the train state, data iterator and config of a run (async by default)."""

    def __init__(self, workdir: str, ckpt_cfg=None, *, read_only: bool = False):
        import grain
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if ckpt_cfg is None else int(ckpt_cfg.max_to_keep),
            enable_async_checkpointing=bool(ckpt_cfg is not None and ckpt_cfg.async_save),
            create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={PARAMS_DIR: ocp.StandardCheckpointHandler(),
                           "train_state": ocp.StandardCheckpointHandler(),
                           EMA_PARAMS_DIR: ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           INTEGRITY: ocp.JsonCheckpointHandler()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, params, train_state, data_iterator, config) -> None:
        """Start an (async) save of `step`; every process must call it. Raises
        NonFiniteStateError, before anything is written, when any array holds NaN or inf."""
        import grain
        hashes, bad = inspect_arrays({PARAMS_DIR: params, "train_state": train_state})
        if bad:
            raise NonFiniteStateError(bad, len(hashes))
        config_json = _config_json(config)
        integrity = {"hash": HASH_NAME, "arrays": hashes, "config": json_hash(config_json)}
        items = {PARAMS_DIR: ocp.args.StandardSave(params),
                 "train_state": ocp.args.StandardSave(train_state),
                 "config": ocp.args.JsonSave(config_json)}
        ema = optim.ema_params(train_state["opt_state"], params)
        if ema is not None:
            items[EMA_PARAMS_DIR] = ocp.args.StandardSave(ema)
        if data_iterator is not None:
            # The integrity item is written by the primary process: it records that one's file.
            integrity["data"] = {_data_file(): json_hash(data_iterator.get_state())}
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        items[INTEGRITY] = ocp.args.JsonSave(integrity)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _read_json_item(self, step: int, name: str):
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.JsonRestore()}))
        except Exception as e:  # orbax and tensorstore raise many types; all mean "unreadable"
            raise CorruptCheckpointError(self.step_dir(step), f"cannot read its {name}/ item "
                                         f"({type(e).__name__}: {e})") from e
        return restored[name]

    def integrity(self, step: int) -> dict | None:
        """The step's integrity record; None for a checkpoint written before they existed."""
        if not os.path.isdir(os.path.join(self.step_dir(step), INTEGRITY)):
            return None
        record = self._read_json_item(step, INTEGRITY)
        if not isinstance(record, dict) or record.get("hash") != HASH_NAME:
            raise CorruptCheckpointError(self.step_dir(step), "its integrity record is not one "
                                         f"this version writes ({str(record)[:200]})")
        return record

    def _stored_params(self, step: int):
        """The params' stored array metadata; unreadable or empty metadata is corruption (a
        model that does not match is a different error, raised by the shape check)."""
        where = os.path.join(self.step_dir(step), PARAMS_DIR)
        try:
            meta = self.manager.item_metadata(step)[PARAMS_DIR]
        except Exception as e:
            raise CorruptCheckpointError(where, f"cannot read its metadata ({type(e).__name__}: "
                                         f"{e})") from e
        stored = getattr(meta, "tree", meta)
        if not jax.tree.leaves(stored, is_leaf=lambda x: hasattr(x, "shape")):
            raise CorruptCheckpointError(where, "its metadata lists no arrays")
        return stored

    def _check_data_file(self, step: int, record: dict | None) -> None:
        """Read this process's iterator JSON ourselves, so a damaged file is named."""
        path = os.path.join(self.step_dir(step), "data", _data_file())
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(path, f"cannot read the data iterator state "
                                         f"({type(e).__name__}: {e})") from e
        expected = (record or {}).get("data", {}).get(_data_file())
        if expected is not None and json_hash(state) != expected:
            raise CorruptCheckpointError(path, "the data iterator state differs from the one "
                                         "written with the checkpoint")

    def restore(self, step: int, abstract_params, abstract_train_state, data_iterator=None):
        """Restore `step` into the given abstract targets (ShapeDtypeStructs with shardings);
        the data iterator, when given, is set in place. Returns (params, train_state).

        Raises CorruptCheckpointError when the checkpoint cannot be read or its content differs
        from its integrity record, ValueError when it holds a different model."""
        import grain
        step_dir = self.step_dir(step)
        record = self.integrity(step)
        # The optimiser state mirrors the params, so checking the params names every mismatch.
        _check_shapes(abstract_params, self._stored_params(step),
                      os.path.join(step_dir, PARAMS_DIR))
        items = {PARAMS_DIR: ocp.args.StandardRestore(abstract_params),
                 "train_state": ocp.args.StandardRestore(abstract_train_state)}
        if data_iterator is not None:
            self._check_data_file(step, record)
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CorruptCheckpointError(step_dir, f"cannot read it back ({type(e).__name__}: "
                                         f"{e})") from e
        params, train_state = restored[PARAMS_DIR], restored["train_state"]
        if record is None:
            log.warning("checkpoint %s has no integrity record (written by an older version): "
                        "restored without verifying it", step_dir)
        else:
            got, _ = inspect_arrays({PARAMS_DIR: params, "train_state": train_state})
            problems = _compare_hashes(record["arrays"], got, "")
            if problems:
                raise CorruptCheckpointError(step_dir, "; ".join(problems[:5]) + (
                    f"; ... ({len(problems)} arrays)" if len(problems) > 5 else ""))
        return params, train_state

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        """The run config saved with `step`, checked against its integrity record."""
        config = self._read_json_item(step, "config")
        record = self.integrity(step)
        if record is not None and json_hash(config) != record["config"]:
            raise CorruptCheckpointError(os.path.join(self.step_dir(step), "config"),
                                         "the config differs from the one written with the "
                                         "checkpoint")
        return ml_collections.ConfigDict(config)

    def quarantine(self, step: int) -> str:
        """Move a corrupt step out of `checkpoints/` (kept for inspection, never deleted), so
        the run can save that step number again. Returns the new path."""
        dest = os.path.join(self.workdir, QUARANTINE_DIR, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            suffix = 0
            while os.path.exists(dest):  # an earlier quarantine of the same step number
                suffix += 1
                dest = os.path.join(self.workdir, QUARANTINE_DIR, f"{step}.{suffix}")
            os.replace(self.step_dir(step), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"vgpt_jax quarantine {step}")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# Resuming with a changed config. Differences in what the run learns (the model, objective,
# optimiser and data) need `allow_config_change`; those that change parameter shapes are refused
# outright; the rest (how the run executes: steps, logging, mesh, checkpointing, loader threads,
# attention kernels, remat) are reported and accepted.

_FREE_TO_CHANGE = ("train.", "checkpoint.", "mesh.", "distributed.", "model.attention.",
                   "model.remat_policy", "data.read_threads", "data.prefetch_buffer_size",
                   "data.worker_count", "data.worker_buffer_size")
_MISSING = "<absent>"


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved, current) -> list[tuple[str, object, object]]:
    """[(dotted field, saved value, current value)] of the fields that differ. A field the saved
    config lacks and the current one holds at its default (one added by a later version, e.g.
    `optim.ema_decay`) is no change."""
    a, b = _flatten(_config_json(saved)), _flatten(_config_json(current))
    defaults = _flatten(_config_json(get_train_config()))
    added_at_default = lambda k: k not in a and k in defaults and b.get(k) == defaults[k]
    return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))
            if a.get(k, _MISSING) != b.get(k, _MISSING) and not added_at_default(k)]


def _format_changes(changes) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


def check_resume_config(saved, current, where: str, allow_change: bool = False) -> None:
    """Compare the config saved with a checkpoint with the one resuming it (see above)."""
    changes = config_changes(saved, current)
    learned = [c for c in changes if not c[0].startswith(_FREE_TO_CHANGE)]
    free = [c for c in changes if c not in learned]
    model = [c for c in learned if c[0].startswith("model.")]
    if model:
        try:
            saved_params = nnx.state(abstract_model(ModelConfig.from_config(saved["model"])),
                                     nnx.Param).to_pure_dict()
        except (ValueError, TypeError):  # a config this version cannot build: the restore's
            saved_params = None          # own shape check still guards the params
        if saved_params is not None:
            current_params = nnx.state(abstract_model(ModelConfig.from_config(current["model"])),
                                       nnx.Param).to_pure_dict()
            try:
                _check_shapes(current_params, saved_params, where)
            except ValueError as e:
                raise ValueError(f"{e}; the config fields that differ: "
                                 f"{_format_changes(model)}") from None
    if free:
        log.info("%s: resuming with changed run settings: %s", where, _format_changes(free))
    if learned and not allow_change:
        raise ValueError(f"{where} was trained with a different config: {_format_changes(learned)}."
                         " Resume with the checkpoint's values, use a new workdir, or pass "
                         "--allow-config-change (train(..., allow_config_change=True)) to "
                         "continue with the new ones")
    if learned:
        log.warning("%s: continuing with a changed config (allowed): %s", where,
                    _format_changes(learned))


def load_params(directory: str, model_cfg: ModelConfig, shardings=None):
    """The params (pure dict) of an export or a training workdir, checked against `model_cfg`:
    how a curriculum stage starts from the previous stage."""
    params_dir, _ = resolve_params(directory)
    model = restore_params(params_dir, model_cfg, shardings)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
