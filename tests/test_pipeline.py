"""Pipeline and `vgpt sample`: loading an export, pixels in and out, the release's
decode/encode round trip, callbacks, conditions, and clear errors for bad input."""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import pytest

from test_sampling import random_model, rel_err
from vgpt_jax import checkpoint, sampling
from vgpt_jax.data import video_io
from vgpt_jax.pipeline import Pipeline, split_frames
from vgpt_jax.vae.latent_space import SpaceToDepth

from vgpt_jax.commands import sample as sample_tool

PX = 8            # 8x8 RGB frames -> SpaceToDepth(2) latents 4x4x12 -> 2x2 patches
FAST = dict(steps=2, window=6)


def export_random(where: str, **changes) -> str:
    """A random tiny model over SpaceToDepth(2) latents, exported to `where`."""
    model = random_model(seed=5, latent_channels=12, **changes)
    config = ml_collections.ConfigDict({
        "model": dataclasses.asdict(model.cfg),
        "latent_space": {"kind": "space_to_depth", "downsample": 2}})
    return checkpoint.export_model(where, model, config)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_random(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def pipe(export_dir):
    return Pipeline.from_checkpoint(export_dir)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (2, 6, PX, PX, 3), dtype=np.uint8)


def test_from_checkpoint_reads_model_and_latent_space(pipe, export_dir):
    assert isinstance(pipe.latent_space, SpaceToDepth) and pipe.latent_space.downsample == 2
    assert pipe.model.cfg == random_model(latent_channels=12).cfg
    assert Pipeline.from_pretrained(export_dir).model.cfg == pipe.model.cfg


def test_predict_pixels_equals_predict_latents(pipe, pixels):
    calls = []
    out = pipe.predict(pixels[0, :2], clip_sizes=[2, 1], seed=3, **FAST,
                       callback=lambda k, n, clip: calls.append((k, n, clip.shape)))
    assert out.latents.shape == (3, 4, 4, 12) and out.frames.shape == (3, PX, PX, 3)
    assert out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames, pipe.latent_space.decode(out.latents))
    assert calls == [(0, 2, (1, 2, 4, 4, 12)), (1, 2, (1, 1, 4, 4, 12))]
    latents = pipe.latent_space.encode(pixels[0, :2])
    again = pipe.predict(latents, clip_sizes=[2, 1], seed=3, **FAST)
    np.testing.assert_array_equal(again.latents, out.latents)
    assert again.frames is not None


def test_reencode_round_trip_feeds_the_history(pipe, pixels):
    """With reencode, clip 1 continues [context, encode(decode(clip 0))]: the same as a fresh
    prediction from that context (same noise with the release's re-seeding)."""
    opts = dict(FAST, seed=1, same_noise_every_clip=True)
    out = pipe.predict(pixels[:, :2], clip_sizes=[2, 2], reencode=True, **opts)
    plain = pipe.predict(pixels[:, :2], clip_sizes=[2, 2], **opts)
    np.testing.assert_array_equal(out.latents[:, :2], plain.latents[:, :2])
    space = pipe.latent_space
    round_trip = np.stack([space.encode(space.decode(v)) for v in out.latents[:, :2]])
    assert not np.array_equal(round_trip, out.latents[:, :2])  # uint8 quantisation is visible
    context = np.concatenate([np.stack([space.encode(p) for p in pixels[:, :2]]), round_trip], 1)
    fresh = pipe.predict(context, clip_sizes=[2], **opts)
    assert rel_err(out.latents[:, 2:], fresh.latents) < 1e-5


def test_generate_from_nothing(pipe):
    out = pipe.generate(clip_sizes=[2, 1], batch_size=2, frame_size=(PX, PX), seed=[4, 9], **FAST)
    assert out.latents.shape == (2, 3, 4, 4, 12) and out.frames.shape == (2, 3, PX, PX, 3)
    one = pipe.generate(clip_sizes=[2, 1], latent_size=(4, 4), seed=9, **FAST)
    assert rel_err(one.latents[0], out.latents[1]) < 1e-5


