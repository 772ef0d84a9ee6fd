"""`vgpt sample --class / --actions / --caption` and `vgpt export-lora`: the commands wrap the
library (Pipeline.predict with conditions; finetune's exports) and refuse bad input in one
line."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from test_pipeline import export_random
from vgpt_jax.data import video_io

from vgpt_jax.commands import sample as sample_tool

PX = 8


@pytest.fixture(scope="module")
def conditioned_export(tmp_path_factory):
    return export_random(str(tmp_path_factory.mktemp("export")),
                         conditions=dict(num_classes=3, action_dim=2))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    pixels = np.random.default_rng(0).integers(0, 256, (4, PX, PX, 3), dtype=np.uint8)
    return video_io.write_video(str(tmp_path_factory.mktemp("in") / "in.mp4"), pixels, fps=8.0)


def sample_argv(export, video, out, *extra):
    return ["--checkpoint", export, "--input", video, "--output", out, "--frame-stride", "1",
            "--context-frames", "2", "--clip-sizes", "1", "1", "--steps", "2", "--window", "4",
            "--no-progress", *extra]


def test_sample_takes_a_class_and_actions(conditioned_export, video, tmp_path):
    actions = tmp_path / "actions.npy"
    np.save(actions, np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32))
    outs = {}
    for k in (0, 2):
        out = str(tmp_path / f"class{k}.mp4")
        assert sample_tool.main(sample_argv(conditioned_export, video, out, "--class", str(k),
                                            "--actions", str(actions),
                                            "--condition-guidance", "2.0")) == 0
        outs[k], _ = video_io.read_video(out)
    assert outs[0].shape == (2, PX, PX, 3)
    assert np.abs(outs[0].astype(int) - outs[2]).max() > 0   # the class reaches the video
    json_actions = tmp_path / "actions.json"
    json_actions.write_text(json.dumps(np.load(actions).tolist()))
    out = str(tmp_path / "json.mp4")
    assert sample_tool.main(sample_argv(conditioned_export, video, out, "--class", "0",
                                        "--actions", str(json_actions),
                                        "--condition-guidance", "2.0")) == 0
    np.testing.assert_array_equal(video_io.read_video(out)[0], outs[0])
    # The release's decode -> uint8 -> encode round trip works with conditions too.
    assert sample_tool.main(sample_argv(conditioned_export, video, out, "--class", "0",
                                        "--actions", str(actions), "--reencode",
                                        "--condition-guidance", "2.0")) == 0
    assert video_io.read_video(out)[0].shape == (2, PX, PX, 3)


@pytest.mark.parametrize("extra, message", [
    (["--class", "7", "--actions", "ACTIONS"], "--class: class 7 outside"),
    (["--actions", "ACTIONS"], "--class: missing"),
    (["--class", "0"], "--actions: missing"),
    (["--class", "0", "--actions", "SHORT"], "3 frames; the context"),
    (["--class", "0", "--actions", "missing.npy"], "no such file"),
    (["--class", "0", "--caption", "a ball"], "--caption: the model has no text"),
    (["--condition-guidance", "2"], "--condition-guidance needs"),
])
def test_sample_refuses_bad_conditions(conditioned_export, video, tmp_path, extra, message):
    np.save(tmp_path / "a.npy", np.zeros((4, 2), np.float32))
    np.save(tmp_path / "short.npy", np.zeros((3, 2), np.float32))
    extra = [{"ACTIONS": str(tmp_path / "a.npy"), "SHORT": str(tmp_path / "short.npy")}.get(e, e)
             for e in extra]
    with pytest.raises(ValueError, match=message):
        sample_tool.main(sample_argv(conditioned_export, video, str(tmp_path / "o.mp4"), *extra))


def test_sample_takes_a_caption(video, tmp_path):
    """--caption embeds with --text-encoder (or the export's text.encoder) and samples."""
    pytest.importorskip("transformers")
    from vgpt_jax import checkpoint, text_encoder
    encoder = text_encoder.make_tiny_encoder(str(tmp_path / "enc"), ("two", "balls"), dim=16)
    export = export_random(str(tmp_path / "export"), conditions=dict(text_dim=16, text_tokens=4))
    config = checkpoint.read_config(export)
    config.text = {"encoder": encoder}
    with open(os.path.join(export, checkpoint.CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f)
    outs = []
    for caption in ("two balls", "balls balls two"):
        out = str(tmp_path / f"{len(outs)}.mp4")
        assert sample_tool.main(sample_argv(export, video, out, "--caption", caption)) == 0
        outs.append(video_io.read_video(out)[0].astype(int))
    assert np.abs(outs[0] - outs[1]).max() > 0
    with pytest.raises(ValueError, match="--text-encoder needs --caption"):
        sample_tool.main(sample_argv(export, video, out, "--text-encoder", encoder))
    with pytest.raises(ValueError, match="--class: given, but the model has no such"):
        sample_tool.main(sample_argv(export, video, out, "--class", "0"))
