"""grain input pipeline over a random-access latent source: frame sampling, clip partitions,
per-process rows, worker prefetch, and global arrays.

The source is anything with `__len__` and `__getitem__(i) -> dict(latents float32 [T, h, w, C],
fps, source, num_frames)` (`vgpt_jax.data.store.LatentStore`, or an in-memory list in tests).

Determinism. Element i of the global stream (a seeded shuffle of the eligible videos, repeated
over epochs with a fresh order each epoch) is a pure function of (seed, i): grain's `random_map`
seeds each element's generator from the dataset seed and the element index. Global batch k is
elements [k * B, (k + 1) * B); a process reads only the rows its devices hold (from the batch
sharding), so the global batch, and hence training, is the same for any process count. The
iterator's state is its next batch index (grain checkpoint handler).

Frame sampling (as the official data loader): N frames at an integer stride s from a random start;
s is fixed (stride_min == stride_max) or drawn per sample from [stride_min, min(stride_max,
floor((T - 1) / (N - 1)))]. Videos shorter than (N - 1) * stride_min + 1 frames are dropped
when the pipeline is built: nothing to drop when the store manifest's `min_frames` suffices,
else lengths come from the source's `frame_counts()` if it has one, else from reading each
record once (slow on a large store).
"""
from __future__ import annotations

import logging

import grain
import jax
import numpy as np

from vgpt_jax import layout as layout_lib
from vgpt_jax.config import DataConfig

log = logging.getLogger(__name__)


def min_video_frames(data_cfg) -> int:
    d = DataConfig.from_config(data_cfg)
    return (d.num_frames - 1) * d.stride_min + 1


