"""Videos -> latent store: decode, resize, crop, stride, encode, write. Resumable and parallel.

Geometry follows Video-GPT: the longer side is resized to <= `max_image_size` (320) keeping the
aspect ratio (never upscaled), then both sides are center-cropped to multiples of `crop_multiple`
(16), so 1280x720 becomes 320x176. Sources with a side < `min_side` (128) or an aspect ratio >
`max_aspect` (4) are rejected, judged on the *source* resolution (a quality filter on the input).
`frame_size=(H, W)` instead resizes every video to cover H x W (up or down) and center-crops it
to exactly that size, the paper's fixed-size preprocessing.

A training store holds one frame size (a batch stacks its videos). When the kept videos come out
at different sizes, the most common size is kept and the others are skipped as `size_mismatch`,
with their size and the `--frame-size` that would keep them all; `mixed_sizes=True` keeps every
size (a store read one video at a time).

Resumability. Each finished video is committed on its own, atomically, to `<output>/_work/`:
its encoded store record (`<key>.rec`) or why it was skipped (`<key>.skip.json`). A rerun with the
same settings only processes videos without a journal entry. When every video has one, the shards
are written from the journal in sorted-path order, renamed into place, and `manifest.json` is
written last; so a crash at any point leaves either a resumable journal or a complete store, and an
interrupted-then-resumed run produces exactly the store of an uninterrupted one. The journal
briefly doubles the disk space of the latents; it is deleted once the store is complete.

Each record's `fps` is the rate of the *stored* frames (source fps / frame_stride); the source fps
and size are kept in the record header's `extra`. Latents are the encoder's deterministic output
(`seed=None`: the posterior mean for a VAE), so reruns and resumes are reproducible.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vgpt_jax.data import store as store_lib
from vgpt_jax.data import video_io
from vgpt_jax.vae.latent_space import LatentNormalization, make_latent_space, raw_space, with_normalization

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".gif", ".mpg", ".mpeg", ".flv")
TOO_SMALL, BAD_ASPECT, TOO_SHORT = "too_small", "bad_aspect", "too_short"
SIZE_MISMATCH = "size_mismatch"
SKIP_KINDS = (video_io.CORRUPT, video_io.TRUNCATED, video_io.EMPTY, video_io.NO_VIDEO_STREAM,
              TOO_SMALL, BAD_ASPECT, TOO_SHORT, SIZE_MISMATCH)
WORK_DIR = "_work"
SUMMARY = "ingest_summary.json"
# Crash tests set this to slow ingestion down so a kill lands midway; never needed otherwise.
_DELAY_ENV = "VGPT_INGEST_DELAY_S"


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    max_image_size: int = 320   # longer side after resizing, px (never upscaled)
    crop_multiple: int = 16     # both sides center-cropped to a multiple of this
    min_side: int = 128         # reject sources whose shorter side is below this, px
    max_aspect: float = 4.0     # reject sources with long/short side ratio above this
    frame_stride: int = 1       # keep every n-th decoded frame
    min_frames: int = 1         # reject videos with fewer kept frames (after stride)
    max_frames: int | None = None  # keep at most this many frames (after stride); None = all
    encode_batch: int = 16      # frames per latent_space.encode call (bounds peak memory)
    num_shards: int = 1
    dtype: str = "float16"      # storage dtype: float16 | bfloat16
    frame_size: tuple[int, int] | None = None  # (H, W): resize to cover, crop to exactly this
    mixed_sizes: bool = False   # keep every frame size (a store for per-video use, not training)
    # Latent normalisation measured over the first `normalize_sample_frames` stored frames
    # (vae.latent_space.LatentNormalization.measure): "none" keeps the space's latents (an SDXL
    # VAE has its own scaling factor); "shift" or "shift_scale" for spaces without one.
    normalize: str = "none"
    normalize_sample_frames: int = 4096


class SkipVideo(Exception):
    """A readable video that the filters reject. `kind` is one of TOO_SMALL, BAD_ASPECT, TOO_SHORT."""

    def __init__(self, kind: str, detail: str):
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {detail}")


# ----------------------------------------------------------------------------- latent spaces

def describe_latent_space(space, spec=None) -> str:
    """A string for the manifest and records: the CLI spec when there is one, else class and geometry."""
    if isinstance(spec, str):
        return spec
    return f"{type(space).__name__}(downsample={space.downsample}, channels={space.channels})"


def measure_normalization(latents: Iterable[np.ndarray], mode: str, max_frames: int):
    """`LatentNormalization.measure` over the first `max_frames` frames of raw (unnormalised)
    latents `[T, h, w, C]` per video, consumed lazily; None when there are none (an empty store
    has nothing to normalise). Frame sizes may differ between videos."""
    parts, count = [], 0
    for video in latents:
        if count >= max_frames:
            break
        video = np.asarray(video)[:max_frames - count]
        count += len(video)
        parts.append(video.reshape(-1, video.shape[-1]))
    return LatentNormalization.measure(np.concatenate(parts), mode) if parts else None


def encode_in_batches(space, frames_THW3: np.ndarray, batch: int, dtype=np.float32) -> np.ndarray:
    """uint8 `[T, H, W, 3]` -> `[T, H/d, W/d, C]` in `dtype`, `batch` frames per encode call.

    Each batch is cast into a preallocated output, so peak memory is one float32 batch plus the
    result in `dtype` (half of float32 for float16 storage), not a list of float32 parts.
    """
    out = None
    for i in range(0, len(frames_THW3), batch):
        part = np.asarray(space.encode(frames_THW3[i:i + batch]))
        if out is None:
            out = np.empty((len(frames_THW3),) + part.shape[1:], dtype)
        out[i:i + len(part)] = part
    return out


# ----------------------------------------------------------------------------- geometry

def output_geometry(height: int, width: int, config: IngestConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Source size -> ((resized h, w), (cropped h, w)). Raises SkipVideo for rejected sizes."""
    short, long = min(height, width), max(height, width)
    if short < config.min_side:
        raise SkipVideo(TOO_SMALL, f"{width}x{height}: shorter side {short} px < min_side {config.min_side}")
    if long / short > config.max_aspect:
        raise SkipVideo(BAD_ASPECT, f"{width}x{height}: aspect ratio {long / short:.2f} > {config.max_aspect}")
    if config.frame_size is not None:
        out_h, out_w = config.frame_size
        scale = max(out_h / height, out_w / width)
        return (max(out_h, round(height * scale)), max(out_w, round(width * scale))), (out_h, out_w)
    scale = min(1.0, config.max_image_size / long)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    m = config.crop_multiple
    cropped = (resized[0] // m * m, resized[1] // m * m)
    if min(cropped) == 0:
        raise SkipVideo(TOO_SMALL, f"{width}x{height} resizes to {resized[1]}x{resized[0]}, "
                                   f"smaller than one {m}-px crop unit")
    return resized, cropped


def center_crop(frames_THW3: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (frames_THW3.shape[1] - height) // 2
    left = (frames_THW3.shape[2] - width) // 2
    return frames_THW3[:, top:top + height, left:left + width]


def load_video_frames(path: str, config: IngestConfig) -> tuple[np.ndarray, float, dict]:
    """Decode + resize + crop + stride: `(frames uint8 [T, h, w, 3], fps, info)`.

    Raises video_io.VideoReadError (unreadable) or SkipVideo (filtered out).
    """
    info = video_io.probe_video(path)
    resized, cropped = output_geometry(info.height, info.width, config)
    resize_hw = None if resized == (info.height, info.width) else resized
    frames = list(video_io.iter_frames(path, stride=config.frame_stride, max_frames=config.max_frames,
                                       resize_hw=resize_hw))
    if len(frames) < config.min_frames:
        raise SkipVideo(TOO_SHORT, f"{len(frames)} frames at stride {config.frame_stride} "
                                   f"< min_frames {config.min_frames}")
    frames = center_crop(np.stack(frames), *cropped)
    meta = {"source_size": [info.width, info.height], "frame_size": list(cropped),
            "stride": config.frame_stride, "source_fps": info.fps}
    return np.ascontiguousarray(frames), info.fps, meta


def _exit_with_parent(parent_pid: int) -> None:
    """Decode-worker initializer: exit as soon as the ingesting process is gone. A SIGKILLed
    parent runs no cleanup, so its workers would live on, blocked writing decoded frames to a
    pipe nobody reads (and keeping multiprocessing's resource tracker alive with them)."""
    import threading

    def watch():
        while os.getppid() == parent_pid:  # re-parented once the parent has died
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _decode_job(path: str, rel: str, config: IngestConfig):
    """Worker-process entry point: never raises, so one bad file cannot take down the pool."""
    try:
        frames, fps, meta = load_video_frames(path, config)
        return ("ok", rel, frames, fps, meta)
    except video_io.VideoReadError as e:
        return ("skip", rel, e.kind, e.detail)
    except SkipVideo as e:
        return ("skip", rel, e.kind, e.detail)
    except Exception as e:  # anything else FFmpeg throws at us is still a per-file problem
        return ("skip", rel, video_io.CORRUPT, f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- journal

def _journal_key(input_dir: str, rel: str) -> str:
    # Size and mtime are part of the key: a file replaced between runs is re-ingested, not reused.
    path = os.path.join(input_dir, rel)
    try:
        stat = os.stat(path)
    except OSError:  # a dangling symlink: key it by the link, and let decoding report it
        stat = os.lstat(path)
    digest = hashlib.sha1(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8")).hexdigest()[:16]
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(rel))[:48]
    return f"{digest}-{readable}"


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # the journal entry exists whole or not at all


def find_videos(input_dir: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[str]:
    """Sorted paths relative to `input_dir` of files with a video extension (recursive)."""
    found = []
    for root, _, files in os.walk(input_dir):
        for name in files:
            if name.lower().endswith(tuple(extensions)):
                found.append(os.path.relpath(os.path.join(root, name), input_dir))
    return sorted(found)


def _settings(config: IngestConfig, space, space_description: str) -> dict:
    return {"config": dataclasses.asdict(config), "latent_space": space_description,
            "downsample": int(space.downsample), "channels": int(space.channels)}


# ----------------------------------------------------------------------------- ingestion

def ingest_folder(input_dir: str, output: str, latent_space="space_to_depth:8", config: IngestConfig | None = None,
                  *, num_workers: int = 0, overwrite: bool = False, keep_work: bool = False,
                  progress: bool = True) -> dict:
    """Ingest every video under `input_dir` into the store at `output`; returns the summary dict.

    Bad files are skipped and listed in the summary (also `<output>/ingest_summary.json`) by kind:
    corrupt, truncated, empty, no_video_stream, too_small, bad_aspect, too_short.
    `num_workers > 0` decodes in that many processes; encoding stays in this process (a VAE's
    weights and compiled functions live here once).
    """
    config = config or IngestConfig()
    started = time.time()
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    space = make_latent_space(latent_space)
    if config.crop_multiple % space.downsample:
        raise ValueError(f"crop_multiple {config.crop_multiple} is not a multiple of the latent space's "
                         f"downsample {space.downsample}")
    if config.frame_size is not None and any(side % config.crop_multiple for side in config.frame_size):
        raise ValueError(f"frame_size (H, W) = {tuple(config.frame_size)} is not a multiple of "
                         f"crop_multiple {config.crop_multiple}")
    description = describe_latent_space(space, latent_space)
    settings = _settings(config, space, description)
    output = os.fspath(output)
    work = os.path.join(output, WORK_DIR)
    manifest_path = os.path.join(output, store_lib.MANIFEST)
    summary_path = os.path.join(output, SUMMARY)

    if overwrite:
        for stale in (manifest_path, summary_path):
            if os.path.exists(stale):
                os.remove(stale)
        shutil.rmtree(work, ignore_errors=True)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            existing = json.load(f).get("settings")
        if existing != settings:
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
            if json.load(f) != settings:
                raise store_lib.StoreError(f"{settings_path}: an unfinished run with different settings is in "
                                           f"{output} (rerun with the same settings, or pass --overwrite)")
    else:
        store_lib._atomic_write_json(settings_path, settings)

    videos = find_videos(input_dir)
    keys = {rel: _journal_key(input_dir, rel) for rel in videos}
    done = {name for name in os.listdir(work) if name.endswith((".rec", ".skip.json"))}
    pending = [rel for rel in videos if keys[rel] + ".rec" not in done and keys[rel] + ".skip.json" not in done]
    resumed = len(videos) - len(pending)
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)

    def commit(result) -> None:
        if result[0] == "ok":
            _, rel, frames, fps, meta = result
            latents = encode_in_batches(space, frames, config.encode_batch, store_lib.STORAGE_DTYPES[config.dtype])
            # fps of the *stored* frames: striding slows the clock (stride 4 at 30 fps -> 7.5 fps)
            record = store_lib.encode_record(latents, fps=fps / config.frame_stride, source=rel, num_frames=len(frames),
                                             dtype=config.dtype, latent_space=description, extra=meta)
            _atomic_write_bytes(os.path.join(work, keys[rel] + ".rec"), record)
        else:
            _, rel, kind, detail = result
            _atomic_write_bytes(os.path.join(work, keys[rel] + ".skip.json"),
                                json.dumps({"file": rel, "kind": kind, "reason": detail}).encode())
        if delay:
            time.sleep(delay)

    bar = _progress(len(pending), progress, desc=f"ingest {os.path.basename(os.path.normpath(input_dir))}")
    if num_workers > 0 and pending:
        # spawn, not fork: the parent may hold JAX/XLA threads, which fork does not survive.
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx,
                                    initializer=_exit_with_parent,
                                    initargs=(os.getpid(),)) as pool:
            queue = list(reversed(pending))
            in_flight: set = set()
            while queue or in_flight:
                while queue and len(in_flight) < 2 * num_workers:  # bounded: decoded frames are big
                    rel = queue.pop()
                    in_flight.add(pool.submit(_decode_job, os.path.join(input_dir, rel), rel, config))
                finished, in_flight = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    commit(future.result())
                    bar.update(1)
    else:
        for rel in pending:
            commit(_decode_job(os.path.join(input_dir, rel), rel, config))
            bar.update(1)
    bar.close()

    summary, writer = _write_shards(output, work, videos, keys, config, description, settings)
    summary.update(input_dir=os.path.abspath(input_dir), output=os.path.abspath(output), resumed=resumed,
                   processed=len(pending), seconds=round(time.time() - started, 3))
    # Summary before manifest: a store that looks complete always has its summary.
    store_lib._atomic_write_json(summary_path, summary)
    writer.close()
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(format_summary(summary), file=sys.stderr)
    return summary


def _record_size(rec_path: str) -> tuple[int, int] | None:
    """The pixel (H, W) of a journal record (its header only), or None for a skipped video."""
    if not os.path.exists(rec_path):
        return None
    with open(rec_path, "rb") as f:
        head = f.read(12)
        header = json.loads(f.read(int.from_bytes(head[8:12], "little")))
    return tuple(header["extra"]["frame_size"])


def _size_mismatch(size, keep, count: int) -> str:
    return (f"its frames are {size[1]}x{size[0]} after resizing and cropping, but the other {count} "
            f"video(s) are {keep[1]}x{keep[0]} and a store holds one size; rerun with --frame-size "
            f"{keep[1]}x{keep[0]} to resize and crop every video to one size")


def _write_shards(output, work, videos, keys, config, description, settings):
    """Journal -> shards in sorted-path order. Returns (summary, open writer): closing the writer
    renames the shards into place and writes the manifest."""
    skipped: dict[str, list] = {kind: [] for kind in SKIP_KINDS}
    ingested, total_frames = [], 0
    sizes = {rel: _record_size(os.path.join(work, keys[rel] + ".rec")) for rel in videos}
    counts = collections.Counter(size for size in sizes.values() if size is not None)
    keep = max(counts, key=lambda size: (counts[size], size)) if counts else None
    kept = [rel for rel in videos if sizes[rel] is not None
            and (sizes[rel] == keep or config.mixed_sizes)]
    normalization = _journal_normalization(work, keys, kept, config)
    writer = store_lib.StoreWriter(output, num_shards=config.num_shards, dtype=config.dtype,
                                   latent_space=description, settings=settings, overwrite=True,
                                   normalization=normalization)
    for rel in videos:
        rec_path = os.path.join(work, keys[rel] + ".rec")
        if sizes[rel] is not None and sizes[rel] != keep and not config.mixed_sizes:
            skipped[SIZE_MISMATCH].append({"file": rel, "reason": _size_mismatch(
                sizes[rel], keep, counts[keep])})
        elif os.path.exists(rec_path):
            with open(rec_path, "rb") as f:
                record = f.read()
            if normalization is not None:
                record = _normalized_record(record, normalization, rec_path)
            writer.add_encoded(record)
            header = store_lib.read_header(record, where=rec_path)
            ingested.append(rel)
            total_frames += header["num_frames"]
        else:
            with open(os.path.join(work, keys[rel] + ".skip.json")) as f:
                entry = json.load(f)
            skipped.setdefault(entry["kind"], []).append({"file": entry["file"], "reason": entry["reason"]})
    summary = {"num_files": len(videos), "num_ingested": len(ingested), "ingested": ingested,
               "num_skipped": len(videos) - len(ingested), "skipped": skipped, "total_frames": total_frames}
    return summary, writer


def _journal_normalization(work, keys, kept, config: IngestConfig):
    """The normalisation measured over the journal's raw latents, in store order (so a resumed
    run measures the same statistics); None for `normalize="none"`."""
    if config.normalize == "none":
        return None

    def latents():
        for rel in kept:
            path = os.path.join(work, keys[rel] + ".rec")
            with open(path, "rb") as f:
                yield store_lib.decode_record(f.read(), where=path)[1]

    return measure_normalization(latents(), config.normalize, config.normalize_sample_frames)


def _normalized_record(record: bytes, normalization, where: str) -> bytes:
    header, latents = store_lib.decode_record(record, where=where)
    return store_lib.encode_record(
        normalization.normalize(latents), fps=header["fps"], source=header["source"],
        num_frames=header["num_frames"], dtype=header["dtype"],
        latent_space=header["latent_space"], extra=header["extra"])


def format_summary(summary: dict) -> str:
    lines = [f"ingested {summary['num_ingested']}/{summary['num_files']} videos "
             f"({summary['total_frames']} frames; {summary.get('resumed', 0)} from an earlier run) "
             f"-> {summary.get('output', '')}"]
    for kind, entries in summary["skipped"].items():
        for entry in entries:
            lines.append(f"  skipped [{kind}] {entry['file']}: {entry['reason']}")
    return "\n".join(lines)


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, disable=not enabled, unit="video")
    except ImportError:  # tqdm is a core dependency, but progress bars must never be fatal
        class _Null:
            def update(self, n=1): pass
            def close(self): pass
        return _Null()


def ingest_arrays(items: Iterable[tuple[np.ndarray, float, str]], output: str, latent_space="space_to_depth:1",
                  *, frame_stride: int = 1, num_shards: int = 1, dtype: str = "float16", encode_batch: int = 16,
                  overwrite: bool = False, settings: dict[str, Any] | None = None,
                  normalize: str = "none", normalize_sample_frames: int = 4096) -> store_lib.LatentStore:
    """In-memory ingestion: `(frames uint8 [T, H, W, 3], fps, name)` triples -> an open LatentStore.

    Frames are used at their size (no resize or crop; H and W must be multiples of the space's
    downsample). Used by the physics world and tests; no video files are involved.
    `normalize` ("none", "shift", "shift_scale"; see `LatentNormalization.measure`): latents are
    normalised by statistics of the first `normalize_sample_frames` frames, which the manifest
    records (`LatentStore.normalization`); a `LatentNormalization` is used as given (a model's,
    to make more data for it).
    """
    space = make_latent_space(latent_space)
    description = describe_latent_space(space, latent_space)
    all_settings = {"source": "arrays", "frame_stride": frame_stride, "latent_space": description,
                    "downsample": int(space.downsample), "channels": int(space.channels),
                    "normalize": normalize if isinstance(normalize, str) else "given",
                    **(settings or {})}
    items = [(np.asarray(frames)[::frame_stride], fps, name) for frames, fps, name in items]
    normalization = normalize if isinstance(normalize, LatentNormalization) else None
    if normalization is None and normalize != "none":
        raw = raw_space(space)
        normalization = measure_normalization(
            (encode_in_batches(raw, frames[:normalize_sample_frames], encode_batch)
             for frames, _, _ in items), normalize, normalize_sample_frames)
        space = with_normalization(space, normalization)
    with store_lib.StoreWriter(output, num_shards=num_shards, dtype=dtype, latent_space=description,
                               settings=all_settings, overwrite=overwrite,
                               normalization=normalization) as writer:
        for frames, fps, name in items:
            space.check_frames(frames, what=name)
            latents = encode_in_batches(space, frames, encode_batch, store_lib.STORAGE_DTYPES[dtype])
            writer.add(latents, fps=fps / frame_stride, source=name, num_frames=len(frames),
                       extra={"stride": frame_stride, "source_fps": fps})
    return store_lib.LatentStore(output)
