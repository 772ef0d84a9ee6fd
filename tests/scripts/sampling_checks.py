"""Subprocess side of the sharded-sampling tests (8 fake CPU devices).

    python sampling_checks.py OUT.json

Samples the same videos on one device and on the (data 2 x fsdp 4) and (fsdp 2 x context 2 x
tensor 2) meshes, cached, recomputed and rolling; a batch of 8 against its videos one by one;
a Pipeline on a mesh against one without; the layouts the arrays got. Results go to OUT.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from test_sampling import CLIPS, CONTEXT, H, STEPS, W, WINDOW, random_model  # noqa: E402
from vgpt_jax import checkpoint, sampling  # noqa: E402
from vgpt_jax.config import get_model_config  # noqa: E402
from vgpt_jax.pipeline import Pipeline  # noqa: E402

MESHES = {"data2_fsdp4": dict(data=2, fsdp=4),
          "fsdp2_context2_tensor2": dict(fsdp=2, context=2, tensor=2)}
SEEDS = list(range(8))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def main(out_path: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    model = random_model()
    context = np.random.default_rng(0).standard_normal(
        (len(SEEDS), CONTEXT, H, W, 4)).astype(np.float32)
    # Guided, context noise, and a window reset on the third clip (see test_sampling).
    base = sampling.SamplerConfig(steps=STEPS, guidance=1.5, window=WINDOW, context_noise=0.2)
    modes = {"cached": base, "recompute": dataclasses.replace(base, cache_mode="recompute")}
    run = lambda cfg, placement=None, seeds=SEEDS, ctx=context: sampling.sample_video(
        model, CLIPS, cfg, seeds, context_BFhwc=ctx, placement=placement)
    ref = {m: run(cfg) for m, cfg in modes.items()}
    res = {"scale": float(np.max(np.abs(ref["cached"]))),
           "cached_vs_recompute_one_device": max_diff(ref["cached"], ref["recompute"])}

    for name, sizes in MESHES.items():
        placement = sampling.Placement.of(sizes)
        res[name] = {m: max_diff(run(cfg, placement), ref[m]) for m, cfg in modes.items()}
        graphdef, state = nnx.split(placement.place_model(model))
        cache = sampling._build_cache(graphdef, state, placement.put(context, ("batch",)),
                                      placement=placement)
        res[name]["kv_spec"] = str(cache.kv.k.sharding.spec)
        res[name]["meta_spec"] = str(cache.meta.frame.sharding.spec)
        res[name]["qkv_spec"] = str(state["decoder"]["qkv_proj"][...].sharding.spec)
        res[name]["batch_multiple"] = placement.batch_multiple

    # A batch of 8 on the mesh against the 8 videos sampled one by one on it (each alone is
    # padded to the 8 batch shards with copies of itself).
    placement = sampling.Placement.of(MESHES["data2_fsdp4"])
    batched = run(base, placement)
    res["one_by_one"] = max(max_diff(run(base, placement, [s], context[b:b + 1])[0], batched[b])
                            for b, s in enumerate(SEEDS))
    # Three videos (not a multiple of the batch shards) are the first three of the eight.
    res["three_of_eight"] = max_diff(run(base, placement, SEEDS[:3], context[:3]), batched[:3])

    # The rolling cache (eviction re-indexes cached keys) on the context-sharded mesh.
    rolling = dataclasses.replace(base, window=5, cache_mode="rolling", anchor_frames=1)
    res["rolling"] = max_diff(
        run(rolling, sampling.Placement.of(MESHES["fsdp2_context2_tensor2"]), SEEDS[:2],
            context[:2]), run(rolling, None, SEEDS[:2], context[:2]))

    # Generation from nothing (an empty cache on the mesh, the first clip unguided).
    res["from_nothing"] = max_diff(
        sampling.sample_video(model, (2, 2), base, SEEDS[:2], latent_hw=(H, W),
                              placement=sampling.Placement.of(MESHES["fsdp2_context2_tensor2"])),
        sampling.sample_video(model, (2, 2), base, SEEDS[:2], latent_hw=(H, W)))

    # Pipeline.from_checkpoint(mesh=...): params restored into their shards, same prediction.
    export = tempfile.mkdtemp()
    checkpoint.export_model(export, model, {"model": _model_section(model)})
    plain = Pipeline.from_checkpoint(export, latent_space=None)
    meshed = Pipeline.from_checkpoint(export, latent_space=None, mesh=MESHES["data2_fsdp4"])
    kwargs = dict(clip_sizes=[2, 1], steps=STEPS, window=WINDOW, seed=5)
    res["pipeline"] = dict(
        diff=max_diff(meshed.predict(context[:3], **kwargs).latents,
                      plain.predict(context[:3], **kwargs).latents),
        qkv_spec=str(meshed.model.decoder.qkv_proj[...].sharding.spec),
        devices=len(meshed.model.decoder.qkv_proj[...].sharding.device_set))
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


def _model_section(model) -> dict:
    """The export config's model section for `random_model()` (dense attention, 2 layers)."""
    cfg = get_model_config("tiny")
    cfg.num_layers = model.cfg.num_layers
    cfg.attention.impl = "dense"
    return cfg.to_dict()


if __name__ == "__main__":
    main(sys.argv[1])
