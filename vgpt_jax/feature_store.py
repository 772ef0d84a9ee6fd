"""A resumable npz store of per-video features (written by `vgpt features`).

    DIR/manifest.json   settings, video names, chunk size, feature keys
    DIR/part-00000.npz  one chunk of videos: `names` [n] and every key's [n, D]
    DIR/features.npz    all chunks merged, written once every chunk is there

Each chunk is written atomically, so an interrupted run resumes at the first missing chunk;
a run whose settings differ from the manifest's is refused (its chunks would not be
comparable) unless it overwrites. Keys name what a column block is, e.g. `layer2.mean`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from vgpt_jax.data.store import atomic_write

MANIFEST, MERGED = "manifest.json", "features.npz"


def _part(directory: str, index: int) -> str:
    return os.path.join(directory, f"part-{index:05d}.npz")


def _atomic_npz(path: str, arrays: dict) -> None:
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


class FeatureWriter:
    """Chunks of `chunk` videos, in the order of `names`."""

    def __init__(self, directory: str, names, settings: dict, chunk: int = 64,
                 overwrite: bool = False):
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: must be >= 1")
        self.directory, self.names, self.chunk = directory, [str(n) for n in names], chunk
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature store: video names must be unique")
        manifest = {"settings": settings, "names": self.names, "chunk": chunk}
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path) and not overwrite:
            with open(path) as f:
                old = json.load(f)
            if {k: old.get(k) for k in manifest} != json.loads(json.dumps(manifest)):
                changed = sorted(k for k in settings if old.get("settings", {}).get(k)
                                 != json.loads(json.dumps(settings))[k])
                raise ValueError(f"{directory!r} holds features of other settings (differ: "
                                 f"{changed or 'videos or chunk size'}); pass --overwrite or "
                                 "another --out")
        elif overwrite and os.path.isdir(directory):
            for f in os.listdir(directory):  # only the store's own files: --out may hold others
                if f == MERGED or (f.startswith("part-") and f.endswith(".npz")):
                    os.remove(os.path.join(directory, f))
        os.makedirs(directory, exist_ok=True)
        with atomic_write(path) as f:
            json.dump(manifest, f, indent=1)

    def pending(self) -> list[tuple[int, int, int]]:
        """(chunk index, first video, end) of every chunk not yet written."""
        return [(i, lo, min(lo + self.chunk, len(self.names)))
                for i, lo in enumerate(range(0, len(self.names), self.chunk))
                if not os.path.exists(_part(self.directory, i))]

    def write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        lo = index * self.chunk
        names = self.names[lo:lo + self.chunk]
        for k, v in arrays.items():
            if len(v) != len(names):
                raise ValueError(f"chunk {index}: {k} has {len(v)} rows for {len(names)} videos")
        _atomic_npz(_part(self.directory, index), {"names": np.asarray(names), **arrays})

    def finish(self) -> str:
        """Merge the chunks into `features.npz` (every chunk must be written)."""
        if self.pending():
            raise ValueError(f"{len(self.pending())} chunk(s) still missing")
        path = os.path.join(self.directory, MERGED)
        _atomic_npz(path, dict(zip(*_merge_parts(self.directory))))
        return path


def _merge_parts(directory: str):
    parts = sorted(f for f in os.listdir(directory) if f.startswith("part-") and f.endswith(".npz")
                   and ".tmp" not in f)
    loaded = [dict(np.load(os.path.join(directory, p))) for p in parts]
    keys = list(loaded[0]) if loaded else ["names"]
    return keys, [np.concatenate([d[k] for d in loaded]) for k in keys]


def load(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(names [N], {key: float [N, D]}) from a store folder or its features.npz."""
    if os.path.isdir(path):
        merged = os.path.join(path, MERGED)
        if not os.path.exists(merged):
            raise ValueError(f"features {path!r}: no {MERGED} (the run that writes it has not "
                             "finished; rerun `vgpt features` with the same options to resume)")
        path = merged
    if not os.path.isfile(path):
        raise ValueError(f"features {path!r}: no such file or folder")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if "names" not in arrays:
        raise ValueError(f"features {path!r}: no 'names' array (not a `vgpt features` store)")
    names = arrays.pop("names").astype(str)
    return names, arrays


def read_settings(path: str) -> dict:
    """The manifest's settings of a store folder (or of the folder holding features.npz)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest):
        return {}
    with open(manifest) as f:
        return json.load(f).get("settings", {})
