"""Physics-IQ scoring that reproduces the official scorer (google-deepmind/physics-IQ-benchmark).

The official `physiq/` code is built on OpenCV, so this module calls OpenCV for the same steps,
in the same order, and numpy for the same reductions. Per (scenario, view) sample, with
n = fps * 5 frames:

1. Motion masks, per video at its own size: decode (BGR) -> COLOR_BGR2GRAY -> GaussianBlur 5x5
   -> accumulateWeighted (alpha 0.3, seeded with frame 0) -> absdiff with convertScaleAbs(bg)
   -> threshold > 10 -> MORPH_OPEN then MORPH_CLOSE (5x5 ones); frame 0 is empty. The masks are
   stored as grey mp4v video (even size, round(fps)) and read back: that lossy round trip is
   part of the official numbers. A release ships the real takes' mask videos
   (`video-masks/real`); the generated videos' masks are made here, the same way.
2. The first n frames of take 1, take 2 and the generated video, and of their mask videos, are
   resized with `cv2.resize` (bilinear) to take-1's size // 4. Masks are then channel 0 > 127;
   frames are scaled by 1/255.
3. Metrics against take 1: spatiotemporal IoU per frame (empty union = 1), spatial IoU of the
   "ever moved" maps, weighted spatial IoU (sum of min / sum of max of the per-pixel motion
   frequency where the max is > 0; 1 when there is no such pixel) and MSE per frame (float32).
   The same metrics of take 2 against take 1 are the physical variance: the ceiling, a
   prediction as close to take 1 as a second real take scores 100.
4. Per-frame values are rounded to 4 decimals (the official scorer reads them back from a CSV).

Scores are fractions in [0, 1] internally; `printed` turns one into the number the official
`run_physics_iq.py` prints (`round(x, 4) * 100`, two decimals):
- Original (`IQTable.final_score_orig`): per scenario, ST and MSE are means over all frames of
  its views, S and WS means over its views; each is averaged over scenarios (variances alike)
  and score = clip((ST/vST + S/vS + WS/vWS)/3 - (MSE - vMSE), 0, 1). No epsilon.
  `original_rounded_variances` is the older `calculate_iq_score.py`, which rounds the
  variances to 4 decimals (spatial: 5) first; the two differ by hundredths of a point.
- Verified (`final_score_view`): per sample, S/(vS+1e-8), WS/(vWS+1e-8), ST/(vST+1e-8) and
  (vMSE+1e-8)/MSE, each clipped to [0, 1], averaged; then the mean over samples.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

MASK_THRESHOLD = 10  # on 0..255 grey levels
BACKGROUND_ALPHA = 0.3
BLUR_SIZE = (5, 5)
MORPH_KERNEL = np.ones((5, 5), np.uint8)
MASK_ON = 127  # a decoded mask pixel counts as moving when channel 0 is above this
MASK_FOURCC = "mp4v"
RESIZE_DIVISOR = 4  # metrics run at 1/4 of take-1's size (960x540 for the 4K release)
SECONDS = 5  # the scored window: the first 5 s after the switch frame
VIEWS = ("perspective-left", "perspective-center", "perspective-right")
RATIO_EPS = 1e-8  # the Verified score's guard against zero variances
LIST_KEYS = ("spatiotemporal_iou", "mse", "variance_spatiotemporal_iou", "variance_mse")
SCALAR_KEYS = ("spatial_iou", "weighted_spatial_iou", "variance_spatial_iou",
               "variance_weighted_spatial_iou")
METRICS = ("spatiotemporal_iou", "spatial_iou", "weighted_spatial_iou", "mse")


class VideoError(ValueError):
    """A video that OpenCV cannot open, or that has too few frames; the message names the file."""


def _cv2():
    try:
        import cv2
    except ImportError as e:  # the eval extra; the rest of vgpt_jax runs without it
        raise ImportError("Physics-IQ scoring uses OpenCV, as the official scorer does: "
                          "pip install -e '.[eval]' (opencv-python-headless)") from e
    return cv2


# ----------------------------------------------------------------------------- video files


def read_frames(path: str, limit: int | None = None) -> Iterator[np.ndarray]:
    """Decoded frames of a video file as `cv2.VideoCapture` gives them: BGR uint8 `[H,W,3]`."""
    cv2 = _cv2()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise VideoError(f"{path}: OpenCV cannot open it (corrupt, empty or not a video)")
        count = 0
        while limit is None or count < limit:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
            count += 1
    finally:
        capture.release()


def video_fps(path: str) -> float:
    """The frame rate OpenCV reports (`CAP_PROP_FPS`), which is what the official scorer uses."""
    cv2 = _cv2()
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise VideoError(f"{path}: OpenCV cannot open it (corrupt, empty or not a video)")
        return float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()


def _exactly(frames: Iterable[np.ndarray], n: int, what: str) -> Iterator[np.ndarray]:
    """The first `n` of `frames`; a clear VideoError when there are fewer."""
    count = 0
    for frame in frames:
        if count == n:
            return
        yield frame
        count += 1
    if count < n:
        raise VideoError(f"{what}: {count} frames, but the first {n} are scored")


# ----------------------------------------------------------------------------- masks


class MotionMasker:
    """The official motion mask, one frame at a time: BGR uint8 `[H,W,3]` -> uint8 0/255 `[H,W]`.

    Streaming keeps memory at one native-resolution frame, which matters for 4K release videos.
    """

    def __init__(self, threshold: int = MASK_THRESHOLD, alpha: float = BACKGROUND_ALPHA):
        self.threshold = threshold
        self.alpha = alpha
        self._background: np.ndarray | None = None  # float64, as `astype("float")` makes it

    def __call__(self, frame_bgr: np.ndarray) -> np.ndarray:
        cv2 = _cv2()
        grey = cv2.GaussianBlur(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY), BLUR_SIZE, 0)
        if self._background is None:
            self._background = grey.astype(np.float64)
            return np.zeros_like(grey)
        # The background takes in the current frame *before* the difference is taken.
        cv2.accumulateWeighted(grey, self._background, self.alpha)
        diff = cv2.absdiff(grey, cv2.convertScaleAbs(self._background))
        _, binary = cv2.threshold(diff, self.threshold, 255, cv2.THRESH_BINARY)
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, MORPH_KERNEL)
        return cv2.morphologyEx(binary, cv2.MORPH_CLOSE, MORPH_KERNEL)


def write_mask_video(frames_bgr: Iterable[np.ndarray], path: str, fps: float) -> int:
    """Write the motion masks of BGR frames as the official scorer stores them; returns the count.

    Grey mp4v at round(fps), the writer opened at the size cropped to even sides.
    """
    cv2 = _cv2()
    masker, writer, count = MotionMasker(), None, 0
    try:
        for frame in frames_bgr:
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*MASK_FOURCC), round(fps),
                                         (w - w % 2, h - h % 2), isColor=False)
                if not writer.isOpened():
                    raise OSError(f"{path}: OpenCV cannot write {MASK_FOURCC} video here")
            writer.write(masker(frame))
            count += 1
    finally:
        if writer is not None:
            writer.release()
    return count


def mask_video_of(video_path: str, mask_path: str) -> int:
    """`write_mask_video` of every frame of a video file; returns the video's frame count."""
    return write_mask_video(read_frames(video_path), mask_path, video_fps(video_path))


