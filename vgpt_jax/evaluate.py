"""Evaluate a model on held-out videos: predictions, baselines, metrics, report and grids.

For each held-out video the first `context_frames` frames condition the model, which predicts
the next `predict_frames` with the sampler (`steps` Euler steps: a sample of the future) and,
as a second row, with one step (`video_gpt_1step`: from pure noise at t = 0 one Euler step
lands exactly on the model's x1 prediction given the history, its estimate of the conditional
mean E[x1 | context], which is what minimises MSE; a sample is sharper but pays for every
misplaced detail twice under MSE). Two baselines predict the same frames: copy-the-last-frame and linear
extrapolation in latent space (`z_{C-1} + k (z_{C-1} - z_{C-2})`, decoded). Every method is
scored against the ground truth with MSE, PSNR and SSIM on [0, 1] pixels (and FVD when asked
and the I3D extra is installed), and, for videos that come with a second take (the physics
world's test scenarios or a Physics-IQ style set), with the Physics-IQ style score. Reports are
a JSON file and a markdown table; grids are `context | method... | ground truth` videos.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from vgpt_jax.eval import balls as balls_lib
from vgpt_jax.eval import metrics as metrics_lib
from vgpt_jax.eval import physics_iq
from vgpt_jax.vae.latent_space import LatentSpace

HISTORY_TS = (0.0, 0.5, 0.8)  # noise levels at which `history_usage` measures the x1 error


@dataclasses.dataclass
class HeldOutVideo:
    name: str
    frames: np.ndarray                   # uint8 [T, H, W, 3], T >= context + predict
    second_take: np.ndarray | None = None  # uint8 [T, H, W, 3]: same start, tiny perturbation
    fps: float = 16.0
    balls: balls_lib.Balls | None = None   # the true balls of `frames` (physics world)


def held_out_videos(test_clips, background=None) -> list[HeldOutVideo]:
    """Two-take physics-world test clips (`data.physics_world.make_world`) -> `HeldOutVideo`s
    with their true balls (take 0 is the truth, take 1 the physical variance)."""
    from vgpt_jax.data.physics_world import WorldConfig
    background = np.asarray(WorldConfig().background if background is None else background)
    takes = {}
    for clip in test_clips:
        takes.setdefault(clip.name.rsplit("-take", 1)[0], {})[clip.take] = clip
    videos = []
    for name, t in sorted(takes.items()):
        truth = t[0]
        balls = balls_lib.Balls.of_clip(truth, background) if truth.scenario == "balls" else None
        videos.append(HeldOutVideo(name, truth.frames, t[1].frames, truth.fps, balls))
    return videos


def copy_last_frame(context_FHW3: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(context_FHW3[-1:], n, axis=0)


def linear_extrapolation(space: LatentSpace, context_FHW3: np.ndarray, n: int) -> np.ndarray:
    """Extrapolate the last two context latents linearly, then decode: [n, H, W, 3] uint8."""
    z = space.encode(context_FHW3[-2:])
    steps = np.arange(1, n + 1, dtype=np.float32)[:, None, None, None]
    return space.decode(z[-1:] + steps * (z[-1:] - z[-2:-1]))


def check_videos(videos: Sequence[HeldOutVideo], context_frames: int, predict_frames: int):
    """Clear errors for an unusable held-out set, before any model runs."""
    if not videos:
        raise ValueError("held-out set is empty")
    if context_frames < 2:
        raise ValueError(f"context_frames={context_frames}: need at least 2 (the linear "
                         "extrapolation baseline uses the last two)")
    need = context_frames + predict_frames
    first = videos[0].frames.shape[1:]
    for v in videos:
        if v.frames.ndim != 4 or v.frames.shape[-1] != 3 or v.frames.dtype != np.uint8:
            raise ValueError(f"{v.name}: expected uint8 frames [T, H, W, 3], got "
                             f"{v.frames.dtype} {v.frames.shape}")
        if len(v.frames) < need:
            raise ValueError(f"{v.name}: {len(v.frames)} frames, but context {context_frames} + "
                             f"prediction {predict_frames} = {need} are needed")
        if v.frames.shape[1:] != first:
            raise ValueError(f"{v.name}: frame size {v.frames.shape[1:3]} differs from "
                             f"{videos[0].name}'s {first[:2]}; a held-out set has one size")
        if v.second_take is not None and v.second_take.shape != v.frames.shape:
            raise ValueError(f"{v.name}: second take {v.second_take.shape} does not match "
                             f"{v.frames.shape}")


def predict_all(pipeline, videos, context_frames, predict_frames, *, clip_frames, steps,
                guidance, seed, predict_options=None, batch_size=8, progress=None) -> np.ndarray:
    """Model predictions for every video: uint8 [N, predict_frames, H, W, 3].
    `predict_options`: further keyword arguments of `Pipeline.predict` (window, context_noise,
    ...)."""
    sizes = [clip_frames] * (predict_frames // clip_frames)
    if predict_frames % clip_frames:
        sizes.append(predict_frames % clip_frames)
    out = []
    for start in range(0, len(videos), batch_size):
        chunk = videos[start:start + batch_size]
        context = np.stack([v.frames[:context_frames] for v in chunk])
        result = pipeline.predict(context, clip_sizes=sizes, steps=steps, guidance=guidance,
                                  **(predict_options or {}),
                                  seed=[seed + start + i for i in range(len(chunk))])
        out.append(result.frames)
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out)


def score(predictions: dict[str, np.ndarray], truth_NTHW3: np.ndarray) -> dict[str, dict]:
    """MSE / PSNR / SSIM of each method on [0, 1] pixels, averaged over frames and videos."""
    table = {}
    for name, pred in predictions.items():
        table[name] = {
            "mse": float(np.mean(metrics_lib.mse(pred, truth_NTHW3))),
            "psnr": float(np.mean(metrics_lib.psnr(pred, truth_NTHW3))),
            "ssim": float(np.mean(metrics_lib.ssim(pred, truth_NTHW3))),
        }
    return table


def physics_iq_scores(predictions: dict[str, np.ndarray], videos, context_frames) -> dict:
    """Physics-IQ style scores (take 1 = ground truth, take 2 = physical variance) per method."""
    if any(v.second_take is None for v in videos):
        return {}
    n = next(iter(predictions.values())).shape[1]
    out = {}
    for name, pred in predictions.items():
        scenarios = [dict(take1=v.frames[context_frames:context_frames + n],
                          take2=v.second_take[context_frames:context_frames + n],
                          prediction=p, scenario=v.name) for v, p in zip(videos, pred)]
        result = physics_iq.score_scenarios(scenarios)
        out[name] = {"original": float(result["original"]), "verified": float(result["verified"])}
    return out


def ball_scores(predictions: dict[str, np.ndarray], videos, context_frames) -> dict:
    """Ball position error (px), detection rate and colour error per method
    (`eval.balls.score`), for videos that know their balls; {} otherwise."""
    if any(v.balls is None for v in videos):
        return {}
    n = next(iter(predictions.values())).shape[1]
    out = {}
    for name, pred in predictions.items():
        rows = [balls_lib.score(p, v.balls.frames(context_frames, context_frames + n))
                for v, p in zip(videos, pred)]
        out[name] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return out


def history_usage(pipeline, videos, context_frames: int, predict_frames: int, *,
                  clip_frames: int | None = None, ts=HISTORY_TS, draws: int = 4,
                  seed: int = 0) -> dict:
    """Does the model read its history? The error (latent MSE) of the first predicted clip
    (`clip_frames` frames, default all `predict_frames`: the clip the sampler denoises first) at
    noise levels `ts`, with the true context, with another video's context (the batch rolled
    by one) and with no context (the clip as a first clip), averaged over videos and `draws`
    noise draws (`diffusion.denoising_error`). The error is of what the network predicts: x1,
    or the velocity for a v-prediction model. A model that ignores its history has three equal
    columns; `gain` is no-context error over true-context error."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vgpt_jax import diffusion
    space = pipeline.latent_space
    c, p = context_frames, min(clip_frames or predict_frames, predict_frames)
    z = np.stack([space.encode(v.frames[:c + p]) for v in videos])
    graphdef, state = nnx.split(pipeline.model)
    objective = diffusion.ObjectiveConfig(
        prediction_type=getattr(pipeline, "prediction_type", "x1"))

    @jax.jit
    def error(state, latents, clip_ids, t, rng):
        return diffusion.denoising_error(nnx.merge(graphdef, state), latents, clip_ids, t, rng,
                                         objective)

    b = len(videos)
    with_history = jnp.asarray(np.repeat([[0] * c + [1] * p], b, 0))
    alone = jnp.zeros((b, p), jnp.int32)
    contexts = {"true_context": z, "other_context": np.concatenate(
        [np.roll(z[:, :c], 1, axis=0), z[:, c:]], axis=1)}
    rows = {}
    for t in ts:
        sums = {"true_context": 0.0, "other_context": 0.0, "no_context": 0.0}
        for d in range(draws):
            key = jax.random.key(seed * 1000 + d)
            for name, latents in contexts.items():
                sums[name] += float(error(state, latents, with_history, t, key)[:, c:].mean())
            sums["no_context"] += float(error(state, z[:, c:], alone, t, key).mean())
        row = {k: v / draws for k, v in sums.items()}
        row["gain"] = row["no_context"] / max(row["true_context"], 1e-12)
        rows[f"{t:g}"] = row
    return rows


