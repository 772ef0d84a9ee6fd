"""One shard of folder ingestion, engine-free, and the merge that turns finished shards into a store.

Every engine (the local process pool, `vgpt prepare --distributed`, the Beam pipeline) drives
the same three steps, so the same folder and settings give the same store, record for record:

1. `plan_shards`: the folder's sorted file list, cut into `config.num_shards` consecutive work
   shards (sizes differ by at most one video). Worker and process counts play no part.
2. `write_shard` (or, for an engine that schedules videos itself, `Journal` + `finish_from_journal`): a shard's
   videos -> one ArrayRecord file per output frame size, `latents-SSSSS-of-NNNNN-WxH.array_record`,
   records in file-list order, then the shard manifest `latents-SSSSS-of-NNNNN.json` (its records,
   its bad files, latent statistics), written last. Files are written to temporaries and renamed,
   so a shard is finished exactly when its manifest exists: a finished shard is skipped, a
   half-written one is redone. Every video's result is journalled as it is made (`Journal`:
   `_work/<key>.rec` or `.skip.json`), so an interrupted shard resumes video by video and a
   preempted worker loses at most the videos it had in flight.
3. `merge_shards`: reads the shard manifests in shard order and writes `ingest_summary.json`, then
   `manifest.json` (last: its presence means "complete"). Nothing is copied: the store lists the
   part files (`"assignment": "contiguous"`). A store holds one frame size: the size most videos
   come out at is kept and the others are reported as `size_mismatch` (or all kept with
   `mixed_sizes`), which is why each shard writes one file per size.

Latent normalisation (`config.normalize`) is measured from per-shard sufficient statistics:
each shard manifest holds, per frame size, the frame count and the per-channel mean and sum of
squared deviations (float64) of its stored raw latents, accumulated video by video in file-list
order; the merge combines the kept sizes' statistics shard by shard in shard order (Chan et al.'s
pairwise update). The statistics are therefore those of every stored frame and identical
whatever the engine or worker count. Records keep the raw latents and the manifest says
`normalize_on_read`, so `LatentStore` serves normalised latents without a second pass over the
data.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from vgpt_jax.data import store as store_lib
from vgpt_jax.data.ingest import (SIZE_MISMATCH, SKIP_KINDS, IngestConfig, describe_latent_space,
                                  encode_in_batches, find_videos)
from vgpt_jax.vae.latent_space import LatentNormalization, make_latent_space, raw_space

WORK_DIR = "_work"
SUMMARY = "ingest_summary.json"
SHARD_PREFIX = "latents-"
# Crash tests set this to slow ingestion down so a kill lands midway; never needed otherwise.
_DELAY_ENV = "VGPT_INGEST_DELAY_S"


@dataclasses.dataclass(frozen=True)
class ShardTask:
    index: int
    num_shards: int
    videos: tuple[str, ...]  # paths relative to the input folder, in file-list order

    @property
    def stem(self) -> str:
        return f"{SHARD_PREFIX}{self.index:05d}-of-{self.num_shards:05d}"

    def part_name(self, size_hw: Sequence[int]) -> str:
        return f"{self.stem}-{size_hw[1]}x{size_hw[0]}.array_record"


@dataclasses.dataclass(frozen=True)
class IngestJob:
    """What every shard of one ingestion shares, validated once (`make_job`). Picklable (Beam
    ships it to its workers) when `latent_space` is a spec string."""
    input_dir: str
    output: str
    latent_space: object        # a spec string (or LatentSpace) for `make_latent_space`
    config: IngestConfig
    description: str
    settings: dict

    def path(self, name: str) -> str:
        return os.path.join(self.output, name)

    def space(self):
        """The raw latent space (normalisation is measured and applied by the store)."""
        return raw_space(make_latent_space(self.latent_space))


def make_job(input_dir: str, output: str, latent_space, config: IngestConfig) -> IngestJob:
    """Check the input folder, the config and the latent space's geometry; one-line errors."""
    input_dir, output = os.path.abspath(os.fspath(input_dir)), os.path.abspath(os.fspath(output))
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    if config.num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {config.num_shards}")
    if config.dtype not in store_lib.STORAGE_DTYPES:
        raise ValueError(f"dtype {config.dtype!r}: expected one of {sorted(store_lib.STORAGE_DTYPES)}")
    space = make_latent_space(latent_space)
    if config.crop_multiple % space.downsample:
        raise ValueError(f"crop_multiple {config.crop_multiple} is not a multiple of the latent space's "
                         f"downsample {space.downsample}")
    if config.frame_size is not None and any(side % config.crop_multiple for side in config.frame_size):
        raise ValueError(f"frame_size (H, W) = {tuple(config.frame_size)} is not a multiple of "
                         f"crop_multiple {config.crop_multiple}")
    description = describe_latent_space(space, latent_space)
    fields = dataclasses.asdict(config)
    if not config.text_encoder:  # stores written before text conditions keep their settings
        fields = {k: v for k, v in fields.items() if k not in ("text_encoder", "text_tokens")}
    settings = {"config": fields, "latent_space": description,
                "downsample": int(space.downsample), "channels": int(space.channels)}
    return IngestJob(input_dir, output, latent_space, config, description, json.loads(json.dumps(settings)))


