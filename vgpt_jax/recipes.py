"""Generation recipes on the embedded physics world, no downloads:

    vgpt recipe class_to_video    --workdir runs/class      # ball count (1-3) -> a video
    vgpt recipe text_to_video     --workdir runs/text       # a caption -> a video
    vgpt recipe action_prediction --workdir runs/action     # frames + kicks -> next frames
    vgpt recipe image_animation   --workdir runs/animate    # one frame -> a video
    vgpt recipe atari_actions     --workdir runs/atari      # Atari frames + actions -> next frames

Each recipe simulates its world, ingests it into a latent store (conditions in each record's
`extra`: `class_id`, per-frame `actions`, `caption` + its `text` embeddings), trains (`train.train`; `init_from` fine-tunes an
export instead, e.g. the demo's `runs/demo/model`), and measures what its conditions do:
- class_to_video: videos sampled from nothing per class (condition guidance `guidance_c`),
  their ball count read off the decoded frames (bright connected blobs in frame 0); class
  accuracy against chance (a third), the counts read per class asked for (a confusion table
  and means) with and without the class, and the counter's own accuracy on true videos;
  with `eval.fvd`, FVD against real videos of the world, overall and per class, beside a
  second real set (the floor) and real frames held still (`_class_fvd`);
- text_to_video: each video's caption is templated from the simulator's ground truth
  (`caption`: "two balls, the red one moves left") and embedded once at ingestion by a frozen
  text encoder (`text_encoder`; the embedded default is a small random T5 written into the
  workdir, `--text-encoder` takes a local folder or hub id, e.g. google-t5/t5-small); videos
  are sampled from nothing for the held-out captions, with the captions and without, and
  read for what the caption says (`caption_agreement`: the count, the named colour, its
  direction), the readers checked on the true videos;
- action_prediction: held-out kicked videos (`data.action_world`) continued frame by frame
  from `context_frames` frames, given their true actions or another video's (shuffled); latent
  MSE of each and of copying the last frame, ball 0's position error on the decoded frames
  (`ball_errors`), and the one-step x1 error at t = 0.05 of each predicted frame (one frame
  per clip, the same noise draws for both; nearly pure noise, so the frame must come from the
  history and the action: at t = 0.5 the noisy frame itself shows where the ball went). A
  model that uses its actions is better with the true ones;
- atari_actions: action_prediction's measurements on Atari episodes (`data.atari`, the `atari`
  extra: ale-py and its ROMs; a random policy, the one-hot action before each frame);
- image_animation: one frame in, `predict_frames` out (clip mode "first_frame": the first
  frame is the context of one clip); latent MSE and ball metrics against copying the frame.

`recipe_config(name, size)` holds the embedded defaults (`configs/<name>.py` returns them);
the model, optimiser and latent space are the demo's (`demo.demo_config`). `size="quick"` is the
end-to-end size the tests run.
"""
from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

RECIPES = ("class_to_video", "text_to_video", "action_prediction", "image_animation",
           "atari_actions")
NUMBERS = ("no", "one", "two", "three", "four", "five")
COLOR_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")
CAPTION_WORDS = (*NUMBERS, "ball", "balls", ",", "the", "moves", "left", "right", *COLOR_NAMES)