def sample_frame_indices(t: int, data_cfg, rng: np.random.Generator) -> np.ndarray:
    """The indices [N] of N evenly strided frames of a T-frame video, from a random start."""
    d = DataConfig.from_config(data_cfg)
    n = d.num_frames
    if n == 1:
        return np.asarray([rng.integers(0, t)])
    lo, hi = d.stride_min, min(d.stride_max, (t - 1) // (n - 1))
    if hi < lo:
        raise ValueError(f"video of {t} frames is too short for {n} frames at stride {lo}")
    stride = lo if hi == lo else int(rng.integers(lo, hi + 1))
    span = (n - 1) * stride + 1
    start = int(rng.integers(0, t - span + 1))
    return np.arange(start, start + span, stride)


class _Subset:
    """A picklable view of `source` restricted to `indices` (the eligible videos)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def frame_counts(source) -> np.ndarray:
    if hasattr(source, "frame_counts"):
        return np.asarray(source.frame_counts(), np.int64)
    return np.asarray([source[i]["latents"].shape[0] for i in range(len(source))], np.int64)


def eligible_indices(source, data_cfg, name: str) -> np.ndarray:
    need = min_video_frames(data_cfg)
    manifest = getattr(source, "manifest", None)
    if isinstance(manifest, dict) and manifest.get("latent_shape", {}).get("min_frames", 0) >= need:
        return np.arange(len(source))  # a store's manifest says no video is too short
    counts = frame_counts(source)
    keep = np.nonzero(counts >= need)[0]
    if len(keep) < len(counts):
        log.info("%s: dropping %d of %d videos shorter than %d frames", name,
                 len(counts) - len(keep), len(counts), need)
    if not len(keep):
        raise ValueError(f"{name}: none of its {len(counts)} videos has the {need} frames that "
                         f"data.num_frames={data_cfg.num_frames} at data.stride_min="
                         f"{data_cfg.stride_min} needs (longest: {counts.max(initial=0)})")
    return keep


class _Rows(grain.MapDataset):
    """Local element j -> global element (j // n) * B + lo + j % n: this process's rows
    [lo, lo + n) of every global batch of B."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, lo: int, n: int):
        super().__init__(parent)
        self._b, self._lo, self._n = global_batch, lo, n

    def __len__(self):
        return (len(self._parent) // self._b) * self._n

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        step, r = divmod(int(j), self._n)
        return self._parent[step * self._b + self._lo + r]


class _Sample:
    """grain random map: a video -> {latents [N, h, w, C] float32, clip_ids [N] int32}, and the
    conditions the model needs from the record's `extra` (`conditioning.record_conditions`):
    class_id [] int32, actions [N, A] float32 (the sampled frames' actions)."""

    def __init__(self, data_cfg: DataConfig, latent_hwc: tuple[int, ...], name: str,
                 conditions=None):
        self.data_cfg, self.latent_hwc, self.name = data_cfg, tuple(latent_hwc), name
        self.conditions = conditions

    def __call__(self, record, rng: np.random.Generator):
        latents = np.asarray(record["latents"], np.float32)
        if latents.shape[1:] != self.latent_hwc:
            raise ValueError(f"{self.name}: video {record.get('source', '?')!r} has latents of "
                             f"shape {latents.shape[1:]}, but the batch needs {self.latent_hwc} "
                             "(all videos of a run must share one latent size)")
        index = sample_frame_indices(latents.shape[0], self.data_cfg, rng)
        clip_ids = layout_lib.sample_clip_ids(rng, len(index), self.data_cfg.clip_mode)
        out = {"latents": latents[index], "clip_ids": clip_ids}
        if self.conditions is not None and self.conditions.enabled:
            from vgpt_jax import conditioning
            out.update(conditioning.record_conditions(record, self.conditions, index, self.name))
        return out


def process_rows(sharding, global_batch: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of a [B, ...] batch that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    lo, hi = min(starts), max(stops)
    held = sum(len(range(s, e)) for s, e in sorted(set(zip(starts, stops))))
    if held != hi - lo:
        raise ValueError(f"this process's batch rows {sorted(set(zip(starts, stops)))} are not "
                         "contiguous; use a mesh whose batch axes follow process boundaries")
    return lo, hi


def make_dataset(source, data_cfg, *, rows: tuple[int, int] | None = None,
                 name: str = "data source", conditions=None) -> grain.IterDataset:
    """Batches {latents [n, N, h, w, C], clip_ids [n, N]} of this process's rows [lo, hi) of each
    global batch (all rows when `rows` is None); with `conditions` (the model's
    `ConditionConfig`), also class_id [n] / actions [n, N, A] as it needs. `data_cfg`: the
    `data` section (a ConfigDict or `config.DataConfig`)."""
    data_cfg = DataConfig.from_config(data_cfg)
    b = data_cfg.global_batch_size
    lo, hi = rows if rows is not None else (0, b)
    if len(source) == 0:
        raise ValueError(f"{name}: empty (no videos)")
    keep = eligible_indices(source, data_cfg, name)
    first = np.asarray(source[int(keep[0])]["latents"])
    ds = grain.MapDataset.source(_Subset(source, keep)).seed(data_cfg.seed)
    if data_cfg.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(None).random_map(_Sample(data_cfg, first.shape[1:], name, conditions))
    ds = _Rows(ds, b, lo, hi - lo).batch(hi - lo, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                              prefetch_buffer_size=data_cfg.prefetch_buffer_size))
    if data_cfg.worker_count > 0:
        _allow_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.worker_count, per_worker_buffer_size=data_cfg.worker_buffer_size))
    return it


def _allow_grain_workers():
    """grain's workers read absl flags; outside `absl.app.run` they are unparsed (absl
    raises UnparsedFlagAccessError), so mark them parsed with their defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def to_global(local_batch: dict, shardings: dict, global_batch: int) -> dict:
    """Host batch (this process's rows) -> global jax.Arrays; clip ids are validated first."""
    ids = local_batch["clip_ids"]
    layout_lib.check_clip_ids(ids, local_batch["latents"].shape[1], what="input batch clip_ids")
    return {k: jax.make_array_from_process_local_data(
        shardings[k], v, (global_batch,) + tuple(v.shape[1:])) for k, v in local_batch.items()}


def open_source(path: str):
    """The latent store at `path` (a clear error when it is missing or corrupt)."""
    from vgpt_jax.data.store import LatentStore
    if not path:
        raise ValueError("config: data.store is empty: give the latent store path (or pass "
                         "data_source= to train())")
    return LatentStore(path)
