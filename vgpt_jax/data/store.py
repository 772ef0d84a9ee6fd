"""Sharded latent store on ArrayRecord: one record per video, random access, grain-ready.

Layout of a store directory:
    manifest.json                              written last: its presence means "complete"
    latents-00000-of-000NN.array_record        NN shards, records assigned round-robin

Record format (self-describing, no pickle):
    b"VGLAT001"                 8-byte magic + format version
    uint32 little-endian        length L of the JSON header
    L bytes                     UTF-8 JSON header: shape [F, h, w, C], dtype ("float16" | "bfloat16"),
                                fps, source, num_frames, latent_space, crc32 (of the payload), extra
    payload                     raw latents, C order, little-endian, in `dtype`

Records are dealt round-robin (`"assignment": "round_robin"`, what `StoreWriter` writes), so
global index i lives in shard i % NN at position i // NN: the store keeps the order in which videos
were written, whatever the shard count. Folder ingestion (`data.ingest_shard`) writes each work
shard's records into their own files and lists them as `"assignment": "contiguous"`: the shards'
records one after the other, shard by shard, with any count per shard.

`normalization` is the `LatentNormalization` the served latents carry. By default the records
hold normalised latents; `"normalize_on_read": true` (folder ingestion, whose statistics are known
only once every shard is written) means the records hold the space's raw latents and the reader
normalises each one.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

MAGIC = b"VGLAT001"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ASSIGNMENTS = ("round_robin", "contiguous")
STORAGE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Each record is a whole video (~0.1-10 MB), so one record per chunk: random access reads exactly
# one chunk. Latents barely compress, so skip zstd and keep reads cheap on training hosts.
WRITER_OPTIONS = "group_size:1,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0"


class StoreError(Exception):
    """A latent store is missing, incomplete or corrupt. The message names the file."""


def shard_name(index: int, num_shards: int) -> str:
    return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def encode_record(latents: np.ndarray, *, fps: float, source: str, num_frames: int | None = None,
                  dtype: str = "float16", latent_space: str = "", extra: Mapping[str, Any] | None = None) -> bytes:
    """Serialize latents `[F, h, w, C]` (any float dtype) plus metadata into one record."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    latents = np.asarray(latents)
    if latents.ndim != 4:
        raise ValueError(f"{source}: latents must be [F, h, w, C], got shape {latents.shape}")
    payload = np.ascontiguousarray(latents.astype(STORAGE_DTYPES[dtype].newbyteorder("<"), copy=False)).tobytes()
    header = {
        "shape": [int(s) for s in latents.shape],
        "dtype": dtype,
        "fps": float(fps),
        "source": str(source),
        "num_frames": int(latents.shape[0] if num_frames is None else num_frames),
        "latent_space": latent_space,
        "crc32": zlib.crc32(payload),
        "extra": dict(extra or {}),
    }
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + payload


def decode_record(record: bytes, where: str = "record") -> tuple[dict, np.ndarray]:
    """Parse a record: `(header dict, latents float32 [F, h, w, C])`. Raises StoreError on corruption."""
    header, payload, dtype = _split_record(record, where)
    return header, np.frombuffer(payload, dtype=dtype).reshape(header["shape"]).astype(np.float32)


def read_header(record: bytes, where: str = "record") -> dict:
    """The header of a record, after checking its payload's size and checksum (no array decode)."""
    return _split_record(record, where)[0]