def recipe_config(name: str, size: str = "default") -> ml_collections.ConfigDict:
    """The embedded defaults of recipe `name` ("default" or "quick")."""
    from vgpt_jax.demo import demo_config
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r}: one of {RECIPES}")
    if size not in ("default", "quick"):
        raise ValueError(f"recipe size {size!r}: 'default' or 'quick'")
    cfg = demo_config(size)
    cfg.recipe = name
    w = cfg.world
    w.num_train_videos = 512 if size == "default" else 8
    w.num_test_videos = 16 if size == "default" else 2
    w.min_balls = 1
    cfg.checkpoint.init_from = ""
    cfg.train.steps = 600 if size == "default" else 2
    cfg.optim.warmup_steps = 50 if size == "default" else 1
    quick = size == "quick"
    if quick:  # the tests' end-to-end size: 4-frame windows, two Euler steps
        w.num_frames, cfg.data.num_frames = 6, 4
    cfg.eval = ml_collections.ConfigDict(dict(
        context_frames=2, predict_frames=2 if quick else 4, steps=1 if quick else 20,
        guidance=1.0, guidance_c=1.0, time_shift=1.0, samples_per_class=1 if quick else 32,
        # videos from nothing (class_to_video, text_to_video): their length, and FVD for
        # class_to_video (the eval extra's I3D, clips of >= 9 frames)
        sample_frames=2 if quick else 16, fvd=not quick, seed=0))
    # token_gate (off, the default): see `ConditionConfig`; measured on a one-ball world it
    # only began to separate true from shuffled actions (0.75% at 600 steps).
    cc = dict(num_classes=0, action_dim=0, dropout=0.1, token_gate=False, head_modulation=False)
    if name == "class_to_video":
        w.max_balls = 3
        cc["num_classes"] = 3          # class k: k + 1 balls
        cfg.eval.guidance_c = 2.0
    elif name == "text_to_video":
        w.max_balls = 3
        # encoder "": a random T5 of width `tiny_dim` written into the workdir (no download);
        # else a local folder or hub id. text_dim is set to the encoder's width by `run`.
        cfg.text = ml_collections.ConfigDict(dict(encoder="", tiny_dim=32, max_tokens=8))
        cc.update(text_dim=32, text_tokens=8)
        cfg.eval.guidance_c = 2.0
        if not quick:  # one sample per held-out caption: 64 of them
            w.num_test_videos = 64
    elif name == "action_prediction":
        from vgpt_jax.data.action_world import ACTION_DIM
        w.max_balls = 2
        # The main job's fps (a fine-tune from its export knows the world's timing); a kick
        # moves the controlled ball 3 px in the next frame, twice the free balls' fastest.
        w.kick_speed, w.kick_prob = 3.0, 0.5
        cc["action_dim"] = ACTION_DIM
        cc["dropout"] = 0.0             # no action guidance: the actions are always given
    elif name == "atari_actions":
        w.frame_size, w.fps = 32, 15.0  # 160x210 screens at 32x32 px, every 4th emulator frame
        w.num_train_videos = 256 if size == "default" else 4
        cfg.atari = ml_collections.ConfigDict(dict(game="breakout", frame_skip=4, hold=4.0))
        cc["action_dim"] = 4            # breakout's minimal action set; `run` sets the game's
        cc["dropout"] = 0.0
    else:
        w.max_balls = 2
        cfg.data.clip_mode = "first_frame"
        cfg.eval.context_frames, cfg.eval.predict_frames = 1, cfg.data.num_frames - 1
    cfg.model.conditions = cc
    from vgpt_jax.vae.latent_space import make_latent_space
    cfg.model.latent_channels = make_latent_space(cfg.latent_space.to_dict()).channels
    return cfg


def hue_index(rgb_N3) -> np.ndarray:
    """Each colour's `COLOR_NAMES` index [...]: its hue in sixths (`physics_world.palette`'s
    colours are saturated, so the hue tells them apart)."""
    from matplotlib.colors import rgb_to_hsv
    hue = rgb_to_hsv(np.asarray(rgb_N3, np.float64) / 255.0)[..., 0]
    return np.round(hue * 6).astype(int) % 6


def color_name(rgb) -> str:
    """The hue name of a palette colour."""
    return COLOR_NAMES[int(hue_index(rgb))]


def lit_pixels(frames_HW3, background) -> np.ndarray:
    """Pixels clearly off the background [..., H, W] bool: a ball's, on decoded samples too."""
    return np.abs(np.asarray(frames_HW3, np.float32) - np.asarray(background)).max(-1) > 60


def caption(clip) -> str:
    """A caption from the simulator's ground truth: the ball count and where ball 0 goes,
    e.g. "two balls, the red one moves left"."""
    n = len(clip.radii)
    dx = float(clip.positions[-1, 0, 0] - clip.positions[0, 0, 0])
    return (f"{NUMBERS[n]} ball{'s' if n != 1 else ''}, the {color_name(clip.colors[0])} one "
            f"moves {'left' if dx < 0 else 'right'}")