@pytest.fixture(scope="module")
def class_pipe():
    """A model conditioned on 3 classes (random condition paths) over SpaceToDepth(2) latents."""
    return Pipeline(random_model(seed=5, latent_channels=12, conditions=dict(num_classes=3)),
                    SpaceToDepth(2))


def test_predict_and_generate_with_a_class_equal_sample_video(class_pipe, pixels):
    """The conditions reach `sampling.sample_video` as given: the same latents, exactly; an
    unbatched context takes one video's class."""
    opts = dict(FAST, condition_guidance=2.0)
    cfg = sampling.SamplerConfig(**opts)
    space, model = class_pipe.latent_space, class_pipe.model
    latents = np.stack([space.encode(p, seed=s) for p, s in zip(pixels[:, :2], [3, 4])])
    expected = sampling.sample_video(model, [2, 1], cfg, [3, 4], context_BFhwc=latents,
                                     class_id=[2, 0])
    out = class_pipe.predict(pixels[:, :2], clip_sizes=[2, 1], seed=3, class_id=[2, 0], **opts)
    np.testing.assert_array_equal(out.latents, expected)
    one = class_pipe.predict(pixels[0, :2], clip_sizes=[2, 1], seed=3, class_id=2, **opts)
    assert rel_err(one.latents, expected[0]) < 1e-5  # a batch is its videos one by one
    generated = class_pipe.generate(clip_sizes=[2], latent_size=(4, 4), batch_size=2,
                                    seed=[1, 2], class_id=[0, 1], **opts)
    np.testing.assert_array_equal(generated.latents, sampling.sample_video(
        model, [2], cfg, [1, 2], latent_hw=(4, 4), class_id=[0, 1]))


@pytest.mark.parametrize("conditions, message", [
    (dict(class_id=7), r"class_id: class 7 outside \[0, 3\)"),
    (dict(class_id=-1), r"class_id: class -1 outside"),
    (dict(class_id=[1]), r"class_id: shape \(1,\), expected a scalar \(one video's"),
    (dict(class_id=1.5), r"class_id: shape \(1,\) \(float64\), expected \(1,\) integers"),
    (dict(actions=np.zeros((3, 2))), "class_id: missing"),
    (dict(class_id=1, actions=np.zeros((3, 2))), "actions: given, but the model has no such"),
])
def test_bad_conditions_are_clear_errors(class_pipe, pixels, conditions, message, monkeypatch):
    """Refused before the context is encoded, each error naming the keyword and the value."""
    monkeypatch.setattr(class_pipe, "_context_latents", lambda *a: pytest.fail("encoded"))
    with pytest.raises(ValueError, match=message):
        class_pipe.predict(pixels[0, :2], clip_sizes=[1], **FAST, **conditions)


def test_split_frames():
    assert split_frames(48) == [24, 24] and split_frames(50) == [24, 24, 2]
    with pytest.raises(ValueError, match="num_frames=0"):
        split_frames(0)


