"""One interface over the latent spaces Video-GPT can train in.

A latent space maps uint8 RGB frames `[N, H, W, 3]` to float latents `[N, H/d, W/d, C]` and back,
where `d = downsample` and `C = channels`. Latents are already scaled for the diffusion model
(for a VAE: `(z - shift_factor) * scaling_factor`, as diffusers pipelines do).

Implementations:
- `SpaceToDepth`: pixels as latents (no learning), for tests and tiny demos; round-trips exactly.
- `AutoencoderKLSpace` (in `vgpt_jax.vae.autoencoder_kl`): the diffusers AutoencoderKL in NNX,
  with SDXL-VAE weights or a small VAE trained by `tools/train_vae.py`.
"""
from __future__ import annotations

import abc

import numpy as np


class LatentSpace(abc.ABC):
    """Frames <-> latents. Works on host numpy arrays; implementations may jit internally."""

    downsample: int
    channels: int

    @abc.abstractmethod
    def encode(self, frames_NHW3: np.ndarray, *, seed: int | None = None) -> np.ndarray:
        """uint8 frames `[N, H, W, 3]` -> float32 latents `[N, H/d, W/d, C]`.

        `seed`: None takes the posterior mean (deterministic); an int samples the posterior
        (the official pipeline samples). Spaces without a posterior ignore it.
        """

    @abc.abstractmethod
    def decode(self, latents_NhwC: np.ndarray) -> np.ndarray:
        """float latents `[N, h, w, C]` -> uint8 frames `[N, h*d, w*d, 3]`."""

    def check_frames(self, frames_NHW3: np.ndarray, what: str = "frames") -> None:
        """Raise a ValueError naming the problem when frames cannot be encoded by this space."""
        shape = np.shape(frames_NHW3)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{what}: expected uint8 frames of shape [N, H, W, 3], got {shape}")
        if shape[1] % self.downsample or shape[2] % self.downsample:
            raise ValueError(
                f"{what}: frame size {shape[1]}x{shape[2]} is not a multiple of the latent "
                f"downsampling factor {self.downsample}")


class SpaceToDepth(LatentSpace):
    """Pixels as latents: each `d x d` RGB patch becomes `3*d*d` channels in [-1, 1]."""

    def __init__(self, downsample: int = 1):
        self.downsample = int(downsample)
        self.channels = 3 * self.downsample**2

    def encode(self, frames_NHW3, *, seed=None):
        self.check_frames(frames_NHW3)
        x = np.asarray(frames_NHW3, np.float32) / 127.5 - 1.0
        n, h, w, _ = x.shape
        d = self.downsample
        x = x.reshape(n, h // d, d, w // d, d, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h // d, w // d, self.channels)

    def decode(self, latents_NhwC):
        z = np.asarray(latents_NhwC, np.float32)
        n, h, w, c = z.shape
        if c != self.channels:
            raise ValueError(f"latents have {c} channels, this space has {self.channels}")
        d = self.downsample
        x = z.reshape(n, h, w, d, d, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * d, w * d, 3)
        return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


_SPACE_KEYS = {
    "space_to_depth": {"kind", "downsample"},
    "autoencoder_kl": {"kind", "path", "subfolder", "batch_size", "dtype", "scaling_factor", "shift_factor"},
}


def make_latent_space(config) -> LatentSpace:
    """Build a latent space from a config mapping (dict or ConfigDict).

    `{"kind": "space_to_depth", "downsample": 2}` or
    `{"kind": "autoencoder_kl", "path": "<diffusers folder or hub id>", "subfolder": None, "batch_size": 8,
      "dtype": "float32" | "bfloat16", "scaling_factor": None, "shift_factor": None}` (None = from config.json).
    """
    cfg = dict(config or {})
    kind = cfg.get("kind", "space_to_depth")
    if kind not in _SPACE_KEYS:
        raise ValueError(f"latent space kind {kind!r} unknown; expected one of {sorted(_SPACE_KEYS)}")
    extra = sorted(set(cfg) - _SPACE_KEYS[kind])
    if extra:
        raise ValueError(f"latent space {kind!r}: unknown option(s) {extra}; allowed {sorted(_SPACE_KEYS[kind])}")
    if kind == "space_to_depth":
        return SpaceToDepth(cfg.get("downsample", 1))
    if not cfg.get("path"):
        raise ValueError("latent space 'autoencoder_kl' needs 'path' (a diffusers VAE folder or hub repo id)")
    from vgpt_jax.vae.autoencoder_kl import AutoencoderKLSpace  # keeps flax off the SpaceToDepth import path

    return AutoencoderKLSpace.from_pretrained(
        cfg["path"], subfolder=cfg.get("subfolder"), batch_size=cfg.get("batch_size", 8),
        dtype=cfg.get("dtype", "float32"), scaling_factor=cfg.get("scaling_factor"),
        shift_factor=cfg.get("shift_factor"))
