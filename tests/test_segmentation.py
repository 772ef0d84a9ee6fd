"""Segmentation as video-to-video: J and F, masks as video, the training pairs, the recipe end to
end at a quick size."""
import os

import numpy as np
import pytest

from vgpt_jax.data import segmentation_masks as masks_lib
from vgpt_jax.eval import segmentation as seg


def square(top, left, size=4, frame=10):
    m = np.zeros((frame, frame), bool)
    m[top:top + size, left:left + size] = True
    return m


def test_truth_scores_one():
    truth = np.stack([square(2, 2), square(1, 5), np.zeros((10, 10), bool)])
    s = seg.j_and_f(truth, truth)
    assert s["J"] == s["F"] == s["J&F"] == 1.0
    np.testing.assert_array_equal(s["J_frames"], [1, 1, 1])


def test_known_values_on_hand_made_masks():
    truth, shifted = square(2, 2), square(2, 3)
    # 4x4 squares one column apart: 12 shared pixels of 20.
    assert seg.region_similarity(shifted, truth) == pytest.approx(0.6)
    # Inner boundaries of 12 pixels each share the 6 on the top and bottom rows: P = R = 0.5.
    assert seg.boundary_f(shifted, truth, tolerance=0) == pytest.approx(0.5)
    # One pixel of tolerance forgives a one-column shift entirely.
    assert seg.boundary_f(shifted, truth, tolerance=1) == pytest.approx(1.0)
    # Three columns apart: one shared column of 4 pixels, 28 in the union.
    assert seg.region_similarity(square(2, 5), truth) == pytest.approx(1 / 7)


def test_empty_masks():
    empty, ball = np.zeros((10, 10), bool), square(3, 3)
    assert seg.region_similarity(empty, empty) == 1.0 and seg.boundary_f(empty, empty) == 1.0
    assert seg.region_similarity(empty, ball) == 0.0 and seg.boundary_f(empty, ball) == 0.0
    assert seg.boundary_f(ball, empty) == 0.0


def test_davis_tolerance_and_errors():
    assert seg.boundary_tolerance(32, 32) == 1
    assert seg.boundary_tolerance(480, 854) == 8  # DAVIS 480p: ceil(0.008 * 979.7)
    with pytest.raises(ValueError, match="boolean"):
        seg.region_similarity(np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="must be equal"):
        seg.boundary_f(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_disc_masks_and_video_round_trip():
    # A disc of radius 1 centred on a pixel corner covers the 4 pixels around it.
    m = masks_lib.disc_masks(np.array([[[2.0, 2.0]]]), np.array([1.0]), 5, 6)
    assert m.shape == (1, 5, 6) and m.sum() == 4 and m[0, 1:3, 1:3].all()
    frames = masks_lib.render_masks(m, (200, 40, 40), (10, 10, 10))
    assert frames.dtype == np.uint8 and frames.shape == (1, 5, 6, 3)
    np.testing.assert_array_equal(masks_lib.read_masks(frames, (200, 40, 40), (10, 10, 10)), m)


def test_simulator_masks_match_the_rendered_balls():
    from vgpt_jax.data import physics_world
    world = physics_world.WorldConfig(scenarios=("balls",), max_balls=2)
    clip = physics_world.make_dataset(1, 4, 32, seed=3, config=world)[0]
    truth = masks_lib.clip_masks(clip)
    assert truth.shape == (4, 32, 32) and truth.any()
    # Pixels at least half covered by a ball are its mask: the threshold baseline, set between
    # the background and half a ball's contrast, recovers nearly all of it.
    found = masks_lib.threshold_masks(clip.frames, world.background, 100.0)
    assert seg.region_similarity(found, truth).mean() > 0.8


def test_pair_batch_puts_the_masks_after_their_source():
    from vgpt_jax import segmentation
    v, t, f = 3, 6, 2
    src = np.arange(v * t, dtype=np.float32).reshape(v, t, 1, 1, 1)
    videos = segmentation.PairedVideos(np.zeros((v, t, 4, 4, 3), np.uint8),
                                       np.zeros((v, t, 4, 4), bool), src, -src)
    batch = segmentation.pair_batch(videos, np.random.default_rng(0), 5, f)
    assert batch["latents"].shape == (5, 2 * f, 1, 1, 1)
    np.testing.assert_array_equal(batch["clip_ids"], [[0, 0, 1, 1]] * 5)
    lat = batch["latents"][..., 0, 0, 0]
    np.testing.assert_array_equal(lat[:, f:], -lat[:, :f])           # masks of the same frames
    np.testing.assert_array_equal(np.diff(lat[:, :f], axis=1), 1.0)  # consecutive frames


def test_config_errors_name_the_field():
    from vgpt_jax.segmentation import SegmentationConfig
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['stpes'\]"):
        SegmentationConfig.from_config({"stpes": 3})
    with pytest.raises(ValueError, match="eval_starts"):
        SegmentationConfig.from_config({"eval_starts": [14]})
    with pytest.raises(ValueError, match=r"world\.\['size'\]"):
        SegmentationConfig.from_config({"world": {"size": 3}})


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from flax import nnx

    from vgpt_jax import checkpoint
    from vgpt_jax.config import ModelConfig
    from vgpt_jax.demo import demo_config
    from vgpt_jax.model import VideoGPT
    cfg = demo_config("quick")
    cfg.model.latent_channels = 48  # space-to-depth by 4 of RGB
    model = VideoGPT(ModelConfig.from_config(cfg.model), rngs=nnx.Rngs(0))
    return checkpoint.export_model(str(tmp_path_factory.mktemp("pretrained")), model, cfg)


def load_config(size):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "segmentation.py")
    spec = importlib.util.spec_from_file_location("seg_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)


def test_finetune_config_keeps_the_export_and_sets_the_recipe():
    import ml_collections

    from vgpt_jax import segmentation
    from vgpt_jax.demo import demo_config
    pretrained = ml_collections.ConfigDict(demo_config("quick").to_dict())
    for scratch in (False, True):
        cfg = segmentation.SegmentationConfig.from_config(
            {**load_config("default").to_dict(), "init_from": "exp", "from_scratch": scratch})
        t = segmentation.finetune_config(cfg, pretrained)
        assert t.checkpoint.init_from == ("" if scratch else "exp")
        assert t.data.num_frames == 8 and t.data.global_batch_size == 16
        assert t.model.to_dict() == pretrained.model.to_dict()
        assert t.segmentation.from_scratch == scratch


def test_recipe_end_to_end_quick(tiny_export, tmp_path):
    from vgpt_jax import checkpoint, segmentation
    cfg = load_config("quick")
    cfg.init_from = tiny_export
    report = segmentation.run(segmentation.SegmentationConfig.from_config(cfg), str(tmp_path))
    assert report["test_windows"] == 2 * 2 and report["steps"] == 2
    for name in ("model", "threshold_baseline"):
        assert 0.0 <= report[name]["J"] <= 1.0 and 0.0 <= report[name]["F"] <= 1.0
        assert len(report[name]["J_by_frame"]) == 2
    assert report["threshold_baseline"]["J"] > 0.5
    for name in ("report.json", "masks.png", "metrics.jsonl", "model/config.json"):
        assert os.path.exists(tmp_path / name)
    saved = checkpoint.read_config(str(tmp_path / "model"))
    assert saved.checkpoint.init_from == tiny_export and saved.data.num_frames == 4
