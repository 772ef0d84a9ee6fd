"""One interface over the latent spaces Video-GPT can train in.

A latent space maps uint8 RGB frames `[N, H, W, 3]` to float latents `[N, H/d, W/d, C]` and back,
where `d = downsample` and `C = channels`. Latents are already scaled for the diffusion model
(for a VAE: `(z - shift_factor) * scaling_factor`, as diffusers pipelines do).

Latent normalisation (`LatentNormalization`): diffusion learns fastest on latents that are centred
with a known scale (SDXL's VAE carries a `scaling_factor`, newer VAEs a `shift_factor`, for this
reason). A space's raw latents may be far from that: space-to-depth latents of the dark physics world have
mean -0.77 and std 0.23, so the noise of x_t = t x1 + (1 - t) eps swamps the signal at most t and
the clean history's context noise hides the small moving details a world model must read. A
per-channel shift and an optional scale, measured once over a sample of the data at ingestion,
wrap any space (`NormalizedSpace`): applied on encode, undone on decode. The normalisation is
recorded in the latent store's manifest and in every checkpoint and export (the run config's
`data.latent_normalization`), and training and sampling refuse a store and a model whose
normalisations disagree (`check_same_normalization`).

Implementations:
- `SpaceToDepth`: pixels as latents (no learning), for tests and tiny demos; round-trips exactly.
- `AutoencoderKLSpace`: the diffusers AutoencoderKL in NNX (`vgpt_jax.vae.autoencoder_kl`),
  with SDXL-VAE weights or a small VAE trained by `vgpt train-vae`.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vgpt_jax.vae.autoencoder_kl import AutoencoderKL


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


NORMALIZE_MODES = ("none", "shift", "shift_scale")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass(frozen=True)
class LatentNormalization:
    """The affine map from a space's raw latents to the model's: `z_model = (z_raw - shift) / scale`.

    `shift` and `scale` hold one value per latent channel (C floats each).
    """
    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self):
        if len(self.shift) != len(self.scale):
            raise ValueError(f"latent normalization: {len(self.shift)} shift values but "
                             f"{len(self.scale)} scale values (one per channel each)")
        values = np.asarray(self.shift + self.scale, np.float64)
        if not np.all(np.isfinite(values)) or min(self.scale, default=1.0) <= 0:
            raise ValueError("latent normalization: shift must be finite and scale finite and > 0")

    @property
    def channels(self) -> int:
        return len(self.shift)

    @classmethod
    def measure(cls, latents_NhwC: np.ndarray, mode: str = "shift",
                per_channel: bool = True) -> "LatentNormalization":
        """Statistics of a sample of raw latents `[..., C]`.

        `mode`: "shift" centres (scale 1); "shift_scale" also divides by the standard deviation
        (per channel, or of all channels together when `per_channel=False`); "none" is the
        identity. The shift is per channel unless `per_channel=False`.
        """
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"latent normalization mode {mode!r}: expected one of {NORMALIZE_MODES}")
        z = np.asarray(latents_NhwC, np.float64)
        z = z.reshape(-1, z.shape[-1])
        c = z.shape[-1]
        if not len(z):
            raise ValueError("latent normalization: no latents to measure")
        if mode == "none":
            return cls.identity(c)
        shift = z.mean(0) if per_channel else np.full(c, z.mean())
        scale = np.ones(c)
        if mode == "shift_scale":
            centred = z - shift
            scale = centred.std(0) if per_channel else np.full(c, centred.std())
            scale = np.maximum(scale, 1e-6)  # a constant channel stays finite
        return cls(tuple(float(v) for v in shift), tuple(float(v) for v in scale))

    @classmethod
    def identity(cls, channels: int) -> "LatentNormalization":
        return cls((0.0,) * channels, (1.0,) * channels)

    @classmethod
    def from_dict(cls, d: Mapping) -> "LatentNormalization":
        return cls(tuple(float(v) for v in d["shift"]), tuple(float(v) for v in d["scale"]))

    def to_dict(self) -> dict:
        return {"shift": list(self.shift), "scale": list(self.scale)}

    def normalize(self, z_raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(z_raw, np.float32) - np.float32(self.shift))
                / np.float32(self.scale)).astype(np.float32)

    def denormalize(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, np.float32) * np.float32(self.scale)
                + np.float32(self.shift)).astype(np.float32)


def normalization_of(space_or_section) -> LatentNormalization | None:
    """The normalisation of a LatentSpace, a config section or manifest entry (dict with
    `normalization`), or a bare normalisation dict; None when there is none."""
    if space_or_section is None:
        return None
    if isinstance(space_or_section, LatentSpace):
        return getattr(space_or_section, "normalization", None)
    d = space_or_section.to_dict() if hasattr(space_or_section, "to_dict") else dict(space_or_section)
    if "shift" in d:
        return LatentNormalization.from_dict(d)
    return LatentNormalization.from_dict(d["normalization"]) if d.get("normalization") else None


def check_same_normalization(a: LatentNormalization | None, b: LatentNormalization | None,
                             a_name: str, b_name: str, rtol: float = 1e-6) -> None:
    """Raise a ValueError when two normalisations differ (None counts as the identity)."""
    channels = (a or b).channels if (a or b) else 0
    a = a or LatentNormalization.identity(channels)
    b = b or LatentNormalization.identity(channels)
    same = (a.channels == b.channels
            and np.allclose(a.shift, b.shift, rtol=rtol, atol=rtol)
            and np.allclose(a.scale, b.scale, rtol=rtol, atol=rtol))
    if not same:
        summary = lambda n: (f"shift mean {np.mean(n.shift):+.4f}, scale mean {np.mean(n.scale):.4f}"
                             f" over {n.channels} channels")
        raise ValueError(
            f"latent normalization mismatch: {a_name} has {summary(a)}, {b_name} has "
            f"{summary(b)}. A model only understands latents normalised as in its training "
            "data: re-ingest the store with the model's normalization, or train a new model")


class NormalizedSpace(LatentSpace):
    """A latent space whose latents are `base`'s, normalised by `normalization` (see the module
    docstring): `encode = normalize(base.encode)`, `decode = base.decode(denormalize)`."""

    def __init__(self, base: LatentSpace, normalization: LatentNormalization):
        if isinstance(base, NormalizedSpace):  # normalising twice is never meant
            base = base.base
        if normalization.channels != base.channels:
            raise ValueError(f"latent normalization has {normalization.channels} channels, the "
                             f"latent space has {base.channels}")
        self.base, self.normalization = base, normalization
        self.downsample, self.channels = base.downsample, base.channels

    def encode(self, frames_NHW3, *, seed=None):
        return self.normalization.normalize(self.base.encode(frames_NHW3, seed=seed))

    def decode(self, latents_NhwC):
        return self.base.decode(self.normalization.denormalize(latents_NhwC))

    def check_frames(self, frames_NHW3, what="frames"):
        self.base.check_frames(frames_NHW3, what)


def raw_space(space: LatentSpace) -> LatentSpace:
    """The space under any normalisation."""
    return space.base if isinstance(space, NormalizedSpace) else space


def with_normalization(space: LatentSpace, normalization: LatentNormalization | None) -> LatentSpace:
    """`space` (its raw part) normalised by `normalization`; None gives the raw space."""
    base = raw_space(space)
    return base if normalization is None else NormalizedSpace(base, normalization)


class AutoencoderKLSpace(LatentSpace):
    """A LatentSpace over an `AutoencoderKL`: latents are `(z - shift_factor) * scaling_factor`.

    Frames go through the VAE in batches of `batch_size` (the last batch is zero-padded so one compiled
    shape serves a whole video) to bound memory on long videos. `dtype=jnp.bfloat16` casts weights and
    activations (GroupNorm statistics and attention logits stay float32); outputs are float32 regardless.
    jax and flax are imported on construction, so the other spaces stay free of them.
    """

    def __init__(self, vae: AutoencoderKL, *, batch_size: int = 8, dtype="float32",
                 scaling_factor: float | None = None, shift_factor: float | None = None):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        cfg = vae.config
        self.vae, self.batch_size, self.dtype = vae, int(batch_size), jnp.dtype(dtype)
        self.downsample, self.channels = cfg.downsample, cfg.latent_channels
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        shift = cfg.shift_factor if shift_factor is None else shift_factor
        self.shift_factor = float(shift or 0.0)
        graphdef, state = nnx.split(vae)
        state = jax.tree.map(lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
        self._graphdef, self._state = graphdef, state

    @classmethod
    def from_pretrained(cls, path_or_repo: str, *, subfolder: str | None = None, **kw) -> "AutoencoderKLSpace":
        from vgpt_jax.vae.autoencoder_kl import load_autoencoder_kl

        return cls(load_autoencoder_kl(path_or_repo, subfolder=subfolder), **kw)

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        n, b = x.shape[0], self.batch_size
        outs = []
        for i, start in enumerate(range(0, n, b)):
            chunk = x[start:start + b]
            k = chunk.shape[0]
            if k < b and n > b:  # pad so the tail reuses the compiled shape
                chunk = np.concatenate([chunk, np.zeros((b - k,) + chunk.shape[1:], chunk.dtype)])
            outs.append(np.asarray(fn(i, chunk))[:k])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def encode(self, frames_NHW3, *, seed=None):
        """uint8 `[N, H, W, 3]` -> float32 `[N, H/d, W/d, C]`; seed None = posterior mean, else a sample."""
        import jax

        self.check_frames(frames_NHW3)
        x = np.asarray(frames_NHW3, np.uint8)
        base = jax.random.key(0 if seed is None else seed)
        encode_batch = vae_batch_fns()[0]
        return self._batched(lambda i, c: encode_batch(
            self._graphdef, self._state, c, jax.random.fold_in(base, i), self.scaling_factor, self.shift_factor,
            self.dtype, 0.0 if seed is None else 1.0), x)

    def decode(self, latents_NhwC):
        """float `[N, h, w, C]` -> uint8 `[N, h*d, w*d, 3]`."""
        z = np.asarray(latents_NhwC, np.float32)
        if z.ndim != 4 or z.shape[-1] != self.channels:
            raise ValueError(f"latents: expected [N, h, w, {self.channels}], got {z.shape}")
        decode_batch = vae_batch_fns()[1]
        return self._batched(lambda i, c: decode_batch(
            self._graphdef, self._state, c, self.scaling_factor, self.shift_factor, self.dtype), z)

    def save_pretrained(self, folder: str) -> None:
        self.vae.save_pretrained(folder)


@functools.cache
def vae_batch_fns():
    """`(encode_batch, decode_batch)`: the jitted VAE calls of `AutoencoderKLSpace`, built once per
    process and keyed on the (static) graphdef, so every space over the same architecture and batch
    shape shares one compilation (training builds several spaces: untrained, trained, ...).

    `encode_batch(graphdef, state, x_u8, key, scale, shift, dtype, noise_scale)` -> scaled latents;
    `decode_batch(graphdef, state, latents, scale, shift, dtype)` -> uint8 frames.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vgpt_jax import noise

    @functools.partial(jax.jit, static_argnums=(0, 6))
    def encode_batch(graphdef, state, x_u8, key, scale, shift, dtype, noise_scale):
        m = nnx.merge(graphdef, state)
        x = (x_u8.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)
        mean, logvar = m.encode_moments(x)
        # noise_scale 0 (mean) or 1 (sample) is traced, so both modes share one compilation.
        eps = noise.normal(key, mean.shape, jnp.float32)
        z = mean.astype(jnp.float32) + noise_scale * jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps
        return (z - shift) * scale

    @functools.partial(jax.jit, static_argnums=(0, 5))
    def decode_batch(graphdef, state, lat, scale, shift, dtype):
        m = nnx.merge(graphdef, state)
        x = m.decode((lat / scale + shift).astype(dtype)).astype(jnp.float32)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return encode_batch, decode_batch