def start(input_dir: str, output: str, latent_space, config: IngestConfig, *,
          overwrite: bool = False) -> tuple[IngestJob, list[ShardTask], dict | None]:
    """A single-launcher engine's first step: `make_job`, `prepare_output`, `plan_shards` over
    the folder. Returns `(job, tasks, None)`, or `(job, [], summary)` when the store is already
    complete."""
    job = make_job(input_dir, output, latent_space, config)
    complete = prepare_output(job, overwrite=overwrite)
    if complete is not None:
        return job, [], complete
    return job, plan_shards(find_videos(job.input_dir), config.num_shards), None


def plan_shards(videos: Sequence[str], num_shards: int) -> list[ShardTask]:
    """Cut the sorted file list into `num_shards` consecutive runs (the first ones one longer)."""
    bounds = np.linspace(0, len(videos), num_shards + 1).round().astype(int)
    return [ShardTask(i, num_shards, tuple(videos[bounds[i]:bounds[i + 1]])) for i in range(num_shards)]


def file_list_digest(videos: Sequence[str]) -> bytes:
    """16 bytes naming a file list: processes of one job check they all listed the same files."""
    return hashlib.sha1("\0".join(videos).encode("utf-8")).digest()[:16]


# ----------------------------------------------------------------------------- output folder