# ----------------------------------------------------------------------------- scoring size


def scoring_size(frame: np.ndarray, divisor: int = RESIZE_DIVISOR) -> tuple[int, int]:
    """(h, w) the metrics run at: a take-1 frame's size // divisor."""
    return frame.shape[0] // divisor, frame.shape[1] // divisor


def resize(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """`cv2.resize` to (h, w) with its default bilinear interpolation, as the official code does."""
    return _cv2().resize(image, (out_hw[1], out_hw[0]))


def frames_at(frames_bgr: Iterable[np.ndarray], out_hw: tuple[int, int]) -> np.ndarray:
    """Decoded frames resized for scoring: uint8 `[T,h,w,3]`."""
    out = [resize(frame, out_hw) for frame in frames_bgr]
    return np.stack(out) if out else np.zeros((0, *out_hw, 3), np.uint8)


def masks_at(mask_frames: Iterable[np.ndarray], out_hw: tuple[int, int]) -> np.ndarray:
    """Decoded mask-video frames (BGR) resized, then channel 0 > 127: bool `[T,h,w]`."""
    out = [resize(frame, out_hw)[..., 0] > MASK_ON for frame in mask_frames]
    return np.stack(out) if out else np.zeros((0, *out_hw), bool)


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
    freq_a = np.sum(masks_a, axis=0, dtype=np.uint16) / len(masks_a)
    freq_b = np.sum(masks_b, axis=0, dtype=np.uint16) / len(masks_b)
    union = np.maximum(freq_a, freq_b)
    valid = union > 0
    if not valid.any():
        return 1.0
    return float(np.sum(np.minimum(freq_a, freq_b)[valid]) / np.sum(union[valid]))


def mse_per_frame(frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
    """Per-frame MSE of uint8 frames `[T,H,W,3]` on [0, 1], in float32 as the official code: `[T]`."""
    if frames_a.shape != frames_b.shape:
        raise ValueError(f"mse_per_frame: shapes differ, {frames_a.shape} vs {frames_b.shape}")
    out = np.empty(len(frames_a), np.float64)
    for t, (a, b) in enumerate(zip(frames_a, frames_b)):  # one frame at a time: 4K-safe memory
        diff = (a / 255.0).astype(np.float32) - (b / 255.0).astype(np.float32)
        out[t] = (diff**2).mean()
    return out


def sample_metrics(take1, take2, generated) -> dict:
    """Metrics of one sample from three (frames uint8 `[n,h,w,3]`, masks bool `[n,h,w]`) pairs.

    Returns per-frame lists (spatiotemporal_iou, mse and their variance_*, unrounded) and floats.
    """
    (f1, m1), (f2, m2), (fg, mg) = take1, take2, generated
    shapes = {"take 1": (f1.shape, m1.shape), "take 2": (f2.shape, m2.shape),
              "generated": (fg.shape, mg.shape)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"frames or masks differ in shape across the videos: {shapes}")
    return {
        "spatiotemporal_iou": spatiotemporal_iou_per_frame(m1, mg).tolist(),
        "spatial_iou": spatial_iou(m1, mg),
        "weighted_spatial_iou": weighted_spatial_iou(m1, mg),
        "mse": mse_per_frame(f1, fg).tolist(),
        "variance_spatiotemporal_iou": spatiotemporal_iou_per_frame(m1, m2).tolist(),
        "variance_spatial_iou": spatial_iou(m1, m2),
        "variance_weighted_spatial_iou": weighted_spatial_iou(m1, m2),
        "variance_mse": mse_per_frame(f1, f2).tolist(),
    }


# ----------------------------------------------------------------------------- aggregation


def _rounded(values) -> np.ndarray:
    """Python's round(x, 4) per value: how the official scorer parses its CSV (not np.round)."""
    return np.array([round(float(v), 4) for v in values], np.float64)


def printed(fraction) -> float:
    """A score fraction as `run_physics_iq.py` prints it: `f"{round(x, 4) * 100:.2f}"`."""
    return float(f"{round(np.float64(fraction), 4) * 100:.2f}")


def _by(samples: Sequence[dict], key: str) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for sample in samples:
        groups.setdefault(str(sample.get(key, "")), []).append(sample)
    return list(groups.values())


def _scenario_means(members: list[dict]) -> dict:
    row = {k: float(np.mean(np.concatenate([_rounded(m[k]) for m in members]))) for k in LIST_KEYS}
    row.update({k: float(np.mean([m[k] for m in members])) for k in SCALAR_KEYS})
    return row


def verified_components(sample: dict) -> dict:
    """One sample's Verified sub-scores, each clipped to [0, 1], and their mean ('score')."""
    frame_means = {k: np.mean(_rounded(sample[k])) for k in LIST_KEYS}
    with np.errstate(divide="ignore", invalid="ignore"):  # MSE 0 -> inf -> 1, as officially
        parts = {
            "spatial": sample["spatial_iou"] / (np.float64(sample["variance_spatial_iou"]) + RATIO_EPS),
            "weighted_spatial": sample["weighted_spatial_iou"]
            / (np.float64(sample["variance_weighted_spatial_iou"]) + RATIO_EPS),
            "spatiotemporal": frame_means["spatiotemporal_iou"]
            / (frame_means["variance_spatiotemporal_iou"] + RATIO_EPS),
            "mse": np.reciprocal(frame_means["mse"] / (frame_means["variance_mse"] + RATIO_EPS)),
        }
    clipped = np.clip(np.array(list(parts.values())), 0.0, 1.0)
    return {**dict(zip(parts, clipped.tolist())), "score": float(clipped.mean())}


def _rounded_variance_original(samples: Sequence[dict], rows: list[dict]) -> float:
    """`calculate_iq_score.py`: S and WS as means over views of per-view means, variances
    rounded before the ratios, the percentage clipped and rounded to 2 decimals."""
    views = _by(samples, "view")
    per_view = lambda key: np.mean([np.mean([m[key] for m in group]) for group in views])
    per_view_frames = lambda key: np.mean([np.mean(np.concatenate([_rounded(m[key]) for m in group]))
                                           for group in views])
    st, mse = np.mean([r["spatiotemporal_iou"] for r in rows]), np.mean([r["mse"] for r in rows])
    # round() of numpy floats rounds as numpy does, which is what the official code gets.
    v_st = round(np.float64(per_view_frames("variance_spatiotemporal_iou")), 4)
    v_mse = round(np.float64(per_view_frames("variance_mse")), 4)
    v_s = round(np.float64(per_view("variance_spatial_iou")), 5)
    v_ws = round(np.float64(per_view("variance_weighted_spatial_iou")), 4)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = ((st / v_st + per_view("spatial_iou") / v_s
                  + per_view("weighted_spatial_iou") / v_ws) / 3 - (mse - v_mse)) * 100
    return float(round(max(min(np.float64(score), 100.0), 0.0), 2))


def iq_scores(samples: Sequence[dict]) -> dict:
    """Both official scores of `sample_metrics` dicts that carry 'scenario' (and 'view') keys.

    Samples sharing a scenario are its views; give them in the official order (scenarios as
    they appear, views left, center, right) to match it to the last bit.
    Returns 'original', 'verified' (as printed), 'original_rounded_variances', 'fractions'
    (unrounded), 'components' (the official sub-scores), 'metrics' and 'physical_variance'
    (means over scenarios, as the official scorer averages them).
    """
    if not samples:
        raise ValueError("Physics-IQ: no samples to score")
    rows = [_scenario_means(group) for group in _by(samples, "scenario")]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in LIST_KEYS + SCALAR_KEYS}
    with np.errstate(divide="ignore", invalid="ignore"):  # the official Original has no epsilon
        components = {
            "score_spatiotemporal": np.float64(mean["spatiotemporal_iou"]) / mean["variance_spatiotemporal_iou"],
            "score_spatial": np.float64(mean["spatial_iou"]) / mean["variance_spatial_iou"],
            "score_weighted_spatial": np.float64(mean["weighted_spatial_iou"]) / mean["variance_weighted_spatial_iou"],
            "score_mse": np.float64(mean["mse"]) - mean["variance_mse"],
        }
    raw = (components["score_spatiotemporal"] + components["score_spatial"]
           + components["score_weighted_spatial"]) / 3 - components["score_mse"]
    per_sample = [verified_components(s) for s in samples]
    for part in ("spatial", "weighted_spatial", "spatiotemporal", "mse"):
        components[f"score_{part}_view"] = float(np.mean([p[part] for p in per_sample]))
    fractions = {"final_score_raw": float(raw), "final_score_orig": float(np.clip(raw, 0.0, 1.0)),
                 "final_score_view": float(np.mean([p["score"] for p in per_sample]))}
    return {
        "original": printed(fractions["final_score_orig"]),
        "verified": printed(fractions["final_score_view"]),
        "original_rounded_variances": _rounded_variance_original(samples, rows),
        "fractions": fractions,
        "components": {k: float(v) for k, v in components.items()},
        "metrics": {k: mean[k] for k in METRICS},
        "physical_variance": {k: mean["variance_" + k] for k in METRICS},
    }


def breakdown(samples: Sequence[dict], key: str) -> dict:
    """`iq_scores` of the samples grouped by `key` ('view', 'category'), plus their counts."""
    out = {}
    for group in _by(samples, key):
        scores = iq_scores(group)
        out[str(group[0].get(key, ""))] = {
            "num_samples": len(group), "num_scenarios": len(_by(group, "scenario")),
            **{k: scores[k] for k in ("original", "verified", "metrics", "physical_variance")}}
    return out


# ----------------------------------------------------------------------------- arrays in memory


def _bgr(video: np.ndarray, name: str) -> np.ndarray:
    """RGB `[T,H,W,3]` (uint8, or float in [0, 1]) -> contiguous BGR uint8, as OpenCV decodes."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name}: expected an RGB video [T,H,W,3], got shape {video.shape}")
    if np.issubdtype(video.dtype, np.floating):
        video = np.clip(np.rint(video * 255.0), 0, 255)
    return np.ascontiguousarray(video.astype(np.uint8)[..., ::-1])


def summarize_array(video_bgr: np.ndarray, out_hw: tuple[int, int], fps: float,
                    work_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames and masks at the scoring size of decoded BGR frames `[T,H,W,3]`; the masks make
    the official mp4v round trip through `work_dir`."""
    path = os.path.join(work_dir, "mask.mp4")
    write_mask_video(video_bgr, path, fps)
    return frames_at(video_bgr, out_hw), masks_at(read_frames(path, len(video_bgr)), out_hw)


def evaluate_sample(take1: np.ndarray, take2: np.ndarray, prediction: np.ndarray, *,
                    fps: float = 8.0, num_frames: int | None = None,
                    resize_divisor: int = RESIZE_DIVISOR, strict_size: bool = True) -> dict:
    """Metrics of one sample given as decoded RGB videos `[T,H,W,3]` (uint8 or float in [0, 1]).

    Each video is treated as the official scorer treats a decoded file: its masks are computed
    and stored as mp4v at `fps` (which only sets the mask videos' frame rate) and read back.
    num_frames: score the first `num_frames` (the benchmark: fps * 5); None: all, which must
    then be equally many. strict_size: require the prediction to have take-1's H, W (the
    benchmark itself resizes any size). Raises ValueError naming the shapes.
    """
    videos = {"take1": _bgr(take1, "take1"), "take2": _bgr(take2, "take2"),
              "prediction": _bgr(prediction, "prediction")}
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
    out_hw = scoring_size(videos["take1"][0], resize_divisor)
    if min(out_hw) < 1:
        raise ValueError(f"take1 frames {shapes['take1']} are too small for resize_divisor={resize_divisor}")
    with tempfile.TemporaryDirectory(prefix="physics_iq_") as work_dir:
        summaries = [summarize_array(videos[k], out_hw, fps, work_dir) for k in videos]
    return sample_metrics(*summaries)


def score_scenarios(scenarios: Iterable[dict], *, fps: float = 8.0, num_frames: int | None = None,
                    resize_divisor: int = RESIZE_DIVISOR, strict_size: bool = True) -> dict:
    """Score predictions against real takes held in memory.

    scenarios: one dict per sample with RGB videos `[T,H,W,3]` under 'take1', 'take2' and
    'prediction'; optional 'scenario' (samples sharing it are the views of one scenario) and
    'view'. fps, num_frames, resize_divisor, strict_size: as in `evaluate_sample`.
    Returns `iq_scores` plus 'per_sample' (metrics with their names) and 'scenarios'.
    """
    per_sample = []
    for index, item in enumerate(scenarios):
        missing = {"take1", "take2", "prediction"} - set(item)
        if missing:
            raise ValueError(f"scenario {index} lacks {sorted(missing)}")
        metrics = evaluate_sample(item["take1"], item["take2"], item["prediction"], fps=fps,
                                  num_frames=num_frames, resize_divisor=resize_divisor,
                                  strict_size=strict_size)
        per_sample.append({"scenario": str(item.get("scenario", index)),
                           "view": str(item.get("view", "")), **metrics})
    return {**iq_scores(per_sample), "per_sample": per_sample,
            "scenarios": [s["scenario"] for s in per_sample]}


# ----------------------------------------------------------------------------- release on disk


@dataclasses.dataclass
class ReleaseSample:
    """The files of one (scenario, view): real takes, their masks (None: made here), generated."""
    scenario: str   # the scene as in the file names, e.g. 'trimmed-ball-and-block-fall'
    view: str
    take1: str
    take2: str
    generated: str
    take1_mask: str | None = None
    take2_mask: str | None = None


@dataclasses.dataclass
class Release:
    fps: int
    testing_dir: str
    mask_dir: str | None       # None: the release has no masks at this fps; they are made here
    samples: list[ReleaseSample]
    notes: list[str]           # renames the official scorer would also make, ignored files


def parse_fps(value) -> int:
    """A whole frame rate from 8, 8.0, '8' or '8FPS'; a clear ValueError otherwise."""
    text = str(value).strip().upper().removesuffix("FPS")
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number) or number <= 0 or abs(number - round(number)) > 1e-3:
        raise ValueError(f"fps={value!r}: expected a whole number of frames per second, such as "
                         "8 or 30 (the release's folders are named by it: 8FPS, 30FPS)")
    return int(round(number))