def grid(context_FHW3, predictions: dict[str, np.ndarray], truth_THW3, gap=2) -> np.ndarray:
    """`context | method... | ground truth` panels over time: uint8 [C + P, H, W', 3].

    The context panel freezes on the last context frame; every other panel shows the context
    first, then its own continuation.
    """
    c = len(context_FHW3)
    p = len(truth_THW3)
    frozen = np.concatenate([context_FHW3, copy_last_frame(context_FHW3, p)])
    panels = [frozen] + [np.concatenate([context_FHW3, pred]) for pred in predictions.values()]
    panels.append(np.concatenate([context_FHW3, truth_THW3]))
    t, h, _, _ = panels[0].shape
    spacer = np.full((t, h, gap, 3), 255, np.uint8)
    row = [x for panel in panels for x in (panel, spacer)][:-1]
    out = np.concatenate(row, axis=2)
    out[c:, :2] = (255, 0, 0)  # a red bar marks predicted frames
    return out


def markdown_report(report: dict) -> str:
    lines = [f"# Held-out evaluation: {report['num_videos']} videos, {report['context_frames']} "
             f"context frames, {report['predict_frames']} predicted", ""]
    settings = ", ".join(f"{k}={v}" for k, v in report["settings"].items())
    lines += [f"Settings: {settings}", "",
              "| method | MSE | PSNR (dB) | SSIM |" + (" Physics-IQ | Physics-IQ verified |"
                                                     if report["physics_iq"] else ""),
              "|---|---|---|---|" + ("---|---|" if report["physics_iq"] else "")]
    balls = report.get("balls") or {}
    if balls:
        lines[-2] += " ball position error (px) | balls detected | ball colour error |"
        lines[-1] += "---|---|---|"
    for name, m in report["metrics"].items():
        row = f"| {name} | {m['mse']:.5f} | {m['psnr']:.2f} | {m['ssim']:.4f} |"
        if report["physics_iq"]:
            piq = report["physics_iq"][name]
            row += f" {piq['original']:.2f} | {piq['verified']:.2f} |"
        if balls:
            bm = balls[name]
            row += (f" {bm['position_error_px']:.2f} | {100 * bm['detection_rate']:.0f}% |"
                    f" {bm['color_error']:.3f} |")
        lines.append(row)
    if report.get("history"):
        lines += ["", "History use: x1 error (latent MSE) of the first predicted clip at noise "
                  "level t, by context", "",
                  "| t | true context | another video's context | no context | gain |",
                  "|---|---|---|---|---|"]
        for t, h in report["history"].items():
            lines.append(f"| {t} | {h['true_context']:.4f} | {h['other_context']:.4f} | "
                         f"{h['no_context']:.4f} | {h['gain']:.2f} |")
    if report.get("rollout"):
        lines += ["", "#" + markdown_report(report["rollout"]).rstrip("\n")]
    if report.get("fvd"):
        lines += ["", "FVD: " + ", ".join(f"{k} {v:.1f}" for k, v in report["fvd"].items())]
    return "\n".join(lines) + "\n"


