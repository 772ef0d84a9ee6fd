"""Physics-IQ style scoring (google-deepmind/physics-IQ-benchmark, `physiq/`), in numpy/scipy.

Pipeline per (scenario, view) sample, following the official scorer:

1. Motion masks, per video at its own resolution (`binary_mask_generator.py`): RGB -> gray
   (OpenCV fixed-point weights) -> 5x5 Gaussian blur ([1,4,6,4,1]/16, reflect-101 border) ->
   running-average background (float, alpha 0.3, seeded with frame 0) -> |gray - round(bg)| > 10
   -> 5x5 morphological open, then close. Frame 0 is always empty.
2. Everything is resized (OpenCV-style bilinear) to take-1's size // 4; masks are resized as
   0/255 images and re-binarised with > 127; frames are scaled to [0, 1].
3. Metrics of the prediction against take 1: spatiotemporal IoU per frame (empty union = 1),
   spatial IoU of the "ever moved" masks, weighted spatial IoU (sum of min / sum of max of the
   per-pixel motion frequency; 1 when both are empty) and MSE per frame. The same metrics of
   take 2 against take 1 are the physical variance (the best a model can be expected to do).
4. Per-frame values are rounded to 4 decimals (the official scorer reads them back from a CSV).

Scores, in percent:
- `original` (`calculate_iq_score.py`, the number the README tables cite): ST and MSE are means
  over scenarios of the mean over all frames of the scenario's views; S and WS are means over
  samples; variances are means over samples rounded to 4 decimals (spatial: 5);
  100 * ((ST/vST + S/vS + WS/vWS)/3 - (MSE - vMSE)), clipped to [0, 100], rounded to 2 decimals.
- `verified` (`calculate_iq_score_stable.py::final_score_view`): per sample, each IoU divided by
  (its variance + 1e-8), the MSE term is (variance + 1e-8) / MSE, each clipped to [0, 1], the four
  averaged; then the mean over samples.

Differences from the official code, all small: our masks are exact where the official stores
them as lossy mp4v and re-reads them; RGB->gray and resizing round like OpenCV but are not
guaranteed bit-exact at ties. There are no learned networks, so results are deterministic.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np
from scipy import ndimage

MASK_THRESHOLD = 10  # on 0..255 gray levels, i.e. 10/255
BACKGROUND_ALPHA = 0.3
MORPH_SIZE = 5
RESIZE_DIVISOR = 4  # metrics run at 1/4 of take-1's resolution (960x540 for the 4K release)
VIEWS = ("perspective-left", "perspective-center", "perspective-right")
RATIO_EPS = 1e-8  # the Verified score's guard against zero variances
_BLUR_TAPS = np.array([1, 4, 6, 4, 1], np.int64)  # OpenCV's fixed 5-tap kernel for sigma=0


# ----------------------------------------------------------------------------- masks


def _gray_uint8(frame_rgb: np.ndarray) -> np.ndarray:
    """`[H,W,3]` uint8 RGB -> `[H,W]` uint8 luma with OpenCV's 14-bit fixed-point weights."""
    f = frame_rgb.astype(np.int64)
    return ((f[..., 0] * 4899 + f[..., 1] * 9617 + f[..., 2] * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def _blur5_uint8(gray: np.ndarray) -> np.ndarray:
    """OpenCV `GaussianBlur(gray, (5,5), 0)` on uint8: exact integer taps, round half up."""
    padded = np.pad(gray.astype(np.int64), 2, mode="reflect")  # numpy 'reflect' == BORDER_REFLECT_101
    h, w = gray.shape
    rows = sum(_BLUR_TAPS[i] * padded[i : i + h, :] for i in range(5))
    both = sum(_BLUR_TAPS[j] * rows[:, j : j + w] for j in range(5))
    return ((both + 128) >> 8).astype(np.uint8)


class MotionMasker:
    """Streaming motion masks: feed RGB uint8 frames `[H,W,3]` in order, get bool masks `[H,W]`.

    Streaming keeps memory at one native-resolution frame, which matters for 4K release videos.
    """

    def __init__(self, threshold: int = MASK_THRESHOLD, alpha: float = BACKGROUND_ALPHA):
        self.threshold = threshold
        self.alpha = alpha
        self._background: np.ndarray | None = None
        self._footprint = np.ones((MORPH_SIZE, MORPH_SIZE), bool)

    def __call__(self, frame_rgb: np.ndarray) -> np.ndarray:
        blurred = _blur5_uint8(_gray_uint8(frame_rgb))
        if self._background is None:
            self._background = blurred.astype(np.float64)
            return np.zeros(blurred.shape, bool)
        # accumulateWeighted updates the background with the current frame *before* the diff.
        self._background = (1.0 - self.alpha) * self._background + self.alpha * blurred
        background_u8 = np.clip(np.rint(self._background), 0, 255)  # convertScaleAbs
        moving = np.abs(blurred.astype(np.float64) - background_u8) > self.threshold
        # OpenCV morphology ignores out-of-image pixels; 'nearest' min/max filters do the same.
        opened = ndimage.maximum_filter(ndimage.minimum_filter(moving, footprint=self._footprint, mode="nearest"),
                                        footprint=self._footprint, mode="nearest")
        closed = ndimage.minimum_filter(ndimage.maximum_filter(opened, footprint=self._footprint, mode="nearest"),
                                        footprint=self._footprint, mode="nearest")
        return closed


def motion_masks(video: np.ndarray) -> np.ndarray:
    """Motion masks of a video `[T,H,W,3]` (uint8 or float in [0,1]) -> bool `[T,H,W]`."""
    video = _as_uint8_video(video, "video")
    masker = MotionMasker()
    return np.stack([masker(frame) for frame in video])


# ----------------------------------------------------------------------------- resizing


def _axis_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR sample positions along one axis: (index0, index1, weight1)."""
    pos = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    frac[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, frac


def _resize_uint8(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """`cv2.resize(image, (w, h))` (bilinear; exact halving is area-averaged as OpenCV does)."""
    h, w = image.shape[:2]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return image
    x = image.astype(np.float64)
    if h == 2 * oh and w == 2 * ow:
        out = x.reshape(oh, 2, ow, 2, *x.shape[2:]).mean(axis=(1, 3))
    else:
        r0, r1, fr = _axis_weights(h, oh)
        c0, c1, fc = _axis_weights(w, ow)
        fr = fr.reshape((-1, 1) + (1,) * (x.ndim - 2))
        fc = fc.reshape((1, -1) + (1,) * (x.ndim - 2))
        rows = x[r0] * (1 - fr) + x[r1] * fr
        out = rows[:, c0] * (1 - fc) + rows[:, c1] * fc
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _resize_mask(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    return _resize_uint8(mask.astype(np.uint8) * 255, out_hw) > 127


# ----------------------------------------------------------------------------- metrics


def spatiotemporal_iou_per_frame(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Per-frame IoU of bool masks `[T,H,W]` -> `[T]`; frames where both are empty count as 1."""
    inter = np.logical_and(masks_a, masks_b).sum(axis=(1, 2))
    union = np.logical_or(masks_a, masks_b).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def spatial_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    """IoU of the "did this pixel ever move" maps of bool masks `[T,H,W]` (1 if both are empty)."""
    return float(spatiotemporal_iou_per_frame(masks_a.any(axis=0)[None], masks_b.any(axis=0)[None])[0])


def weighted_spatial_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    """Sum of min / sum of max of the per-pixel motion frequencies of bool masks `[T,H,W]`."""
    freq_a, freq_b = masks_a.mean(axis=0), masks_b.mean(axis=0)
    union = np.maximum(freq_a, freq_b).sum()
    return 1.0 if union == 0 else float(np.minimum(freq_a, freq_b).sum() / union)


def mse_per_frame(frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
    """Per-frame MSE of uint8 frames `[T,H,W,3]` scaled to [0, 1] -> `[T]`."""
    diff = frames_a.astype(np.float64) / 255.0 - frames_b.astype(np.float64) / 255.0
    return np.mean(diff**2, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- one sample


def _as_uint8_video(video: np.ndarray, name: str) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name}: expected an RGB video [T,H,W,3], got shape {video.shape}")
    if video.dtype == np.uint8:
        return video
    if np.issubdtype(video.dtype, np.floating):
        return np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)
    return np.clip(video, 0, 255).astype(np.uint8)


def summarize_video(frames: Iterable[np.ndarray], out_hw: tuple[int, int],
                    masks: Iterable[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stream native RGB uint8 frames `[H,W,3]` -> (frames `[T,h,w,3]` uint8, masks `[T,h,w]` bool).

    `masks` (bool `[H,W]` per frame, e.g. the release's precomputed masks) replaces our own.
    """
    masker = MotionMasker()
    small_frames, small_masks = [], []
    mask_iter = iter(masks) if masks is not None else None
    for frame in frames:
        if mask_iter is None:
            mask = masker(frame)
        else:
            mask = next(mask_iter, None)
            if mask is None:
                raise ValueError(f"fewer masks than frames (ran out at frame {len(small_frames)})")
            mask = np.asarray(mask, bool)
        small_frames.append(_resize_uint8(frame, out_hw))
        small_masks.append(_resize_mask(mask, out_hw))
    if not small_frames:
        raise ValueError("summarize_video: the video has no frames")
    return np.stack(small_frames), np.stack(small_masks)


def compare_summaries(take1, take2, prediction) -> dict:
    """Metrics from three `summarize_video` results of equal shape. Per-frame values unrounded."""
    (f1, m1), (f2, m2), (fp, mp) = take1, take2, prediction
    return {
        "spatiotemporal_iou": spatiotemporal_iou_per_frame(m1, mp),
        "spatial_iou": spatial_iou(m1, mp),
        "weighted_spatial_iou": weighted_spatial_iou(m1, mp),
        "mse": mse_per_frame(f1, fp),
        "variance_spatiotemporal_iou": spatiotemporal_iou_per_frame(m1, m2),
        "variance_spatial_iou": spatial_iou(m1, m2),
        "variance_weighted_spatial_iou": weighted_spatial_iou(m1, m2),
        "variance_mse": mse_per_frame(f1, f2),
    }


def evaluate_sample(take1: np.ndarray, take2: np.ndarray, prediction: np.ndarray, *,
                    num_frames: int | None = None, resize_divisor: int = RESIZE_DIVISOR,
                    strict_size: bool = True, take1_masks: np.ndarray | None = None,
                    take2_masks: np.ndarray | None = None) -> dict:
    """Physics-IQ metrics of one (scenario, view) sample.

    Args:
      take1, take2, prediction: RGB videos `[T,H,W,3]` (uint8, or float in [0, 1]) covering the
        scored window only (the 5 s after the switch frame).
      num_frames: score the first `num_frames` frames (the benchmark uses fps * 5); None: all,
        which then must be equally long.
      resize_divisor: metrics run at take-1's size // resize_divisor (official: 4).
      strict_size: require the prediction to have take-1's H, W. The benchmark itself accepts
        any resolution (it resizes), so the release loader turns this off.
      take1_masks, take2_masks: optional precomputed bool masks `[T,H,W]` for the real takes.
    Returns:
      dict of per-frame arrays `[T]` (spatiotemporal_iou, mse and their variance_*) and floats.
    Raises:
      ValueError naming the shapes for mismatched lengths or sizes.
    """
    videos = {"take1": _as_uint8_video(take1, "take1"), "take2": _as_uint8_video(take2, "take2"),
              "prediction": _as_uint8_video(prediction, "prediction")}
    shapes = {k: v.shape for k, v in videos.items()}
    if num_frames is None:
        if len({s[0] for s in shapes.values()}) != 1:
            raise ValueError(f"videos must have the same number of frames, got shapes {shapes}")
    else:
        short = {k: s for k, s in shapes.items() if s[0] < num_frames}
        if short:
            raise ValueError(f"videos shorter than num_frames={num_frames}: shapes {short}")
        videos = {k: v[:num_frames] for k, v in videos.items()}
    if shapes["take1"][1:3] != shapes["take2"][1:3]:
        raise ValueError(f"take1 and take2 must have the same frame size, got shapes {shapes}")
    if strict_size and shapes["prediction"][1:3] != shapes["take1"][1:3]:
        raise ValueError(f"prediction must have take1's frame size (strict_size=True), got shapes {shapes}")
    out_hw = (shapes["take1"][1] // resize_divisor, shapes["take1"][2] // resize_divisor)
    if min(out_hw) < 1:
        raise ValueError(f"take1 frames {shapes['take1']} are too small for resize_divisor={resize_divisor}")
    masks = {"take1": take1_masks, "take2": take2_masks, "prediction": None}
    summaries = {}
    for key, video in videos.items():
        given = masks[key]
        if given is not None:
            given = np.asarray(given, bool)[: len(video)]
            if given.shape != video.shape[:3]:
                raise ValueError(f"{key}_masks shape {given.shape} does not match {key} video {video.shape}")
        summaries[key] = summarize_video(video, out_hw, given)
    return compare_summaries(summaries["take1"], summaries["take2"], summaries["prediction"])


# ----------------------------------------------------------------------------- aggregation


def _round_frames(values) -> np.ndarray:
    return np.round(np.asarray(values, np.float64), 4)


def original_score(samples: list[dict], scenarios: list[str] | None = None, *,
                   round_variances: bool = True) -> float:
    """The original Physics-IQ score (percent) from `evaluate_sample` dicts; see the module doc.

    `round_variances=True` is `calculate_iq_score.py` (the README's number); False is
    `IQTable.final_score_orig` of the newer scorer, which skips the variance rounding.
    """
    if not samples:
        raise ValueError("original_score: no samples")
    scenarios = scenarios or [str(i) for i in range(len(samples))]
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(scenarios):
        groups.setdefault(name, []).append(index)

    def per_scenario_frame_mean(key):
        return np.mean([np.mean(np.concatenate([_round_frames(samples[i][key]) for i in idx]))
                        for idx in groups.values()])

    st, mse = per_scenario_frame_mean("spatiotemporal_iou"), per_scenario_frame_mean("mse")
    s = np.mean([x["spatial_iou"] for x in samples])
    ws = np.mean([x["weighted_spatial_iou"] for x in samples])
    def maybe_round(value, digits):
        return round(float(value), digits) if round_variances else float(value)

    v_st = maybe_round(np.mean(np.concatenate([_round_frames(x["variance_spatiotemporal_iou"]) for x in samples])), 4)
    v_mse = maybe_round(np.mean(np.concatenate([_round_frames(x["variance_mse"]) for x in samples])), 4)
    v_s = maybe_round(np.mean([x["variance_spatial_iou"] for x in samples]), 5)
    v_ws = maybe_round(np.mean([x["variance_weighted_spatial_iou"] for x in samples]), 4)
    with np.errstate(divide="ignore", invalid="ignore"):  # the official score has no epsilon
        score = ((np.float64(st) / v_st + s / v_s + ws / v_ws) / 3 - (mse - v_mse)) * 100
    return round(float(np.clip(score, 0.0, 100.0)), 2)


def verified_components(sample: dict) -> dict:
    """Per-sample Verified sub-scores, each clipped to [0, 1], and their mean ('score')."""
    st, v_st = np.mean(_round_frames(sample["spatiotemporal_iou"])), np.mean(_round_frames(sample["variance_spatiotemporal_iou"]))
    mse, v_mse = np.mean(_round_frames(sample["mse"])), np.mean(_round_frames(sample["variance_mse"]))
    with np.errstate(divide="ignore"):  # MSE 0 -> inf -> clipped to 1, as in the official code
        parts = {
            "spatial": sample["spatial_iou"] / (sample["variance_spatial_iou"] + RATIO_EPS),
            "spatiotemporal": st / (v_st + RATIO_EPS),
            "weighted_spatial": sample["weighted_spatial_iou"] / (sample["variance_weighted_spatial_iou"] + RATIO_EPS),
            "mse": (v_mse + RATIO_EPS) / np.float64(mse),
        }
    parts = {k: float(np.clip(v, 0.0, 1.0)) for k, v in parts.items()}
    parts["score"] = float(np.mean(list(parts.values())))
    return parts


def verified_score(samples: list[dict]) -> float:
    """Physics-IQ Verified score (percent): mean over samples of `verified_components`."""
    if not samples:
        raise ValueError("verified_score: no samples")
    return round(100.0 * float(np.mean([verified_components(x)["score"] for x in samples])), 2)


def _summary(per_sample: list[dict], names: list[str]) -> dict:
    def mean_of(key):
        return float(np.mean([np.mean(x[key]) for x in per_sample]))

    keys = ("spatiotemporal_iou", "spatial_iou", "weighted_spatial_iou", "mse")
    return {
        "original": original_score(per_sample, names),
        "original_unrounded": original_score(per_sample, names, round_variances=False),
        "verified": verified_score(per_sample),
        "metrics": {k: mean_of(k) for k in keys},
        "physical_variance": {k: mean_of("variance_" + k) for k in keys},
        "per_sample": per_sample,
        "scenarios": names,
    }


def score_scenarios(scenarios: Iterable[dict], *, num_frames: int | None = None,
                    resize_divisor: int = RESIZE_DIVISOR, strict_size: bool = True) -> dict:
    """Score predictions against real takes.

    Args:
      scenarios: iterable of dicts, one per (scenario, view) sample, with RGB videos `[T,H,W,3]`
        under 'take1', 'take2', 'prediction'; optional 'scenario' (a name: samples sharing it are
        the views of one scenario, which only matters for the original score's ST and MSE
        averaging) and optional 'take1_masks' / 'take2_masks' (bool `[T,H,W]`).
      num_frames, resize_divisor, strict_size: as in `evaluate_sample`.
    Returns:
      dict with 'original', 'original_unrounded' and 'verified' (percent), 'metrics' and
      'physical_variance' (means over samples of the four metrics), 'per_sample' (the `evaluate_sample` dicts) and 'scenarios'.
    """
    per_sample, names = [], []
    for index, item in enumerate(scenarios):
        missing = {"take1", "take2", "prediction"} - set(item)
        if missing:
            raise ValueError(f"scenario {index} lacks {sorted(missing)}")
        per_sample.append(evaluate_sample(item["take1"], item["take2"], item["prediction"],
                                          num_frames=num_frames, resize_divisor=resize_divisor,
                                          strict_size=strict_size, take1_masks=item.get("take1_masks"),
                                          take2_masks=item.get("take2_masks")))
        names.append(str(item.get("scenario", index)))
    return _summary(per_sample, names)


# ----------------------------------------------------------------------------- release on disk


def _read_frames(path: str, max_frames: int, gray: bool = False) -> Iterator[np.ndarray]:
    import av

    with av.open(path) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= max_frames:
                break
            rgb = frame.to_ndarray(format="rgb24")
            yield rgb[..., 0] > 127 if gray else rgb


def _frame_size(path: str) -> tuple[int, int]:
    import av

    with av.open(path) as container:
        ctx = container.streams.video[0].codec_context
        return ctx.height, ctx.width


def find_release_samples(release_dir: str, generated_dir: str, fps: int = 30) -> list[dict]:
    """Locate the files of every take-1 (scenario, view) in a Physics-IQ release folder.

    Layout (as the official `physiq/` code reads it):
      `{release}/split-videos/testing/{fps}FPS/{id}_testing-videos_{fps}FPS_{view}_take-{1|2}_{scene}.mp4`
      `{release}/video-masks/real/{fps}FPS/{id}_video-masks_{fps}FPS_{view}_take-{1|2}_{scene}.mp4`
        (optional; when the folder is absent, masks are computed from the videos, as the
        official code then does)
      `{generated}/{take-1 id}_{view}_{scene}.mp4` (or any single file starting `{take-1 id}_`,
        as the official renaming step accepts).
    Takes are paired by scene name and view, not by id. Returns dicts of paths and names.
    Raises FileNotFoundError naming every missing folder or file.
    """
    candidates = [os.path.join(release_dir, "split-videos", sub, f"{fps}FPS") for sub in ("testing", "testing-videos")]
    testing = next((c for c in candidates if os.path.isdir(c)), None)
    if testing is None:
        raise FileNotFoundError(f"Physics-IQ testing videos not found; looked for {candidates}")
    if not os.path.isdir(generated_dir):
        raise FileNotFoundError(f"generated videos folder not found: {generated_dir}")
    mask_dir = os.path.join(release_dir, "video-masks", "real", f"{fps}FPS")
    use_masks = os.path.isdir(mask_dir)
    takes: dict[tuple[str, str], dict[str, str]] = {}
    for name in sorted(os.listdir(testing)):
        parts = name.split("_")
        if not name.endswith(".mp4") or len(parts) != 6 or parts[1] != "testing-videos":
            continue
        file_id, _, _, view, take, scene = parts
        takes.setdefault((scene, view), {})[take] = file_id
    if not takes:
        raise FileNotFoundError(f"no '{{id}}_testing-videos_{fps}FPS_{{view}}_take-N_{{scene}}.mp4' files in {testing}")
    generated_files = sorted(f for f in os.listdir(generated_dir) if f.endswith(".mp4"))
    samples, missing = [], []
    for (scene, view), ids in sorted(takes.items()):
        if "take-1" not in ids or "take-2" not in ids:
            missing.append(f"{testing}: take-1 and take-2 of {view} {scene} (found {sorted(ids)})")
            continue
        sample = {"scenario": scene.removesuffix(".mp4"), "view": view}
        for take, key in (("take-1", "take1"), ("take-2", "take2")):
            sample[key] = os.path.join(testing, f"{ids[take]}_testing-videos_{fps}FPS_{view}_{take}_{scene}")
            if use_masks:
                sample[key + "_masks"] = os.path.join(mask_dir, f"{ids[take]}_video-masks_{fps}FPS_{view}_{take}_{scene}")
        exact = f"{ids['take-1']}_{view}_{scene}"
        prefixed = [f for f in generated_files if f.startswith(ids["take-1"] + "_")]
        sample["prediction"] = os.path.join(generated_dir, exact if exact in generated_files
                                            else (prefixed[0] if len(prefixed) == 1 else exact))
        for key in ("take1", "take2", "take1_masks", "take2_masks", "prediction"):
            if key in sample and not os.path.isfile(sample[key]):
                missing.append(sample[key])
        samples.append(sample)
    if missing:
        raise FileNotFoundError("Physics-IQ files missing:\n  " + "\n  ".join(missing))
    return samples


def score_release(release_dir: str, generated_dir: str, *, fps: int = 30, seconds: int = 5,
                  resize_divisor: int = RESIZE_DIVISOR) -> dict:
    """Score a folder of generated videos against a Physics-IQ release on disk.

    Videos are streamed frame by frame (the release is 4K), keeping only the 1/4-size frames
    and masks in memory. The first `fps * seconds` frames of every video are scored.
    Returns the same dict as `score_scenarios`.
    """
    num_frames = fps * seconds
    per_sample, names = [], []
    for sample in find_release_samples(release_dir, generated_dir, fps):
        h, w = _frame_size(sample["take1"])
        out_hw = (h // resize_divisor, w // resize_divisor)
        summaries = {}
        for key in ("take1", "take2", "prediction"):
            mask_path = sample.get(key + "_masks")
            masks = _read_frames(mask_path, num_frames, gray=True) if mask_path else None
            summaries[key] = summarize_video(_read_frames(sample[key], num_frames), out_hw, masks)
        lengths = {sample[k]: len(summaries[k][0]) for k in summaries}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"videos must have at least {num_frames} frames or equal lengths, got {lengths}")
        per_sample.append(compare_summaries(summaries["take1"], summaries["take2"], summaries["prediction"]))
        names.append(sample["scenario"])
    return _summary(per_sample, names)
