"""The main job end to end at a reduced size, and `vgpt eval` on its checkpoint."""
import json
import os

import numpy as np
import pytest

from vgpt_jax import demo, evaluate
from vgpt_jax.data.physics_world import make_world
from vgpt_jax.commands import evaluate as eval_command
from vgpt_jax.data.video_io import read_video
from vgpt_jax.pipeline import Pipeline


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    report = demo.run(demo.demo_config("quick"), workdir)
    return workdir, report


def test_demo_writes_readable_outputs(demo_run):
    workdir, report = demo_run
    with open(os.path.join(workdir, "eval", "report.json")) as f:
        saved = json.load(f)
    assert set(saved["metrics"]) == {"video_gpt", "video_gpt_1step", "copy_last_frame",
                                     "linear_extrapolation"}
    for row in saved["metrics"].values():
        assert np.isfinite([row["mse"], row["psnr"], row["ssim"]]).all()
    assert set(saved["physics_iq"]) == set(saved["metrics"])
    assert "| video_gpt |" in open(os.path.join(workdir, "eval", "report.md")).read()
    grids = [f for f in os.listdir(os.path.join(workdir, "eval")) if f.startswith("grid_")]
    assert grids
    frames, _ = read_video(os.path.join(workdir, "eval", grids[0]))
    cfg = demo.demo_config("quick")
    assert len(frames) == cfg.eval.context_frames + cfg.eval.predict_frames
    assert os.path.exists(os.path.join(workdir, "train", "metrics.jsonl"))
    assert os.path.getsize(os.path.join(workdir, "eval", "learning_curve.png")) > 1000


def test_demo_checkpoint_reloads_for_sampling(demo_run):
    workdir, _ = demo_run
    pipe = Pipeline.from_checkpoint(os.path.join(workdir, "model"))
    assert pipe.latent_space is not None, "the export carries its latent space"
    cfg = demo.demo_config("quick")
    context = evaluate.held_out_videos(make_world(cfg.world)[1])[0].frames[:3]
    out = pipe.predict(context, num_frames=2, steps=2)
    assert out.frames.shape == (2,) + context.shape[1:] and out.frames.dtype == np.uint8


def test_eval_command_scores_a_checkpoint(demo_run, tmp_path):
    workdir, _ = demo_run
    out = str(tmp_path / "report")
    eval_command.main(["--checkpoint", os.path.join(workdir, "model"), "--physics", "2",
                   "--out", out, "--context-frames", "3", "--predict-frames", "2",
                   "--steps", "2", "--time-shift", "3", "--max-grids", "0"])
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["num_videos"] == 2 and report["settings"]["steps"] == 2
    assert report["settings"]["time_shift"] == 3.0
    assert report["checkpoint"].endswith("model")


def test_eval_command_rejects_bad_input(demo_run, tmp_path):
    workdir, _ = demo_run
    model = os.path.join(workdir, "model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_command.main(["--checkpoint", str(tmp_path / "nope"), "--physics", "1", "--out",
                       str(tmp_path / "r")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no videos"):
        eval_command.main(["--checkpoint", model, "--videos", str(empty), "--out", str(tmp_path / "r")])
    from vgpt_jax.data.video_io import write_video
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(0)
    write_video(str(mixed / "a.gif"), rng.integers(0, 255, (8, 32, 32, 3), np.uint8), 8)
    write_video(str(mixed / "b.gif"), rng.integers(0, 255, (8, 16, 16, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="differs from"):
        eval_command.main(["--checkpoint", model, "--videos", str(mixed), "--out", str(tmp_path / "r")])
    write_video(str(mixed / "b.gif"), rng.integers(0, 255, (5, 32, 32, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="are needed"):
        eval_command.main(["--checkpoint", model, "--videos", str(mixed), "--out", str(tmp_path / "r")])


def test_sample_command_defaults_to_the_trained_resolution(demo_run, tmp_path, capsys):
    from vgpt_jax.commands import sample as sample_tool
    from vgpt_jax.data.video_io import write_video
    workdir, _ = demo_run
    cfg = demo.demo_config("quick")
    size = cfg.world.frame_size
    big = str(tmp_path / "big.mp4")  # a real-sized input: 176x320, never trained on
    write_video(big, np.random.default_rng(0).integers(0, 255, (6, 176, 320, 3), np.uint8), 8)
    out = str(tmp_path / "pred.mp4")
    sample_tool.main(["--checkpoint", os.path.join(workdir, "model"), "--input", big,
                      "--output", out, "--context-frames", "3", "--frame-stride", "1",
                      "--clip-sizes", "2", "--steps", "1", "--no-progress"])
    frames, _ = read_video(out)
    assert frames.shape[1:3] == (size, size)
    assert f"resized to {size}x{size}, the resolution the model was trained at" in \
        capsys.readouterr().err
