"""Subprocess side of the feature tests: features of a fixed random model on this process's
devices (the fake device count is set by the caller), written to OUT.npz; with 8 devices also
on a (data 2 x fsdp 4) placement.

    python features_checks.py OUT.npz
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(out: str) -> None:
    from test_sampling import random_model
    from vgpt_jax import features, sampling
    model = random_model(num_layers=2, seed=3)
    latents = np.random.default_rng(1).standard_normal((11, 3, 4, 4, 4)).astype(np.float32)
    clean = features.extract(model, latents, pools=features.POOLS, batch_size=1)
    noisy = features.extract(model, latents, pools=("mean", "last_frame"), t=0.4,
                             seeds=range(100, 111), batch_size=1)
    extra = {}
    if len(jax.devices()) == 8:  # parameters split over fsdp as in training, videos over data x fsdp
        placement = sampling.Placement.of({"data": 2, "fsdp": 4})
        extra["fsdp_mean"] = features.extract(model, latents, batch_size=1,
                                              placement=placement)["mean"]
    np.savez(out, devices=len(jax.devices()), **clean, **extra,
             **{f"noisy_{k}": v for k, v in noisy.items()})


if __name__ == "__main__":
    main(sys.argv[1])
