"""Features for probing and retrieval: the decoder tap, determinism, batch invariance, 1 vs 8
devices, the resumable store (stored == recomputed), linear probes, retrieval, and the
physics world's simulator labels."""
from __future__ import annotations

import dataclasses
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from test_sampling import random_model
from vgpt_jax import checkpoint, feature_store, features
from vgpt_jax import layout as layout_lib
from vgpt_jax.commands import features as features_cmd
from vgpt_jax.commands import probe as probe_cmd
from vgpt_jax.commands import retrieval as retrieval_cmd
from vgpt_jax.eval import physics_probe, probe, retrieval
from vgpt_jax.model.decoder import rms_norm
from vgpt_jax.pipeline import Pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return random_model(num_layers=3, seed=2)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(0).standard_normal((5, 3, 4, 4, 4)).astype(np.float32)


# ----------------------------------------------------------------------------- the decoder tap


@pytest.mark.parametrize("scan", [True, False])
def test_tap_sees_the_residual_stream_of_every_layer(scan, latents):
    m = random_model(num_layers=3, seed=2, scan_layers=scan)
    b, f = latents.shape[:2]
    layout = layout_lib.clip_layout(b, f, 6, noisy=False, clip=0)
    t = jnp.ones((b, f))
    x = m.embed(latents, t, layout)
    args = (x, layout_lib.token_positions(layout), layout_lib.token_meta(layout), 6)
    stream = m.decoder(*args, tap=lambda h: h)
    assert stream.shape == (3,) + x.shape
    final = rms_norm(stream[-1], m.decoder.final_norm[...], m.cfg.rms_norm_eps)
    np.testing.assert_allclose(final, m.decoder(*args), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- extraction


def test_features_are_deterministic_and_batch_invariant(model, latents):
    a = features.extract(model, latents, pools=features.POOLS, batch_size=2)
    b = features.extract(model, latents, pools=features.POOLS, batch_size=2)
    c = features.extract(model, latents, pools=features.POOLS, batch_size=4)
    alone = features.extract(model, latents[3:4], pools=features.POOLS, batch_size=1)
    for p in features.POOLS:
        assert a[p].shape == (5, 3, 64) and a[p].dtype == np.float32
        np.testing.assert_array_equal(a[p], b[p])
        np.testing.assert_allclose(a[p], c[p], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[p][3:4], alone[p], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["mean"], a["last_frame"])


def test_layers_are_returned_in_the_order_asked(model, latents):
    every = features.extract(model, latents, layers="all")["mean"]
    picked = features.extract(model, latents, layers=[-1, 0])["mean"]
    np.testing.assert_allclose(picked, every[:, [2, 0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a layer of this 3-layer model"):
        features.extract(model, latents, layers=[3])


def test_noisy_copy_depends_on_each_videos_own_seed(model, latents):
    a = features.extract(model, latents, t=0.5, seeds=[10, 11, 12, 13, 14], batch_size=2)
    b = features.extract(model, latents[::-1], t=0.5, seeds=[14, 13, 12, 11, 10], batch_size=3)
    np.testing.assert_allclose(a["mean"], b["mean"][::-1], rtol=1e-5, atol=1e-6)
    other = features.extract(model, latents, t=0.5, seeds=[20, 21, 22, 23, 24])
    assert not np.allclose(a["mean"], other["mean"])
    clean_noise = features.extract(model, latents, t=1.0)["mean"]  # t = 1: no noise at all
    np.testing.assert_allclose(clean_noise, features.extract(model, latents, t=1.0,
                                                             seeds=[9] * 5)["mean"])
    with pytest.raises(ValueError, match="end_token.*noisy copy"):
        features.extract(model, latents, pools=("end_token",), t=0.5)
    with pytest.raises(ValueError, match=r"t=1.5"):
        features.extract(model, latents, t=1.5)


def test_one_and_eight_devices_agree(tmp_path):
    outs = {}
    for devices in (1, 8):
        path = tmp_path / f"features_{devices}.npz"
        proc = subproc.run(["tests/scripts/features_checks.py", str(path)], devices=devices)
        assert proc.returncode == 0, proc.stdout[-3000:]
        outs[devices] = dict(np.load(path))
    assert outs[1]["devices"] == 1 and outs[8]["devices"] == 8
    for k in outs[1]:
        if k != "devices":
            np.testing.assert_allclose(outs[8][k], outs[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(outs[8]["fsdp_mean"], outs[1]["mean"], rtol=1e-5, atol=1e-6)


def test_pixel_features():
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    out = features.pixel_features(frames)
    assert out["mean"].shape == (2, 192) and out["all"].shape == (2, 576)
    np.testing.assert_allclose(out["last_frame"], out["all"][:, -192:])
    with pytest.raises(ValueError, match="multiple of the 8x8 grid"):
        features.pixel_features(frames[:, :, :12, :12])


# ----------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A random model on 16x16 physics frames: space-to-depth(4) latents 4x4x48, 2x2 patches."""
    m = random_model(num_layers=2, seed=5, latent_channels=48)
    config = ml_collections.ConfigDict({
        "model": dataclasses.asdict(m.cfg),
        "latent_space": {"kind": "space_to_depth", "downsample": 4}})
    return checkpoint.export_model(str(tmp_path_factory.mktemp("export")), m, config)


PHYSICS = ["--physics", "12", "--frames", "3", "--frame-size", "16", "--no-progress"]


def test_store_resumes_and_equals_recomputation(export_dir, tmp_path):
    out = str(tmp_path / "feats")
    argv = ["--checkpoint", export_dir, "--out", out, "--chunk", "5", *PHYSICS]
    assert features_cmd.main(argv) == 0
    names, stored = feature_store.load(out)
    assert len(names) == 24 and sorted(stored) == sorted(
        f"layer{i}.{p}" for i in range(2) for p in features.POOLS)
    # An interrupted run: the last chunks and the merged file are missing; resuming fills them.
    for f in ("part-00003.npz", "part-00004.npz", "features.npz"):
        os.remove(os.path.join(out, f))
    assert features_cmd.main(argv) == 0
    names2, resumed = feature_store.load(out)
    np.testing.assert_array_equal(names2, names)
    for k in stored:
        np.testing.assert_array_equal(resumed[k], stored[k])
    # Stored == recomputed through the public API.
    clips, _ = physics_probe.make_probe_set(physics_probe.ProbeSetConfig(
        num_scenarios=12, num_frames=3, frame_size=16))
    assert [c.name for c in clips] == list(names)
    pipe = Pipeline.from_checkpoint(export_dir)
    direct = pipe.features(np.stack([c.frames for c in clips]), layers=[1], pool="last_frame")
    np.testing.assert_allclose(direct[:, 0], stored["layer1.last_frame"], rtol=1e-5, atol=1e-6)
    single = pipe.features(clips[4].frames, layers=[1], pool=["mean"])
    np.testing.assert_allclose(single["mean"][0], stored["layer1.mean"][4], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"other settings \(differ: \['seed'\]\)"):
        features_cmd.main([*argv, "--seed", "3"])


def test_probe_and_retrieval_commands_on_a_store(export_dir, tmp_path, capsys):
    out = str(tmp_path / "feats")
    assert features_cmd.main(["--checkpoint", export_dir, "--random-init", "0", "--out", out,
                              "--layers", "-1", "--pools", "mean", *PHYSICS]) == 0
    pixels = str(tmp_path / "pixels")
    assert features_cmd.main(["--pixels", "--out", pixels, *PHYSICS]) == 0
    report = str(tmp_path / "probes")
    assert probe_cmd.main(["--features", out, pixels, "--label", "scenario", "--steps", "20",
                           "--out", report]) == 0
    text = capsys.readouterr().out
    assert "feats/layer1.mean" in text and "pixels/pixels.all" in text
    assert "best for scenario:" in text
    assert os.path.exists(os.path.join(report, "confusion_scenario.png"))
    assert retrieval_cmd.main(["--features", pixels]) == 0
    text = capsys.readouterr().out
    assert "(24 queries, 23 candidates each)" in text and "best: pixels." in text


# ----------------------------------------------------------------------------- probe, retrieval


def test_probe_beats_the_majority_class_on_a_separable_set():
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=300, p=[0.5, 0.3, 0.2])
    centers = rng.standard_normal((3, 16)) * 3
    x = centers[y] + rng.standard_normal((300, 16))
    r = probe.linear_probe(x, y, groups=np.arange(300) // 2, steps=200)
    assert r.top1 > 0.95 and r.top1 > r.majority + 0.3
    assert r.confusion.sum() == r.num_test and r.num_train + r.num_test == 300
    assert set(r.val_top1) == set(probe.WEIGHT_DECAYS)


def test_groups_never_straddle_the_split():
    groups = np.repeat(np.arange(20), 2)
    train, test = probe.split_by_group(groups, 0.3, seed=0)
    assert not set(groups[train]) & set(groups[test]) and len(train) + len(test) == 40


def test_retrieval_finds_an_exact_duplicate_at_rank_1():
    x = np.random.default_rng(0).standard_normal((30, 8))
    x = np.concatenate([x, x[:1]])  # video 30 duplicates video 0
    ranks = retrieval.cosine_ranks(x, targets=[30, 0], queries=[0, 30])
    assert ranks.tolist() == [1, 1]
    queries, targets = retrieval.pair_targets(["a", "b", "a", "c", "c", "d"])
    assert queries.tolist() == [0, 2, 3, 4] and targets.tolist() == [2, 0, 4, 3]
    tied = retrieval.cosine_ranks(np.ones((4, 3)), targets=[1], queries=[0])
    assert tied.tolist() == [3]  # ties count against the query
    s = retrieval.summarize(np.array([1, 2, 7, 20]))
    assert s["R@1"] == 0.25 and s["R@5"] == 0.5 and s["R@10"] == 0.75 and s["median_rank"] == 4.5


# ----------------------------------------------------------------------------- physics labels


def test_collision_label_comes_from_the_substep_simulation():
    from vgpt_jax.data.physics_world import PhysicsClip, WorldConfig
    world = WorldConfig(size=16, gravity=0.0)

    def clip(vx):  # two balls on one horizontal line, moving towards each other at vx
        pos = np.array([[[0.3, 0.5], [0.7, 0.5]]])
        vel = np.array([[[vx, 0.0], [-vx, 0.0]]])
        return PhysicsClip("c", "balls", 0, 0, 16.0, np.zeros((8, 16, 16, 3), np.uint8), pos,
                           vel, np.array([0.08, 0.08]), np.ones(2), {})
    assert physics_probe.collided(clip(1.0), world)       # they meet within 7 frames
    assert not physics_probe.collided(clip(-0.2), world)  # moving apart
    clips, rows = physics_probe.make_probe_set(physics_probe.ProbeSetConfig(
        num_scenarios=6, num_frames=3, frame_size=16))
    for c, r in zip(clips, rows):
        assert r["name"] == c.name and r["scenario"] == c.scenario
        assert r["num_balls"] == (len(c.radii) if c.scenario == "balls" else "")
    assert {r["group"] for r in rows} == {c.name.rsplit("-take", 1)[0] for c in clips}
