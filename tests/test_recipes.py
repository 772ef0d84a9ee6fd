"""The recipes end to end at their quick size (simulate, ingest with conditions, train,
measure), the kicked world's actions, and the ball counter that scores class-to-video."""
from __future__ import annotations

import numpy as np
import pytest

from vgpt_jax import recipes
from vgpt_jax.data import action_world
from vgpt_jax.data import physics_world as pw


def test_kicks_are_the_only_difference_from_the_free_world():
    config = pw.WorldConfig(size=32, scenarios=("balls",), max_balls=2)
    rng = np.random.default_rng(0)
    pos, vel, radii = pw.sample_balls(rng, config)
    none = np.zeros((1, 6, 2))
    free = pw.simulate_balls(pos[None], vel[None], radii[None], 6, config)[0]
    np.testing.assert_allclose(action_world.simulate_kicks(pos[None], vel[None], radii[None],
                                                            none, config)[0], free, atol=1e-12)
    kick = none.copy()
    kick[0, 3] = (1.0, 0.0)
    kicked = action_world.simulate_kicks(pos[None], vel[None], radii[None], kick, config)[0]
    np.testing.assert_allclose(kicked[0, :3], free[0, :3], atol=1e-12)
    assert np.abs(kicked[0, 3:, 0] - free[0, 3:, 0]).max() > 1e-3


def test_kicked_dataset_is_deterministic_and_records_its_actions():
    a = action_world.make_dataset(3, 5, 32, seed=1)
    b = action_world.make_dataset(3, 5, 32, seed=1)
    assert all(np.array_equal(x.clip.frames, y.clip.frames) for x, y in zip(a, b))
    assert a[0].actions.shape == (5, 2) and not a[0].actions[0].any()


def test_ball_counter_reads_the_true_videos():
    clips = pw.make_dataset(6, 2, 32, seed=0, config=pw.WorldConfig(scenarios=("balls",),
                                                                       max_balls=3), num_takes=1)
    counted = recipes.count_balls(np.stack([c.frames[0] for c in clips]),
                                  pw.WorldConfig().background)
    assert np.mean(counted == np.asarray([len(c.radii) for c in clips])) >= 0.5


def test_ball_errors_read_the_true_videos_and_the_controlled_ball_alone():
    from vgpt_jax.vae.latent_space import make_latent_space
    clips = [p.clip for p in action_world.make_dataset(3, 4, 32, seed=2)]
    space = make_latent_space("space_to_depth:8")
    latents = np.stack([space.encode(c.frames) for c in clips])
    got = recipes.ball_errors(space, latents[:, 1:], clips, 1)
    assert got["position_error_px"] < 0.5 and got["detection_rate"] == 1.0
    # A copy of frame 0: the kicked, moving ball 0 is off by its motion.
    still = np.repeat(latents[:, :1], 3, axis=1)
    moved = np.mean([np.linalg.norm(c.pixel_positions()[1:, 0] - c.pixel_positions()[:1, 0], axis=-1).mean()
                     for c in clips])
    np.testing.assert_allclose(recipes.ball_errors(space, still, clips, 1, 1)["position_error_px"],
                               moved, atol=0.5)


@pytest.mark.parametrize("name", recipes.RECIPES)
def test_recipe_runs_end_to_end(name, tmp_path):
    if name == "atari_actions":  # the atari extra (ale-py); CI installs test,eval,tpu only
        pytest.importorskip("ale_py")
    report = recipes.run(recipes.recipe_config(name, "quick"), str(tmp_path))
    assert report["steps"] == 2 and np.isfinite(report["final_loss"])
    actions = ("mse_true_actions", "mse_shuffled_actions", "copy_last_mse",
               "denoising_error_true_actions", "denoising_error_shuffled_actions")
    controlled = tuple(f"controlled_ball_{k}" for k in ("true_actions", "shuffled_actions", "copy_last"))
    keys = {"atari_actions": actions, "class_to_video": ("class_accuracy", "unconditional_accuracy"),
            "action_prediction": actions + controlled,
            "image_animation": ("mse", "copy_frame_mse", "balls", "copy_frame_balls"),
            "text_to_video": ()}[name]
    number = lambda v: v["position_error_px"] if isinstance(v, dict) else v  # ball metrics: a dict
    assert all(np.isfinite(number(report[k])) for k in keys)
    assert (tmp_path / "report.json").exists() and (tmp_path / "model" / "config.json").exists()
    if name == "text_to_video":
        assert all(np.isfinite(report[k]["count_accuracy"])
                   for k in ("with_text", "unconditional", "true_videos"))
    if name == "class_to_video":  # samples per class asked for, by the ball count read; a row
        # of samples per class, then the unconditional ones
        assert np.asarray(report["balls_read_per_class"]).sum() == report["samples"]
        from vgpt_jax.data.video_io import read_video
        cfg = recipes.recipe_config(name, "quick")
        frames = read_video(str(tmp_path / "samples.gif"))[0]
        side = 2 * (cfg.world.frame_size + 2)  # upscaled 2x, with the grid's gap
        # (a GIF merges repeated frames, so it may hold fewer than sample_frames)
        assert frames.shape[1:3] == (4 * side, 8 * side)
        assert 1 <= len(frames) <= cfg.eval.sample_frames