def prepare_output(job: IngestJob, *, overwrite: bool = False) -> dict | None:
    """Make `job.output` ready for shards; run once per job, before any shard. Returns the summary
    of an already complete store with the same settings (nothing left to do), else None.
    Raises StoreError when a store or unfinished run with other settings is there."""
    manifest_path, summary_path = job.path(store_lib.MANIFEST), job.path(SUMMARY)
    work = job.path(WORK_DIR)
    if overwrite:
        for stale in (manifest_path, summary_path, *glob.glob(job.path(SHARD_PREFIX + "*"))):
            if os.path.exists(stale):
                os.remove(stale)
        shutil.rmtree(work, ignore_errors=True)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            existing = json.load(f).get("settings")
        if existing != job.settings:
            raise store_lib.StoreError(f"{manifest_path}: a store with different settings exists "
                                       f"(pass overwrite=True / --overwrite)")
        shutil.rmtree(work, ignore_errors=True)  # a crash after finalizing can leave it behind
        summary = {}
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        summary["already_complete"] = True
        return summary
    os.makedirs(work, exist_ok=True)
    settings_path = os.path.join(work, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            if json.load(f) != job.settings:
                raise store_lib.StoreError(f"{settings_path}: an unfinished run with different settings is in "
                                           f"{job.output} (rerun with the same settings, or pass --overwrite)")
    else:
        store_lib._atomic_write_json(settings_path, job.settings)
    return None


# ----------------------------------------------------------------------------- one shard

def encode_video(space, decoded: tuple, job: IngestJob) -> bytes:
    """An "ok" decode result -> its store record of raw latents `[T, h, w, C]` in `config.dtype`.
    `space` is anything with the latent space's `encode` (a device-sharded one included)."""
    _, rel, frames, fps, meta = decoded
    config = job.config
    if config.text_encoder and "caption" in meta:  # the encoder loads once per process
        from vgpt_jax import text_encoder
        encoder = text_encoder.load(config.text_encoder, config.text_tokens)
        meta = {**meta, **text_encoder.embed_extra(encoder, [meta["caption"]])[0]}
    latents = encode_in_batches(space, frames, config.encode_batch, store_lib.STORAGE_DTYPES[config.dtype])
    # fps of the *stored* frames: striding slows the clock (stride 4 at 30 fps -> 7.5 fps)
    return store_lib.encode_record(latents, fps=fps / config.frame_stride, source=rel, num_frames=len(frames),
                                   dtype=config.dtype, latent_space=job.description, extra=meta)


def _moments(latents: np.ndarray) -> dict:
    """Sufficient statistics of latents `[..., C]`: frame count, per-channel mean and sum of
    squared deviations, in float64."""
    z = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    mean = z.mean(0)
    return {"count": len(z), "mean": mean, "m2": ((z - mean) ** 2).sum(0)}


def _combine(a: dict | None, b: dict) -> dict:
    """Chan et al.'s pairwise update of two sets of moments (order fixed by the caller)."""
    if a is None:
        return b
    n = a["count"] + b["count"]
    delta = b["mean"] - a["mean"]
    return {"count": n, "mean": a["mean"] + delta * (b["count"] / n),
            "m2": a["m2"] + b["m2"] + delta ** 2 * (a["count"] * b["count"] / n)}


def finish_shard(job: IngestJob, task: ShardTask, result_of: Callable[[str], tuple]) -> dict:
    """Write a shard from its videos' results and return its manifest. `result_of(rel)` gives
    `("ok", record bytes)` or `("skip", kind, reason)` for every video of the task; records are
    read one at a time, so a shard never has to fit in memory."""
    from array_record.python.array_record_module import ArrayRecordWriter

    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # two attempts at one shard never collide
    writers, records, skipped, stats = {}, [], [], {}
    try:
        for rel in task.videos:
            result = result_of(rel)
            if result[0] == "skip":
                skipped.append({"file": rel, "kind": result[1], "reason": result[2]})
                continue
            record = result[1]
            header, latents = store_lib.decode_record(record, where=f"{task.stem}: {rel}")
            size = header["extra"]["frame_size"]
            # One file per frame size, so the merge can leave out the sizes it does not keep.
            name = task.stem + ".array_record" if job.config.mixed_sizes else task.part_name(size)
            if name not in writers:
                writers[name] = ArrayRecordWriter(job.path(name) + suffix, store_lib.WRITER_OPTIONS)
            writers[name].write(record)
            records.append({"source": rel, "part": name, "frame_size": size, "shape": header["shape"],
                            "num_frames": header["num_frames"]})
            if job.config.normalize != "none":
                stats[name] = _combine(stats.get(name), _moments(latents))
    finally:
        for writer in writers.values():
            writer.close()
    for name in writers:
        os.replace(job.path(name) + suffix, job.path(name))
    manifest = {"shard": task.index, "num_shards": task.num_shards, "videos": list(task.videos),
                "settings": job.settings, "records": records, "skipped": skipped,
                "parts": {name: sum(r["part"] == name for r in records) for name in sorted(writers)},
                "stats": {name: {"count": int(m["count"]), "mean": m["mean"].tolist(), "m2": m["m2"].tolist()}
                          for name, m in stats.items()}}
    store_lib._atomic_write_json(job.path(task.stem + ".json"), manifest)  # last: the shard is finished
    return manifest


class Journal:
    """The per-video results of unfinished shards, each committed atomically to `_work/`:
    `<key>.rec` (its record) or `<key>.skip.json` (why it was skipped). The key holds the file's
    path, size and mtime, so a file replaced between runs is ingested again, not reused."""

    def __init__(self, job: IngestJob):
        self.job, self.work = job, job.path(WORK_DIR)
        self._delay = float(os.environ.get(_DELAY_ENV, "0") or 0)

    def _key(self, rel: str) -> str:
        path = os.path.join(self.job.input_dir, rel)
        try:
            stat = os.stat(path)
        except OSError:  # a dangling symlink: key it by the link, and let decoding report it
            stat = os.lstat(path)
        digest = hashlib.sha1(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8")).hexdigest()[:16]
        readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(rel))[:48]
        return os.path.join(self.work, f"{digest}-{readable}")

    def has(self, rel: str) -> bool:
        key = self._key(rel)
        return os.path.exists(key + ".rec") or os.path.exists(key + ".skip.json")

    def commit(self, rel: str, result: tuple) -> None:
        """`result`: `("ok", record bytes)` or `("skip", kind, reason)`."""
        key = self._key(rel)
        if result[0] == "ok":
            with store_lib.atomic_write(key + ".rec", "wb") as f:
                f.write(result[1])
        else:
            with store_lib.atomic_write(key + ".skip.json", "wb") as f:
                f.write(json.dumps({"file": rel, "kind": result[1], "reason": result[2]}).encode())
        if self._delay:
            time.sleep(self._delay)

    def result(self, rel: str) -> tuple:
        key = self._key(rel)
        if os.path.exists(key + ".rec"):
            with open(key + ".rec", "rb") as f:
                return ("ok", f.read())
        with open(key + ".skip.json") as f:
            entry = json.load(f)
        return ("skip", entry["kind"], entry["reason"])

    def drop(self, rels) -> None:
        for rel in rels:
            key = self._key(rel)
            for name in (key + ".rec", key + ".skip.json"):
                if os.path.exists(name):
                    os.remove(name)


def finished(job: IngestJob, task: ShardTask) -> bool:
    """Whether the shard's manifest is there; StoreError when it was written with other settings."""
    path = job.path(task.stem + ".json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        if json.load(f)["settings"] != job.settings:
            raise store_lib.StoreError(f"{path}: a shard with different settings exists "
                                       f"(pass overwrite=True / --overwrite)")
    return True


def finish_from_journal(job: IngestJob, task: ShardTask) -> dict:
    """`finish_shard` from the journal, which every video of the task must be in; its entries
    are dropped after (the shard holds them now: the journal never doubles the store's size)."""
    journal = Journal(job)
    missing = [rel for rel in task.videos if not journal.has(rel)]
    if missing:
        raise store_lib.StoreError(f"{task.stem}: {len(missing)} video(s) have no result, e.g. {missing[0]}")
    manifest = finish_shard(job, task, journal.result)
    journal.drop(task.videos)
    return manifest


def write_shard(job: IngestJob, task: ShardTask, space, pool, on_video: Callable[[], None] | None = None) -> dict:
    """Ingest one shard: decode its videos through `pool` (`ingest_pool.DecodePool`), encode
    them with `space`, journal each, then `finish_from_journal`. Returns `{"resumed": videos
    found done, "processed": videos done now}`; a finished shard is skipped whole."""
    if finished(job, task):
        return {"resumed": len(task.videos), "processed": 0}
    journal = Journal(job)
    pending = [rel for rel in task.videos if not journal.has(rel)]
    for result in pool.decode([(os.path.join(job.input_dir, rel), rel) for rel in pending]):
        rel = result[1]
        journal.commit(rel, ("ok", encode_video(space, result, job)) if result[0] == "ok" else ("skip", *result[2:]))
        if on_video:
            on_video()
    finish_from_journal(job, task)
    return {"resumed": len(task.videos) - len(pending), "processed": len(pending)}


# ----------------------------------------------------------------------------- merge

def _size_mismatch(size, keep, count: int) -> str:
    return (f"its frames are {size[1]}x{size[0]} after resizing and cropping, but the other {count} "
            f"video(s) are {keep[1]}x{keep[0]} and a store holds one size; rerun with --frame-size "
            f"{keep[1]}x{keep[0]} to resize and crop every video to one size")


def normalization_from_moments(moments: dict, mode: str) -> LatentNormalization:
    """`LatentNormalization` ("shift" or "shift_scale") from combined moments; the scale is the
    population standard deviation, floored at 1e-6 as `LatentNormalization.measure` does."""
    shift = np.asarray(moments["mean"], np.float64)
    scale = np.ones_like(shift)
    if mode == "shift_scale":
        scale = np.maximum(np.sqrt(np.asarray(moments["m2"], np.float64) / moments["count"]), 1e-6)
    return LatentNormalization(tuple(float(v) for v in shift), tuple(float(v) for v in scale))


def merge_shards(job: IngestJob) -> dict:
    """Finished shard manifests -> `ingest_summary.json`, then the store's `manifest.json`; the
    journal and stale temporaries are removed. Returns the summary. Raises StoreError naming the
    first shard that is not finished."""
    num_shards = job.config.num_shards
    shards = []
    for index in range(num_shards):
        path = job.path(ShardTask(index, num_shards, ()).stem + ".json")
        if not os.path.exists(path):
            raise store_lib.StoreError(f"{path}: shard {index} of {num_shards} is not finished (rerun to "
                                       f"resume; finished shards are kept)")
        with open(path) as f:
            shards.append(json.load(f))
    records = [r for shard in shards for r in shard["records"]]
    counts = collections.Counter(tuple(r["frame_size"]) for r in records)
    keep = max(counts, key=lambda size: (counts[size], size)) if counts else None
    is_kept = lambda r: job.config.mixed_sizes or tuple(r["frame_size"]) == keep  # noqa: E731
    kept = [r for r in records if is_kept(r)]  # file-list order, which is store order
    skipped: dict[str, list] = {kind: [] for kind in SKIP_KINDS}
    for entry in sorted((e for shard in shards for e in shard["skipped"]), key=lambda e: e["file"]):
        skipped.setdefault(entry["kind"], []).append({"file": entry["file"], "reason": entry["reason"]})
    skipped[SIZE_MISMATCH] = [{"file": r["source"], "reason": _size_mismatch(r["frame_size"], keep, counts[keep])}
                              for r in records if not is_kept(r)]
    kept_parts = [(name, count) for shard in shards for name, count in shard["parts"].items()
                  if any(r["part"] == name and is_kept(r) for r in shard["records"])]

    normalization = None
    if job.config.normalize != "none" and kept:
        moments = None
        for shard in shards:  # shard order, then part order: fixed whatever the engine
            for name in sorted(shard["stats"]):
                if name in dict(kept_parts):
                    m = shard["stats"][name]
                    moments = _combine(moments, {"count": m["count"], "mean": np.asarray(m["mean"], np.float64),
                                                 "m2": np.asarray(m["m2"], np.float64)})
        normalization = normalization_from_moments(moments, job.config.normalize)

    manifest = store_lib.make_manifest([n for n, _ in kept_parts], [c for _, c in kept_parts],
                                       [r["shape"] for r in kept], dtype=job.config.dtype,
                                       latent_space=job.description, settings=job.settings,
                                       normalization=normalization, assignment="contiguous",
                                       normalize_on_read=True)
    total = sum(len(shard["videos"]) for shard in shards)
    summary = {"num_files": total, "num_ingested": len(kept), "ingested": [r["source"] for r in kept],
               "num_skipped": total - len(kept), "skipped": skipped,
               "total_frames": int(sum(r["num_frames"] for r in kept)),
               "input_dir": job.input_dir, "output": job.output}
    # Summary before manifest: a store that looks complete always has its summary.
    store_lib._atomic_write_json(job.path(SUMMARY), summary)
    store_lib._atomic_write_json(job.path(store_lib.MANIFEST), manifest)
    shutil.rmtree(job.path(WORK_DIR), ignore_errors=True)
    unkept = {name for shard in shards for name in shard["parts"]} - set(dict(kept_parts))
    for stale in [*glob.glob(job.path(SHARD_PREFIX + "*.tmp-*")), *map(job.path, unkept)]:
        if os.path.exists(stale):  # temporaries of killed attempts; the sizes the store does not keep
            os.remove(stale)
    return summary
