"""Physics-IQ scoring: each step against OpenCV calls written here, hand-computed metrics and
aggregations, and a small release-layout folder scored end to end (ceiling, floor, errors)."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from vgpt_jax.eval import physics_iq as piq  # noqa: E402

FPS = 8
N = FPS * piq.SECONDS  # scored frames
CONDITIONING = FPS * 3
H, W = 96, 128  # scoring size 24 x 32


# ----------------------------------------------------------------------------- synthetic takes


def _scene_video(seed, take, t, h=H, w=W):
    """RGB uint8 `[t,h,w,3]`: a textured background and a square falling then sliding; take 2 is
    a slightly perturbed repeat (its start and speed differ a little)."""
    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(30, 110, (h, w, 3)).astype(np.uint8), (7, 7), 0)
    frames = np.repeat(background[None], t, axis=0)
    jitter = 0.0 if take == 1 else 1.5
    speed = 1.6 + 0.4 * (seed % 3) + (0.08 if take == 2 else 0.0)
    colour = rng.integers(160, 250, 3)
    for i in range(t):
        y = int(min(h - 20, 6 + jitter + speed * i * 0.8))
        x = int(10 + jitter + speed * max(0, i - t // 3))
        frames[i, y:y + 16, x:x + 16] = colour
    return frames


def _write_h264(path, frames_rgb, fps):
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = frames_rgb.shape[2], frames_rgb.shape[1], "yuv420p"
        for frame in frames_rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _official_mask_video(video_path, mask_path):
    """The release's mask videos, made step by step with OpenCV as `binary_mask_generator.py`."""
    capture = cv2.VideoCapture(video_path)
    fps = round(capture.get(cv2.CAP_PROP_FPS))
    w, h = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = cv2.VideoWriter(mask_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w - w % 2, h - h % 2),
                             isColor=False)
    kernel = np.ones((5, 5), np.uint8)
    ok, frame = capture.read()
    grey = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (5, 5), 0)
    background = grey.astype("float")
    writer.write(np.zeros_like(grey))
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        grey = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (5, 5), 0)
        cv2.accumulateWeighted(grey, background, 0.3)
        diff = cv2.absdiff(grey, cv2.convertScaleAbs(background))
        _, binary = cv2.threshold(diff, 10, 255, cv2.THRESH_BINARY)
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
        writer.write(cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel))
    capture.release()
    writer.release()


SCENES = ("trimmed-slide", "trimmed-roll")


def build_release(root, fps=FPS, scenes=SCENES, masks=True, size=(H, W)):
    """A release-layout folder (`piq.write_release`): `scenes` x 3 views x 2 takes, 3 s
    conditioning + 5 s testing, with the real takes' masks made as the release makes them.
    Returns {(scene, view): {'take-1': id, 'take-2': id}}.
    """
    takes = {scene: [tuple(_scene_video(3 * s + v, take, (3 + piq.SECONDS) * fps, *size)
                           for take in (1, 2)) for v in range(len(piq.VIEWS))]
             for s, scene in enumerate(scenes)}
    ids = piq.write_release(root, takes, fps, write=_write_h264)
    if masks:
        mask_dir = os.path.join(root, "video-masks", "real", f"{fps}FPS")
        os.makedirs(mask_dir)
        for (scene, view), take_ids in ids.items():
            for take, file_id in take_ids.items():
                _official_mask_video(_testing_path(root, ids, scene, view, take, fps), os.path.join(
                    mask_dir, f"{file_id}_video-masks_{fps}FPS_{view}_{take}_{scene}.mp4"))
    return ids


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("physics-IQ-benchmark"))
    return root, build_release(root)


def _testing_path(root, ids, scene, view, take, fps=FPS):
    return os.path.join(root, "split-videos", "testing", f"{fps}FPS",
                        f"{ids[(scene, view)][take]}_testing-videos_{fps}FPS_{view}_{take}_{scene}.mp4")