_SPACE_KEYS = {
    "space_to_depth": {"kind", "downsample", "normalization"},
    "autoencoder_kl": {"kind", "path", "subfolder", "batch_size", "dtype", "scaling_factor", "shift_factor",
                       "normalization"},
}


def make_latent_space(config) -> LatentSpace:
    """The one latent-space factory: a LatentSpace is returned as is; a string is a command-line
    spec (`space_to_depth:<d>`, or a diffusers AutoencoderKL folder or hub id); else a config
    mapping (dict or ConfigDict):

    `{"kind": "space_to_depth", "downsample": 2}` or
    `{"kind": "autoencoder_kl", "path": "<diffusers folder or hub id>", "subfolder": None, "batch_size": 8,
      "dtype": "float32" | "bfloat16", "scaling_factor": None, "shift_factor": None}` (None = from config.json).
    Either may carry `"normalization": {"shift": [C floats], "scale": [C floats]}` (see
    `LatentNormalization`), which wraps the space in a `NormalizedSpace`.
    """
    if isinstance(config, LatentSpace):
        return config
    if isinstance(config, str):
        if config.startswith("space_to_depth:"):
            return SpaceToDepth(int(config.split(":", 1)[1]))
        if not (os.path.isdir(config) or _HUB_ID.fullmatch(config)):
            raise ValueError(f"latent space {config!r}: expected 'space_to_depth:<d>', a VAE "
                             "folder, or a hub id 'owner/name'")
        config = {"kind": "autoencoder_kl", "path": config}
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    kind = cfg.get("kind", "space_to_depth")
    if kind not in _SPACE_KEYS:
        raise ValueError(f"latent space kind {kind!r} unknown; expected one of {sorted(_SPACE_KEYS)}")
    extra = sorted(set(cfg) - _SPACE_KEYS[kind])
    if extra:
        raise ValueError(f"latent space {kind!r}: unknown option(s) {extra}; allowed {sorted(_SPACE_KEYS[kind])}")
    normalization = normalization_of(cfg)
    if kind == "space_to_depth":
        return with_normalization(SpaceToDepth(cfg.get("downsample", 1)), normalization)
    if not cfg.get("path"):
        raise ValueError("latent space 'autoencoder_kl' needs 'path' (a diffusers VAE folder or hub repo id)")
    return with_normalization(AutoencoderKLSpace.from_pretrained(
        cfg["path"], subfolder=cfg.get("subfolder"), batch_size=cfg.get("batch_size", 8),
        dtype=cfg.get("dtype", "float32"), scaling_factor=cfg.get("scaling_factor"),
        shift_factor=cfg.get("shift_factor")), normalization)
