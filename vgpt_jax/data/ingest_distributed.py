"""Folder ingestion as a multi-host JAX job (`vgpt prepare --distributed`).

Every process of a `jax.distributed` runtime (a TPU slice, a GPU cluster, or processes on one
machine) lists the same input folder, takes the work shards `i` with
`i % process_count == process_index`, decodes with a local `DecodePool`, encodes on its local
devices (a VAE's encode jitted with the frame batch sharded over them) and writes its shards
with `ingest_shard.write_shard`. Process 0 prepares the output folder first and merges the
shard manifests last; barriers (`multihost_utils.sync_global_devices`) order the three steps.
A preempted process loses at most the video it was on: finished shards and journalled videos
are kept by the rerun. A process whose own part fails (an exception, not a kill) still joins
the collectives, and every process then raises one error naming the failed processes. The store
equals the local job's for the same folder and settings.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from vgpt_jax.data import ingest_shard
from vgpt_jax.data.store import MANIFEST
from vgpt_jax.data.ingest import IngestConfig, find_videos, format_summary
from vgpt_jax.data.ingest_encode import device_encoder
from vgpt_jax.data.ingest_pool import DecodePool


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize` (once): arguments left None are detected from the
    environment (TPU VM metadata, SLURM, Open MPI), as `jax.distributed.initialize` does."""
    import jax

    if jax.distributed.is_initialized():
        return
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


_ERROR_BYTES = 1024  # of each process's error message, gathered


def _gather_errors(error: str) -> list[tuple[int, str]]:
    """Every process's error message ("" for none), gathered to all: a collective that every
    process calls. Returns [(process index, message)] of the processes that failed."""
    from jax.experimental import multihost_utils

    raw = error.encode()[:_ERROR_BYTES]
    buffer = np.zeros(_ERROR_BYTES, np.uint8)
    buffer[:len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, _ERROR_BYTES)
    return [(i, bytes(row).rstrip(b"\0").decode(errors="replace"))
            for i, row in enumerate(rows) if row.any()]


def ingest_distributed(input_dir: str, output: str, latent_space="space_to_depth:8",
                       config: IngestConfig | None = None, *, num_workers: int = 0,
                       overwrite: bool = False) -> dict:
    """Run this process's part of a folder ingestion; `jax.distributed` must be initialised (a
    single process is a runtime of one). Returns the merged summary on process 0 and the job's
    video counts (`{"resumed", "processed"}`) elsewhere."""
    import jax
    from jax.experimental import multihost_utils

    config = config or IngestConfig()
    started = time.time()
    index, count = jax.process_index(), jax.process_count()
    job = ingest_shard.make_job(input_dir, output, latent_space, config)
    complete = ingest_shard.prepare_output(job, overwrite=overwrite) if index == 0 else None
    multihost_utils.sync_global_devices("vgpt-ingest: output prepared")
    if os.path.exists(job.path(MANIFEST)):  # complete before this run: every process stops here
        return complete or {"already_complete": True}
    # Every process lists the folder; a process that sees other files would write other shards.
    videos = find_videos(job.input_dir)
    multihost_utils.assert_equal(np.frombuffer(ingest_shard.file_list_digest(videos), np.uint8),
                                 f"processes list different files under {job.input_dir}")
    tasks = ingest_shard.plan_shards(videos, config.num_shards)[index::count]
    done = np.zeros(2, np.int32)  # videos resumed, videos processed
    error = ""
    try:
        encoder = device_encoder(job.space(), config.encode_batch)
        with DecodePool(num_workers, config) as pool:
            for task in tasks:
                counts = ingest_shard.write_shard(job, task, encoder, pool)
                done += (counts["resumed"], counts["processed"])
    except Exception as e:  # any failure: every process must still reach the collectives below
        error = f"{type(e).__name__}: {e}"
    # Also the barrier before the merge: every process has written its shards, or failed. A
    # process that raised here instead would leave the others waiting in this collective until
    # jax.distributed's shutdown barrier aborts them all, with no word of the cause.
    failures = _gather_errors(error)
    if failures:
        raise RuntimeError("ingestion failed on " + "; ".join(
            f"process {i}: {message}" for i, message in failures) + " (finished shards and "
            "journalled videos are kept: rerun the same command to resume)")
    resumed, processed = multihost_utils.process_allgather(done).reshape(-1, 2).sum(0)
    counts = {"resumed": int(resumed), "processed": int(processed)}
    summary = ingest_shard.merge_shards(job) if index == 0 else None
    # Every process leaves together, once the store is complete: a process that exits while
    # process 0 still merges waits in jax.distributed's shutdown barrier, which failed the job
    # (SIGABRT, "Shutdown barrier has failed") on a loaded machine.
    multihost_utils.sync_global_devices("vgpt-ingest: merged")
    if index != 0:
        return counts
    summary.update(counts, seconds=round(time.time() - started, 3), processes=count)
    print(format_summary(summary), file=sys.stderr)
    return summary
