"""A model that must read its history learns to: the copy task on static videos.

In a static world the future equals the past, so a model that uses its context predicts the
future frames from pure noise (t = 0) far better with the true context than with another
video's. Trained on the raw space-to-depth latents of this dark world (far from zero mean and
unit scale) the same model ignores its context after as many steps (true/other error ratio
0.99 measured with normalize="none"); with the measured normalisation it uses it (0.55).
"""
import os
import sys

import numpy as np

from vgpt_jax import evaluate, train
from vgpt_jax.data import physics_world
from vgpt_jax.data.ingest import ingest_arrays
from vgpt_jax.pipeline import Pipeline
from vgpt_jax.vae.latent_space import SpaceToDepth

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))


def test_tiny_model_uses_its_context_on_the_copy_task(tmp_path):
    import tiny_test
    world = physics_world.WorldConfig(size=16, scenarios=("balls",), max_balls=2, gravity=0.0,
                                      max_speed=0.0, min_radius=0.12, max_radius=0.2)
    train_clips = physics_world.make_dataset(256, 6, 16, seed=0, split="train", config=world)
    test_clips = physics_world.make_dataset(16, 6, 16, seed=0, split="test", config=world,
                                            num_takes=1)
    assert all(np.array_equal(c.frames[0], c.frames[-1]) for c in test_clips)  # static
    store = str(tmp_path / "store")
    ingest_arrays(((c.frames, c.fps, c.name) for c in train_clips), store, "space_to_depth:2",
                  normalize="shift_scale")
    cfg = tiny_test.get_config()
    cfg.model.latent_channels = 12
    cfg.data.store = store
    cfg.train.steps, cfg.train.log_every = 300, 50
    cfg.checkpoint.save_interval_steps = 300
    cfg.optim.warmup_steps = 20
    train.train(cfg, str(tmp_path / "train"))
    pipe = Pipeline.from_checkpoint(str(tmp_path / "train"), latent_space=SpaceToDepth(2))
    videos = [evaluate.HeldOutVideo(c.name, c.frames) for c in test_clips]
    at_noise = evaluate.history_usage(pipe, videos, 3, 3, ts=(0.0,))["0"]
    assert at_noise["true_context"] < 0.75 * at_noise["other_context"], at_noise
    assert at_noise["true_context"] < 0.75 * at_noise["no_context"], at_noise