def _generated(folder, release, make):
    """Write `make(take1_rgb, take2_path) -> rgb or None (copy take 2)` for every sample."""
    root, ids = release
    os.makedirs(folder, exist_ok=True)
    for (scene, view), take_ids in ids.items():
        out = os.path.join(folder, f"{take_ids['take-1']}_{view}_{scene}.mp4")
        take2 = _testing_path(root, ids, scene, view, "take-2")
        frames = make(_decode_rgb(_testing_path(root, ids, scene, view, "take-1")), take2)
        if frames is None:
            shutil.copy(take2, out)
        else:
            _write_h264(out, frames, FPS)
    return folder


def _decode_rgb(path):
    return np.stack([f[..., ::-1] for f in piq.read_frames(path)])


# ----------------------------------------------------------------------------- steps vs OpenCV


def test_motion_masker_is_the_opencv_sequence(np_rng):
    video = np.repeat(np_rng.integers(0, 256, (1, 40, 50, 3), dtype=np.uint8), 6, axis=0)
    video[2:, 10:25, 12:30] = (250, 30, 90)
    video[4:] = np.roll(video[4:], 3, axis=2)
    masker = piq.MotionMasker()
    kernel = np.ones((5, 5), np.uint8)
    background = None
    for frame in video:
        grey = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (5, 5), 0)
        if background is None:
            background, expected = grey.astype("float"), np.zeros_like(grey)
        else:
            cv2.accumulateWeighted(grey, background, 0.3)
            _, expected = cv2.threshold(cv2.absdiff(grey, cv2.convertScaleAbs(background)), 10, 255,
                                        cv2.THRESH_BINARY)
            expected = cv2.morphologyEx(cv2.morphologyEx(expected, cv2.MORPH_OPEN, kernel),
                                        cv2.MORPH_CLOSE, kernel)
        np.testing.assert_array_equal(masker(frame), expected)
    assert expected.any()


def test_mask_video_round_trip_matches_opencv(tmp_path, release):
    root, ids = release
    video = _testing_path(root, ids, "trimmed-slide", "perspective-left", "take-1")
    ours, theirs = str(tmp_path / "ours.mp4"), str(tmp_path / "theirs.mp4")
    assert piq.mask_video_of(video, ours) == N
    _official_mask_video(video, theirs)
    a, b = list(piq.read_frames(ours)), list(piq.read_frames(theirs))
    assert len(a) == len(b) == N
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # decoded pixels, never encoded bytes


def test_resize_and_mask_threshold_are_opencv(np_rng):
    frame = np_rng.integers(0, 256, (51, 77, 3), dtype=np.uint8)
    np.testing.assert_array_equal(piq.resize(frame, (12, 19)), cv2.resize(frame, (19, 12)))
    # The threshold runs on channel 0 *after* the bilinear resize of the decoded mask pixels.
    mask = np.zeros((48, 64, 3), np.uint8)
    mask[10:31, 7:40] = 255
    mask[12:14, 7:9] = 120  # lossy-codec greys near the edge
    got = piq.masks_at([mask], (12, 16))[0]
    np.testing.assert_array_equal(got, cv2.resize(mask, (16, 12))[..., 0] > 127)
    assert piq.scoring_size(frame) == (12, 19)


def test_mse_is_float32_on_bgr_over_255(np_rng):
    a = np_rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    b = np_rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    diff = (a / 255.0).astype(np.float32) - (b / 255.0).astype(np.float32)
    assert piq.mse_per_frame(a, b).tolist() == (diff**2).mean(axis=(1, 2, 3)).tolist()


# ----------------------------------------------------------------------------- metrics by hand