def parse_caption(text: str) -> tuple[int, str, str]:
    """(ball count, ball 0's colour name, "left" or "right") of a `caption`."""
    words = text.replace(",", "").split()
    return NUMBERS.index(words[0]), words[words.index("the") + 1], words[-1]


def colour_x(frame_HW3: np.ndarray, colour: str, background, min_pixels: int = 4):
    """The mean x (px) of the lit pixels of hue `colour` (`COLOR_NAMES`) in a frame, or None
    where fewer than `min_pixels` have it."""
    hue = lit_pixels(frame_HW3, background) & (hue_index(frame_HW3) == COLOR_NAMES.index(colour))
    xs = np.nonzero(hue)[1]
    return float(xs.mean()) if len(xs) >= min_pixels else None


def caption_agreement(videos_NFHW3, captions) -> dict:
    """How far decoded videos show their captions: the ball count read off the first frame
    equals the caption's (`count_accuracy`); a ball of the caption's colour is in the first
    frame (`colour_found`); and where that colour is in the first and the last frame, its
    pixels moved the way the caption says (`direction_agreement`, over `direction_videos`)."""
    from vgpt_jax.data.physics_world import WorldConfig
    background = WorldConfig().background
    parsed = [parse_caption(c) for c in captions]
    videos = np.asarray(videos_NFHW3)
    tracks = [(colour_x(v[0], colour, background), colour_x(v[-1], colour, background))
              for v, (_, colour, _) in zip(videos, parsed)]
    moved = [(x1 < x0) == (direction == "left") for (x0, x1), (_, _, direction)
             in zip(tracks, parsed) if x0 is not None and x1 is not None]
    return {"count_accuracy": float(np.mean(balls_read(videos) == [p[0] for p in parsed])),
            "colour_found": float(np.mean([x0 is not None for x0, _ in tracks])),
            "direction_agreement": float(np.mean(moved)) if moved else float("nan"),
            "direction_videos": len(moved)}


def text_encoder_for(cfg, workdir: str):
    """The recipe's frozen text encoder (`cfg.text.encoder`, or the random default written
    into `workdir/text_encoder`); sets `model.conditions.text_dim` to its width."""
    from vgpt_jax import text_encoder
    path = cfg.text.encoder
    if not path:
        path = os.path.join(workdir, "text_encoder")
        if not os.path.exists(os.path.join(path, "config.json")):
            text_encoder.make_tiny_encoder(path, CAPTION_WORDS, dim=int(cfg.text.tiny_dim))
    encoder = text_encoder.load(path, int(cfg.text.max_tokens))
    cfg.text.encoder = os.path.abspath(path) if os.path.isdir(path) else path  # for vgpt sample
    cfg.model.conditions.text_dim = encoder.dim
    cfg.model.conditions.text_tokens = int(cfg.text.max_tokens)
    return encoder


def _world(cfg, split: str, count: int, encoder=None):
    """(clips, extras): the recipe's videos and each one's conditions."""
    from vgpt_jax.data import action_world
    from vgpt_jax.data import physics_world as pw
    w = cfg.world
    world = pw.WorldConfig(size=w.frame_size, fps=w.fps, scenarios=("balls",),
                           min_balls=w.min_balls, max_balls=w.max_balls,
                           min_radius=w.min_radius, max_radius=w.max_radius)
    if cfg.recipe == "atari_actions":
        from vgpt_jax.data import atari
        a = cfg.atari
        episodes = atari.record_episodes(a.game, count, w.num_frames, w.frame_size, w.seed,
                                         split, int(a.frame_skip), float(a.hold))
        cfg.model.conditions.action_dim = int(episodes[0].actions.shape[1])
        return episodes, [{"actions": e.actions.tolist()} for e in episodes]
    if cfg.recipe == "action_prediction":
        kicked = action_world.make_dataset(count, w.num_frames, w.frame_size, w.seed, split,
                                           world, w.kick_speed, w.kick_prob)
        return [k.clip for k in kicked], [{"actions": k.actions.tolist()} for k in kicked]
    clips = pw.make_dataset(count, w.num_frames, w.frame_size, w.seed, split, config=world,
                            num_takes=1)
    if cfg.recipe == "class_to_video":
        return clips, [{"class_id": len(c.radii) - 1} for c in clips]
    if cfg.recipe == "text_to_video":
        from vgpt_jax.text_encoder import embed_extra
        return clips, embed_extra(encoder, [caption(c) for c in clips])
    return clips, [{} for _ in clips]