def evaluate(pipeline, videos: Sequence[HeldOutVideo], *, context_frames: int,
             predict_frames: int, clip_frames: int | None = None, steps: int = 50,
             guidance: float = 1.5, seed: int = 0, fvd: bool = False, mean_row: bool = True,
             history: bool = True, predict_options: dict | None = None,
             progress=None) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the model and the baselines on `videos`; returns (report, predictions by method).

    `history`: also measure how much the model uses its context (`history_usage`).
    `predict_options`: further keyword arguments of `Pipeline.predict`, e.g. `window` (a
    rollout longer than the frames the model was trained on stays within the trained length
    when `window` is that length: the newest frames are kept, positions restart at 0, as in the
    reference's long-video sampling) or `context_noise`."""
    check_videos(videos, context_frames, predict_frames)
    space = pipeline.latent_space
    if space is None:
        raise ValueError("evaluate: the pipeline needs a latent space to compare pixels")
    clip_frames = clip_frames or predict_frames
    truth = np.stack([v.frames[context_frames:context_frames + predict_frames] for v in videos])
    run = lambda n: predict_all(pipeline, videos, context_frames, predict_frames,
                                clip_frames=clip_frames, steps=n, guidance=guidance, seed=seed,
                                predict_options=predict_options, progress=progress)
    predictions = {
        "video_gpt": run(steps),
        **({"video_gpt_1step": run(1)} if mean_row and steps > 1 else {}),
        "copy_last_frame": np.stack([copy_last_frame(v.frames[:context_frames], predict_frames)
                                     for v in videos]),
        "linear_extrapolation": np.stack([
            linear_extrapolation(space, v.frames[:context_frames], predict_frames)
            for v in videos]),
    }
    report = {
        "num_videos": len(videos), "context_frames": context_frames,
        "predict_frames": predict_frames,
        "settings": {"steps": steps, "guidance": guidance, "clip_frames": clip_frames,
                     "seed": seed, **(predict_options or {})},
        "metrics": score(predictions, truth),
        "physics_iq": physics_iq_scores(predictions, videos, context_frames),
        "balls": ball_scores(predictions, videos, context_frames),
    }
    if history:
        report["history"] = history_usage(pipeline, videos, context_frames, predict_frames,
                                          clip_frames=clip_frames, seed=seed)
    if fvd:
        from vgpt_jax.eval import fvd as fvd_lib
        report["fvd"] = {name: float(fvd_lib.fvd(pred, truth)) for name, pred in predictions.items()}
    return report, predictions


def write_report(report: dict, out_dir: str, videos=None, predictions=None,
                 context_frames: int = 0, max_grids: int = 8, fps: float = 8.0) -> None:
    """report.json, report.md and up to `max_grids` grid videos (gif) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown_report(report))
    if videos is not None and predictions is not None:
        write_grids(out_dir, videos, predictions, context_frames, max_grids, fps)


def write_grids(out_dir: str, videos, predictions: dict[str, np.ndarray], context_frames: int,
                max_grids: int = 8, fps: float = 8.0) -> None:
    """Up to `max_grids` grid gifs `grid_NN_NAME.gif` (see `grid`) in `out_dir`."""
    from vgpt_jax.data.video_io import write_video
    os.makedirs(out_dir, exist_ok=True)
    n = next(iter(predictions.values())).shape[1]
    for i, v in enumerate(videos[:max_grids]):
        panels = {k: p[i] for k, p in predictions.items() if k != "copy_last_frame"}
        # panels: context | sample | 1-step mean | linear extrapolation | ground truth
        frames = grid(v.frames[:context_frames], panels,
                      v.frames[context_frames:context_frames + n])
        frames = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # small frames: upscale
        write_video(os.path.join(out_dir, f"grid_{i:02d}_{v.name}.gif"), frames, fps)


def load_video_folder(folder: str, num_frames: int) -> list[HeldOutVideo]:
    """Held-out videos from a folder: `NAME.mp4` (or .gif/.avi/.mov/.webm), with an optional
    second take `NAME.take2.mp4` for the Physics-IQ style score. Frames beyond `num_frames` are
    dropped."""
    from vgpt_jax.data.video_io import VIDEO_EXTENSIONS as exts, read_video
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"held-out folder {folder!r} does not exist")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(exts) and ".take2." not in f)
    if not names:
        raise ValueError(f"held-out folder {folder!r} has no videos ({', '.join(exts)})")
    videos = []
    for name in names:
        frames, fps = read_video(os.path.join(folder, name), max_frames=num_frames)
        stem, ext = os.path.splitext(name)
        take2_path = os.path.join(folder, f"{stem}.take2{ext}")
        take2 = read_video(take2_path, max_frames=num_frames)[0] if os.path.exists(take2_path) \
            else None
        videos.append(HeldOutVideo(stem, frames, take2, fps))
    return videos
