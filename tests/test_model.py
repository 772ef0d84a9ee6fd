"""The Video-GPT model: mask semantics end to end, layout equivalence, size, input errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgpt_jax import config, layout
from vgpt_jax.model import VideoGPT

H, W, C = 4, 6, 4          # latent frame; 2x2 patches -> 6 image tokens, L = 8
L = (H // 2) * (W // 2) + 2


def tiny_config(**overrides):
    return dataclasses.replace(config.ModelConfig.from_config(config.get_model_config("tiny")),
                               **overrides)


def randomized(model, seed=1):
    """Zero-initialised parts (noisy embedder, head) would hide bugs: give every param noise."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.fixture(scope="module")
def model():
    return randomized(VideoGPT(tiny_config(), rngs=nnx.Rngs(0)))


@nnx.jit
def hidden_states(model, latents, t, lay):
    x = model.embed(latents, t, lay)
    return model.decoder(x, layout.token_positions(lay), layout.token_meta(lay), lay.block_len)


def inputs(seed, clip_ids):
    rng = np.random.default_rng(seed)
    b, f = clip_ids.shape
    lat = jnp.asarray(rng.normal(size=(b, 2 * f, H, W, C)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=(b, 2 * f)), jnp.float32)
    return lat, t


def test_noisy_tokens_never_influence_clean_tokens_or_other_clips(model):
    clip_ids = np.array([[0, 0, 1, 1, 1, 2]])
    lay = layout.training_layout(clip_ids, L)
    lat, t = inputs(0, clip_ids)
    base = np.asarray(hidden_states(model, lat, t, lay))
    meta = {k: np.asarray(v)[0] for k, v in layout.token_meta(lay)._asdict().items()}
    for frame in range(6):
        bumped = lat.at[0, 2 * frame].add(1.0)          # the noisy copy of this frame
        out = np.asarray(hidden_states(model, bumped, t, lay))[0]
        changed = np.abs(out - base[0]).max(-1) > 0
        own_clip = meta["noisy"] & (meta["clip"] == clip_ids[0, frame]) & meta["valid"]
        assert not changed[meta["valid"] & ~own_clip].any(), f"frame {frame} leaked"
        assert changed[own_clip].any()


def test_a_clip_never_influences_earlier_clips(model):
    clip_ids = np.array([[0, 1, 1, 2, 3, 3]])
    lay = layout.training_layout(clip_ids, L)
    lat, t = inputs(1, clip_ids)
    base = np.asarray(hidden_states(model, lat, t, lay))[0]
    meta = {k: np.asarray(v)[0] for k, v in layout.token_meta(lay)._asdict().items()}
    for clip in range(1, 4):
        frames = np.nonzero(clip_ids[0] == clip)[0]
        bumped = lat
        for f in frames:                                  # both copies of the clip
            bumped = bumped.at[0, 2 * f].add(1.0).at[0, 2 * f + 1].add(1.0)
        out = np.asarray(hidden_states(model, bumped, t, lay))[0]
        changed = np.abs(out - base).max(-1) > 0
        earlier = meta["valid"] & (meta["clip"] < clip)
        assert not changed[earlier].any(), f"clip {clip} changed an earlier clip"


def test_frame_major_layout_equals_reference_order(model):
    """Our static layout gives the same predictions as the official block order."""
    clip_ids = np.array([0, 0, 1, 2, 2])
    lay = layout.training_layout(clip_ids[None], L)
    lat, t = inputs(2, clip_ids[None])
    ours = np.asarray(nnx.jit(lambda m, a, b, c: m(a, b, c))(model, lat, t, lay))[0]
    order = []                                            # reference: NS(c) CL(c) ..., NS(last)
    for c in range(3):
        frames = list(np.nonzero(clip_ids == c)[0])
        order += [2 * f for f in frames] + ([2 * f + 1 for f in frames] if c < 2 else [])
    order = np.array(order)
    ref_lay = layout.Layout(
        frame=lay.frame[:, order], clip=lay.clip[:, order], noisy=lay.noisy[:, order],
        valid=jnp.ones((1, len(order)), bool), position=lay.position[:, order], block_len=L)
    ref = np.asarray(model(lat[:, order], t[:, order], ref_lay))[0]
    for i, block in enumerate(order):
        if block % 2 == 0:
            np.testing.assert_allclose(ours[block], ref[i], atol=1e-5)


def test_scan_unrolled_and_remat_agree(model):
    clip_ids = np.array([[0, 1, 1, 2]])
    lay = layout.training_layout(clip_ids, L)
    lat, t = inputs(3, clip_ids)
    state = nnx.state(model)

    def loss_and_grad(cfg):
        m = VideoGPT(cfg, rngs=nnx.Rngs(0))
        nnx.update(m, state)
        f = lambda m: jnp.sum(m(lat, t, lay) ** 2)
        return nnx.jit(nnx.value_and_grad(f))(m)

    ref_val, ref_grad = loss_and_grad(tiny_config())
    val, grad = loss_and_grad(tiny_config(scan_layers=False, remat_policy="full"))
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_phi3_mini_parameter_count_without_allocating():
    cfg = config.ModelConfig.from_config(config.get_model_config("phi3_mini"))
    abstract = nnx.eval_shape(lambda: VideoGPT(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    count = sum(int(np.prod(x.shape)) for x in leaves)
    assert count == cfg.num_params() == 3_663_581_200
    # The official model also carries Phi-3's 32064 x 3072 token table, of which it uses three
    # rows (our `markers`): 3.762B, the paper's "3.8B".
    assert count - 3 * 3072 + 32064 * 3072 == 3_762_072_592


def test_bad_inputs_raise_at_trace_time(model):
    clip_ids = np.array([[0, 1]])
    lay = layout.training_layout(clip_ids, L)
    lat, t = inputs(4, clip_ids)
    with pytest.raises(ValueError, match="3-channel latents"):
        jax.eval_shape(lambda: model(lat[..., :3], t, lay))
    with pytest.raises(ValueError, match="block_len"):
        jax.eval_shape(lambda: model(lat[:, :, :2], t, lay))
    with pytest.raises(ValueError, match="max_seq_len"):
        small = VideoGPT(tiny_config(max_seq_len=16), rngs=nnx.Rngs(0))
        jax.eval_shape(lambda: small(lat, t, lay))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        jax.eval_shape(lambda: model(lat[:, :, :3], t, lay))


def test_config_errors_name_the_field():
    bad = config.get_model_config("tiny")
    bad.num_heads = 5
    with pytest.raises(ValueError, match="hidden_size"):
        config.ModelConfig.from_config(bad)
    bad = config.get_model_config("tiny")
    bad.attention.impl = "magic"
    with pytest.raises(ValueError, match="impl must be one of"):
        config.ModelConfig.from_config(bad)
    with pytest.raises(ValueError, match="unknown model preset"):
        config.get_model_config("phi4")