def _hand_masks():
    """Two 3-frame 4x4 mask videos whose IoUs are worked out by hand below."""
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[1, 0, 0] = a[1, 0, 1] = True  # frame 1: a = {(0,0), (0,1)}
    b[1, 0, 1] = b[1, 1, 1] = True  #          b = {(0,1), (1,1)}
    a[2, 2, 2] = True               # frame 2: a = {(2,2)}
    b[2, 0, 1] = True               #          b = {(0,1)}
    return a, b


def test_metrics_hand_computed():
    a, b = _hand_masks()
    # frame 0: both empty -> 1; frame 1: |{(0,1)}| / |{(0,0),(0,1),(1,1)}| = 1/3; frame 2: 0/2.
    np.testing.assert_allclose(piq.spatiotemporal_iou_per_frame(a, b), [1.0, 1 / 3, 0.0])
    # ever-moved: a = {(0,0),(0,1),(2,2)}, b = {(0,1),(1,1)} -> 1/4.
    assert piq.spatial_iou(a, b) == pytest.approx(0.25)
    # frequencies: a (0,0)=(0,1)=(2,2)=1/3; b (0,1)=2/3, (1,1)=1/3.
    # sum min = 1/3 at (0,1); sum max = 1/3 + 2/3 + 1/3 + 1/3 = 5/3 -> 0.2.
    assert piq.weighted_spatial_iou(a, b) == pytest.approx(0.2)
    empty = np.zeros_like(a)
    assert piq.spatial_iou(empty, empty) == 1.0 and piq.weighted_spatial_iou(empty, empty) == 1.0
    frames_a = np.zeros((2, 2, 2, 3), np.uint8)
    frames_b = frames_a.copy()
    frames_b[1, 0, 0, 0] = 255  # one of 12 values off by 1.0 in frame 1
    np.testing.assert_allclose(piq.mse_per_frame(frames_a, frames_b), [0.0, 1 / 12], rtol=1e-6)


def _sample(scenario="s", view="v", **changes):
    sample = {
        "scenario": scenario, "view": view,
        "spatiotemporal_iou": [1.0, 0.5], "variance_spatiotemporal_iou": [1.0, 1.0],
        "spatial_iou": 0.3, "variance_spatial_iou": 0.6,
        "weighted_spatial_iou": 0.2, "variance_weighted_spatial_iou": 0.4,
        "mse": [0.01, 0.03], "variance_mse": [0.01, 0.01],
    }
    return {**sample, **changes}


def test_aggregations_hand_computed():
    # Original: (0.75/1 + 0.3/0.6 + 0.2/0.4) / 3 - (0.02 - 0.01) = 0.57333 -> 57.33.
    # Verified: mean(0.5, 0.5, 0.75, 0.01/0.02) = 0.5625 -> 56.25.
    scores = piq.iq_scores([_sample()])
    assert scores["original"] == 57.33 and scores["original_rounded_variances"] == 57.33
    assert scores["verified"] == 56.25
    assert scores["fractions"]["final_score_raw"] == pytest.approx(0.57333333)
    # Per-frame values are rounded to 4 decimals first: 0.12344 and 0.12346 both count.
    rounded = piq.iq_scores([_sample(spatiotemporal_iou=[0.12344, 0.12346])])
    assert rounded["metrics"]["spatiotemporal_iou"] == pytest.approx((0.1234 + 0.1235) / 2, abs=1e-12)
    # Original: ST/MSE averaged over all frames of a scenario's views, then over scenarios.
    two = [_sample("a", "l"), _sample("a", "c", spatiotemporal_iou=[0.0, 0.0]),
           _sample("b", "l", spatiotemporal_iou=[0.2, 0.2])]
    assert piq.iq_scores(two)["metrics"]["spatiotemporal_iou"] == pytest.approx((0.375 + 0.2) / 2)
    # MSE 0 makes the Verified MSE term infinite, clipped to 1 (as officially).
    assert piq.verified_components(_sample(mse=[0.0, 0.0]))["mse"] == 1.0


