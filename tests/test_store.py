"""Latent store: round trips, grain compatibility, and clear errors for broken stores."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import ml_dtypes
import numpy as np
import pytest

from vgpt_jax.data.store import (MANIFEST, LatentStore, StoreError, StoreWriter, decode_record, encode_record,
                                 shard_name, write_store)


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"latents": rng.standard_normal((i + 2, 3, 5, 4)).astype(np.float32), "fps": 10.0 + i,
             "source": f"video_{i}.mp4", "num_frames": i + 2} for i in range(n)]


@pytest.mark.parametrize("dtype,np_dtype", [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_round_trip_keeps_order_shapes_and_metadata(tmp_path, dtype, np_dtype):
    records = _records(7)
    store = write_store(tmp_path / "s", records, num_shards=3, dtype=dtype, latent_space="space_to_depth:8")
    assert len(store) == 7
    for i, r in enumerate(records):
        item = store[i]
        assert set(item) == {"latents", "fps", "source", "num_frames", "extra"}
        assert item["latents"].dtype == np.float32 and item["latents"].shape == r["latents"].shape
        np.testing.assert_array_equal(item["latents"], r["latents"].astype(np_dtype).astype(np.float32))
        assert (item["fps"], item["source"], item["num_frames"]) == (r["fps"], r["source"], r["num_frames"])
    assert store[-1]["source"] == "video_6.mp4"
    with pytest.raises(IndexError):
        store[7]
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["shards"] == [shard_name(i, 3) for i in range(3)]
    assert manifest["shard_num_records"] == [3, 2, 2] and manifest["num_videos"] == 7
    assert manifest["latent_space"] == "space_to_depth:8" and manifest["storage_dtype"] == dtype
    assert manifest["latent_shape"]["channels"] == [4] and manifest["latent_shape"]["total_frames"] == 35
    assert sorted(os.listdir(tmp_path / "s")) == sorted([MANIFEST] + manifest["shards"])  # no temporaries left


def test_more_shards_than_videos_and_empty_store(tmp_path):
    store = write_store(tmp_path / "a", _records(2), num_shards=4)
    assert [store[i]["source"] for i in range(2)] == ["video_0.mp4", "video_1.mp4"]
    assert len(write_store(tmp_path / "b", [], num_shards=2)) == 0


def test_grain_source_and_pickle(tmp_path):
    import grain

    records = _records(5)
    store = write_store(tmp_path / "s", records, num_shards=2)
    _ = store[0]  # opens readers; pickling must drop them
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone[3]["latents"], store[3]["latents"])
    dataset = grain.MapDataset.source(store).map(lambda item: item["num_frames"])
    read = list(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
    assert read == [r["num_frames"] for r in records]


def test_record_format_is_self_describing_and_checksummed():
    latents = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    record = encode_record(latents, fps=25.0, source="x.mp4", dtype="float16", latent_space="s2d")
    assert record[:8] == b"VGLAT001"
    header_len = int.from_bytes(record[8:12], "little")
    header = json.loads(record[12:12 + header_len])
    assert header["shape"] == [1, 2, 3, 4] and header["dtype"] == "float16" and header["source"] == "x.mp4"
    assert len(record) == 12 + header_len + latents.size * 2
    _, back = decode_record(record)
    np.testing.assert_array_equal(back, latents)
    broken = bytearray(record)
    broken[-1] ^= 0xFF
    with pytest.raises(StoreError, match="checksum"):
        decode_record(bytes(broken), where="somewhere")
    with pytest.raises(StoreError, match="truncated"):
        decode_record(record[:-3])
    with pytest.raises(StoreError, match="magic"):
        decode_record(b"not a record at all")


def test_missing_manifest_names_the_file(tmp_path):
    write_store(tmp_path / "s", _records(2))
    os.remove(tmp_path / "s" / MANIFEST)
    with pytest.raises(StoreError, match=str(tmp_path / "s" / MANIFEST)):
        LatentStore(tmp_path / "s")
    with pytest.raises(StoreError, match="does not exist"):
        LatentStore(tmp_path / "nowhere")


def test_missing_shard_names_the_file(tmp_path):
    write_store(tmp_path / "s", _records(4), num_shards=2)
    missing = tmp_path / "s" / shard_name(1, 2)
    os.remove(missing)
    with pytest.raises(StoreError, match=f"{missing}.*missing"):
        LatentStore(tmp_path / "s")


def test_garbage_shard_names_the_file(tmp_path):
    write_store(tmp_path / "s", _records(4), num_shards=2)
    shard = tmp_path / "s" / shard_name(0, 2)
    shard.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match=str(shard)):
        LatentStore(tmp_path / "s")


def test_corrupt_record_bytes_name_the_file(tmp_path):
    # Big records so that the flipped bytes land inside a record's data, not the index.
    records = [{"latents": np.ones((4, 16, 16, 8), np.float32) * i, "fps": 5.0, "source": f"v{i}"} for i in range(3)]
    write_store(tmp_path / "s", records)
    shard = tmp_path / "s" / shard_name(0, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(shard)):
        store = LatentStore(tmp_path / "s")
        for i in range(len(store)):
            store[i]


def test_manifest_shard_count_mismatch(tmp_path):
    write_store(tmp_path / "big", _records(5), num_shards=2)    # shard 1 holds 2 records
    write_store(tmp_path / "small", _records(3), num_shards=2)  # shard 1 holds 1 record
    shutil.copy(tmp_path / "small" / shard_name(1, 2), tmp_path / "big" / shard_name(1, 2))
    with pytest.raises(StoreError, match=f"{shard_name(1, 2)}: shard holds 1 records but"):
        LatentStore(tmp_path / "big")
    manifest_path = tmp_path / "small" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["num_videos"] = 9
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="do not add up"):
        LatentStore(tmp_path / "small")


def test_writer_refuses_to_clobber_and_cleans_up_on_error(tmp_path):
    write_store(tmp_path / "s", _records(1))
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(tmp_path / "s")
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "t", num_shards=2) as writer:
            writer.add(np.zeros((1, 1, 1, 1)), fps=1.0, source="a")
            raise RuntimeError("crash while writing")
    assert os.listdir(tmp_path / "t") == []  # no manifest, no temporaries: nothing looks complete
