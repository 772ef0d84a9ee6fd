"""Video-to-video fine-tuning: segmentation masks rendered as video, conditioned on the source.

The paper turns Video-GPT into a video object segmenter by fine-tuning it on (video, masks)
pairs with the masks rendered as video. Here the conditioning is the clip history itself, with
no new tokens:

- a training sequence is `[source frames 0..F-1, mask frames 0..F-1]`, 2F frames, with the clip
  assignment `[0]*F + [1]*F` (`source_target_clip_ids`). The noisy copy of the mask clip sees
  the clean copies of the source clip as its history, which is how the sampler later conditions
  on them. The objective is the pretraining one (`diffusion.loss`), so the source clip is also
  denoised, unconditionally, and the mask clip's loss is the logged `loss_with_history`;
- segmenting a clip is continuing it: `Pipeline.predict(source, clip_sizes=[F])` samples the
  next clip, which is read back as masks (`data.segmentation_masks.read_masks`);
- scores are J and F per frame against the simulator's masks (`eval.segmentation`), beside the
  trivial segmenter that thresholds the source frame's distance from the background colour.

`run(cfg, workdir)` fine-tunes from `cfg.init_from` (a model export; `from_scratch=True`
re-initialises the same architecture instead), exports the model to `workdir/model`, scores the
held-out windows and writes `workdir/report.json` and `workdir/masks.png`.

Training drives the engine's compiled step (`train.build`) with its own batches rather than
`train.train`: the engine's input pipeline draws a random clip partition per sample, and this
recipe needs one fixed partition. Runs are minutes long, so there are no checkpoints to resume.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import ml_collections
import numpy as np

from vgpt_jax.config import checker
from vgpt_jax.data import segmentation_masks as masks_lib
from vgpt_jax.data.physics_world import WorldConfig, WorldSpec, make_world


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    init_from: str = "runs/demo/model"   # model export: the weights and the architecture
    from_scratch: bool = False           # same architecture, random initialisation
    source_frames: int = 4               # F: frames per source clip (and per mask clip)
    world: WorldSpec = WorldSpec(num_train_videos=512, num_test_videos=32)
    eval_starts: tuple[int, ...] = (0, 6, 12)  # first frame of each scored window per test video
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    log_every: int = 25
    sample_steps: int = 20
    guidance: float = 2.0                # history guidance: the source clip is the history
    seed: int = 0
    mask_color: tuple[int, int, int] = (255, 255, 255)
    mask_background: tuple[int, int, int] = (0, 0, 0)
    baseline_threshold: float = 100.0    # RGB distance from the world's background colour

    @classmethod
    def from_config(cls, cfg) -> "SegmentationConfig":
        """A validated config from a ConfigDict or mapping (`configs/segmentation.py`)."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"segmentation config: unknown field(s) {unknown}")
        world = dict(d.pop("world", {}))
        unknown = sorted(set(world) - {f.name for f in dataclasses.fields(WorldSpec)})
        if unknown:
            raise ValueError(f"segmentation config: unknown field(s) world.{unknown}")
        if "scenarios" in world:
            world["scenarios"] = tuple(world["scenarios"])
        for key in ("eval_starts", "mask_color", "mask_background"):
            if key in d:
                d[key] = tuple(d[key])
        out = cls(world=WorldSpec(**world), **d)
        out.validate()
        return out

    def validate(self) -> None:
        need = checker("segmentation config", self)
        w = self.world
        need(bool(self.init_from), "init_from", "a model export is needed (its architecture and "
             "latent space, and its weights unless from_scratch)")
        need(self.source_frames >= 1, "source_frames", "must be >= 1")
        need(self.steps >= 1, "steps", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(0 <= self.warmup_steps < self.steps, "warmup_steps", "must lie in [0, steps)")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.sample_steps >= 1, "sample_steps", "must be >= 1")
        need(w.num_train_videos >= 1 and w.num_test_videos >= 1, "world.num_train_videos",
             "train and test videos must both be >= 1")
        need(w.num_frames >= self.source_frames, "world.num_frames",
             f"must be >= source_frames={self.source_frames}")
        need(len(self.eval_starts) >= 1 and all(
            0 <= s <= w.num_frames - self.source_frames for s in self.eval_starts),
            "eval_starts", f"each start must lie in [0, world.num_frames - source_frames = "
            f"{w.num_frames - self.source_frames}]")
        need(self.mask_color != self.mask_background, "mask_color",
             "must differ from mask_background")
        need(self.baseline_threshold > 0, "baseline_threshold", "must be positive")


# --------------------------------------------------------------------------- data