def count_balls(frames_NHW3: np.ndarray, background) -> np.ndarray:
    """Bright connected blobs per frame [N] (a ball-count reader for decoded samples)."""
    from scipy import ndimage
    return np.asarray([ndimage.label(f)[1] for f in lit_pixels(frames_NHW3, background)])


def _mse(a, b) -> float:
    return float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))


def ball_errors(space, latents_NFhwc, clips, start: int, balls_kept: int | None = None) -> dict:
    """`eval.balls.score` of decoded latents against the simulator's balls of frames `start..`
    of `clips` (the first `balls_kept` balls, default all), averaged over the videos."""
    from vgpt_jax.data.physics_world import WorldConfig
    from vgpt_jax.eval import balls as balls_lib
    scores = []
    for latents, clip in zip(latents_NFhwc, clips):
        frames = space.decode(np.asarray(latents))
        truth = balls_lib.Balls.of_clip(clip, WorldConfig().background).first(balls_kept)
        scores.append(balls_lib.score(frames, truth.frames(start, start + len(frames))))
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def evaluate(cfg, model, space, test_latents, extras, test_clips, out_dir=None) -> dict:
    """The recipe's measurements (module docstring) on held-out latents [N, F, h, w, C] of
    `test_clips` (physics clips or Atari episodes: `.frames` each). class_to_video also writes
    `out_dir/samples.gif` (given an `out_dir`): a row of samples per class asked for, then the
    unconditional ones."""
    from vgpt_jax import sampling
    e = cfg.eval
    sampler = sampling.SamplerConfig(steps=int(e.steps), guidance=float(e.guidance),
                                     window=int(cfg.data.num_frames),
                                     condition_guidance=float(e.guidance_c),
                                     time_shift=float(e.time_shift))
    n = len(test_latents)
    seeds = list(range(n))
    if cfg.recipe == "text_to_video":
        return _text_to_video(cfg, model, sampler, space, test_latents, extras, test_clips)
    if cfg.recipe == "class_to_video":
        return _class_to_video(cfg, model, sampler, space, test_latents.shape[2:4], extras,
                               test_clips, out_dir)
    c, p = int(e.context_frames), int(e.predict_frames)
    context, truth = test_latents[:, :c], test_latents[:, c:c + p]
    copied = np.repeat(context[:, -1:], p, axis=1)
    copy = _mse(copied, truth)
    if cfg.recipe == "image_animation":
        pred = sampling.sample_video(model, (p,), sampler, seeds, context_BFhwc=context)
        return {"mse": _mse(pred, truth), "copy_frame_mse": copy,
                "balls": ball_errors(space, pred, test_clips, c),
                "copy_frame_balls": ball_errors(space, copied, test_clips, c), "videos": n}
    actions = np.asarray([x["actions"] for x in extras], np.float32)[:, :c + p]
    shuffled = actions.copy()
    shuffled[:, c:] = actions[np.roll(np.arange(n), 1), c:]
    run = lambda acts: sampling.sample_video(model, (1,) * p, sampler, seeds,
                                             context_BFhwc=context, actions=acts)
    with_true, with_shuffled = run(actions), run(shuffled)
    controlled = {}
    if cfg.recipe == "action_prediction":  # ball 0, the one the actions kick
        controlled = {f"controlled_ball_{k}": ball_errors(space, v, test_clips, c, 1)
                      for k, v in (("true_actions", with_true), ("shuffled_actions", with_shuffled),
                                   ("copy_last", copied))}
    return {"mse_true_actions": _mse(with_true, truth),
            "mse_shuffled_actions": _mse(with_shuffled, truth), "copy_last_mse": copy,
            **controlled,
            **{f"denoising_error_{k}": _denoising_error(model, test_latents[:, :c + p], acts, c)
               for k, acts in (("true_actions", actions), ("shuffled_actions", shuffled))},
            "videos": n}