def test_printed_rounding():
    assert piq.printed(0.95225) == 95.22 or piq.printed(0.95225) == 95.23
    assert piq.printed(0.123449) == 12.34 and piq.printed(1.0) == 100.0 and piq.printed(0.0) == 0.0


@pytest.mark.parametrize("value, expected", [(8, 8), ("8", 8), (8.0, 8), ("30FPS", 30), (" 16 ", 16)])
def test_parse_fps_accepts(value, expected):
    assert piq.parse_fps(value) == expected


@pytest.mark.parametrize("value", ["eight", 7.5, 0, "-8", None])
def test_parse_fps_rejects_clearly(value):
    with pytest.raises(ValueError, match="whole number of frames per second"):
        piq.parse_fps(value)


def test_in_memory_scoring_ceiling_and_floor():
    take1 = [_scene_video(s, 1, 16, 48, 64) for s in range(3)]
    take2 = [_scene_video(s, 2, 16, 48, 64) for s in range(3)]
    base = [dict(take1=a, take2=b, scenario="x", view=v) for a, b, v in zip(take1, take2, piq.VIEWS)]
    ceiling = piq.score_scenarios([dict(s, prediction=s["take2"]) for s in base])
    assert ceiling["original"] == 100.0 and ceiling["verified"] == 100.0
    frozen = piq.score_scenarios([dict(s, prediction=np.repeat(s["take1"][:1], 16, 0)) for s in base])
    assert frozen["original"] < 50 and frozen["verified"] < 50
    with pytest.raises(ValueError, match=r"\(15, 48, 64, 3\)"):
        piq.evaluate_sample(take1[0], take2[0], take1[0][:15])
    with pytest.raises(ValueError, match=r"\(16, 24, 32, 3\)"):
        piq.evaluate_sample(take1[0], take2[0], take1[0][:, ::2, ::2])
    piq.evaluate_sample(take1[0], take2[0], take1[0][:, ::2, ::2], strict_size=False)


# ----------------------------------------------------------------------------- the release


def test_take2_copy_scores_100_and_is_deterministic(release, tmp_path):
    generated = _generated(str(tmp_path / "copy"), release, lambda take1, take2: None)
    first = piq.score_release(release[0], generated)
    assert first["fps"] == FPS and first["num_samples"] == 6 and first["num_scenarios"] == 2
    assert first["original"] == 100.0 and first["verified"] == 100.0
    assert 0 < first["physical_variance"]["spatiotemporal_iou"] < 1
    assert set(first["per_view"]) == set(piq.VIEWS) and first["per_category"] is None
    again = piq.score_release(release[0], generated, fps="8")
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)


def test_frozen_frame_and_noise_score_low(release, tmp_path):
    frozen = _generated(str(tmp_path / "frozen"), release,
                        lambda take1, _: np.repeat(take1[:1], N, axis=0))
    result = piq.score_release(release[0], frozen)
    assert result["original"] < 50 and result["verified"] < 50, (result["original"], result["verified"])
    rng = np.random.default_rng(0)
    noise = _generated(str(tmp_path / "noise"), release,
                       lambda take1, _: rng.integers(0, 256, take1.shape, dtype=np.uint8))
    result = piq.score_release(release[0], noise)
    assert result["original"] < 5 and result["verified"] < 15, (result["original"], result["verified"])


