"""Text conditions: a tiny random T5 encoder written into a temp dir (no download), embeddings
packed into the store beside the latents, text tokens as global conditions (a perturbed text
token changes every noisy token, a padded one nothing; zero gates give the unconditioned model
exactly; cached == recomputed sampling), captions from sidecar files at folder ingestion."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from test_conditioning import F, H, W, pair  # noqa: E402

from vgpt_jax import conditioning, diffusion, sampling, text_encoder  # noqa: E402
from vgpt_jax.config import ModelConfig, block_len_for, get_model_config  # noqa: E402

DIM, TOKENS = 16, 5
WORDS = ("one", "two", "balls", "ball", "red", "blue", "moves", "left", "right", ",", "the")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("encoder"))
    text_encoder.make_tiny_encoder(path, WORDS, dim=DIM)
    return text_encoder.load(path, TOKENS)


def model_config() -> ModelConfig:
    """The tiny model with text (and a class, so that text and class tokens mix)."""
    cfg = get_model_config("tiny")
    cfg.attention.impl = "dense"
    cfg.conditions = dict(text_dim=DIM, text_tokens=TOKENS, num_classes=2)
    return ModelConfig.from_config(cfg)


def text_pair(gate: float):
    """(base, text model): shared base parameters, random text paths, gates at `gate`."""
    return pair(gate, conditioned=model_config())


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    latents = jnp.asarray(rng.standard_normal((2, F, H, W, 4)), jnp.float32)
    clip_ids = jnp.asarray([[0, 1, 2, 3], [0, 0, 1, 1]], jnp.int32)
    text = jnp.asarray(rng.standard_normal((2, TOKENS, DIM)), jnp.float32)
    mask = jnp.asarray([[True] * TOKENS, [True, True, True, False, False]])
    return latents, clip_ids, {"text": text, "text_mask": mask, "class_id": jnp.asarray([0, 1])}


@functools.partial(jax.jit, static_argnames="drop")
def predict(model, latents, clip_ids, conditions, drop=False):
    """x1 predictions of every noisy token [B, F, h, w, C] at t = 0.4, training layout."""
    block_len = block_len_for(model.cfg, H, W)
    x = diffusion.noised_inputs(latents, clip_ids, 0.4, jax.random.split(jax.random.key(0), 3),
                                diffusion.ObjectiveConfig(), block_len)
    cond = conditioning.batch_conditions(model.cfg, {"latents": latents, **conditions},
                                         block_len) if conditions else None
    if drop:
        cond = cond.dropped(jnp.ones(latents.shape[0], bool))
    return model(x.blocks_BNhwc, x.t_BN, x.layout, output_blocks=slice(0, None, 2),
                 conditions=cond)


def test_tiny_encoder_embeds_captions_and_packs_them(encoder):
    a, b, c = encoder.encode(["two balls, the red one moves left", "one ball",
                              "two balls, the red one moves left"])
    assert a.shape == (TOKENS, DIM) and b.shape == (2, DIM)   # truncated / its own length
    np.testing.assert_array_equal(a, c)
    assert np.abs(a[:2] - encoder.encode(["two balls"])[0]).max() > 0  # context matters
    unpacked = text_encoder.unpack(text_encoder.pack(a))
    np.testing.assert_allclose(unpacked, a, rtol=1e-3, atol=1e-3)     # stored as float16
    padded, mask = text_encoder.pad(b, TOKENS)
    assert mask.tolist() == [True, True, False, False, False] and not padded[2:].any()
    with pytest.raises(ValueError, match="not a packed embedding"):
        text_encoder.unpack({"shape": [1]})


def test_a_text_token_changes_every_noisy_token_and_padding_none():
    _, model = text_pair(0.5)
    latents, clip_ids, cond = inputs()
    ref = np.asarray(predict(model, latents, clip_ids, cond))
    for video, token in ((0, 0), (0, TOKENS - 1), (1, 2)):
        text = cond["text"].at[video, token].add(1.0)
        out = np.asarray(predict(model, latents, clip_ids, {**cond, "text": text}))
        assert (np.abs(out[video] - ref[video]) > 0).all(), (video, token)
        np.testing.assert_array_equal(out[1 - video], ref[1 - video])
    padded = cond["text"].at[1, 3].add(5.0)   # video 1's tokens 3, 4 are padding
    np.testing.assert_array_equal(
        np.asarray(predict(model, latents, clip_ids, {**cond, "text": padded})), ref)


def test_zero_gates_give_exactly_the_unconditioned_model():
    """Op by op (no jit) the outputs are bit-equal; compiled, the conditioned graph fuses
    differently from the base one, so they agree to float rounding."""
    base, model = text_pair(0.0)
    _, gated = text_pair(0.5)  # non-zero gates, every condition dropped: the base model too
    latents, clip_ids, cond = inputs()
    eager = predict.__wrapped__
    with jax.disable_jit():
        want = np.asarray(eager(base, latents, clip_ids, None))
        np.testing.assert_array_equal(np.asarray(eager(model, latents, clip_ids, cond)), want)
        np.testing.assert_array_equal(np.asarray(eager(gated, latents, clip_ids, cond, True)),
                                      want)
    np.testing.assert_allclose(np.asarray(predict(model, latents, clip_ids, cond)), want,
                               rtol=0, atol=1e-6)


def test_cached_sampling_equals_recomputation_with_text():
    _, model = text_pair(0.5)
    _, _, cond = inputs()
    rng = np.random.default_rng(0)
    context = rng.standard_normal((2, 1, H, W, 4)).astype(np.float32)
    cfg = sampling.SamplerConfig(steps=2, guidance=2.0, window=4, condition_guidance=3.0)
    run = lambda c, text=cond["text"]: sampling.sample_video(
        model, (2, 2), c, [0, 1], context_BFhwc=context, class_id=[0, 1], text=text,
        text_mask=cond["text_mask"])
    cached = run(cfg)
    recomputed = run(dataclasses.replace(cfg, cache_mode="recompute"))
    np.testing.assert_allclose(cached, recomputed, atol=2e-5 * np.abs(recomputed).max())
    assert np.abs(run(cfg, cond["text"][::-1]) - cached).max() > 1e-3
    with pytest.raises(ValueError, match="text: missing"):
        sampling.sample_video(model, (2,), cfg, [0], latent_hw=(H, W), class_id=[0])
    with pytest.raises(ValueError, match="text: shapes"):
        sampling.sample_video(model, (2,), cfg, [0], latent_hw=(H, W), class_id=[0],
                              text=np.zeros((1, TOKENS + 1, DIM)))


def test_store_records_carry_text_and_the_pipeline_pads_it(encoder, tmp_path):
    from vgpt_jax.data.ingest import ingest_arrays
    from vgpt_jax.data.input_pipeline import make_dataset
    from vgpt_jax.config import get_train_config
    rng = np.random.default_rng(0)
    captions = ["one ball", "two balls, the red one moves left"]
    items = [(rng.integers(0, 255, (4, 8, 8, 3), np.uint8), 8.0, f"v{i}", x)
             for i, x in enumerate(text_encoder.embed_extra(encoder, captions))]
    store = ingest_arrays(items, str(tmp_path / "store"), latent_space="space_to_depth:2")
    assert store[1]["extra"]["caption"] == captions[1]
    data_cfg = get_train_config().data
    data_cfg.update(global_batch_size=2, num_frames=4, stride_min=1, stride_max=1,
                    shuffle=False, read_threads=1, prefetch_buffer_size=1)
    cc = model_config().conditions
    with pytest.raises(ValueError, match="no class_id"):
        next(iter(make_dataset(store, data_cfg, conditions=cc)))
    cc = type(cc)(text_dim=DIM, text_tokens=TOKENS)
    batch = next(iter(make_dataset(store, data_cfg, conditions=cc)))
    assert batch["text"].shape == (2, TOKENS, DIM)
    assert sorted(batch["text_mask"].sum(1).tolist()) == [2, TOKENS]


def test_folder_ingestion_reads_sidecar_captions(encoder, tmp_path):
    from vgpt_jax.data import video_io
    from vgpt_jax.data.ingest import IngestConfig, ingest_folder
    from vgpt_jax.data.store import LatentStore
    folder = tmp_path / "videos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        video_io.write_video(str(folder / f"{name}.mp4"),
                             rng.integers(0, 255, (3, 32, 32, 3), np.uint8), fps=8)
    (folder / "a.txt").write_text("two balls, the red one moves left\n")
    config = IngestConfig(min_side=16, crop_multiple=16, text_encoder=encoder.name,
                          text_tokens=TOKENS)
    ingest_folder(str(folder), str(tmp_path / "store"), "space_to_depth:4", config,
                  progress=False)
    store = LatentStore(str(tmp_path / "store"))
    extras = {store[i]["source"]: store[i]["extra"] for i in range(len(store))}
    assert extras["a.mp4"]["caption"] == "two balls, the red one moves left"
    np.testing.assert_allclose(text_encoder.unpack(extras["a.mp4"]["text"]),
                               encoder.encode([extras["a.mp4"]["caption"]])[0], atol=1e-2)
    assert "text" not in extras["b.mp4"]
    assert os.path.basename(text_encoder.caption_path("x/y.mp4")) == "y.txt"


def test_the_abstract_batch_of_a_text_model_holds_its_text():
    """`vgpt plan` lowers the step on `StepSetup.abstract_batch`: every array the batch
    shardings name (text and its mask too) with the shape the input pipeline makes."""
    from vgpt_jax import demo, train
    cfg = demo.demo_config("quick")
    cfg.model.latent_channels = 48
    cfg.model.conditions = dict(text_dim=32, text_tokens=8)
    step = train.build_step(cfg)
    batch = step.abstract_batch((8, 8))
    assert set(batch) == set(step.batch_shardings)
    b = cfg.data.global_batch_size
    assert batch["text"].shape == (b, 8, 32) and batch["text_mask"].shape == (b, 8)
    assert batch["text_mask"].dtype == jnp.bool_
