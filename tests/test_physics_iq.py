"""Physics-IQ scoring: hand-computed metrics, ceiling/floor behaviour, release loader, errors."""
import os
import shutil

import numpy as np
import pytest

from vgpt_jax.eval import physics_iq as piq


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
    np.testing.assert_allclose(piq.mse_per_frame(frames_a, frames_b), [0.0, 1 / 12])


def test_aggregations_hand_computed():
    sample = {
        "spatiotemporal_iou": np.array([1.0, 0.5]), "variance_spatiotemporal_iou": np.array([1.0, 1.0]),
        "spatial_iou": 0.3, "variance_spatial_iou": 0.6,
        "weighted_spatial_iou": 0.2, "variance_weighted_spatial_iou": 0.4,
        "mse": np.array([0.01, 0.03]), "variance_mse": np.array([0.01, 0.01]),
    }
    # Original: ((0.75/1 + 0.3/0.6 + 0.2/0.4) / 3 - (0.02 - 0.01)) * 100 = 57.33.
    assert piq.original_score([sample]) == pytest.approx(57.33)
    assert piq.original_score([sample], round_variances=False) == pytest.approx(57.33)
    # Verified: mean(0.75, 0.5, 0.5, 0.01/0.02) = 0.5625.
    assert piq.verified_score([sample]) == pytest.approx(56.25)


def test_motion_masks_semantics():
    video = np.full((4, 24, 24, 3), 80, np.uint8)
    video[2:, 8:16, 8:16] = 200  # a square appears at frame 2
    masks = piq.motion_masks(video)
    assert not masks[0].any() and not masks[1].any()
    assert masks[2, 10:14, 10:14].all() and not masks[2, :4].any()
    assert not piq.motion_masks(np.repeat(video[:1], 4, axis=0)).any()


def _square_video(x0, speed, t=16, size=64, seed=0):
    """A bright square sliding right over a fixed textured background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(40, 90, (size, size, 3)).astype(np.uint8)
    frames = np.repeat(background[None], t, axis=0)
    for i in range(t):
        x = int(round(x0 + speed * i))
        frames[i, 24:36, x : x + 12] = (230, 200, 60)
    return frames


def _scenarios():
    out = []
    for view, seed in zip(piq.VIEWS, range(3)):
        take1 = _square_video(4, 2.5, seed=seed)
        take2 = _square_video(5, 2.6, seed=seed)  # the second real take: slightly perturbed
        out.append(dict(take1=take1, take2=take2, scenario="slide", view=view))
    return out


def test_second_take_hits_ceiling_and_static_is_far_below():
    take2_as_prediction = [dict(s, prediction=s["take2"]) for s in _scenarios()]
    ceiling = piq.score_scenarios(take2_as_prediction)
    assert ceiling["original"] == 100.0 and ceiling["verified"] == 100.0
    assert 0 < ceiling["physical_variance"]["spatiotemporal_iou"] < 1

    static = [dict(s, prediction=np.repeat(s["take1"][:1], len(s["take1"]), axis=0)) for s in _scenarios()]
    result = piq.score_scenarios(static)
    assert result["metrics"]["spatial_iou"] == 0.0
    assert result["original"] < 50 and result["verified"] < 50, result["original"]


def test_bad_inputs_name_shapes():
    s = _scenarios()[0]
    with pytest.raises(ValueError, match=r"\(15, 64, 64, 3\)"):
        piq.evaluate_sample(s["take1"], s["take2"], s["take1"][:15])
    with pytest.raises(ValueError, match=r"\(16, 32, 64, 3\)"):
        piq.evaluate_sample(s["take1"], s["take2"][:, :32], s["take1"])
    with pytest.raises(ValueError, match=r"\(16, 32, 32, 3\)"):
        piq.evaluate_sample(s["take1"], s["take2"], s["take1"][:, :32, :32])
    with pytest.raises(ValueError, match=r"\(16, 64, 64, 1\).*\(16, 64, 64, 3\)"):
        piq.evaluate_sample(s["take1"], s["take2"], s["take1"], take1_masks=np.zeros((16, 64, 64, 1)))
    # The benchmark accepts predictions at any resolution when asked to.
    piq.evaluate_sample(s["take1"], s["take2"], s["take1"][:, ::2, ::2], strict_size=False)


def _write_mp4(path, frames, fps):
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _fake_release(root, fps=8):
    """Two scenes x three views x two takes in the release layout, 5 s at `fps`, 64x48."""
    testing = os.path.join(root, "release", "split-videos", "testing", f"{fps}FPS")
    generated = os.path.join(root, "generated")
    os.makedirs(testing)
    os.makedirs(generated)
    take1_id = 1
    for s, scene in enumerate(("trimmed-slide", "trimmed-roll")):
        for v, view in enumerate(piq.VIEWS):
            takes = [_square_video(4, 1.0, t=5 * fps, seed=3 * s + v)[:48],
                     _square_video(5, 1.05, t=5 * fps, seed=3 * s + v)[:48]]
            for take, frames in enumerate(takes, start=1):
                file_id = f"{take1_id + 198 * (take - 1):04d}"
                _write_mp4(os.path.join(testing, f"{file_id}_testing-videos_{fps}FPS_{view}_take-{take}_{scene}.mp4"),
                           frames, fps)
            shutil.copy(os.path.join(testing, f"{take1_id + 198:04d}_testing-videos_{fps}FPS_{view}_take-2_{scene}.mp4"),
                        os.path.join(generated, f"{take1_id:04d}_{view}_{scene}.mp4"))
            take1_id += 1
    return os.path.join(root, "release"), generated


def test_release_loader(tmp_path):
    release, generated = _fake_release(str(tmp_path))
    result = piq.score_release(release, generated, fps=8)
    assert len(result["per_sample"]) == 6 and set(result["scenarios"]) == {"trimmed-slide", "trimmed-roll"}
    assert result["original"] == 100.0 and result["verified"] == 100.0

    os.remove(os.path.join(generated, "0002_perspective-center_trimmed-slide.mp4"))
    with pytest.raises(FileNotFoundError, match="0002_perspective-center_trimmed-slide.mp4"):
        piq.score_release(release, generated, fps=8)
    os.makedirs(os.path.join(release, "video-masks", "real", "8FPS"))
    with pytest.raises(FileNotFoundError, match="0001_video-masks_8FPS_perspective-left_take-1_trimmed-slide.mp4"):
        piq.find_release_samples(release, generated, fps=8)
    with pytest.raises(FileNotFoundError, match="testing"):
        piq.score_release(release, generated, fps=16)