def _release_roots_below(path: str, depth: int = 3) -> list[str]:
    found = []
    for root, dirs, _ in os.walk(path):
        if os.path.isdir(os.path.join(root, "split-videos", "testing")):
            found.append(root)
        if root[len(path):].count(os.sep) >= depth - 1:
            dirs.clear()
    return sorted(found)


def check_release_root(release_dir: str) -> None:
    """Raise FileNotFoundError unless `release_dir/split-videos/testing` exists, suggesting the
    folder the user probably meant (a subfolder, or the root above a release subfolder)."""
    if os.path.isdir(os.path.join(release_dir, "split-videos", "testing")):
        return
    if not os.path.isdir(release_dir):
        raise FileNotFoundError(f"release folder {release_dir!r} does not exist")
    hint = ""
    below = _release_roots_below(release_dir)
    absolute = os.path.abspath(release_dir)
    above = [p for p in (os.path.dirname(absolute), os.path.dirname(os.path.dirname(absolute)),
                         os.path.dirname(os.path.dirname(os.path.dirname(absolute))))
             if os.path.isdir(os.path.join(p, "split-videos", "testing"))]
    if below:
        hint = "; did you mean " + " or ".join(repr(p) for p in below[:3]) + "?"
    elif above:
        hint = f"; it is inside the release {above[0]!r}: give that folder"
    raise FileNotFoundError(f"{release_dir!r} is not a Physics-IQ release folder (it has no "
                            f"split-videos/testing/){hint}")


