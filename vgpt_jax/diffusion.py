"""The next-clip-diffusion objective: noising, context noise, and the x1-prediction loss.

For a batch of latents [B, F, h, w, C] and a clip assignment [B, F]:
- one t ~ U(0, 1) per clip (a logit-normal option), shared by the clip's frames;
- noisy copy x_t = t * x1 + (1 - t) * eps (t = 1 is data);
- clean copy, lightly noised per frame: (b + g) * x1 + (1 - b - g) * eps', b = 0.9,
  g ~ U(0, 0.1), with no time token (the level is not given to the model);
- the model predicts x1 at every noisy block; the loss is the mean over noisy frames of each
  frame's MSE (no t-weighting). `prediction_type="v"` (an option; the official inference
  script samples its `model.pt` weights this way) predicts the velocity v = x1 - eps instead. Every frame is noisy exactly once, so this is the mean over
  all B * F frames.

Conditions (a model with `model.conditions`): the batch also holds `class_id` [B] and/or
`actions` [B, F, A]; each video's conditions are dropped together with probability
`conditions.dropout` (a draw from `fold_in(rng, 1)`, so the noise draws are those of an
unconditioned run), which trains the unconditional branch that condition guidance uses.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vgpt_jax import conditioning, noise
from vgpt_jax import layout as layout_lib
from vgpt_jax.config import block_len_for
from vgpt_jax.model import VideoGPT


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Defaults are the recipe's. `timestep_sampling="logit_normal"` is an option the official
    code has but leaves off; setting `context_noise_beta=1, context_noise_gamma_max=0` turns
    context noise off (the ablation)."""
    timestep_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    context_noise_beta: float = 0.9
    context_noise_gamma_max: float = 0.1
    prediction_type: str = "x1"      # "x1" | "v" (the velocity d x_t / dt = x1 - eps)

    def validate(self):
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"objective: timestep_sampling={self.timestep_sampling!r} must be "
                             "'uniform' or 'logit_normal'")
        lo, hi = self.context_noise_beta, self.context_noise_beta + self.context_noise_gamma_max
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"objective: context noise level range [{lo}, {hi}] must lie in [0, 1]")
        if self.prediction_type not in ("x1", "v"):
            raise ValueError(f"objective: prediction_type={self.prediction_type!r} must be 'x1' "
                             "or 'v'")


class TrainingInputs(NamedTuple):
    blocks_BNhwc: jax.Array   # interleaved noisy / clean latents, N = 2F
    t_BN: jax.Array           # noise level of each block (clean blocks: their context level)
    layout: layout_lib.Layout
    target_BFhwc: jax.Array   # x1, or the velocity x1 - eps (prediction_type "v")


def sample_clip_times(rng, clip_ids_BF, cfg: ObjectiveConfig):
    """One t per clip, gathered to frames: [B, F]."""
    shape = clip_ids_BF.shape  # at most F clips per sample
    if cfg.timestep_sampling == "uniform":
        per_clip = jax.random.uniform(rng, shape)
    else:
        per_clip = jax.nn.sigmoid(cfg.logit_normal_mean
                                  + cfg.logit_normal_std * jax.random.normal(rng, shape))
    return jnp.take_along_axis(per_clip, clip_ids_BF, axis=1)


def make_training_inputs(latents_BFhwc, clip_ids_BF, rng, cfg: ObjectiveConfig,
                         block_len: int) -> TrainingInputs:
    """Noise a batch and lay it out as the training sequence (pure; `rng` is a PRNG key)."""
    k_t, *noise_keys = jax.random.split(rng, 4)
    t = sample_clip_times(k_t, clip_ids_BF, cfg)
    return noised_inputs(latents_BFhwc, clip_ids_BF, t, noise_keys, cfg, block_len)