def _split_record(record: bytes, where: str):
    view = memoryview(record)
    if len(view) < 12 or bytes(view[:8]) != MAGIC:
        raise StoreError(f"{where}: not a latent record (bad magic {bytes(view[:8])!r})")
    (header_len,) = struct.unpack("<I", view[8:12])
    try:
        header = json.loads(bytes(view[12:12 + header_len]).decode("utf-8"))
        dtype = STORAGE_DTYPES[header["dtype"]].newbyteorder("<")
        shape = tuple(header["shape"])
    except Exception as e:
        raise StoreError(f"{where}: corrupt record header ({type(e).__name__}: {e})") from e
    payload = view[12 + header_len:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(payload) != expected:
        raise StoreError(f"{where}: payload has {len(payload)} bytes, header {shape} {header['dtype']} "
                         f"needs {expected} (record truncated or corrupt)")
    if zlib.crc32(payload) != header["crc32"]:
        raise StoreError(f"{where}: payload checksum mismatch (record corrupt)")
    return header, payload, dtype


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kw):
    """`with atomic_write(path, "wb") as f: ...`: write a temporary file next to `path`, synced,
    then rename it over `path`, so the file exists whole or not at all (the one atomic-write
    helper: stores, ingestion's per-video results, feature chunks, label files, an export's
    config.json and the training metrics log)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, mode, **open_kw) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: str, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def make_manifest(shards: list[str], counts: list[int], shapes: list[list[int]], *, dtype: str,
                  latent_space: str, settings: Mapping[str, Any], normalization=None,
                  assignment: str = "round_robin", normalize_on_read: bool = False) -> dict:
    """The manifest of a store whose `shards` hold `counts` records of latent `shapes` `[F, h, w, C]`
    (one per record, in store order)."""
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"store assignment {assignment!r}: expected one of {ASSIGNMENTS}")
    shapes = np.array(shapes, dtype=np.int64).reshape(-1, 4)
    manifest = {
        "format": "vgpt_jax.latent_store",
        "format_version": FORMAT_VERSION,
        "record_format": "VGLAT001 + uint32 header length + JSON header + raw little-endian latents",
        "shards": list(shards),
        "shard_num_records": [int(c) for c in counts],
        # round_robin: record i -> shard i % num_shards, position i // num_shards;
        # contiguous: the shards' records one after the other
        "assignment": assignment,
        "num_videos": int(sum(counts)),
        "storage_dtype": dtype,
        "latent_space": latent_space,
        "normalization": normalization.to_dict() if normalization else None,
        "latent_shape": {  # [F, h, w, C]; F and h, w vary per video
            "channels": sorted({int(c) for c in shapes[:, 3]}),
            "height": sorted({int(h) for h in shapes[:, 1]}),
            "width": sorted({int(w) for w in shapes[:, 2]}),
            "min_frames": int(shapes[:, 0].min()) if len(shapes) else 0,
            "max_frames": int(shapes[:, 0].max()) if len(shapes) else 0,
            "total_frames": int(shapes[:, 0].sum()) if len(shapes) else 0,
        },
        "settings": dict(settings),
    }
    if normalize_on_read and normalization:
        manifest["normalize_on_read"] = True
    return manifest


class StoreWriter:
    """Stream records into `num_shards` shards; `close()` renames shards into place, then writes
    the manifest. Until then the directory holds only `.tmp` shards, so readers never see a
    half-written store, and a crashed writer leaves nothing that looks complete.

    Records are either ready-made bytes from `encode_record` (`add_encoded`) or arrays (`add`).
    """

    def __init__(self, path: str, *, num_shards: int = 1, dtype: str = "float16", latent_space: str = "",
                 settings: Mapping[str, Any] | None = None, overwrite: bool = False, normalization=None):
        from array_record.python.array_record_module import ArrayRecordWriter

        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        manifest_path = os.path.join(self.path, MANIFEST)
        if os.path.exists(manifest_path):
            if not overwrite:
                raise StoreError(f"{manifest_path}: a complete store already exists (pass overwrite=True)")
            os.remove(manifest_path)  # first, so a crash below never leaves a stale "complete" marker
        self.num_shards, self.dtype, self.latent_space = num_shards, dtype, latent_space
        self.settings = dict(settings or {})
        # A vae.latent_space.LatentNormalization the latents were normalised with, or None.
        self.normalization = normalization
        self._names = [shard_name(i, num_shards) for i in range(num_shards)]
        self._tmp_paths = [os.path.join(self.path, n + ".tmp") for n in self._names]
        self._writers = [ArrayRecordWriter(p, WRITER_OPTIONS) for p in self._tmp_paths]
        self._counts = [0] * num_shards
        self._shapes: list[list[int]] = []
        self._num_records = 0
        self._closed = False

    def add(self, latents: np.ndarray, *, fps: float, source: str, num_frames: int | None = None,
            extra: Mapping[str, Any] | None = None) -> None:
        """Append one video's latents `[F, h, w, C]`."""
        self.add_encoded(encode_record(latents, fps=fps, source=source, num_frames=num_frames, dtype=self.dtype,
                                       latent_space=self.latent_space, extra=extra))

    def add_encoded(self, record: bytes) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed")
        header = read_header(record, where=f"{self.path} (record {self._num_records} being written)")
        if header["dtype"] != self.dtype:
            raise ValueError(f"record dtype {header['dtype']} != store dtype {self.dtype}")
        shard = self._num_records % self.num_shards
        self._writers[shard].write(record)
        self._counts[shard] += 1
        self._shapes.append(header["shape"])
        self._num_records += 1

    def close(self) -> dict:
        """Finalize; returns the manifest."""
        if self._closed:
            raise StoreError(f"{self.path}: writer already closed")
        self._closed = True
        for writer in self._writers:
            writer.close()
        for tmp, name in zip(self._tmp_paths, self._names):
            os.replace(tmp, os.path.join(self.path, name))
        manifest = make_manifest(self._names, self._counts, self._shapes, dtype=self.dtype,
                                 latent_space=self.latent_space, settings=self.settings,
                                 normalization=self.normalization)
        _atomic_write_json(os.path.join(self.path, MANIFEST), manifest)
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # leave no half store behind: drop the temporaries
            for writer in self._writers:
                writer.close()
            for tmp in self._tmp_paths:
                if os.path.exists(tmp):
                    os.remove(tmp)