def _mp4s(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".mp4"))


def check_generated_dir(generated_dir: str) -> list[str]:
    """The .mp4 names in the generated folder; FileNotFoundError with a hint when it has none."""
    if not os.path.isdir(generated_dir):
        raise FileNotFoundError(f"generated videos folder {generated_dir!r} does not exist")
    names = _mp4s(generated_dir)
    if names:
        return names
    subs = sorted(d for d in os.listdir(generated_dir)
                  if os.path.isdir(os.path.join(generated_dir, d))
                  and _mp4s(os.path.join(generated_dir, d)))
    hint = f"; its subfolder(s) {', '.join(subs[:4])} do: give one of them" if subs else ""
    raise FileNotFoundError(f"generated videos folder {generated_dir!r} has no .mp4 files{hint}")


def detect_fps(paths: Sequence[str]) -> int:
    """The common frame rate of videos, as OpenCV reads it; ValueError when they disagree or it
    is not whole (the official scorer takes it from the generated videos)."""
    rates: dict[float, list[str]] = {}
    for path in paths:
        rates.setdefault(round(video_fps(path), 3), []).append(os.path.basename(path))
    if len(rates) > 1:
        listing = "; ".join(f"{fps:g} FPS: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                            for fps, names in sorted(rates.items()))
        raise ValueError(f"generated videos have different frame rates ({listing}); the official "
                         "scorer needs one rate for the whole folder")
    (fps, names), = rates.items()
    try:
        return parse_fps(fps)
    except ValueError:
        raise ValueError(f"generated videos are at {fps:g} FPS ({names[0]}, ...); Physics-IQ "
                         "scores whole frame rates that have a release folder (8, 16, 24, 30)") from None


def release_takes(testing_dir: str, fps: int) -> dict[tuple[str, str], dict[str, str]]:
    """{(scenario, view): {'take-1': id, 'take-2': id}} from the testing videos' names, scenarios
    in the order the official scorer meets them (sorted file names) and views left, center, right."""
    takes: dict[str, dict[str, dict[str, str]]] = {}
    for name in _mp4s(testing_dir):
        parts = name.removesuffix(".mp4").split("_")
        if len(parts) != 6 or parts[1] != "testing-videos" or parts[4] not in ("take-1", "take-2"):
            continue
        file_id, _, _, view, take, scene = parts
        takes.setdefault(scene, {}).setdefault(view, {})[take] = file_id
    if not takes:
        raise FileNotFoundError(f"no '{{id}}_testing-videos_{fps}FPS_{{view}}_take-{{1|2}}_{{scene}}.mp4' "
                                f"files in {testing_dir}")
    out, missing = {}, []
    for scene, views in takes.items():
        for view in VIEWS:
            ids = views.get(view, {})
            if set(ids) != {"take-1", "take-2"}:
                missing.append(f"{scene} {view}: found {sorted(ids) or 'no take'}")
            else:
                out[(scene, view)] = ids
    if missing:
        raise FileNotFoundError(f"{testing_dir}: every scenario needs take-1 and take-2 of all "
                                f"three views; incomplete: " + "; ".join(missing))
    return out


def split_dir(release_dir: str, part: str, fps: int) -> str:
    """`{release}/split-videos/{part}/{fps}FPS` ('testing' or 'conditioning'); a clear
    FileNotFoundError listing the frame rates the release has when it is absent."""
    parent = os.path.join(release_dir, "split-videos", part)
    folder = os.path.join(parent, f"{fps}FPS")
    if not os.path.isdir(folder):
        have = sorted(d for d in os.listdir(parent) if d.endswith("FPS")) if os.path.isdir(parent) else []
        raise FileNotFoundError(f"the release has no {part} videos at {fps} FPS ({folder}); it "
                                f"has: {', '.join(have) or 'none'}. Use one of those rates")
    return folder


def _match_generated(names: Sequence[str], takes: dict, generated_dir: str, testing_dir: str):
    """Pair generated files with samples by the 4-character take-1 id prefix, as the official
    renaming step does. Returns ({(scene, view): path}, notes); FileNotFoundError names every
    missing sample and why each unused file was rejected."""
    by_take1 = {ids["take-1"]: key for key, ids in takes.items()}
    by_take2 = {ids["take-2"]: key for key, ids in takes.items()}
    claims: dict[str, list[str]] = {}
    rejected, notes = [], []
    for name in names:
        prefix = name[:4]
        if not (prefix.isdigit() and name[4:5] == "_"):
            rejected.append(f"{name}: does not start with a 4-digit take-1 id and '_'")
        elif prefix in by_take1:
            claims.setdefault(prefix, []).append(name)
        elif prefix in by_take2:
            scene, view = by_take2[prefix]
            rejected.append(f"{name}: {prefix} is the take-2 id of {view} {scene}; generated "
                            f"videos carry the take-1 id ({takes[(scene, view)]['take-1']})")
        else:
            rejected.append(f"{name}: no take-1 video with id {prefix} in {testing_dir}")
    found = {}
    for prefix, claimed in claims.items():
        scene, view = by_take1[prefix]
        if len(claimed) > 1:
            rejected.append(f"{', '.join(claimed)}: several files claim id {prefix}")
            continue
        expected = f"{prefix}_{view}_{scene}.mp4"
        if claimed[0] != expected:
            notes.append(f"{claimed[0]} is scored as {expected} (matched by its id, as the "
                         "official scorer renames it)")
        found[(scene, view)] = os.path.join(generated_dir, claimed[0])
    missing = [f"{ids['take-1']}_{view}_{scene}.mp4" for (scene, view), ids in takes.items()
               if (scene, view) not in found]
    if missing or rejected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} of {len(takes)} generated videos missing in "
                         f"{generated_dir}: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if rejected:
            lines.append("rejected files:\n  " + "\n  ".join(rejected))
        raise FileNotFoundError("\n".join(lines))
    return found, notes