def sample_from_nothing(cfg, model, sampler, space, latent_hw, n: int, **conditions):
    """`n` decoded videos of `eval.sample_frames` frames of `latent_hw` latents, sampled from
    nothing (seeds 0..n-1) under `conditions` in the clips the model was trained on (one frame
    each for `data.clip_mode` "one_frame", else one clip): uint8 [n, F, H, W, 3]."""
    from vgpt_jax import sampling
    frames = int(cfg.eval.sample_frames)
    clips = (1,) * frames if cfg.data.clip_mode == "one_frame" else (frames,)
    out = sampling.sample_video(model, clips, sampler, list(range(n)), latent_hw=latent_hw,
                                **conditions)
    return np.stack([space.decode(v) for v in out])


def balls_read(videos_NFHW3) -> np.ndarray:
    """The balls read off each video's first frame [N] (`count_balls`)."""
    from vgpt_jax.data.physics_world import WorldConfig
    return count_balls(np.asarray(videos_NFHW3)[:, 0], WorldConfig().background)


def write_sample_grid(path: str, rows, fps: float, columns: int = 8, gap: int = 2) -> None:
    """Videos [R][N, F, H, W, 3] as one animation (a grid row each, the first `columns`
    videos of each, on white; frames upscaled 2x)."""
    from vgpt_jax.data.video_io import write_video
    f, h, w = np.asarray(rows[0]).shape[1:4]
    grid = np.full((f, len(rows) * (h + gap), columns * (w + gap), 3), 255, np.uint8)
    for r, videos in enumerate(rows):
        for c, video in enumerate(videos[:columns]):
            grid[:, r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = video
    write_video(path, np.repeat(np.repeat(grid, 2, axis=1), 2, axis=2), fps)


def _class_to_video(cfg, model, sampler, space, latent_hw, extras, test_clips,
                    out_dir=None) -> dict:
    """`eval.samples_per_class` videos per class from nothing, with the class (condition
    guidance) and without it (the same seeds); the balls read off their first frames, and with
    `eval.fvd` their FVD against real videos (`_class_fvd`)."""
    classes = int(cfg.model.conditions.num_classes)
    wanted = np.repeat(np.arange(classes), int(cfg.eval.samples_per_class))
    sample = lambda class_id: sample_from_nothing(cfg, model, sampler, space, latent_hw,
                                                  len(wanted), class_id=class_id)
    conditioned_videos, unconditioned_videos = sample(wanted), sample(None)
    conditioned, unconditioned = balls_read(conditioned_videos), balls_read(unconditioned_videos)

    def confusion(counted):  # rows: the class asked for; columns: 0..classes+1 balls read
        return [np.bincount(np.minimum(counted[wanted == k], classes + 1),
                            minlength=classes + 2).tolist() for k in range(classes)]

    def mean_read(counted):  # a counter that misses faint balls still orders the classes
        return [float(counted[wanted == k].mean()) for k in range(classes)]

    truth = np.asarray([x["class_id"] for x in extras])
    counted = balls_read(np.stack([clip.frames for clip in test_clips]))
    report = {"class_accuracy": float(np.mean(conditioned == wanted + 1)),
              "unconditional_accuracy": float(np.mean(unconditioned == wanted + 1)),
              "chance": 1.0 / classes, "counter_accuracy_on_true_videos":
              float(np.mean(counted == truth + 1)), "samples": int(len(wanted)),
              "balls_read_per_class": confusion(conditioned),
              "balls_read_unconditional": confusion(unconditioned),
              "mean_balls_read_per_class": mean_read(conditioned),
              "mean_balls_read_unconditional": mean_read(unconditioned)}
    if out_dir:
        write_sample_grid(os.path.join(out_dir, "samples.gif"),
                          [conditioned_videos[wanted == k] for k in range(classes)]
                          + [unconditioned_videos], float(cfg.world.fps) / 4)
    if cfg.eval.fvd:
        report["fvd"] = _class_fvd(cfg, conditioned_videos, unconditioned_videos, wanted)
    return report


def _class_fvd(cfg, conditioned, unconditioned, wanted) -> dict:
    """FVD (Kinetics I3D, all `eval.sample_frames` frames at the world's size) of the class-
    conditional and the unconditional samples against as many real videos of the world
    (the validation split), beside two references: another real set of that size (the floor:
    what sampling noise alone gives) and its first frames held still (a model that draws
    good frames but no motion). Per class: `fvd.class_fvd`, the samples asked for class j
    against the real videos of class k, and the unconditional samples of the same seeds."""
    from vgpt_jax.eval import fvd
    n, frames = len(wanted), int(cfg.eval.sample_frames)
    clips, extras = _world(cfg, "validation", 2 * n)
    real = np.stack([c.frames[:frames] for c in clips])
    real_classes = np.asarray([x["class_id"] for x in extras])[:n]
    still = np.repeat(real[n:, :1], frames, axis=1)
    features = fvd.i3d_features(np.concatenate([conditioned, unconditioned, real, still]),
                                num_frames=frames)
    cond, uncond, reference, other_real, held_still = np.split(features, [n, 2 * n, 3 * n, 4 * n])
    distance = lambda x: fvd.frechet_distance(x, reference)
    return {"conditional": distance(cond), "unconditional": distance(uncond),
            "real_videos": distance(other_real), "real_first_frames_held_still": distance(held_still),
            "per_class": fvd.class_fvd(cond, wanted, reference, real_classes).tolist(),
            "unconditional_per_class": fvd.class_fvd(uncond, wanted, reference,
                                                     real_classes).diagonal().tolist(),
            "videos": n, "frames": frames}


def _text_to_video(cfg, model, sampler, space, test_latents, extras, test_clips) -> dict:
    """Videos from nothing for the held-out captions, with the text and unconditionally (the
    same seeds): `caption_agreement` of each, and of the true videos (the readers' own
    accuracy)."""
    from vgpt_jax import text_encoder
    cc = cfg.model.conditions
    text, mask = map(np.stack, zip(*(text_encoder.pad(text_encoder.unpack(x["text"]),
                                                      int(cc.text_tokens)) for x in extras)))
    captions = [x["caption"] for x in extras]
    agreement = lambda **conditions: caption_agreement(sample_from_nothing(
        cfg, model, sampler, space, test_latents.shape[2:4], len(extras), **conditions), captions)
    frames = int(cfg.eval.sample_frames)
    return {"with_text": agreement(text=text, text_mask=mask), "unconditional": agreement(),
            "true_videos": caption_agreement(np.stack([c.frames[:frames] for c in test_clips]),
                                             captions),
            "captions": captions[:4], "samples": len(captions)}


def check_eval(cfg) -> None:
    """Reject eval settings the measurements cannot run with, naming the field (before
    training)."""
    e, frames = cfg.eval, int(cfg.eval.sample_frames)
    if frames < 1 or frames > int(cfg.world.num_frames):
        raise ValueError(f"eval.sample_frames={frames}: 1..world.num_frames "
                         f"({cfg.world.num_frames})")
    if cfg.recipe == "class_to_video" and e.fvd:
        from vgpt_jax.eval.fvd import MIN_FRAMES
        if frames < MIN_FRAMES:
            raise ValueError(f"eval.fvd needs eval.sample_frames >= {MIN_FRAMES} (I3D), got "
                             f"{frames}")
        if int(e.samples_per_class) < 2:  # a covariance per class
            raise ValueError(f"eval.fvd needs eval.samples_per_class >= 2, got "
                             f"{e.samples_per_class}")


def _denoising_error(model, latents_BFhwc, actions_BFA, context: int, t: float = 0.05) -> float:
    """The x1 error of the frames after `context`, one frame per clip, each noised to level t
    (the loss at a fixed t; fixed noise draws, so true and shuffled actions see the same)."""
    import jax
    from vgpt_jax import diffusion
    b, f = latents_BFhwc.shape[:2]
    clip_ids = np.broadcast_to(np.arange(f, dtype=np.int32), (b, f))
    err = jax.jit(lambda m, x, a: diffusion.denoising_error(
        m, x, clip_ids, t, jax.random.key(0), actions=a))(model, latents_BFhwc, actions_BFA)
    return float(np.mean(np.asarray(err)[:, context:]))


def _ingest_normalization(cfg):
    """How to normalise the recipe's latents: `cfg.normalize` (measured on its world), or for a
    fine-tune (`checkpoint.init_from`) its base model's normalisation ("none" if it has none):
    the recipe's world has other statistics than the pretraining data (1-3 balls, say), and a
    model reads only latents normalised as in its own training."""
    if not cfg.checkpoint.init_from:
        return cfg.normalize
    from vgpt_jax.checkpoint import resolve_params
    from vgpt_jax.vae.latent_space import normalization_of
    base_config = resolve_params(cfg.checkpoint.init_from)[1]
    return normalization_of(base_config.get("data", {}).get("latent_normalization")) or "none"


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Simulate, ingest, train (or fine-tune), measure; writes `workdir/report.json`."""
    from vgpt_jax import checkpoint, train
    from vgpt_jax.data.ingest import ingest_arrays
    from vgpt_jax.data.store import LatentStore, atomic_write
    from vgpt_jax.vae.latent_space import make_latent_space, with_normalization

    t0 = time.perf_counter()
    check_eval(cfg)
    os.makedirs(workdir, exist_ok=True)
    encoder = text_encoder_for(cfg, workdir) if cfg.recipe == "text_to_video" else None
    train_clips, train_extra = _world(cfg, "train", int(cfg.world.num_train_videos), encoder)
    test_clips, test_extra = _world(cfg, "test", int(cfg.world.num_test_videos), encoder)
    space = make_latent_space(cfg.latent_space.to_dict())
    store_dir = os.path.join(workdir, "latents")
    # A store is reused only if it was made from this world (by this version's ingestion).
    made_from = {"recipe_world": json.loads(json.dumps(cfg.world.to_dict(), default=list)),
                 "recipe_store_version": 2}
    manifest = os.path.join(store_dir, "manifest.json")
    if not os.path.exists(manifest) or any(
            LatentStore(store_dir).manifest.get("settings", {}).get(k) != v
            for k, v in made_from.items()):
        ingest_arrays(((c.frames, c.fps, c.name, x) for c, x in zip(train_clips, train_extra)),
                      store_dir, latent_space=space, num_shards=1, overwrite=True,
                      normalize=_ingest_normalization(cfg), settings=made_from)
    cfg.data.store = store_dir
    train_dir = os.path.join(workdir, "train")
    result = train.train(cfg, train_dir)
    model, _ = checkpoint.load_model(train_dir)
    checkpoint.export_model(os.path.join(workdir, "model"), model, cfg)
    space = with_normalization(space, LatentStore(store_dir).normalization)
    test_latents = np.stack([space.encode(c.frames) for c in test_clips]).astype(np.float32)
    report = {"recipe": cfg.recipe, "steps": result.step,
              "final_loss": result.metrics.get("loss"),
              **evaluate(cfg, model, space, test_latents, test_extra, test_clips, workdir)}
    report["seconds"] = time.perf_counter() - t0
    with atomic_write(os.path.join(workdir, "report.json")) as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="vgpt recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", default="default", choices=("default", "quick"))
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the recipe's)")
    p.add_argument("--init-from", default="", help="a model export to fine-tune")
    p.add_argument("--text-encoder", default="",
                   help="text_to_video: a T5 or CLIP text encoder, a local folder or hub id "
                        "(default: a small random T5 written into the workdir, no download)")
    args = p.parse_args(argv)
    cfg = recipe_config(args.recipe, args.size)
    if args.text_encoder:
        if args.recipe != "text_to_video":
            p.error("--text-encoder is for the text_to_video recipe")
        cfg.text.encoder = args.text_encoder
    if args.steps:
        cfg.train.steps = args.steps
    cfg.checkpoint.init_from = args.init_from
    print(json.dumps(run(cfg, args.workdir), indent=2))
    return 0
