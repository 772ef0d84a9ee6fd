"""Encoding frames on this process's devices, the same way for every ingestion engine.

A VAE (`AutoencoderKLSpace`) encodes each batch of `encode_batch` frames jitted, with the batch
sharded over the process's local devices and the weights replicated on them; every batch is
zero-padded to one size, so a video costs no compile beyond its frame size's first. Spaces that
compute on the host (space-to-depth) are used as they are. All drivers encode through
`device_encoder`, so equal device counts run the same compiled program on the same batches.
"""
from __future__ import annotations

import numpy as np

from vgpt_jax.vae.latent_space import AutoencoderKLSpace


class LocalDeviceEncoder:
    """`encode(frames uint8 [N, H, W, 3]) -> float32 [N, H/d, W/d, C]` for an `AutoencoderKLSpace`,
    with the batch sharded over this process's devices and the weights replicated on them.

    Each call is zero-padded to `batch` frames rounded up to a multiple of the device count (the
    padding is dropped). It takes the posterior mean through the space's own jitted encode
    (`latent_space.vae_batch_fns`), so it computes what `space.encode(seed=None)` does.
    """

    def __init__(self, space, batch: int, devices=None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        self.space = space
        self.downsample, self.channels = space.downsample, space.channels
        mesh = Mesh(np.array(devices or jax.local_devices()), ("batch",))
        self._batch_sharding = NamedSharding(mesh, P("batch"))
        self._state = jax.device_put(space._state, NamedSharding(mesh, P()))
        self._key = jax.random.key(0)  # unused by the mean (noise scale 0), but an argument
        self._padded = -(-batch // mesh.size) * mesh.size

    def encode(self, frames_NHW3, *, seed=None):
        import jax

        from vgpt_jax.vae.latent_space import vae_batch_fns

        if seed is not None:
            raise ValueError("LocalDeviceEncoder takes the posterior mean only (seed=None)")
        self.space.check_frames(frames_NHW3)
        x = np.asarray(frames_NHW3, np.uint8)
        n = len(x)
        pad = -(-n // self._padded) * self._padded - n
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        z = vae_batch_fns()[0](self.space._graphdef, self._state, jax.device_put(x, self._batch_sharding), self._key,
                          self.space.scaling_factor, self.space.shift_factor, self.space.dtype, 0.0)
        return np.asarray(z)[:n]


def device_encoder(space, batch: int):
    """The encoder a process ingests with (see the module docstring); `batch` is
    `IngestConfig.encode_batch`, the frames per encode call."""
    if isinstance(space, AutoencoderKLSpace):
        return LocalDeviceEncoder(space, batch)
    return space
