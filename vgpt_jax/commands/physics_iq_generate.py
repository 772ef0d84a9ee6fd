"""Run the whole Physics-IQ benchmark from a checkpoint: predict, then score every seed.

For each take-1 (scenario, view) of the release, the 3 s conditioning video
(`split-videos/conditioning/{fps}FPS`) is read at the model's resolution (longer side
--max-image-size, sides cropped to the latent patch multiple, as ingestion does) and the model
predicts the next fps * 5 frames. Predictions are written as `{out}/seed-{k}/{id}_{view}_{scene}.mp4`
(the scorer's naming) at the release frame rate; a video already there is kept, so a killed run
resumes where it stopped. Every seed folder is then scored like `vgpt eval physics-iq`
(`{out}/reports/seed-{k}/`), and `{out}/summary.{json,md}` holds one row per seed and the
mean +- std (sample std, as the official aggregate_runs_from_csvs.py) of the unrounded scores.
`--baseline copy-last` writes the last conditioning frame held still instead of sampling (the
floor, read and written exactly as the model's predictions are).

`--batch-size` videos of one shape are sampled together (over a `--mesh`'s batch axes); each
video's prediction depends only on its own seed, so batching and the mesh change no output.
In a multi-process run (`jax.distributed`, initialised as `vgpt train` does when the
environment names a coordinator) video i belongs to process i mod the process count: each
process samples its share on its own devices and writes its own files, then process 0 scores.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from vgpt_jax.commands import add_sampler_arguments
from vgpt_jax.commands.sample import add_mesh_argument
from vgpt_jax.eval import physics_iq

CONDITIONING_SECONDS = 3


def add_arguments(p: argparse.ArgumentParser, add_common) -> None:
    p.add_argument("--checkpoint", required=True, help="model export folder (config.json + params/)")
    add_common(p)
    p.add_argument("--out", required=True, help="run folder: seed-*/ videos, reports/, summary")
    p.add_argument("--seeds", type=int, default=4, help="independent runs (Verified asks for 4)")
    p.add_argument("--seed", type=int, default=0, help="base of every run's sampling seeds")
    p.add_argument("--fps", default="8", help="release frame rate to condition on and predict at")
    p.add_argument("--max-image-size", type=int, default=320, help="longer side, px")
    p.add_argument("--crop-multiple", type=int, default=None,
                   help="center-crop sides to a multiple of this (default: VAE x patch factor)")
    p.add_argument("--clip-frames", type=int, default=24, help="frames per generated clip")
    add_sampler_arguments(p)
    p.add_argument("--baseline", choices=["copy-last"], default=None,
                   help="write the last conditioning frame held still (read at the model's "
                        "resolution) instead of sampling: the floor through the same path")
    p.add_argument("--batch-size", type=int, default=1,
                   help="videos sampled together (a multiple of the mesh's data x fsdp)")
    add_mesh_argument(p)


def conditioning_videos(release: str, fps: int) -> list[tuple[str, str]]:
    """[(conditioning video path, output name `{id}_{view}_{scene}.mp4`)] for every take-1
    sample of the release, in the scorer's order."""
    testing = physics_iq.split_dir(release, "testing", fps)
    conditioning = physics_iq.split_dir(release, "conditioning", fps)
    names = sorted(f for f in os.listdir(conditioning) if f.endswith(".mp4"))
    out, missing = [], []
    for (scene, view), ids in physics_iq.release_takes(testing, fps).items():
        matches = [f for f in names if f.startswith(ids["take-1"] + "_")]
        if len(matches) != 1:
            missing.append(f"{ids['take-1']} ({view} {scene}): {len(matches)} files")
            continue
        out.append((os.path.join(conditioning, matches[0]), f"{ids['take-1']}_{view}_{scene}.mp4"))
    if missing:
        raise FileNotFoundError(f"{conditioning}: need exactly one conditioning video per take-1 "
                                "id; " + "; ".join(missing[:8]))
    return out


def _check_settings(out_dir: str, settings: dict, write: bool = True) -> None:
    """Resuming with other settings would mix two runs in one folder: refuse it. `write`:
    record them (process 0 of a multi-process run)."""
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{out_dir} holds a run with other settings ({changed}, as "
                             "(before, now)); give a new --out to start another run")
    os.makedirs(out_dir, exist_ok=True)
    if write:
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)


def _sample_seed(base: int, run: int, index: int) -> int:
    """Independent sampling noise for every (run, video), stable across resumes."""
    return int(np.random.SeedSequence([base, run, index]).generate_state(1)[0])


