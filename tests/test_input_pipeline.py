"""The grain input pipeline: frame sampling and strides, short-video dropping, clip partitions,
determinism, checkpointable iterator state, per-process rows, worker prefetch, store errors."""
from __future__ import annotations

import os
import sys

import ml_collections
import numpy as np
import pytest

from vgpt_jax.data import input_pipeline as ip

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from train_checks import tiny_source  # noqa: E402


def data_cfg(**kw):
    base = dict(num_frames=4, stride_min=1, stride_max=1, clip_mode="random", global_batch_size=4,
                seed=0, shuffle=True, worker_count=0, worker_buffer_size=2, read_threads=1,
                prefetch_buffer_size=2, store="")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def indexed_source(lengths):
    """Video v, frame t holds the value 1000 * v + t everywhere: a sample reveals its frames."""
    return [dict(latents=np.broadcast_to((1000 * v + np.arange(n, dtype=np.float32))[:, None, None, None],
                                         (n, 2, 2, 4)).copy(), fps=30.0, source=f"v{v}", num_frames=n)
            for v, n in enumerate(lengths)]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("latents", "clip_ids"):
            np.testing.assert_array_equal(x[k], y[k])


def test_same_seed_same_batches_other_seed_differs():
    src = tiny_source()
    a = take(iter(ip.make_dataset(src, data_cfg())), 4)
    b = take(iter(ip.make_dataset(src, data_cfg())), 4)
    c = take(iter(ip.make_dataset(src, data_cfg(seed=1))), 4)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(x["latents"], y["latents"]) for x, y in zip(a, c))
    assert a[0]["latents"].shape == (4, 4, 4, 4, 4) and a[0]["clip_ids"].dtype == np.int32


def test_restored_iterator_yields_the_same_next_batches():
    src = tiny_source()
    it = iter(ip.make_dataset(src, data_cfg()))
    take(it, 3)
    state = it.get_state()
    want = take(it, 3)
    fresh = iter(ip.make_dataset(src, data_cfg()))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), want)


def test_worker_prefetch_gives_the_same_batches():
    src = tiny_source()
    want = take(iter(ip.make_dataset(src, data_cfg())), 3)
    got = take(iter(ip.make_dataset(src, data_cfg(worker_count=2))), 3)
    assert_batches_equal(got, want)


def test_process_rows_partition_the_global_batch():
    src, cfg = tiny_source(), data_cfg(global_batch_size=6)
    full = take(iter(ip.make_dataset(src, cfg)), 2)
    parts = [take(iter(ip.make_dataset(src, cfg, rows=r)), 2) for r in ((0, 2), (2, 6))]
    for k in range(2):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k]["latents"], parts[1][k]["latents"]]), full[k]["latents"])


def test_random_stride_range_and_short_videos_dropped():
    # N=4, stride in [2, 5]: needs (4-1)*2+1 = 7 frames. Video 1 (6 frames) is dropped;
    # video 2 (10 frames) allows strides up to floor(9 / 3) = 3, video 0 (40) up to 5.
    src = indexed_source([40, 6, 10])
    cfg = data_cfg(stride_min=2, stride_max=5, global_batch_size=2, clip_mode="one_frame")
    strides = {0: set(), 2: set()}
    for batch in take(iter(ip.make_dataset(src, cfg)), 60):
        for frames in batch["latents"][:, :, 0, 0, 0]:
            video, t = np.divmod(frames.astype(int), 1000)
            assert len(set(video)) == 1 and video[0] in strides, video
            steps = set(np.diff(t))
            assert len(steps) == 1
            strides[video[0]].add(steps.pop())
        np.testing.assert_array_equal(batch["clip_ids"], np.tile(np.arange(4), (2, 1)))
    assert strides[0] == {2, 3, 4, 5} and strides[2] == {2, 3}


def test_fixed_stride_and_clip_partitions_are_valid():
    from vgpt_jax import layout
    src = indexed_source([30] * 4)
    for batch in take(iter(ip.make_dataset(src, data_cfg(num_frames=5, stride_min=4,
                                                         stride_max=4))), 5):
        t = batch["latents"][:, :, 0, 0, 0].astype(int) % 1000
        assert (np.diff(t, axis=1) == 4).all()
        layout.check_clip_ids(batch["clip_ids"], 5)


def test_no_long_enough_video_is_a_clear_error():
    with pytest.raises(ValueError, match=r"none of its 2 videos has the 13 frames.*longest: 6"):
        ip.make_dataset(indexed_source([6, 5]), data_cfg(stride_min=4, stride_max=4))


def test_mixed_latent_sizes_name_the_video():
    src = tiny_source(3) + [dict(latents=np.zeros((10, 8, 8, 4), np.float32), fps=30.0,
                                 source="big_video", num_frames=10)]
    with pytest.raises(ValueError, match="big_video.*all videos of a run must share"):
        take(iter(ip.make_dataset(src, data_cfg(shuffle=False, global_batch_size=4))), 1)


def test_global_arrays_reject_bad_clip_ids():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    sh = {"latents": NamedSharding(mesh, P("data")), "clip_ids": NamedSharding(mesh, P("data"))}
    good = {"latents": np.zeros((2, 3, 2, 2, 4), np.float32),
            "clip_ids": np.array([[0, 0, 1], [0, 1, 2]], np.int32)}
    out = ip.to_global(good, sh, 2)
    assert out["latents"].shape == (2, 3, 2, 2, 4)
    with pytest.raises(ValueError, match="input batch clip_ids: sample 1 is not contiguous"):
        ip.to_global(dict(good, clip_ids=np.array([[0, 0, 1], [0, 2, 2]], np.int32)), sh, 2)


def test_missing_and_corrupt_stores_name_the_file(tmp_path):
    store = pytest.importorskip("vgpt_jax.data.store")
    with pytest.raises(store.StoreError, match=str(tmp_path / "nowhere")):
        ip.open_source(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.store is empty"):
        ip.open_source("")
    path = tmp_path / "store"
    store.write_store(str(path), tiny_source(3))
    got = take(iter(ip.make_dataset(ip.open_source(str(path)), data_cfg(global_batch_size=2))), 1)
    assert got[0]["latents"].shape == (2, 4, 4, 4, 4)
    shard = next(p for p in path.iterdir() if p.name.endswith(".array_record"))
    shard.write_bytes(b"garbage" * 10)
    with pytest.raises(store.StoreError, match=shard.name):
        ip.open_source(str(path))
