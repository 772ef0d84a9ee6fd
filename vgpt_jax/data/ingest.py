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

Folder ingestion runs through `data.ingest_shard`: the sorted file list is cut into
`config.num_shards` work shards, each written by one engine-free shard function, and a merge
writes the store's manifest. `ingest_folder` drives it with a local decode pool; `vgpt prepare
--distributed` (`data.ingest_distributed`) and the Beam pipeline (`data.ingest_beam`) drive the
same function and give the same store. See that module for resumability (a rerun skips finished
shards and finished videos) and how the latent normalisation is measured.

Each record's `fps` is the rate of the *stored* frames (source fps / frame_stride); the source fps
and size are kept in the record header's `extra`. Latents are the encoder's deterministic output
(`seed=None`: the posterior mean for a VAE), so reruns and resumes are reproducible.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vgpt_jax.data import store as store_lib
from vgpt_jax.data import video_io
from vgpt_jax.vae.latent_space import LatentNormalization, make_latent_space, raw_space, with_normalization

VIDEO_EXTENSIONS = video_io.VIDEO_EXTENSIONS
TOO_SMALL, BAD_ASPECT, TOO_SHORT = "too_small", "bad_aspect", "too_short"
SIZE_MISMATCH = "size_mismatch"
DECODER_CRASH = "decoder_crash"  # the decoding process died on the file (see data.ingest_pool)
SKIP_KINDS = (video_io.CORRUPT, video_io.TRUNCATED, video_io.EMPTY, video_io.NO_VIDEO_STREAM,
              TOO_SMALL, BAD_ASPECT, TOO_SHORT, SIZE_MISMATCH, DECODER_CRASH)


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
    num_shards: int = 1         # work shards: the unit of parallelism and of a finished, skippable piece
    dtype: str = "float16"      # storage dtype: float16 | bfloat16
    frame_size: tuple[int, int] | None = None  # (H, W): resize to cover, crop to exactly this
    mixed_sizes: bool = False   # keep every frame size (a store for per-video use, not training)
    # Latent normalisation measured over every stored frame (data.ingest_shard: per-shard
    # statistics, merged in shard order): "none" keeps the space's latents (an SDXL VAE has its
    # own scaling factor); "shift" or "shift_scale" for spaces without one.
    normalize: str = "none"
    # Text conditions (`vgpt_jax.text_encoder`): a T5 / CLIP text encoder (folder or hub id)
    # embeds each video's sidecar caption (`clip.mp4` + `clip.txt`) into its record's `extra`.
    text_encoder: str = ""
    text_tokens: int = 32       # caption tokens kept (the encoder's truncation)


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
    if config.text_encoder:
        from vgpt_jax.text_encoder import read_caption
        caption = read_caption(path)
        if caption is not None:
            meta["caption"] = caption
    return np.ascontiguousarray(frames), info.fps, meta


def find_videos(input_dir: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[str]:
    """Sorted paths relative to `input_dir` of files with a video extension (recursive)."""
    found = []
    for root, _, files in os.walk(input_dir):
        for name in files:
            if name.lower().endswith(tuple(extensions)):
                found.append(os.path.relpath(os.path.join(root, name), input_dir))
    return sorted(found)


# ----------------------------------------------------------------------------- ingestion

def ingest_folder(input_dir: str, output: str, latent_space="space_to_depth:8", config: IngestConfig | None = None,
                  *, num_workers: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Ingest every video under `input_dir` into the store at `output`; returns the summary dict.

    Bad files are skipped and listed in the summary (also `<output>/ingest_summary.json`) by kind:
    corrupt, truncated, empty, no_video_stream, too_small, bad_aspect, too_short, size_mismatch,
    decoder_crash. `num_workers > 0` decodes in that many processes (and survives a decoder that
    crashes); encoding stays in this process (a VAE's weights and compiled functions live here
    once). The shards are written one after the other by `ingest_shard.write_shard`.
    """
    # The ingest_* modules build on this module's decoding, hence imported here.
    from vgpt_jax.data import ingest_shard
    from vgpt_jax.data.ingest_encode import device_encoder
    from vgpt_jax.data.ingest_pool import DecodePool

    config = config or IngestConfig()
    started = time.time()
    job, tasks, complete = ingest_shard.start(input_dir, output, latent_space, config, overwrite=overwrite)
    if complete is not None:
        return complete
    space = device_encoder(job.space(), config.encode_batch)
    counts = {"resumed": 0, "processed": 0}
    bar = _progress(sum(len(t.videos) for t in tasks), progress,
                    desc=f"ingest {os.path.basename(job.input_dir)}")
    with DecodePool(num_workers, config) as pool:
        for task in tasks:
            done = ingest_shard.write_shard(job, task, space, pool, on_video=lambda: bar.update(1))
            for key in counts:
                counts[key] += done[key]
    bar.close()
    summary = ingest_shard.merge_shards(job)
    summary.update(counts, seconds=round(time.time() - started, 3))
    print(format_summary(summary), file=sys.stderr)
    return summary


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
    A 4th item, a dict, joins the record's `extra`: a video's conditions (`class_id`, per-frame
    `actions`; see `conditioning.record_conditions`), which need `frame_stride=1`.

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
    items = [(np.asarray(item[0])[::frame_stride], item[1], item[2],
              dict(item[3]) if len(item) > 3 else {}) for item in items]
    if frame_stride != 1 and any("actions" in extra for *_, extra in items):
        raise ValueError(f"ingest_arrays: frame_stride={frame_stride} would drop per-frame "
                         "actions; ingest videos with actions at frame_stride=1")
    normalization = normalize if isinstance(normalize, LatentNormalization) else None
    if normalization is None and normalize != "none":
        raw = raw_space(space)
        normalization = measure_normalization(
            (encode_in_batches(raw, frames[:normalize_sample_frames], encode_batch)
             for frames, *_ in items), normalize, normalize_sample_frames)
    if normalization is not None:  # the records hold what the manifest says: normalised latents
        space = with_normalization(space, normalization)
    with store_lib.StoreWriter(output, num_shards=num_shards, dtype=dtype, latent_space=description,
                               settings=all_settings, overwrite=overwrite,
                               normalization=normalization) as writer:
        for frames, fps, name, extra in items:
            space.check_frames(frames, what=name)
            latents = encode_in_batches(space, frames, encode_batch, store_lib.STORAGE_DTYPES[dtype])
            writer.add(latents, fps=fps / frame_stride, source=name, num_frames=len(frames),
                       extra={"stride": frame_stride, "source_fps": fps, **extra})
    return store_lib.LatentStore(output)