@dataclasses.dataclass
class PairedVideos:
    """Source videos and their mask videos, V videos of T frames."""
    frames: np.ndarray          # uint8 [V, T, H, W, 3]: the source videos
    masks: np.ndarray           # bool  [V, T, H, W]: the true masks
    source_latents: np.ndarray  # float32 [V, T, h, w, C]: the model's (normalised) latents
    mask_latents: np.ndarray    # float32 [V, T, h, w, C]: of the masks rendered as video


def paired_videos(clips, space, cfg: SegmentationConfig) -> PairedVideos:
    """`physics_world.PhysicsClip`s -> sources, true masks, and both encoded by `space`."""
    frames = np.stack([c.frames for c in clips])
    masks = np.stack([masks_lib.clip_masks(c) for c in clips])
    rendered = masks_lib.render_masks(masks, cfg.mask_color, cfg.mask_background)
    encode = lambda videos: np.stack([space.encode(v) for v in videos]).astype(np.float32)
    return PairedVideos(frames, masks, encode(frames), encode(rendered))


def source_target_clip_ids(frames: int) -> np.ndarray:
    """The clip assignment of a training pair: `[0]*F + [1]*F`, int32 `[2F]`."""
    return np.repeat(np.arange(2, dtype=np.int32), frames)


def pair_batch(videos: PairedVideos, rng: np.random.Generator, batch: int,
               frames: int) -> dict:
    """A training batch of random F-frame windows: {latents [B, 2F, h, w, C] (source then masks
    of the same frames), clip_ids [B, 2F]}."""
    v = rng.integers(0, len(videos.frames), batch)
    s = rng.integers(0, videos.frames.shape[1] - frames + 1, batch)
    window = lambda a: np.stack([a[i, j:j + frames] for i, j in zip(v, s)])
    latents = np.concatenate([window(videos.source_latents), window(videos.mask_latents)], 1)
    return {"latents": latents,
            "clip_ids": np.broadcast_to(source_target_clip_ids(frames), (batch, 2 * frames)).copy()}


