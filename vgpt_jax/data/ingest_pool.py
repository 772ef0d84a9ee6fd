"""Decoding videos in worker processes, so that a decoder crash costs only the video it was on.

`decode_one` never raises: a file that cannot be read or that the filters reject comes back as a
skip result naming its kind. A crash below Python (FFmpeg segfaults, the OOM killer) cannot be
caught in the crashing process, so `DecodePool` decodes in `spawn` processes and, when its pool
breaks, decodes each video that was in flight again alone in a fresh process: the one that kills
its process again is reported as `DECODER_CRASH`, the others are decoded as usual.

Results: `("ok", rel, frames uint8 [T, h, w, 3], fps, meta)` or `("skip", rel, kind, reason)`.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator

from vgpt_jax.data import video_io
from vgpt_jax.data.ingest import DECODER_CRASH, IngestConfig, SkipVideo, load_video_frames

# Crash tests name a file here whose decoding aborts its process, as a segfaulting decoder would.
_CRASH_ENV = "VGPT_INGEST_CRASH_ON"


def decode_one(path: str, rel: str, config: IngestConfig):
    """Decode, resize, crop and stride one video (`ingest.load_video_frames`) into a result tuple."""
    if os.environ.get(_CRASH_ENV) and os.path.basename(rel) == os.environ[_CRASH_ENV]:
        os.abort()
    try:
        frames, fps, meta = load_video_frames(path, config)
        return ("ok", rel, frames, fps, meta)
    except (video_io.VideoReadError, SkipVideo) as e:
        return ("skip", rel, e.kind, e.detail)
    except Exception as e:  # anything else FFmpeg throws at us is still a per-file problem
        return ("skip", rel, video_io.CORRUPT, f"{type(e).__name__}: {e}")


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


class DecodePool:
    """`decode(jobs)` over `(path, rel)` pairs in `num_workers` processes (0: in this process,
    where a crash is not contained), yielding results in completion order. At most
    `2 * num_workers` videos are in flight: decoded frames are big."""

    def __init__(self, num_workers: int, config: IngestConfig):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers, self.config = num_workers, config
        self._pool = self._new_pool(num_workers) if num_workers else None

    def _new_pool(self, workers: int) -> cf.ProcessPoolExecutor:
        # spawn, not fork: the parent may hold JAX/XLA (or Beam's gRPC) threads, which fork does not survive.
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_exit_with_parent, initargs=(os.getpid(),))

    def decode(self, jobs: Iterable[tuple[str, str]]) -> Iterator[tuple]:
        if self._pool is None:
            for path, rel in jobs:
                yield decode_one(path, rel, self.config)
            return
        queue, in_flight = collections.deque(jobs), {}
        while queue or in_flight:
            if self._submit(queue, in_flight):
                finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                if not any(isinstance(f.exception(), cf.process.BrokenProcessPool) for f in finished):
                    for future in finished:
                        yield future.result()
                        del in_flight[future]
                    continue
            # A worker died: every video still in flight is lost with the pool; find the culprit.
            cf.wait(in_flight)
            suspects = []
            for future, job in in_flight.items():
                if future.exception() is None:
                    yield future.result()
                else:
                    suspects.append(job)
            in_flight = {}
            self._pool.shutdown(wait=True)
            self._pool = self._new_pool(self.num_workers)
            for path, rel in suspects:
                yield self._alone(path, rel)

    def _submit(self, queue: collections.deque, in_flight: dict) -> bool:
        """Top `in_flight` up from `queue`; False if the pool is broken. A worker can die while
        the caller is busy with the last result (it had already taken the next video), and then
        `submit` itself raises: the same crash as a broken future, handled the same way."""
        while queue and len(in_flight) < 2 * self.num_workers:
            path, rel = queue[0]
            try:
                future = self._pool.submit(decode_one, path, rel, self.config)
            except cf.process.BrokenProcessPool:
                return False
            in_flight[future] = queue.popleft()
        return True

    def _alone(self, path: str, rel: str) -> tuple:
        with self._new_pool(1) as pool:
            try:
                return pool.submit(decode_one, path, rel, self.config).result()
            except cf.process.BrokenProcessPool:
                return ("skip", rel, DECODER_CRASH, "the decoding process died while decoding this file "
                                                    "(a crash inside FFmpeg, or killed for memory)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
