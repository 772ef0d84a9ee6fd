"""The user's entry point: a trained model (and optionally a latent space) that predicts video.

    pipe = Pipeline.from_checkpoint("exports/run1")
    out = pipe.predict(context_frames_uint8, num_frames=48)   # out.frames: uint8 [48, H, W, 3]
    out = pipe.generate(num_frames=24, latent_size=(8, 8))    # from nothing
    pipe = Pipeline.from_pretrained("GrayShine/Video-GPT")     # the released weights, converted
    pipe = Pipeline.from_pretrained("ckpt/", latent_space=None)  # latents only: no VAE, offline
    pipe = Pipeline.from_checkpoint("exports/run1", mesh={"data": 2, "fsdp": 4})  # 8 devices

Context is pixels (uint8 [F, H, W, 3], encoded with the latent space) or latents (float
[F, h, w, C]); a leading batch axis samples several videos at once and is kept in the output.
A conditioned model takes its conditions by name, one video's or a batch's as the context:

    out = pipe.predict(context, num_frames=24, class_id=2, condition_guidance=2.0)
The numerics live in `vgpt_jax.sampling`; this module checks inputs, encodes and decodes.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx

from vgpt_jax import checkpoint, conditioning, sampling
from vgpt_jax.config import ModelConfig, cast_to_fields
from vgpt_jax.model import VideoGPT
from vgpt_jax.vae.latent_space import LatentSpace

DEFAULT_CLIP_FRAMES = 24  # the release's clip size (`--gen_nums 24 24`)
AUTO = "auto"  # `latent_space=`: the one the checkpoint's config names


@dataclasses.dataclass
class SampleOutput:
    latents: np.ndarray             # float32 [B, N, h, w, C] ([N, ...] for an unbatched context)
    frames: np.ndarray | None       # uint8 [B, N, H, W, 3] when the pipeline has a latent space


def split_frames(num_frames: int, clip_frames: int = DEFAULT_CLIP_FRAMES) -> list[int]:
    """Clip sizes for `num_frames` new frames: clips of `clip_frames`, the last one shorter."""
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: must be an integer >= 1")
    full, rest = divmod(int(num_frames), clip_frames)
    return [clip_frames] * full + ([rest] if rest else [])


def _clip_sizes(num_frames, clip_sizes) -> list[int]:
    if (num_frames is None) == (clip_sizes is None):
        raise ValueError("give exactly one of num_frames and clip_sizes")
    return split_frames(num_frames) if clip_sizes is None else [int(n) for n in clip_sizes]


def _seeds(seed, batch: int) -> list[int]:
    """An int seed gives video b the seed `seed + b`; a sequence gives one seed per video."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + b for b in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed: {len(seeds)} seeds for a batch of {batch} videos")
    return seeds


def configured_latent_space(directory: str, config) -> LatentSpace | None:
    """The latent space of a checkpoint config's `latent_space` section (None without one).

    A relative `path` that names a folder inside `directory` (a converted checkpoint's copy of
    its bundled VAE) is read from there. A VAE that cannot be loaded (no network for a hub id)
    is one error that says how to go on without it.
    """
    section = config.get("latent_space")
    if not section:
        return None
    from vgpt_jax.vae.latent_space import make_latent_space
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    path = section.get("path")
    if path and not os.path.isabs(path) and os.path.isdir(os.path.join(directory, path)):
        section["path"] = os.path.join(directory, path)
    try:
        return make_latent_space(section)
    except Exception as e:  # hub and network errors come in many types; one line says it all
        if path and os.path.isdir(section["path"]):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        raise OSError(f"could not load the VAE {path!r} named by {directory!r} "
                      f"({type(e).__name__}: {first}): pass latent_space=None to work on latents "
                      "only, or vae= a local diffusers AutoencoderKL folder") from e


def prediction_type_of(config) -> str:
    """What the checkpoint's network predicts (`objective.prediction_type`, default x1)."""
    return (config or {}).get("objective", {}).get("prediction_type", "x1")


# One video's condition axes (`sampling.sample_video` takes them with a leading [videos] axis).
CONDITION_AXES = {"class_id": (), "actions": ("frames", "action_dim"),
                  "text": ("text_tokens", "text_dim"), "text_mask": ("text_tokens",)}