def eval_windows(videos: PairedVideos, starts, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Every video's windows at `starts`: (source uint8 [N, F, H, W, 3], masks bool [N, F, H, W]),
    N = videos x starts, video-major."""
    pick = lambda a: np.stack([a[i, s:s + frames] for i in range(len(a)) for s in starts])
    return pick(videos.frames), pick(videos.masks)


# --------------------------------------------------------------------------- training

def finetune_config(cfg: SegmentationConfig, pretrained: ml_collections.ConfigDict):
    """The engine's run config: the export's (architecture, objective, mesh, latent
    normalisation), with this recipe's sequence length, batch, schedule and initialisation."""
    tcfg = ml_collections.ConfigDict(pretrained.to_dict())
    tcfg.data.num_frames = 2 * cfg.source_frames
    tcfg.data.stride_min = tcfg.data.stride_max = 1
    tcfg.data.global_batch_size = cfg.batch_size
    tcfg.data.store = ""
    tcfg.optim.learning_rate = cfg.learning_rate
    tcfg.optim.warmup_steps = cfg.warmup_steps
    tcfg.optim.decay_steps = 0
    tcfg.train.steps = cfg.steps
    tcfg.train.log_every = cfg.log_every
    tcfg.train.seed = cfg.seed
    tcfg.train.progress_bar = False
    tcfg.train.tensorboard = False
    tcfg.checkpoint.init_from = "" if cfg.from_scratch else cfg.init_from
    tcfg.segmentation = ml_collections.ConfigDict(dataclasses.asdict(cfg))
    return tcfg


def finetune(cfg: SegmentationConfig, videos: PairedVideos, pretrained_config, workdir: str):
    """Train the mask clip after the source clip for `cfg.steps` steps; returns (model, run
    config, seconds of training). Metrics go to `workdir/metrics.jsonl`."""
    import jax
    from flax import nnx

    from vgpt_jax import checkpoint, train
    tcfg = finetune_config(cfg, pretrained_config)
    # `train.build` checks the data against the model through a source: one pair per video.
    f = cfg.source_frames
    records = [{"latents": np.concatenate([s[:f], m[:f]])}
               for s, m in zip(videos.source_latents, videos.mask_latents)]
    run = train.build(tcfg, data_source=records)
    params = None
    if not cfg.from_scratch:
        params = checkpoint.load_params(cfg.init_from, run.model_cfg,
                                        train.shardings_of(run.abstract.params))
    state = run.init(params)
    writer = train.MetricsWriter(workdir, tensorboard=False)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    try:
        for step in range(1, cfg.steps + 1):
            state, metrics = run.step_fn(state, run.global_batch_of(
                pair_batch(videos, rng, cfg.batch_size, f)))
            if step % cfg.log_every == 0 or step == cfg.steps:
                scalars = {k: float(v) for k, v in metrics.items()}
                if not np.isfinite(scalars["loss"]):
                    raise FloatingPointError(f"segmentation fine-tuning: non-finite loss "
                                             f"{scalars['loss']} at step {step}")
                writer.write(step, scalars)
        jax.block_until_ready(state.params)  # the budget is the time the steps took
    finally:
        writer.close()
    return nnx.merge(run.graphdef, state.params), tcfg, time.perf_counter() - t0


# --------------------------------------------------------------------------- segmenting

def predict_masks(pipeline, sources_NFHW3: np.ndarray, cfg: SegmentationConfig):
    """Segment source clips by continuing them: uint8 [N, F, H, W, 3] -> (masks bool
    [N, F, H, W], the sampled mask frames uint8 [N, F, H, W, 3])."""
    out = pipeline.predict(sources_NFHW3, clip_sizes=[sources_NFHW3.shape[1]],
                           steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed)
    return masks_lib.read_masks(out.frames, cfg.mask_color, cfg.mask_background), out.frames


def scores(pred_NFHW: np.ndarray, truth_NFHW: np.ndarray) -> dict:
    """J, F and J&F over every frame, and J and F by frame of the clip (lists of F)."""
    from vgpt_jax.eval.segmentation import j_and_f
    s = j_and_f(pred_NFHW, truth_NFHW)
    return {"J": s["J"], "F": s["F"], "J&F": s["J&F"],
            "J_by_frame": s["J_frames"].mean(0).round(4).tolist(),
            "F_by_frame": s["F_frames"].mean(0).round(4).tolist()}


def write_grid(path: str, sources, predicted, truth, cfg: SegmentationConfig,
               rows: int = 4) -> None:
    """A PNG, one window per row: source frames | predicted mask frames | true masks."""
    from PIL import Image
    true_frames = masks_lib.render_masks(truth, cfg.mask_color, cfg.mask_background)
    gap = lambda n: np.full((sources.shape[2], n, 3), 128, np.uint8)
    body = [np.concatenate([np.concatenate(list(sources[i]), 1), gap(2),
                            np.concatenate(list(predicted[i]), 1), gap(2),
                            np.concatenate(list(true_frames[i]), 1)], 1)
            for i in range(min(rows, len(sources)))]
    Image.fromarray(np.concatenate(body, 0)).resize(
        (body[0].shape[1] * 4, len(body) * body[0].shape[0] * 4), Image.NEAREST).save(path)


# --------------------------------------------------------------------------- the recipe

def run(cfg: SegmentationConfig, workdir: str) -> dict:
    """Fine-tune (or train from scratch), score the held-out windows against the threshold
    baseline, write `workdir/{model/, metrics.jsonl, report.json, masks.png}`; returns the
    report."""
    from vgpt_jax import checkpoint
    from vgpt_jax.pipeline import Pipeline

    os.makedirs(workdir, exist_ok=True)
    pretrained = Pipeline.from_checkpoint(cfg.init_from)
    if pretrained.latent_space is None:
        raise ValueError(f"init_from {cfg.init_from!r}: its config names no latent space, and "
                         "masks are rendered as pixels")
    train_clips, test_clips = make_world(cfg.world)
    test_clips = [c for c in test_clips if c.take == 0]  # the second takes are near-copies
    train_videos = paired_videos(train_clips, pretrained.latent_space, cfg)
    test_videos = paired_videos(test_clips, pretrained.latent_space, cfg)

    model, tcfg, seconds = finetune(cfg, train_videos, pretrained.config, workdir)
    model_dir = checkpoint.export_model(os.path.join(workdir, "model"), model, tcfg)
    pipeline = Pipeline.from_checkpoint(model_dir)

    sources, truth = eval_windows(test_videos, cfg.eval_starts, cfg.source_frames)
    predicted, predicted_frames = predict_masks(pipeline, sources, cfg)
    baseline = masks_lib.threshold_masks(sources, WorldConfig().background,
                                         cfg.baseline_threshold)
    report = {
        "arm": "from scratch" if cfg.from_scratch else f"fine-tuned from {cfg.init_from}",
        "steps": cfg.steps, "batch_size": cfg.batch_size, "train_seconds": round(seconds, 1),
        "train_pairs": len(train_clips), "test_windows": len(sources),
        "frames_per_window": cfg.source_frames, "sample_steps": cfg.sample_steps,
        "guidance": cfg.guidance,
        "model": scores(predicted, truth),
        "threshold_baseline": scores(baseline, truth),
        "config": dataclasses.asdict(cfg),
    }
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_grid(os.path.join(workdir, "masks.png"), sources, predicted_frames, truth, cfg)
    return report