def find_release(release_dir: str, generated_dir: str, fps=None) -> Release:
    """Locate every file of a Physics-IQ release folder and a folder of generated videos.

    Layout, as the official `physiq/` code reads it:
      `{release}/split-videos/testing/{fps}FPS/{id}_testing-videos_{fps}FPS_{view}_take-{1|2}_{scene}.mp4`
      `{release}/video-masks/real/{fps}FPS/{id}_video-masks_{fps}FPS_{view}_take-{1|2}_{scene}.mp4`
        (optional; without the folder the masks are made from the videos, as officially)
      `{generated}/{take-1 id}_{view}_{scene}.mp4` (any name starting with the take-1 id and
        '_' is accepted, as the official renaming step does).
    fps: None detects it from the generated videos; a given value (8, '8', '8FPS') must agree.
    Raises FileNotFoundError / ValueError saying what is wrong and where.
    """
    check_release_root(release_dir)
    names = check_generated_dir(generated_dir)
    detected = detect_fps([os.path.join(generated_dir, n) for n in names])
    if fps is not None and parse_fps(fps) != detected:
        raise ValueError(f"fps={fps!r}, but the generated videos are at {detected} FPS; the "
                         "official scorer takes the rate from the generated videos")
    testing_dir = split_dir(release_dir, "testing", detected)
    takes = release_takes(testing_dir, detected)
    generated, notes = _match_generated(names, takes, generated_dir, testing_dir)
    mask_dir = os.path.join(release_dir, "video-masks", "real", f"{detected}FPS")
    mask_dir = mask_dir if os.path.isdir(mask_dir) else None
    if mask_dir is None:
        notes.append(f"the release has no video-masks/real/{detected}FPS: the real takes' masks "
                     "are made from the videos, as the official scorer does")
    samples, missing = [], []
    for (scene, view), ids in takes.items():
        paths = {take: os.path.join(testing_dir, f"{ids[take]}_testing-videos_{detected}FPS_{view}_{take}_{scene}.mp4")
                 for take in ids}
        masks = {take: None if mask_dir is None else
                 os.path.join(mask_dir, f"{ids[take]}_video-masks_{detected}FPS_{view}_{take}_{scene}.mp4")
                 for take in ids}
        missing += [m for m in masks.values() if m is not None and not os.path.isfile(m)]
        samples.append(ReleaseSample(scene, view, paths["take-1"], paths["take-2"],
                                     generated[(scene, view)], masks["take-1"], masks["take-2"]))
    if missing:
        raise FileNotFoundError(f"{mask_dir} lacks {len(missing)} mask videos: "
                                + ", ".join(os.path.basename(m) for m in missing[:8]))
    return Release(detected, testing_dir, mask_dir, samples, notes)


