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


def load_model(directory: str, shardings=None) -> tuple[VideoGPT, ml_collections.ConfigDict]:
    """Load a model export (`config.json` + `params/`) -> (model, config)."""
    config = read_config(directory)
    model_cfg = ModelConfig.from_config(config.model)
    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"no {PARAMS_DIR}/ in {directory!r}")
    return restore_params(params_dir, model_cfg, shardings), config
