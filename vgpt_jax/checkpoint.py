"""Checkpoints with orbax.

Model exports (what the sampler, converter and `from_checkpoint` read and write): a folder with
`config.json` (the run's ConfigDict as JSON; its `model` section builds the model) and
`params/` (an orbax PyTree checkpoint of the model's `nnx.Param` state). `load_model` also
accepts a training workdir (see the CheckpointManager layout below) and takes the params of its
latest (or a given) step.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from vgpt_jax.config import ModelConfig
from vgpt_jax.model import VideoGPT

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def abstract_model(model_cfg: ModelConfig) -> VideoGPT:
    """The model with ShapeDtypeStruct leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: VideoGPT(model_cfg, rngs=nnx.Rngs(0)))


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
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config_dict, f, indent=2, default=list)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))
    return directory


def read_config(directory: str) -> ml_collections.ConfigDict:
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


def load_model(directory: str, shardings=None, step: int | None = None
               ) -> tuple[VideoGPT, ml_collections.ConfigDict]:
    """Load a model export (`config.json` + `params/`) or a training workdir (the params of its
    latest checkpoint, or of `step`) -> (model, config)."""
    params_dir, config = resolve_params(directory, step)
    model_cfg = ModelConfig.from_config(config.model)
    return restore_params(params_dir, model_cfg, shardings), config


def resolve_params(directory: str, step: int | None = None) -> tuple[str, ml_collections.ConfigDict]:
    """(params directory, run config) of a model export or of a training workdir's checkpoint."""
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, CHECKPOINTS_DIR)):
        with TrainCheckpointer(directory, read_only=True) as ckpt:
            step = ckpt.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"training workdir {directory!r} has no checkpoint yet")
            config = ckpt.restore_config(step)
        return os.path.join(ckpt.directory, str(step), PARAMS_DIR), config
    config = read_config(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"no {PARAMS_DIR}/ in {directory!r}")
    return params_dir, config


# ---------------------------------------------------------------------------------------------
# Training checkpoints: one orbax CheckpointManager per workdir, under `workdir/checkpoints/`.
# Each step directory holds four items:
#   params/       the model's params (a pure dict; the same format as an export's `params/`)
#   train_state/  {"opt_state", "step", "rng"}
#   data/         the grain iterator state, one JSON per process
#   config/       the run ConfigDict as JSON
# Restores always target abstract arrays carrying the *current* mesh's shardings, so a
# checkpoint restores onto any mesh (multihost.md section 3).

CHECKPOINTS_DIR = "checkpoints"


class TrainCheckpointer:
    """Save / restore the train state, data iterator and config of a run (async by default)."""

    def __init__(self, workdir: str, ckpt_cfg=None, *, read_only: bool = False):
        import grain
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if ckpt_cfg is None else int(ckpt_cfg.max_to_keep),
            enable_async_checkpointing=bool(ckpt_cfg is not None and ckpt_cfg.async_save),
            create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={PARAMS_DIR: ocp.StandardCheckpointHandler(),
                           "train_state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, train_state, data_iterator, config) -> None:
        """Start an (async) save of `step`; every process must call it."""
        import grain
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        items = {PARAMS_DIR: ocp.args.StandardSave(params),
                 "train_state": ocp.args.StandardSave(train_state),
                 "config": ocp.args.JsonSave(json.loads(json.dumps(config_dict, default=list)))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params, abstract_train_state, data_iterator=None):
        """Restore `step` into the given abstract targets (ShapeDtypeStructs with shardings);
        the data iterator, when given, is set in place. Returns (params, train_state)."""
        import grain
        step_dir = os.path.join(self.directory, str(step))
        # The optimiser state mirrors the params, so checking the params names every mismatch.
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(os.path.join(step_dir, PARAMS_DIR))
        stored = getattr(meta, "item_metadata", meta)
        _check_shapes(abstract_params, getattr(stored, "tree", stored),
                      os.path.join(step_dir, PARAMS_DIR))
        items = {PARAMS_DIR: ocp.args.StandardRestore(abstract_params),
                 "train_state": ocp.args.StandardRestore(abstract_train_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[PARAMS_DIR], restored["train_state"]

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(restored["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(directory: str, model_cfg: ModelConfig, shardings=None):
    """The params (pure dict) of an export or a training workdir, checked against `model_cfg`:
    how a curriculum stage starts from the previous stage."""
    params_dir, _ = resolve_params(directory)
    model = restore_params(params_dir, model_cfg, shardings)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