def write_release(root: str, scenes: dict[str, Sequence[tuple[np.ndarray, np.ndarray]]], fps: int,
                  write: Callable[[str, np.ndarray, int], object] | None = None) -> dict:
    """Write takes in the release layout `find_release` reads (the inverse of its parsing).

    scenes: {scene: three (take 1, take 2) pairs, one per view of VIEWS}, each take uint8 RGB
    `[(3 + SECONDS) * fps, H, W, 3]`; scene names must not contain '_'. Writes the testing videos
    (the last SECONDS * fps frames of both takes) and the conditioning video (the first 3 * fps
    frames of take 1); no mask videos (the scorer makes them from the videos, officially).
    Ids as in the release: take-1 ids 0001.. in scene-major, view-minor order, take 2 = id + 198.
    write(path, frames, fps): the encoder (default `video_io.write_video`, libx264 crf 18).
    Returns {(scene, view): {'take-1': id, 'take-2': id}}.
    """
    if write is None:
        from vgpt_jax.data.video_io import write_video as write
    conditioning, total = 3 * fps, (3 + SECONDS) * fps
    testing_dir = os.path.join(root, "split-videos", "testing", f"{fps}FPS")
    conditioning_dir = os.path.join(root, "split-videos", "conditioning", f"{fps}FPS")
    for folder in (testing_dir, conditioning_dir):
        os.makedirs(folder, exist_ok=True)
    ids, take1_id = {}, 1
    for scene, views in scenes.items():
        if "_" in scene or len(views) != len(VIEWS):
            raise ValueError(f"scene {scene!r}: needs a name without '_' and {len(VIEWS)} views "
                             f"(got {len(views)})")
        for view, takes in zip(VIEWS, views):
            ids[(scene, view)] = {"take-1": f"{take1_id:04d}", "take-2": f"{take1_id + 198:04d}"}
            for take, frames in zip(("take-1", "take-2"), takes):
                if len(frames) != total:
                    raise ValueError(f"{scene} {view} {take}: {len(frames)} frames; a {fps}FPS "
                                     f"release needs 3 + {SECONDS} s = {total}")
                file_id = ids[(scene, view)][take]
                name = f"{fps}FPS_{view}_{take}_{scene}.mp4"
                write(os.path.join(testing_dir, f"{file_id}_testing-videos_{name}"),
                      frames[conditioning:], fps)
                if take == "take-1":
                    write(os.path.join(conditioning_dir, f"{file_id}_conditioning-videos_{name}"),
                          frames[:conditioning], fps)
            take1_id += 1
    return ids