@pytest.mark.parametrize("make_context,kwargs,message", [
    (lambda p: p[0, :2, :, :, :2], {}, "2 channels"),
    (lambda p: p[0, :2, :6, :6], {}, "frame size 6x6"),
    (lambda p: p[0], dict(window=5), "context of 6 frames is longer than the window of 5"),
    (lambda p: p[0, :2], dict(steps=0), "steps=0"),
    (lambda p: p[0, :2], dict(guidance=-1.0), "guidance=-1.0"),
    (lambda p: p[0, :2], dict(steps=2.5), "steps=2.5: must be an integer"),  # not truncated
    (lambda p: p[0, :2].astype(np.int32), {}, "dtype int32"),
    (lambda p: p[0, 0], {}, "expected"),
])
def test_bad_context_is_a_clear_error(pipe, pixels, make_context, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.predict(make_context(pixels), clip_sizes=[1], **{**FAST, **kwargs})


def test_sampler_settings_by_name_are_cast_to_their_field_types(pipe):
    cfg = pipe._sampler_config("predict", None, dict(guidance=2, same_noise_every_clip=1,
                                                     steps=3))
    assert (cfg.guidance, cfg.same_noise_every_clip, cfg.steps) == (2.0, True, 3)
    assert type(cfg.guidance) is float and type(cfg.same_noise_every_clip) is bool
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidence'"):
        pipe._sampler_config("predict", None, dict(guidence=2.0))


def test_non_finite_context_latents_name_the_frame(pipe, pixels):
    latents = pipe.latent_space.encode(pixels[0, :3])
    latents[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in frame 1"):
        pipe.predict(latents, clip_sizes=[1], **FAST)
    batch = np.stack([pipe.latent_space.encode(pixels[0, :3])] * 2)
    batch[1, 2, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="in frame 2 of video 1"):
        pipe.predict(batch, clip_sizes=[1], **FAST)


@pytest.mark.parametrize("make_context,message", [
    (lambda p: p[0, :0], "0 context frames.*generate"),
    (lambda p: p[:0], "a batch of 0 videos"),
    (lambda p: p[0, :2].astype(np.float32) / 255, "pass video frames as uint8 pixels"),
])
def test_degenerate_context_is_refused(pipe, pixels, make_context, message):
    with pytest.raises(ValueError, match=message):
        pipe.predict(make_context(pixels), clip_sizes=[1], **FAST)


def test_missing_checkpoint_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pipeline.from_checkpoint(str(tmp_path / "nowhere"))


def test_pixels_need_a_latent_space(pipe, pixels):
    with pytest.raises(ValueError, match="no latent space"):
        Pipeline(pipe.model).predict(pixels[0, :2], clip_sizes=[1], **FAST)
    with pytest.raises(ValueError, match="exactly one of num_frames and clip_sizes"):
        pipe.predict(pixels[0, :2], num_frames=2, clip_sizes=[2])


def test_sample_tool_writes_prediction_and_comparison(export_dir, pixels, tmp_path):
    source = video_io.write_video(str(tmp_path / "in.mp4"), pixels[0], fps=8.0)
    out = str(tmp_path / "pred.mp4")
    argv = ["--checkpoint", export_dir, "--input", source, "--output", out, "--frame-stride", "1",
            "--context-frames", "2", "--clip-sizes", "2", "1", "--steps", "2", "--window", "6",
            "--no-progress"]
    assert sample_tool.main(argv) == 0
    frames, _ = video_io.read_video(out)
    assert frames.shape == (3, PX, PX, 3)
    side, _ = video_io.read_video(str(tmp_path / "pred_vs_gt.mp4"))
    assert side.shape == (3, PX, 2 * PX, 3)


def test_sample_tool_refuses_a_bad_output_before_sampling(export_dir, pixels, tmp_path,
                                                          monkeypatch, capsys):
    source = video_io.write_video(str(tmp_path / "in.mp4"), pixels[0], fps=8.0)
    argv = ["--checkpoint", export_dir, "--input", source, "--frame-stride", "1",
            "--clip-sizes", "1", "--steps", "2", "--window", "6", "--no-progress"]
    monkeypatch.setattr(Pipeline, "predict", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="unsupported video extension '.avi'"):
        sample_tool.main(argv + ["--output", str(tmp_path / "pred.avi")])
    monkeypatch.undo()
    # More context frames asked for than the input has: said, and all of them are the context.
    assert sample_tool.main(argv + ["--output", str(tmp_path / "p.mp4"),
                                    "--context-frames", "400"]) == 0
    assert "--context-frames=400, but" in capsys.readouterr().err


def test_sample_tool_rejects_unreadable_video(export_dir, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    argv = ["--checkpoint", export_dir, "--input", str(bad), "--output", str(tmp_path / "o.mp4")]
    with pytest.raises(ValueError, match="broken.mp4"):
        sample_tool.main(argv)
    with pytest.raises(ValueError, match="no such file"):
        sample_tool.main(argv[:3] + [str(tmp_path / "missing.mp4")] + argv[4:])
