"""Reading and writing video files with PyAV (FFmpeg bundled in the wheel; no system ffmpeg needed).

Shapes: frames are uint8 `[T, H, W, 3]` RGB throughout.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

# The file endings read as video wherever a folder is scanned (ingestion, held-out folders, VAE
# training data); what `write_video` writes is `WRITE_EXTENSIONS`.
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".gif", ".mpg", ".mpeg", ".flv")

# Reasons a file can be unreadable; ingestion groups its summary by these.
EMPTY = "empty"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
NO_VIDEO_STREAM = "no_video_stream"


class VideoReadError(Exception):
    """A video file could not be read. `kind` is one of EMPTY, CORRUPT, TRUNCATED, NO_VIDEO_STREAM."""

    def __init__(self, path: str, kind: str, detail: str):
        self.path = str(path)
        self.kind = kind
        self.detail = detail
        super().__init__(f"{self.path}: {kind}: {detail}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    declared_frames: int  # from the container; 0 when the container does not say


def _iso_bmff_cut_off(path: str) -> bool:
    """True when an MP4/MOV file's top-level boxes run past the end of the file: a recording or
    copy that was cut off (the usual reason FFmpeg cannot find the `moov` index)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or head[4:8] != b"ftyp":
            return False
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            box_size = int.from_bytes(header[:4], "big")
            if box_size == 1 and len(header) >= 16:  # 64-bit "largesize"
                box_size = int.from_bytes(header[8:16], "big")
            if box_size == 0:  # box extends to end of file by definition
                return False
            if box_size < 8:
                return False  # garbage, not a cut: let the caller call it corrupt
            offset += box_size
        return offset > size


def _open(path: str):
    import av  # lazy: keeps `import vgpt_jax.data` light

    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.islink(path):
            raise VideoReadError(path, CORRUPT, f"dangling symlink: it points to "
                                                f"{os.readlink(path)!r}, which does not exist")
        raise VideoReadError(path, CORRUPT, "file does not exist")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, EMPTY, "file is 0 bytes")
    try:
        container = av.open(path)
    except Exception as e:  # av raises a zoo of FFmpeg error classes; all mean "not a readable container"
        if _iso_bmff_cut_off(path):
            raise VideoReadError(path, TRUNCATED, f"file is cut off: its MP4 boxes run past the end of "
                                                  f"the file ({type(e).__name__}: {e})") from e
        raise VideoReadError(path, CORRUPT, f"cannot open container ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, NO_VIDEO_STREAM, "container has no video stream")
    return container


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(path: str) -> VideoInfo:
    """Size, fps and the declared frame count, without decoding."""
    with _open(path) as container:
        stream = container.streams.video[0]
        return VideoInfo(int(stream.width), int(stream.height), _stream_fps(stream), int(stream.frames or 0))


# A cut-off file stops early in *time*; frame counts that containers declare are often off by a
# tenth or more on good files (variable frame rate, edit lists, dropped duplicates), so a count
# alone only convicts a file that lost a quarter of its frames.
MIN_TIME_COVERAGE = 0.9
MIN_COUNT_COVERAGE = 0.75


def _duration_s(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else 0.0  # av.time_base: microseconds


def truncation(decoded: int, declared: int, end_s: float, duration_s: float) -> str | None:
    """Why a fully decoded stream looks cut off, or None: by the time its frames cover when the
    container gives a duration and the frames carry timestamps, else by the declared count."""
    if duration_s > 0 and end_s > 0:
        if end_s < MIN_TIME_COVERAGE * duration_s:
            return (f"frames end at {end_s:.2f} s of a declared {duration_s:.2f} s ({decoded} "
                    f"of {declared or '?'} declared frames)")
        return None
    if declared and decoded < MIN_COUNT_COVERAGE * declared:
        return f"decoded {decoded} of {declared} declared frames"
    return None


def iter_frames(path: str, *, stride: int = 1, max_frames: int | None = None,
                resize_hw: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 frames `[H, W, 3]`: every `stride`-th decoded frame, at most `max_frames` of them.

    `resize_hw=(h, w)` resizes inside FFmpeg's swscale with area interpolation (anti-aliased when
    shrinking), so full-resolution RGB frames never reach Python: decoding 720p stays cheap.

    Raises VideoReadError: CORRUPT when no frame decodes, TRUNCATED when decoding fails after
    some frames or stops well short of the stream's end (`truncation`).
    """
    path = os.fspath(path)
    container = _open(path)
    decoded = 0
    yielded = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: ~3x faster h264 decode on 2 cores
        declared = int(stream.frames or 0)
        fps = _stream_fps(stream)
        frame_s = 1.0 / fps if fps else 0.0
        end_s = 0.0  # where the decoded frames end, in stream time (0: no timestamps)
        try:
            for frame in container.decode(stream):
                if frame.time is not None:
                    end_s = max(end_s, float(frame.time) + frame_s)
                if decoded % stride == 0:
                    if resize_hw is not None:
                        h, w = resize_hw
                        frame = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA")
                    yield frame.to_ndarray(format="rgb24")
                    yielded += 1
                decoded += 1
                if max_frames is not None and yielded >= max_frames:
                    return
        except VideoReadError:
            raise
        except Exception as e:
            kind = TRUNCATED if decoded else CORRUPT
            raise VideoReadError(path, kind, f"decode failed after {decoded} frames "
                                             f"({type(e).__name__}: {e})") from e
        if decoded == 0:
            raise VideoReadError(path, CORRUPT, "video stream decoded to 0 frames")
        problem = truncation(decoded, declared, end_s, _duration_s(container, stream))
        if problem:
            raise VideoReadError(path, TRUNCATED, problem)
    finally:
        container.close()


def read_video(path: str, *, stride: int = 1, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a whole video: `(frames uint8 [T, H, W, 3], fps)`. Raises VideoReadError naming the file."""
    info = probe_video(path)
    frames = list(iter_frames(path, stride=stride, max_frames=max_frames))
    return np.stack(frames), info.fps


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides; pad by edge replication (invisible, unlike a black line)."""
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


WRITE_EXTENSIONS = (".mp4", ".mov", ".mkv", ".gif")


def check_writable(path: str) -> str:
    """The lower-case extension of `path` if `write_video` can write it, else a ValueError (so
    a caller can refuse a bad output path before the work that produces the frames)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(f"{os.fspath(path)}: unsupported video extension {ext!r} (use one of "
                         f"{', '.join(WRITE_EXTENSIONS)})")
    return ext


def write_video(path: str, frames: np.ndarray, fps: float, *, crf: int = 18) -> str:
    """Write uint8 frames `[T, H, W, 3]` (or `[T, H, W]` gray) to `.mp4` (libx264, yuv420p) or `.gif`.

    Odd sizes are padded by one edge row/column for mp4. Returns the path.
    """
    import av

    path = os.fspath(path)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video({path}): expected frames [T, H, W, 3] with T > 0, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"write_video({path}): expected uint8 frames, got {frames.dtype}")
    ext = check_writable(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        duration_ms = max(1, int(round(1000.0 / float(fps))))
        images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
        return path
    frames = _pad_to_even(frames)
    from fractions import Fraction

    rate = Fraction(float(fps)).limit_denominator(1001)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