def load_categories(path: str) -> dict[str, str]:
    """{scenario: category} from a descriptions CSV with 'scenario' and 'category' columns (the
    official `descriptions/*.csv`; scenario cells like `0001_perspective-left_take-1_trimmed-x.mp4`)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"scenario", "category"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with 'scenario' and 'category' columns")
    return {row["scenario"].split("_")[-1].removesuffix(".mp4"): row["category"] for row in rows}


def _release_view(sample: ReleaseSample, n: int, work_dir: str):
    """(frames, masks) of take 1, take 2 and the generated video at the scoring size."""
    first = next(read_frames(sample.take1, 1), None)
    if first is None:
        raise VideoError(f"{sample.take1}: no frame decodes")
    out_hw = scoring_size(first)
    summaries = []
    for key in ("take1", "take2", "generated"):
        path = getattr(sample, key)
        mask = getattr(sample, key + "_mask", None)
        if mask is None:
            mask = os.path.join(work_dir, f"{key}_{os.path.basename(path)}")
            count = mask_video_of(path, mask)
            if key == "generated" and count != n:
                raise VideoError(f"{path}: {count} frames; the official scorer takes exactly "
                                 f"{SECONDS} s ({n} frames at {n // SECONDS} FPS)")
        frames = frames_at(_exactly(read_frames(path, n), n, path), out_hw)
        masks = masks_at(_exactly(read_frames(mask, n), n, mask), out_hw)
        summaries.append((frames, masks))
    return summaries


def score_release(release_dir: str, generated_dir: str, *, fps=None,
                  categories: dict[str, str] | None = None, work_dir: str | None = None,
                  progress: Callable[[ReleaseSample], None] | None = None) -> dict:
    """Score a folder of generated videos against a Physics-IQ release on disk, officially.

    fps: None detects it from the generated videos. categories: {scenario: category} (see
    `load_categories`) adds a per-category breakdown. work_dir: where the generated videos'
    masks are written (default: a temporary folder). progress(sample) runs after each sample.
    Returns `iq_scores` plus 'fps', 'num_samples', 'num_scenarios', 'per_view', 'per_category'
    (or None), 'per_sample' (names, files, metrics and Verified sub-scores) and 'notes'.
    """
    release = find_release(release_dir, generated_dir, fps)
    n = release.fps * SECONDS
    per_sample = []
    with tempfile.TemporaryDirectory(prefix="physics_iq_") as temp:
        masks_dir = work_dir or temp
        os.makedirs(masks_dir, exist_ok=True)
        for sample in release.samples:
            metrics = sample_metrics(*_release_view(sample, n, masks_dir))
            name = sample.scenario.removesuffix(".mp4")
            entry = {"scenario": name, "view": sample.view,
                     **({"category": categories.get(name, "unknown")} if categories else {}),
                     "generated": os.path.basename(sample.generated), **metrics}
            entry["verified_components"] = verified_components(entry)
            per_sample.append(entry)
            if progress is not None:
                progress(sample)
    return {**iq_scores(per_sample), "fps": release.fps, "frames_scored": n,
            "num_samples": len(per_sample), "num_scenarios": len(_by(per_sample, "scenario")),
            "per_view": breakdown(per_sample, "view"),
            "per_category": breakdown(per_sample, "category") if categories else None,
            "per_sample": per_sample, "notes": release.notes,
            "release": os.path.abspath(release_dir), "generated": os.path.abspath(generated_dir)}
