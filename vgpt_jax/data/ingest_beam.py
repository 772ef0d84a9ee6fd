"""Folder ingestion as an Apache Beam pipeline (`vgpt prepare --runner beam`; the `beam` extra).

    shards (ShardTask per work shard not yet finished)
      -> videos (shard, rel) not yet journalled -> Reshuffle
      -> Decode   DecodeFn: decode/resize/crop in a crash-isolated process; bad files to the
                  tagged output "bad", which journals them for the shard's report
      -> Encode   EncodeFn: the latent space, loaded once per worker process, encodes each video
                  in batches of `encode_batch` frames and journals its record
      -> CoGroupByKey(task, done videos) per shard
      -> Write    WriteShardFn: `ingest_shard.finish_from_journal` (part files renamed into
                  place, the shard manifest last; a finished shard is skipped, so a retried
                  bundle is harmless)
    then, in the launching process, `ingest_shard.merge_shards` writes the store's manifest.

Latents never travel through the shuffle: every video's result is committed to the journal by
the worker that made it, and only `(shard, rel)` pairs are grouped. So a killed or preempted
pipeline loses only the videos in flight, and the rerun schedules only the others.

The output (and the input) must be a path that every worker and the launcher see (a shared or
FUSE-mounted file system): shards and journal are written with local-file writers. A video is
encoded on its own, never batched with other videos' frames (as `RunInference` would), so its
record is the one the local and multi-host jobs write. Runner options (DirectRunner, Dataflow,
Flink, Spark) are in docs/ingestion.md.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from vgpt_jax.data import ingest_shard
from vgpt_jax.data.ingest import IngestConfig, format_summary

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.utils import shared
except ImportError as e:  # the extra is optional; say how to get it
    raise ImportError("the Beam ingestion pipeline needs apache-beam: pip install -e '.[beam]' "
                      "-c constraints.txt") from e

BAD = "bad"
_Pair = beam.typehints.Tuple[beam.typehints.Any, beam.typehints.Any]


@beam.typehints.with_output_types(_Pair)
class DecodeFn(beam.DoFn):
    """`(shard, rel)` -> `(shard, ("ok", rel, frames, fps, meta))`, or `(shard, (rel, kind,
    reason))` to the "bad" output. Decodes in a one-process `DecodePool`, so a decoder crash
    costs this worker one video, not its bundle."""

    def __init__(self, job: ingest_shard.IngestJob):
        self.job = job

    def setup(self):
        from vgpt_jax.data.ingest_pool import DecodePool
        self._pool = DecodePool(1, self.job.config)

    def process(self, element):
        shard, rel = element
        [result] = self._pool.decode([(os.path.join(self.job.input_dir, rel), rel)])
        if result[0] == "ok":
            yield shard, result
        else:
            yield beam.pvalue.TaggedOutput(BAD, (shard, result[1:]))

    def teardown(self):
        self._pool.close()


class _Held:
    """A weak-referenceable holder, as `beam.utils.shared.Shared` needs."""

    def __init__(self, value):
        self.value = value


class EncodeFn(beam.DoFn):
    """`(shard, decoded)` -> `(shard, rel)` once the video's record is journalled; the latent
    space (a VAE's weights and compiled encode) is built once per worker process and shared by
    its threads."""

    def __init__(self, job: ingest_shard.IngestJob):
        self.job = job
        self._shared = shared.Shared()

    def setup(self):
        from vgpt_jax.data.ingest_encode import device_encoder

        job = self.job
        self._encoder = self._shared.acquire(
            lambda: _Held(device_encoder(job.space(), job.config.encode_batch)), tag=repr(job.latent_space)).value
        self._journal = ingest_shard.Journal(job)

    def process(self, element):
        shard, decoded = element
        self._journal.commit(decoded[1], ("ok", ingest_shard.encode_video(self._encoder, decoded, self.job)))
        yield shard, decoded[1]


def _todo(job: ingest_shard.IngestJob, task: ingest_shard.ShardTask):
    """The task's videos that have no journalled result yet, as `(shard, rel)`."""
    journal = ingest_shard.Journal(job)
    return [(task.index, rel) for rel in task.videos if not journal.has(rel)]


def _journal_bad(job: ingest_shard.IngestJob, element):
    """A "bad" output element `(shard, (rel, kind, reason))` -> journalled -> `(shard, rel)`."""
    shard, (rel, kind, reason) = element
    ingest_shard.Journal(job).commit(rel, ("skip", kind, reason))
    return shard, rel


class WriteShardFn(beam.DoFn):
    """`(shard, {"task": [ShardTask], "done": [rel, ...]})` -> the shard index, once its files and
    manifest are in place."""

    def __init__(self, job: ingest_shard.IngestJob):
        self.job = job

    def process(self, element):
        shard, groups = element
        [task] = groups["task"]
        if not ingest_shard.finished(self.job, task):
            ingest_shard.finish_from_journal(self.job, task)
        yield shard


def build_pipeline(pipeline, job: ingest_shard.IngestJob, tasks: Sequence[ingest_shard.ShardTask]):
    """Add the ingestion of `tasks` to `pipeline`; returns the PCollection of written shard indices."""
    keyed = pipeline | "Shards" >> beam.Create([(task.index, task) for task in tasks])
    videos = (keyed
              | "Videos" >> beam.FlatMap(lambda kv: _todo(job, kv[1]))
              | "Spread" >> beam.Reshuffle())  # one video per element, spread over the workers
    decoded = videos | "Decode" >> beam.ParDo(DecodeFn(job)).with_outputs(BAD, main="frames")
    encoded = decoded.frames | "Encode" >> beam.ParDo(EncodeFn(job))
    bad = decoded[BAD] | "JournalBad" >> beam.Map(lambda element: _journal_bad(job, element))
    done = (encoded, bad) | "Done" >> beam.Flatten()
    return ({"task": keyed, "done": done}
            | "PerShard" >> beam.CoGroupByKey()
            | "Write" >> beam.ParDo(WriteShardFn(job)))


def ingest_beam(input_dir: str, output: str, latent_space="space_to_depth:8", config: IngestConfig | None = None,
                *, beam_options: Sequence[str] = (), overwrite: bool = False) -> dict:
    """Ingest a folder with a Beam pipeline run by `beam_options` (command-line style pipeline
    options; none: the DirectRunner) and merge; returns the summary. `latent_space` must be a
    spec string: it is shipped to the workers, which build the space themselves."""
    if not isinstance(latent_space, str):
        raise ValueError(f"latent_space must be a spec string for Beam (workers build the space), "
                         f"got {type(latent_space).__name__}")
    config = config or IngestConfig()
    started = time.time()
    job, tasks, complete = ingest_shard.start(input_dir, output, latent_space, config, overwrite=overwrite)
    if complete is not None:
        return complete
    pending = [task for task in tasks if not ingest_shard.finished(job, task)]
    journal = ingest_shard.Journal(job)
    processed = sum(not journal.has(rel) for task in pending for rel in task.videos)
    if pending:
        with beam.Pipeline(options=PipelineOptions(list(beam_options))) as pipeline:
            build_pipeline(pipeline, job, pending)
    summary = ingest_shard.merge_shards(job)
    summary.update(resumed=summary["num_files"] - processed, processed=processed,
                   seconds=round(time.time() - started, 3))
    print(format_summary(summary), file=sys.stderr)
    return summary