def noised_inputs(latents_BFhwc, clip_ids_BF, t_BF, noise_keys, cfg: ObjectiveConfig,
                  block_len: int) -> TrainingInputs:
    """The training sequence at given noise levels `t_BF` (one per frame, equal within a clip);
    `noise_keys`: three PRNG keys (noisy copy, context level, context noise)."""
    x1 = latents_BFhwc.astype(jnp.float32)
    b, f = x1.shape[:2]
    t = jnp.broadcast_to(jnp.asarray(t_BF, jnp.float32), (b, f))
    k_eps, k_ctx, k_ctx_eps = noise_keys
    bcast = lambda a: a[:, :, None, None, None]
    eps = noise.normal(k_eps, x1.shape)
    noisy = bcast(t) * x1 + (1 - bcast(t)) * eps
    level = cfg.context_noise_beta + cfg.context_noise_gamma_max * jax.random.uniform(k_ctx, (b, f))
    clean = bcast(level) * x1 + (1 - bcast(level)) * noise.normal(k_ctx_eps, x1.shape)
    blocks = jnp.stack([noisy, clean], axis=2).reshape(b, 2 * f, *x1.shape[2:])
    t_blocks = jnp.stack([t, level], axis=2).reshape(b, 2 * f)
    return TrainingInputs(blocks, t_blocks, layout_lib.training_layout(clip_ids_BF, block_len),
                          x1 if cfg.prediction_type == "x1" else x1 - eps)


def loss(model: VideoGPT, batch: dict, rng, cfg: ObjectiveConfig = ObjectiveConfig()):
    """Pure objective: `batch` = {latents [B,F,h,w,C], clip_ids [B,F] int}; returns (loss, metrics).

    `model` is the NNX module (a pytree of its parameters), so `jax.grad` over it gives
    parameter gradients.
    """
    latents, clip_ids = batch["latents"], batch["clip_ids"]
    layout_lib.check_clip_ids(clip_ids, latents.shape[1], what="batch['clip_ids']")
    block_len = block_len_for(model.cfg, *latents.shape[2:4])
    inputs = make_training_inputs(latents, clip_ids, rng, cfg, block_len)
    conditions = conditioning.batch_conditions(model.cfg, batch, block_len,
                                               jax.random.fold_in(rng, 1),
                                               model.cfg.conditions.dropout)
    pred = model(inputs.blocks_BNhwc, inputs.t_BN, inputs.layout, output_blocks=slice(0, None, 2),
                 conditions=conditions)
    per_frame = jnp.mean((pred - inputs.target_BFhwc) ** 2, axis=(2, 3, 4))  # [B, F]
    value = jnp.mean(per_frame)
    first_clip = clip_ids == 0
    metrics = {
        "loss": value,
        # The first clip is denoised without history: its loss tracks the unconditional branch.
        "loss_first_clip": jnp.sum(per_frame * first_clip) / jnp.maximum(first_clip.sum(), 1),
        "loss_with_history": jnp.sum(per_frame * ~first_clip)
        / jnp.maximum((~first_clip).sum(), 1),
    }
    return value, metrics


def denoising_error(model: VideoGPT, latents_BFhwc, clip_ids_BF, t, rng,
                    cfg: ObjectiveConfig = ObjectiveConfig(), *, class_id=None, actions=None):
    """Per-frame MSE `[B, F]` of the prediction (x1, or v as `cfg.prediction_type` says) when
    every clip is noised to level `t` (a scalar or `[B, F]`),
    under the training layout: what the loss sees, at a chosen t instead of a random one.

    Evaluation uses it to ask whether a model reads its history: the error of the last clip with
    the true history, with another video's history, and with none (`evaluate.history_usage`).
    `class_id` [B] / `actions` [B, F, A]: the conditions of a conditioned model (never dropped).
    """
    block_len = block_len_for(model.cfg, *latents_BFhwc.shape[2:4])
    inputs = noised_inputs(latents_BFhwc, clip_ids_BF, t, jax.random.split(rng, 3), cfg,
                           block_len)
    conditions = conditioning.batch_conditions(
        model.cfg, {"latents": latents_BFhwc, "class_id": class_id, "actions": actions}, block_len)
    pred = model(inputs.blocks_BNhwc, inputs.t_BN, inputs.layout, output_blocks=slice(0, None, 2),
                 conditions=conditions)
    return jnp.mean((pred - inputs.target_BFhwc) ** 2, axis=(2, 3, 4))
