"""Catalog video datasets (TFDS) as `(frames uint8 [T, H, W, 3], fps, name)` triples for ingestion.

Uses `tfds.data_source` (random access over ArrayRecord, no TensorFlow needed to read). The dataset
must already be prepared in `data_dir` (e.g. `tfds.builder(name, file_format="array_record")
.download_and_prepare()`); this module never downloads. Install with `pip install vgpt_jax[tfds]`.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Frame rates the catalog does not record in its features.
KNOWN_FPS = {"bair_robot_pushing_small": 10.0, "ucf101": 25.0, "moving_mnist": 10.0, "robonet": 10.0}
# Feature holding the video, where a dataset has several (BAIR: two camera views).
KNOWN_VIDEO_KEYS = {"bair_robot_pushing_small": "image_main", "ucf101": "video"}


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("reading TFDS catalog datasets needs tensorflow-datasets: "
                          "pip install 'vgpt_jax[tfds]' (or pip install tensorflow-datasets)") from e
    return tfds


def _find_video(example: dict, key: str | None, name: str) -> np.ndarray:
    if key is not None:
        if key not in example:
            raise KeyError(f"{name}: no feature {key!r}; features are {sorted(example)}")
        return np.asarray(example[key])
    for k, value in example.items():  # first 4-D uint8 RGB array
        value = np.asarray(value)
        if value.ndim == 4 and value.shape[-1] == 3 and value.dtype == np.uint8:
            return value
    raise ValueError(f"{name}: no [T, H, W, 3] uint8 feature among {sorted(example)}; pass video_key")


def iter_tfds_videos(name: str, split: str = "train", *, data_dir: str | None = None, video_key: str | None = None,
                     fps: float | None = None, max_videos: int | None = None,
                     start: int = 0) -> Iterator[tuple[np.ndarray, float, str]]:
    """Yield `(frames uint8 [T, H, W, 3], fps, "<name>/<split>/<index>")` from a prepared TFDS dataset.

    `fps` defaults to KNOWN_FPS[name]; `video_key` to KNOWN_VIDEO_KEYS[name] or the first RGB video feature.
    """
    tfds = _import_tfds()
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    base_name = name.split("/")[0].split(":")[0]
    fps = fps if fps is not None else KNOWN_FPS.get(base_name)
    if fps is None:
        raise ValueError(f"{name}: frame rate unknown; pass fps=")
    video_key = video_key or KNOWN_VIDEO_KEYS.get(base_name)
    stop = len(source) if max_videos is None else min(len(source), start + max_videos)
    for index in range(start, stop):
        label = f"{base_name}/{split}/{index}"
        frames = _find_video(source[index], video_key, label)
        yield frames, float(fps), label