def test_a_fine_tune_reads_its_world_with_the_base_model_normalization(tmp_path):
    """The recipe's world (1-3 balls) has other latent statistics than the main job's: a
    fine-tune from the main job's export ingests with the export's normalisation."""
    from vgpt_jax import demo
    from vgpt_jax.data.store import LatentStore
    base = demo.run(demo.demo_config("quick"), str(tmp_path / "base"))
    assert base["num_videos"]
    cfg = recipes.recipe_config("image_animation", "quick")
    cfg.checkpoint.init_from = str(tmp_path / "base" / "model")
    report = recipes.run(cfg, str(tmp_path / "ft"))
    assert report["steps"] == 2
    ours = LatentStore(str(tmp_path / "ft" / "latents")).normalization
    theirs = LatentStore(str(tmp_path / "base" / "latents")).normalization
    np.testing.assert_array_equal(ours.shift, theirs.shift)
    np.testing.assert_array_equal(ours.scale, theirs.scale)


def test_captions_follow_the_simulator():
    clips = pw.make_dataset(6, 8, 32, seed=0, config=pw.WorldConfig(scenarios=("balls",),
                                                                       max_balls=3), num_takes=1)
    for c in clips:
        text = recipes.caption(c)
        count, colour, direction = recipes.parse_caption(text)
        assert count == len(c.radii) and colour == recipes.color_name(c.colors[0])
        assert direction in ("left", "right")
        assert ("left" in text) == (c.positions[-1, 0, 0] < c.positions[0, 0, 0])
        assert set(text.replace(",", " ,").split()) <= set(recipes.CAPTION_WORDS)
    assert recipes.color_name((255, 70, 70)) == "red" and recipes.color_name((70, 70, 255)) == "blue"


def test_caption_agreement_reads_the_true_videos_and_not_a_mirrored_one():
    """On true videos the readers agree with the captions; mirrored left-right, the
    directions flip (but for a ball that barely moves)."""
    clips = pw.make_dataset(12, 16, 32, seed=3, config=pw.WorldConfig(scenarios=("balls",),
                                                                        max_balls=3), num_takes=1)
    videos = np.stack([c.frames for c in clips])
    captions = [recipes.caption(c) for c in clips]
    true = recipes.caption_agreement(videos, captions)
    assert true["count_accuracy"] >= 0.75 and true["colour_found"] == 1.0
    assert true["direction_agreement"] >= 0.75 and true["direction_videos"] >= 8
    mirrored = recipes.caption_agreement(videos[:, :, :, ::-1], captions)
    assert mirrored["direction_agreement"] <= 0.25


def test_bad_recipe_names_the_field():
    with pytest.raises(ValueError, match="recipe 'nope'"):
        recipes.recipe_config("nope")
    with pytest.raises(ValueError, match="size"):
        recipes.recipe_config("class_to_video", "huge")
    cfg = recipes.recipe_config("class_to_video", "quick")
    cfg.eval.fvd = True  # the quick size samples 2 frames; I3D needs 9
    with pytest.raises(ValueError, match="eval.fvd needs eval.sample_frames >= 9"):
        recipes.run(cfg, "unused")
    cfg.eval.sample_frames = 64
    with pytest.raises(ValueError, match="eval.sample_frames=64: 1..world.num_frames"):
        recipes.run(cfg, "unused")