def test_other_resolution_and_made_masks(release, tmp_path):
    """Generated videos at another size are resized like the real ones; a release without
    mask videos gets them made the official way, which gives the same numbers."""
    half = _generated(str(tmp_path / "half"), release,
                      lambda take1, _: np.stack([cv2.resize(f, (W // 2, H // 2)) for f in take1]))
    with_masks = piq.score_release(release[0], half)
    assert 0 < with_masks["verified"] < 100
    bare = str(tmp_path / "bare")
    shutil.copytree(os.path.join(release[0], "split-videos"), os.path.join(bare, "split-videos"))
    without = piq.score_release(bare, half)
    assert any("no video-masks/real" in n for n in without["notes"])
    assert (without["original"], without["verified"]) == (with_masks["original"], with_masks["verified"])


def test_release_errors_are_clear(release, tmp_path):
    root, ids = release
    generated = _generated(str(tmp_path / "gen"), release, lambda take1, take2: None)
    # A wrong root: the folder above the release, and a folder inside it.
    with pytest.raises(FileNotFoundError, match="did you mean"):
        piq.score_release(os.path.dirname(root), generated)
    with pytest.raises(FileNotFoundError, match="give that folder"):
        piq.score_release(os.path.join(root, "split-videos", "testing"), generated)
    with pytest.raises(FileNotFoundError, match="subfolder"):
        piq.score_release(root, str(tmp_path))
    # fps given but contradicted by the videos.
    with pytest.raises(ValueError, match="at 8 FPS"):
        piq.score_release(root, generated, fps=30)
    # A take-2 id and a stray name are rejected, saying why; the missing sample is named.
    os.rename(os.path.join(generated, "0002_perspective-center_trimmed-slide.mp4"),
              os.path.join(generated, "0200_perspective-center_trimmed-slide.mp4"))
    shutil.copy(os.path.join(generated, "0001_perspective-left_trimmed-slide.mp4"),
                os.path.join(generated, "pred_0003.mp4"))
    with pytest.raises(FileNotFoundError) as error:
        piq.score_release(root, generated)
    message = str(error.value)
    assert "0002_perspective-center_trimmed-slide.mp4" in message
    assert "0200 is the take-2 id" in message and "pred_0003.mp4: does not start" in message
    os.remove(os.path.join(generated, "pred_0003.mp4"))
    # Any name with the right id is accepted (the official scorer renames by id), with a note.
    os.rename(os.path.join(generated, "0200_perspective-center_trimmed-slide.mp4"),
              os.path.join(generated, "0002_model-output.mp4"))
    assert any("0002_model-output.mp4 is scored as" in n for n in piq.find_release(root, generated).notes)
    # A short generated video and a corrupt one.
    short = os.path.join(generated, "0004_perspective-left_trimmed-roll.mp4")
    _write_h264(short, _decode_rgb(short)[:N - 3], FPS)
    with pytest.raises(piq.VideoError, match=f"{N - 3} frames"):
        piq.score_release(root, generated)
    with open(short, "wb") as f:
        f.write(b"not a video")
    with pytest.raises(piq.VideoError, match="cannot open"):
        piq.score_release(root, generated)


def test_categories_break_down(release, tmp_path):
    generated = _generated(str(tmp_path / "copy"), release, lambda take1, take2: None)
    descriptions = tmp_path / "descriptions.csv"
    descriptions.write_text("scenario,description,category\n"
                            "0001_perspective-left_take-1_trimmed-slide.mp4,x,Solid Mechanics\n"
                            "0004_perspective-left_take-1_trimmed-roll.mp4,y,Fluid Dynamics\n")
    result = piq.score_release(release[0], generated, categories=piq.load_categories(str(descriptions)))
    assert set(result["per_category"]) == {"Solid Mechanics", "Fluid Dynamics"}
    assert result["per_category"]["Fluid Dynamics"]["num_samples"] == 3


# ----------------------------------------------------------------------------- the commands


def test_eval_physics_iq_command_writes_reports(release, tmp_path, capsys):
    from vgpt_jax import cli

    generated = _generated(str(tmp_path / "copy"), release, lambda take1, take2: None)
    out = str(tmp_path / "report")
    assert cli.main(["eval", "physics-iq", "--release", release[0], "--generated", generated,
                     "--out", out, "--no-progress"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert (report["original"], report["verified"]) == (100.0, 100.0)
    page = open(os.path.join(out, "report.md")).read()
    assert "| Physics-IQ Verified | 100.00 |" in page and "| perspective-left | 2 |" in page
    assert "physical variance" in page
    # Errors are one line naming the problem.
    assert cli.main(["eval", "physics-iq", "--release", os.path.dirname(release[0]),
                     "--generated", generated, "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "did you mean" in error


def test_generate_then_score_end_to_end(release, tmp_path, capsys):
    import dataclasses

    import ml_collections

    from test_sampling import random_model
    from vgpt_jax import checkpoint, cli

    model = random_model(seed=5, latent_channels=12)
    config = ml_collections.ConfigDict({"model": dataclasses.asdict(model.cfg),
                                        "latent_space": {"kind": "space_to_depth", "downsample": 2}})
    export = checkpoint.export_model(str(tmp_path / "export"), model, config)
    out = str(tmp_path / "run")
    argv = ["physics-iq", "generate", "--checkpoint", export, "--release", release[0], "--out", out,
            "--seeds", "2", "--steps", "1", "--max-image-size", "16", "--no-progress"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("seed")] == ["seed 0", "seed 1"]
    assert "2 seed(s): Physics-IQ original" in lines[-1] and "+-" in lines[-1]
    videos = sorted(os.listdir(os.path.join(out, "seed-0")))
    assert videos == sorted(f"{ids['take-1']}_{view}_{scene}.mp4" for (scene, view), ids in release[1].items())
    frames = list(piq.read_frames(os.path.join(out, "seed-0", videos[0])))
    assert len(frames) == N and frames[0].shape == (12, 16, 3)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(summary["runs"]) == 2 and summary["runs"][0] != summary["runs"][1]
    # Resumable: finished videos are kept, a missing one is made again.
    kept = os.path.join(out, "seed-1", videos[1])
    stamp = os.path.getmtime(kept)
    os.remove(os.path.join(out, "seed-1", videos[0]))
    assert cli.main(argv) == 0
    assert os.path.getmtime(kept) == stamp and os.path.exists(os.path.join(out, "seed-1", videos[0]))
    assert json.load(open(os.path.join(out, "summary.json")))["runs"][0] == summary["runs"][0]
    # Other settings in the same folder are refused.
    assert cli.main(argv[:-1] + ["--guidance", "3", "--no-progress"]) == 1
    assert "other settings" in capsys.readouterr().err


def _physics_export(tmp_path):
    import dataclasses

    import ml_collections

    from test_sampling import random_model
    from vgpt_jax import checkpoint

    model = random_model(seed=5, latent_channels=12)
    config = ml_collections.ConfigDict({"model": dataclasses.asdict(model.cfg),
                                        "latent_space": {"kind": "space_to_depth", "downsample": 2}})
    return checkpoint.export_model(str(tmp_path / "export"), model, config)


def _decoded(folder):
    return {name: np.stack(list(piq.read_frames(os.path.join(folder, name))))
            for name in sorted(os.listdir(folder))}


def test_generate_batched_on_a_mesh_and_spread_over_processes(release, tmp_path):
    """--batch-size and --mesh change no prediction; with two processes (jax.distributed on
    localhost) each writes its share of the videos, and process 0 scores the whole folder."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    import subproc

    export = _physics_export(tmp_path)
    args = lambda out, seeds="1": ["physics-iq", "generate", "--checkpoint", export,
                                   "--release", release[0], "--out", str(tmp_path / out),
                                   "--seeds", seeds, "--steps", "1",
                                   "--max-image-size", "16", "--no-progress"]
    # Two seeds in the reference run: seed 1's prediction is the yardstick of a real change.
    one = subproc.run(["-m", "vgpt_jax", *args("one", seeds="2")], timeout=300)
    assert one.returncode == 0, one.stdout[-3000:]
    batched = subproc.run(["-m", "vgpt_jax", *args("batched"), "--batch-size", "3",
                           "--mesh", "data=1"], timeout=300)
    assert batched.returncode == 0, batched.stdout[-3000:]
    pair = subproc.run_pair(lambda port, i: ["tests/scripts/cli_distributed.py", str(port), str(i),
                                             "2", *args("pair")], devices_each=1, timeout=400)
    assert all(p.returncode == 0 for p in pair), [p.stdout[-3000:] for p in pair]
    assert "process 1 of 2: wrote its share" in pair[1].stdout
    expected = _decoded(str(tmp_path / "one" / "seed-0"))
    other_seed = _decoded(str(tmp_path / "one" / "seed-1"))
    for run in ("batched", "pair"):
        got = _decoded(str(tmp_path / run / "seed-0"))
        assert sorted(got) == sorted(expected)
        for name, frames in expected.items():
            # The files are lossy H.264: float summation order moves a prediction's pixels by a
            # level, and the encoder turns that into differences of up to tens of levels in a
            # few pixels (measured means 0.3-1.0 levels). Another seed's prediction moves every
            # pixel: the same prediction must stay far closer than that.
            diff = np.abs(got[name].astype(int) - frames).mean()
            seed_diff = np.abs(other_seed[name].astype(int) - frames).mean()
            assert diff < 0.1 * seed_diff, (run, name, diff, seed_diff)
    scores = lambda run: json.load(open(tmp_path / run / "summary.json"))["runs"][0]
    assert scores("pair")["original"] == pytest.approx(scores("one")["original"], abs=0.5)


def test_make_physics_writes_a_release_the_scorer_reads(tmp_path, capsys):
    """`vgpt make-physics --release-fps`: the world's two takes, 3 scenarios per scene's views,
    parsed back by the generate command and scored: take 2 is the ceiling."""
    from vgpt_jax import cli
    from vgpt_jax.commands.physics_iq_generate import conditioning_videos

    root = str(tmp_path / "release")
    assert cli.main(["make-physics", "--out", root, "--num-videos", "3", "--size", "32",
                     "--fps", "32", "--split", "test", "--release-fps", "1"]) == 0
    videos = conditioning_videos(root, 1)
    assert [name for _, name in videos] == [f"000{i + 1}_{view}_world-000.mp4"
                                            for i, view in enumerate(piq.VIEWS)]
    assert len(list(piq.read_frames(videos[0][0]))) == 3
    testing = piq.split_dir(root, "testing", 1)
    generated = str(tmp_path / "take2")
    os.makedirs(generated)
    for (scene, view), ids in piq.release_takes(testing, 1).items():
        shutil.copy(os.path.join(testing, f"{ids['take-2']}_testing-videos_1FPS_{view}_take-2_{scene}.mp4"),
                    os.path.join(generated, f"{ids['take-1']}_{view}_{scene}.mp4"))
    result = piq.score_release(root, generated)
    assert (result["fps"], result["num_samples"], result["original"]) == (1, 3, 100.0)
    # The copy-last floor through `physics-iq generate`: the last conditioning frame, held still.
    out = str(tmp_path / "copy-last")
    assert cli.main(["physics-iq", "generate", "--checkpoint", _physics_export(tmp_path),
                     "--release", root, "--out", out, "--fps", "1", "--seeds", "1",
                     "--max-image-size", "32", "--baseline", "copy-last", "--no-progress"]) == 0
    held = np.stack(list(piq.read_frames(os.path.join(out, "seed-0", videos[0][1]))))
    last = list(piq.read_frames(videos[0][0]))[-1]
    assert held.shape == (piq.SECONDS, 32, 32, 3) and (held == held[0]).all()
    assert np.abs(held[0].astype(int) - last).mean() < 4  # two lossy H.264 trips, two decoders
    assert json.load(open(os.path.join(out, "summary.json")))["runs"][0]["original"] < 100
    assert cli.main(["make-physics", "--out", str(tmp_path / "bad"), "--num-videos", "2",
                     "--split", "test", "--release-fps", "1"]) == 1
    assert "a multiple of 3" in capsys.readouterr().err