def _check_finite(latents_BF: np.ndarray, what: str, batched: bool) -> None:
    """NaN or inf in the context would spread to every sampled frame: name the first frame."""
    bad = ~np.isfinite(latents_BF).reshape(latents_BF.shape[:2] + (-1,)).all(axis=-1)
    if bad.any():
        b, f = (int(i) for i in np.argwhere(bad)[0])
        video = f" of video {b}" if batched else ""
        raise ValueError(f"{what}: non-finite values (NaN or inf) in frame {f}{video} "
                         f"({int(bad.sum())} frame(s) affected)")


def placement_of(mesh, config) -> sampling.Placement | None:
    """Where to sample: None (the default device), or `mesh` (a `Mesh`, axis sizes such as
    {"data": 2, "fsdp": 4}, or a `sampling.Placement`) with the run's logical-axis rules
    (`config.mesh.rules`, the ones it trained with; the defaults without a config)."""
    if mesh is None:
        return None
    rules = ((config or {}).get("mesh") or {}).get("rules") or None
    return sampling.Placement.of(mesh, rules)


class Pipeline:
    def __init__(self, model: VideoGPT, latent_space: LatentSpace | None = None, config=None,
                 prediction_type: str | None = None, mesh=None):
        """mesh: sample on a mesh of this process's devices (see `placement_of`): the
        parameters are placed on it here, by the training rules; None: the default device."""
        self.placement = placement_of(mesh, config)
        self.model = model if self.placement is None else self.placement.place_model(model)
        self.latent_space = latent_space
        self.config = config
        # "x1" or "v": how the sampler reads the network's output (the config's by default).
        self.prediction_type = prediction_type or prediction_type_of(config)
        if self.prediction_type not in sampling.PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}: must be one of "
                             f"{sampling.PREDICTION_TYPES}")

    @classmethod
    def from_checkpoint(cls, directory: str, *, latent_space: LatentSpace | str | None = AUTO,
                        shardings=None, mesh=None) -> "Pipeline":
        """Load a model export; the latent space is the argument, or with "auto" the config's
        optional `latent_space` section (`configured_latent_space`), or None: latents only.
        mesh: sample on it (`placement_of`); the parameters are restored straight into their
        shards, never whole on one device (unless `shardings` gives other ones).

        The model's latent normalisation (`data.latent_normalization`, recorded from its
        training store) is applied to a raw latent space; a space normalised otherwise is
        refused.
        """
        from vgpt_jax.vae import latent_space as ls
        placement = None
        if mesh is not None:
            _, config = checkpoint.resolve_params(directory)
            placement = placement_of(mesh, config)
            if shardings is None:
                abstract = checkpoint.abstract_model(ModelConfig.from_config(config.model))
                shardings = placement.param_shardings(nnx.state(abstract, nnx.Param))
        model, config = checkpoint.load_model(directory, shardings)
        if isinstance(latent_space, str) and latent_space == AUTO:
            latent_space = configured_latent_space(directory, config)
        ours = ls.normalization_of(config.get("data", {}).get("latent_normalization"))
        if latent_space is not None:
            given = ls.normalization_of(latent_space)
            if given is None:
                latent_space = ls.with_normalization(latent_space, ours)
            else:
                ls.check_same_normalization(ours, given, f"the model in {directory!r}",
                                            "the latent space given")
        return cls(model, latent_space, config, mesh=placement)

    @classmethod
    def from_pretrained(cls, name_or_directory: str, *, cache_dir: str | None = None,
                        dtype: str = "bfloat16", rope_factor_rule: str = "official",
                        weights: str | None = None, lora: str | None = None,
                        prediction_type: str | None = None, vae: str | None = None,
                        latent_space: LatentSpace | str | None = AUTO,
                        shardings=None, mesh=None) -> "Pipeline":
        """A vgpt_jax export (as `from_checkpoint`), or the released weights: an official
        checkpoint folder (or its `transformer/` subfolder) or hub repo id
        (`GrayShine/Video-GPT`), converted once and cached
        (`vgpt_jax.convert_official.pretrained_export`). Defaults are the official ones.

        dtype: "bfloat16" or "float32" parameters and compute. rope_factor_rule: LongRoPE
        factors, "official" (long at every length) or "by_length" (stock transformers).
        weights: the weights file or folder when not found as the official script finds them.
        lora: a peft LoRA adapter folder merged into the weights (the official `merge_lora`).
        prediction_type: "x1" or "v" instead of the export's (the official rule: v for
        `model.pt`); no conversion again. vae: a diffusers VAE folder or hub id instead of the
        export's (the bundled `vae/`, else stabilityai/sdxl-vae). latent_space: a LatentSpace,
        "auto" (the export's or `vae`'s), or None: latents only, no VAE built, no network.
        mesh: sample on a mesh, as `from_checkpoint`.
        """
        from vgpt_jax import convert_official
        if not convert_official.is_export(name_or_directory):
            name_or_directory = convert_official.pretrained_export(
                name_or_directory, cache_dir, dtype, rope_factor_rule, weights=weights, lora=lora)
        if vae is not None and isinstance(latent_space, str) and latent_space == AUTO:
            from vgpt_jax.vae.latent_space import make_latent_space
            latent_space = make_latent_space({"kind": "autoencoder_kl", "path": vae})
        pipe = cls.from_checkpoint(name_or_directory, latent_space=latent_space,
                                   shardings=shardings, mesh=mesh)
        if prediction_type is not None:
            pipe = cls(pipe.model, pipe.latent_space, pipe.config, prediction_type,
                       mesh=pipe.placement)
        return pipe

    # ------------------------------------------------------------------ entry points

    def predict(self, context, num_frames: int | None = None, *,
                clip_sizes: Sequence[int] | None = None,
                sampler: sampling.SamplerConfig | None = None, seed: int | Sequence[int] = 0,
                reencode: bool = False,
                callback: Callable[[int, int, np.ndarray], None] | None = None,
                class_id=None, actions=None, text=None, text_mask=None,
                **sampler_overrides) -> SampleOutput:
        """Continue `context` by `num_frames` (clips of 24) or by clips of `clip_sizes` frames.

        context: uint8 pixels [(B,) F, H, W, 3] or float latents [(B,) F, h, w, C].
        sampler: the sampling settings (`sampling.SamplerConfig`; None: its defaults, the
        release's); any of its fields given by name (steps=, guidance=, window=, time_shift=,
        cache_mode=, anchor_frames=, context_noise=, same_noise_every_clip=,
        renoise_context=, condition_guidance=) replaces the sampler's. The prediction type is
        always `self.prediction_type`. seed: an int (video b uses seed + b) or one per video.
        reencode: pass each finished clip through decode -> uint8 -> encode before it joins
        the history, as the release does. callback(k, num_clips, latents [B, n, h, w, C]) runs
        after each clip.
        class_id / actions / text (text_mask): the conditions of a model with
        `model.conditions`, each kind it has and no other (`sampling.sample_video`); one
        video's for a context without a batch axis (class_id an int, actions [F + N, A]: one
        per context and generated frame, text [text_tokens, text_dim], text_mask
        [text_tokens]), else with a leading [B] axis. Checked before the context is encoded.
        """
        sizes = _clip_sizes(num_frames, clip_sizes)
        cfg = self._sampler_config("predict", sampler, sampler_overrides)
        context = np.asarray(context)
        batched = context.ndim == 5
        if context.ndim not in (4, 5):
            raise ValueError(f"context: expected [frames, H, W, 3] pixels or [frames, h, w, C] "
                             f"latents (with an optional leading batch axis), got shape "
                             f"{context.shape}")
        context = context if batched else context[None]
        if context.shape[0] == 0:
            raise ValueError(f"context: a batch of 0 videos (shape {context.shape})")
        if context.shape[1] == 0:
            raise ValueError(f"context: 0 context frames (shape {context.shape}); to sample "
                             "from nothing use generate()")
        seeds = _seeds(seed, context.shape[0])
        conditions = self._conditions(
            dict(class_id=class_id, actions=actions, text=text, text_mask=text_mask), batched,
            context.shape[0], context.shape[1], sum(sizes))
        latents = self._context_latents(context, seeds)
        _check_finite(latents, "context latents" if context.dtype != np.uint8
                      else "context latents (as encoded from the pixels)", batched)
        out = self._sample(sizes, cfg, seeds, latents, None, reencode, callback, conditions)
        return out if batched else SampleOutput(out.latents[0], None if out.frames is None
                                                else out.frames[0])

    def generate(self, num_frames: int | None = None, *, clip_sizes: Sequence[int] | None = None,
                 batch_size: int = 1, frame_size: tuple[int, int] | None = None,
                 latent_size: tuple[int, int] | None = None,
                 sampler: sampling.SamplerConfig | None = None, seed: int | Sequence[int] = 0,
                 reencode: bool = False,
                 callback: Callable[[int, int, np.ndarray], None] | None = None,
                 class_id=None, actions=None, text=None, text_mask=None,
                 **sampler_overrides) -> SampleOutput:
        """Video from nothing: the first clip without history, then as `predict` (`sampler`
        and the sampler settings given by name, seed, reencode, callback as there).

        Give `frame_size=(H, W)` in pixels (with a latent space) or `latent_size=(h, w)`.
        Outputs are batched [batch_size, N, ...], and so are the conditions (as `predict`'s
        with a batch axis: class_id [batch_size], actions [batch_size, N, A], ...).
        """
        sizes = _clip_sizes(num_frames, clip_sizes)
        cfg = self._sampler_config("generate", sampler, sampler_overrides)
        if (frame_size is None) == (latent_size is None):
            raise ValueError("generate: give exactly one of frame_size (pixels) and latent_size")
        if frame_size is not None:
            space = self._require_space("frame_size")
            H, W = frame_size
            space.check_frames(np.zeros((1, H, W, 3), np.uint8), what="frame_size")
            latent_size = (H // space.downsample, W // space.downsample)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        conditions = self._conditions(
            dict(class_id=class_id, actions=actions, text=text, text_mask=text_mask), True,
            batch_size, 0, sum(sizes))
        return self._sample(sizes, cfg, _seeds(seed, batch_size), None, tuple(latent_size),
                            reencode, callback, conditions)

    def features(self, video, *, layers=None, pool: str | Sequence[str] = "mean",
                 t: float | None = None, seed: int | Sequence[int] = 0, batch_size: int = 8):
        """Pooled hidden states of decoder `layers` (default all) per video, for probing and
        retrieval (`vgpt_jax.features`): float32 [(B,) len(layers), D], or with a sequence of
        pools a dict {pool: array}.

        video: uint8 pixels [(B,) F, H, W, 3] (encoded to the posterior mean, so features are
        deterministic) or float latents [(B,) F, h, w, C]. pool: "mean", "last_frame" or
        "end_token". t: None for the clean copies, or the noise level of one noisy copy
        (noise from `seed`: video b uses seed + b, or one seed per video). Runs on the
        pipeline's mesh, or data parallel over every local device without one.
        """
        from vgpt_jax import features as features_lib
        video = np.asarray(video)
        if video.ndim not in (4, 5):
            raise ValueError(f"video: expected [frames, H, W, 3] pixels or [frames, h, w, C] "
                             f"latents (with an optional leading batch axis), got shape "
                             f"{video.shape}")
        batched = video.ndim == 5
        video = video if batched else video[None]
        latents = self._context_latents(video, [None] * len(video))
        _check_finite(latents, "video latents", batched)
        pools = (pool,) if isinstance(pool, str) else tuple(pool)
        out = features_lib.extract(self.model, latents, layers=layers, pools=pools, t=t,
                                   seeds=_seeds(seed, len(latents)), batch_size=batch_size,
                                   placement=self.placement)
        if not batched:
            out = {p: v[0] for p, v in out.items()}
        return out[pool] if isinstance(pool, str) else out

    # ------------------------------------------------------------------ helpers

    def _sampler_config(self, method: str, sampler: sampling.SamplerConfig | None,
                        overrides: dict) -> sampling.SamplerConfig:
        """`sampler` (default: `SamplerConfig()`) with the settings given by name (float and
        bool fields cast to their type) and this pipeline's prediction type, validated."""
        fields = {f.name for f in dataclasses.fields(sampling.SamplerConfig)}
        fields.discard("prediction_type")
        for name in overrides:
            if name not in fields:
                raise TypeError(f"{method}() got an unexpected keyword argument {name!r} (the "
                                f"sampler settings are {sorted(fields)})")
        # ints stay as given, so that validate() rejects steps=2.5 instead of truncating it
        given = cast_to_fields(sampling.SamplerConfig, overrides, (float, bool))
        cfg = dataclasses.replace(sampler or sampling.SamplerConfig(), **given,
                                  prediction_type=self.prediction_type)
        cfg.validate()
        return cfg

    def _conditions(self, given: dict, batched: bool, videos: int, context_frames: int,
                    generated: int) -> dict:
        """`sampling.sample_video`'s condition keywords, [videos, ...] each, from `given`
        (name -> value, None: not given; one video's, without the batch axis, unless
        `batched`), checked (`sampling.check_conditions`): each error names the keyword."""
        given = {k: np.asarray(v) for k, v in given.items() if v is not None}
        for name, value in given.items():
            axes = ("videos",) * batched + CONDITION_AXES[name]
            if value.ndim != len(axes):
                raise conditioning.ConditionError(
                    name, f"shape {value.shape}, expected "
                    f"{'[' + ', '.join(axes) + ']' if axes else 'a scalar'}"
                    + ("" if batched else " (one video's, as the context)"))
        if not batched:
            given = {k: v[None] for k, v in given.items()}
        sampling.check_conditions(self.model.cfg, videos, context_frames, generated, **given)
        return given

    def _require_space(self, what: str) -> LatentSpace:
        if self.latent_space is None:
            raise ValueError(f"{what}: this pipeline has no latent space (give one to "
                             "Pipeline(...) or a 'latent_space' section in the checkpoint "
                             "config), so it works on latents only")
        return self.latent_space

    def _context_latents(self, context_BF, seeds) -> np.ndarray:
        """Pixels (uint8) are encoded (a posterior sample, as the release); floats are latents."""
        if context_BF.dtype == np.uint8:
            space = self._require_space("context pixels")
            if context_BF.shape[-1] != 3:
                raise ValueError(f"context pixels: frames have {context_BF.shape[-1]} channels, "
                                 f"expected RGB (3); shape {context_BF.shape}")
            for b in range(len(context_BF)):
                space.check_frames(context_BF[b], what="context pixels")
            p = self.model.cfg.patch_size * space.downsample
            if context_BF.shape[2] % p or context_BF.shape[3] % p:
                raise ValueError(f"context pixels: frame size {context_BF.shape[2]}x"
                                 f"{context_BF.shape[3]} is not a multiple of {p} (latent "
                                 "downsampling x patch size)")
            return np.stack([space.encode(f, seed=s) for f, s in zip(context_BF, seeds)])
        if not np.issubdtype(context_BF.dtype, np.floating):
            raise ValueError(f"context: dtype {context_BF.dtype} is neither uint8 pixels nor "
                             "float latents")
        channels, expected = context_BF.shape[-1], self.model.cfg.latent_channels
        if channels == 3 and expected != 3:
            raise ValueError(f"context: float frames with 3 channels (shape {context_BF.shape}) "
                             f"are taken as latents, but the model has latent_channels="
                             f"{expected}; pass video frames as uint8 pixels (0-255)")
        return context_BF.astype(np.float32)

    def _sample(self, sizes, cfg, seeds, context_latents, latent_hw, reencode, callback,
                conditions: dict) -> SampleOutput:
        space = self.latent_space
        to_context = None
        if reencode:
            space = self._require_space("reencode")

            def to_context(k, clip_BNhwc):
                clip = np.asarray(clip_BNhwc)
                return np.stack([space.encode(space.decode(c), seed=s + 7919 * (k + 1))
                                 for c, s in zip(clip, seeds)])
        on_clip = None
        if callback is not None:
            on_clip = lambda k, clip: callback(k, len(sizes), np.asarray(clip))
        latents = sampling.sample_video(self.model, sizes, cfg, seeds,
                                        context_BFhwc=context_latents, latent_hw=latent_hw,
                                        on_clip=on_clip, to_context=to_context,
                                        placement=self.placement, **conditions)
        frames = None if space is None else np.stack([space.decode(v) for v in latents])
        return SampleOutput(latents, frames)