def write_store(path: str, records: Iterable[Mapping[str, Any]], *, num_shards: int = 1, dtype: str = "float16",
                latent_space: str = "", settings: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> "LatentStore":
    """Write dicts `{latents [F,h,w,C], fps, source, num_frames?}` to a store and open it."""
    with StoreWriter(path, num_shards=num_shards, dtype=dtype, latent_space=latent_space, settings=settings,
                     overwrite=overwrite) as writer:
        for r in records:
            writer.add(r["latents"], fps=r["fps"], source=r["source"], num_frames=r.get("num_frames"),
                       extra=r.get("extra"))
    return LatentStore(path)


class LatentStore:
    """Random-access reader: `store[i] -> dict(latents float32 [F,h,w,C], fps, source, num_frames)`.

    A grain random-access data source (`grain.MapDataset.source(store)`). Picklable: shard readers
    are opened lazily per process, and each shard read is serialized by a lock because a Riegeli
    reader is not safe to share between grain's reader threads.
    """

    def __init__(self, path: str, *, verify_shards: bool = True):
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isdir(self.path):
            raise StoreError(f"{self.path}: latent store directory does not exist")
        if not os.path.exists(manifest_path):
            raise StoreError(f"{manifest_path}: manifest missing (the store was never finalized, or this is "
                             f"not a latent store)")
        try:
            with open(manifest_path) as f:
                self.manifest = json.load(f)
            self.shards = list(self.manifest["shards"])
            self.shard_counts = [int(c) for c in self.manifest["shard_num_records"]]
        except Exception as e:
            raise StoreError(f"{manifest_path}: unreadable manifest ({type(e).__name__}: {e})") from e
        if sum(self.shard_counts) != int(self.manifest.get("num_videos", sum(self.shard_counts))):
            raise StoreError(f"{manifest_path}: per-shard counts {self.shard_counts} do not add up to "
                             f"num_videos={self.manifest['num_videos']}")
        for name in self.shards:
            if not os.path.exists(os.path.join(self.path, name)):
                raise StoreError(f"{os.path.join(self.path, name)}: shard missing (listed in {manifest_path})")
        total, num_shards = sum(self.shard_counts), len(self.shards)
        self.assignment = self.manifest.get("assignment", "round_robin")
        if self.assignment not in ASSIGNMENTS:
            raise StoreError(f"{manifest_path}: unknown assignment {self.assignment!r} (expected one of "
                             f"{ASSIGNMENTS})")
        expected = [len(range(s, total, num_shards)) for s in range(num_shards)]
        if self.assignment == "round_robin" and self.shard_counts != expected:
            raise StoreError(f"{manifest_path}: per-shard counts {self.shard_counts} are not a round-robin "
                             f"split of {total} records")
        self._starts = np.cumsum([0] + self.shard_counts).tolist()  # contiguous: shard s starts here
        self._on_read = self.normalization if self.manifest.get("normalize_on_read") else None
        self._num_records = total
        self._readers: dict[int, Any] = {}
        self._locks = [threading.Lock() for _ in self.shards]
        self._open_lock = threading.Lock()
        if verify_shards:
            for s in range(len(self.shards)):
                self._reader(s)

    @property
    def normalization(self):
        """The `LatentNormalization` the stored latents carry (None: the space's raw latents)."""
        from vgpt_jax.vae.latent_space import normalization_of
        return normalization_of(self.manifest)

    def _shard_path(self, shard: int) -> str:
        return os.path.join(self.path, self.shards[shard])

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is not None:
            return reader
        from array_record.python.array_record_module import ArrayRecordReader

        with self._open_lock:
            if shard in self._readers:
                return self._readers[shard]
            path = self._shard_path(shard)
            if not os.path.exists(path):
                raise StoreError(f"{path}: shard missing")
            try:
                reader = ArrayRecordReader(path, READER_OPTIONS)
                ok = reader.ok()
                count = reader.num_records() if ok else -1
            except Exception as e:
                raise StoreError(f"{path}: corrupt shard ({type(e).__name__}: {e})") from e
            if not ok:
                raise StoreError(f"{path}: corrupt shard (ArrayRecord could not read its index)")
            if count != self.shard_counts[shard]:
                raise StoreError(f"{path}: shard holds {count} records but {MANIFEST} says "
                                 f"{self.shard_counts[shard]}")
            self._readers[shard] = reader
            return reader

    def __len__(self) -> int:
        return self._num_records

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (shard, index within shard)."""
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.path}: index {index} out of range for {n} videos")
        if self.assignment == "contiguous":
            shard = bisect.bisect_right(self._starts, index) - 1
            return shard, index - self._starts[shard]
        return index % len(self.shards), index // len(self.shards)

    def read_raw(self, index: int) -> tuple[dict, np.ndarray]:
        """`(full record header, latents float32 [F, h, w, C])`, normalised by the manifest's
        `normalization` (on read, for a store that holds raw latents)."""
        shard, local = self.locate(index)
        where = f"{self._shard_path(shard)} (record {local})"
        reader = self._reader(shard)
        try:
            with self._locks[shard]:
                (record,) = reader.read([local])
        except Exception as e:
            raise StoreError(f"{where}: corrupt shard ({type(e).__name__}: {e})") from e
        header, latents = decode_record(record, where)
        return header, latents if self._on_read is None else self._on_read.normalize(latents)

    def __getitem__(self, index: int) -> dict:
        header, latents = self.read_raw(index)
        return {"latents": latents, "fps": float(header["fps"]), "source": header["source"],
                "num_frames": int(header["num_frames"]), "extra": header.get("extra", {})}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"], state["_locks"], state["_open_lock"] = {}, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._locks = [threading.Lock() for _ in self.shards]
        self._open_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"LatentStore({self.path!r}, videos={len(self)}, shards={len(self.shards)}, "
                f"latent_space={self.manifest.get('latent_space')!r})")