def generate_seed(pipe, videos, folder: str, partial: str, run: int, args, fps: int,
                  progress: bool, process: tuple[int, int] = (0, 1)) -> None:
    """Write the missing predictions of one run into `folder` (each file lands atomically):
    those of process `process[0]` of `process[1]` (video i is process i mod count's)."""
    from tqdm import tqdm

    from vgpt_jax.commands.sample import read_context
    from vgpt_jax.data import video_io
    from vgpt_jax.pipeline import split_frames

    os.makedirs(folder, exist_ok=True)
    crop = args.crop_multiple or pipe.latent_space.downsample * pipe.model.cfg.patch_size
    clips = split_frames(fps * physics_iq.SECONDS, args.clip_frames)
    index, count = process
    todo = [(i, path, name) for i, (path, name) in enumerate(videos)
            if i % count == index and not os.path.exists(os.path.join(folder, name))]
    with tqdm(total=len(todo), desc=f"seed {run}", unit="video", disable=not progress) as bar:
        for start in range(0, len(todo), args.batch_size):
            by_shape = {}  # videos of one shape are one batch
            for i, path, name in todo[start:start + args.batch_size]:
                context = _conditioning(read_context(path, 1, args.max_image_size, crop, None),
                                        path, fps)
                by_shape.setdefault(context.shape, []).append((i, name, context))
            for group in by_shape.values():
                contexts = np.stack([c for _, _, c in group])  # [B, F, H, W, 3]
                if args.baseline == "copy-last":
                    predicted = np.repeat(contexts[:, -1:], sum(clips), axis=1)
                else:
                    predicted = pipe.predict(
                        contexts, clip_sizes=clips, steps=args.steps, guidance=args.guidance,
                        window=args.window, context_noise=args.context_noise,
                        time_shift=args.time_shift,
                        seed=[_sample_seed(args.seed, run, i) for i, _, _ in group]).frames
                for (_, name, _), frames in zip(group, predicted):
                    temp = video_io.write_video(os.path.join(partial, name), frames, fps)
                    os.replace(temp, os.path.join(folder, name))
                bar.update(len(group))


def _conditioning(read, path: str, fps: int) -> np.ndarray:
    """The frames of `read_context`, checked against the asked frame rate and length."""
    context, context_fps = read
    if abs(context_fps - fps) > 1e-3:
        raise ValueError(f"{path}: {context_fps:g} FPS, but the {fps}FPS folder was asked for")
    if len(context) < CONDITIONING_SECONDS * fps - 1:
        raise ValueError(f"{path}: {len(context)} frames, shorter than the "
                         f"{CONDITIONING_SECONDS} s conditioning ({CONDITIONING_SECONDS * fps})")
    return context


def summary_markdown(rows: list[dict], stats: dict) -> str:
    lines = ["# Physics-IQ over seeds", "", "| run | Original | Verified |", "|---|---|---|"]
    lines += [f"| seed {r['seed']} | {r['original']:.2f} | {r['verified']:.2f} |" for r in rows]
    lines.append(f"| mean +- std | {stats['original']} | {stats['verified']} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    values = 100 * np.asarray(values)
    if len(values) < 2:
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} +- {values.std(ddof=1):.2f}"


def run(args) -> int:
    from vgpt_jax.commands.physics_iq import score_folder
    from vgpt_jax.config import get_train_config
    from vgpt_jax.pipeline import Pipeline
    from vgpt_jax.train import maybe_initialize_distributed

    fps = physics_iq.parse_fps(args.fps)
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds}: must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size}: must be >= 1")
    maybe_initialize_distributed(get_train_config().distributed)  # before any device is used
    import jax
    from jax.experimental import multihost_utils
    process = (jax.process_index(), jax.process_count())
    videos = conditioning_videos(args.release, fps)
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    # Several processes: each restores the parameters onto its own devices (a one-device mesh
    # by default), never onto the global device set.
    mesh = args.mesh if args.mesh is not None or process[1] == 1 else {}
    pipe = Pipeline.from_checkpoint(args.checkpoint, mesh=mesh)
    if pipe.latent_space is None:
        raise ValueError(f"checkpoint {args.checkpoint!r} has no latent_space section; Physics-IQ "
                         "needs pixels")
    settings = {k: getattr(args, k) for k in ("seed", "max_image_size", "crop_multiple",
                                              "clip_frames", "steps", "guidance", "window",
                                              "context_noise", "baseline")}
    settings.update(fps=fps, checkpoint=os.path.abspath(args.checkpoint),
                    release=os.path.abspath(args.release))
    _check_settings(args.out, settings, write=process[0] == 0)
    partial = os.path.join(args.out, ".partial")
    os.makedirs(partial, exist_ok=True)
    rows = []
    for k in range(args.seeds):
        folder = os.path.join(args.out, f"seed-{k}")
        generate_seed(pipe, videos, folder, partial, k, args, fps, not args.no_progress, process)
        if process[1] > 1:  # every process's share is written before the folder is scored
            multihost_utils.sync_global_devices(f"physics-iq generate: seed {k} written")
            if process[0] != 0:
                continue
        result = score_folder(args.release, folder, os.path.join(args.out, "reports", f"seed-{k}"),
                              fps=fps, descriptions=args.descriptions,
                              progress=not args.no_progress)
        rows.append({"seed": k, "original": result["original"], "verified": result["verified"],
                     **result["fractions"]})
        print(f"seed {k}: Physics-IQ original {result['original']:.2f}, "
              f"Verified {result['verified']:.2f}")
    if process[0] != 0:
        print(f"process {process[0]} of {process[1]}: wrote its share of {args.seeds} seed(s) "
              f"in {args.out}; process 0 scores them")
        return 0
    stats = {"original": _mean_std([r["final_score_orig"] for r in rows]),
             "verified": _mean_std([r["final_score_view"] for r in rows])}
    print(f"{args.seeds} seed(s): Physics-IQ original {stats['original']}, "
          f"Verified {stats['verified']}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"settings": settings, "runs": rows, "mean_std": stats}, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(rows, stats))
    return 0
