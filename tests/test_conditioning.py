"""Condition tokens: the mask rule for condition keys against a per-token reference, what a
class and an action can influence, exact equality with the unconditioned model (zero gates,
dropped conditions), the backends, cached == recomputed sampling with both guidances, and the
guidance formula; the token-dependent gate (`conditions.token_gate`) in each of these that it
touches."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgpt_jax import attention, checkpoint, conditioning, diffusion, sampling
from vgpt_jax import layout as layout_lib
from vgpt_jax.config import ModelConfig, get_model_config
from vgpt_jax.model import VideoGPT

H = W = 4   # 2x2 patches: L = 6
L = 6
F = 4
CLASSES, ACTION_DIM = 3, 2


def model_config(conditions: bool, **changes) -> ModelConfig:
    cfg = get_model_config("tiny")
    cfg.attention.impl = "dense"
    if conditions:
        cfg.conditions = dict(num_classes=CLASSES, action_dim=ACTION_DIM)
    cfg.update(changes)
    return ModelConfig.from_config(cfg)


def token_gated(**changes) -> ModelConfig:
    """A class and actions, with the token-dependent gate `gate + y W_g`."""
    cfg = model_config(True, **changes)
    return dataclasses.replace(cfg, conditions=dataclasses.replace(cfg.conditions,
                                                                   token_gate=True))


def head_modulated(**changes) -> ModelConfig:
    """A class and actions that also modulate the output head (`conditions.head_modulation`)."""
    cfg = model_config(True, **changes)
    return dataclasses.replace(cfg, conditions=dataclasses.replace(cfg.conditions,
                                                                   head_modulation=True))


def random_state(model_cfg: ModelConfig, seed: int):
    graphdef, state = nnx.split(checkpoint.abstract_model(model_cfg))
    rng = np.random.default_rng(seed)
    return graphdef, jax.tree.map(
        lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32)), state)


def pair(gate: float = 0.5, conditioned: ModelConfig | None = None, gate_proj: float = 1.0,
         head_out: float = 1.0, **changes):
    """(base model, conditioned model): the same base parameters, random condition paths, the
    condition gates set to `gate` (and a token gate's random W_g scaled by `gate_proj`, a head
    modulation's output layer by `head_out`: 0 is their initialisation). `conditioned`: the
    conditioned model's config (default: a class and actions)."""
    graphdef, base_state = random_state(model_config(False, **changes), 0)
    cgraph, cstate = random_state(conditioned or model_config(True, **changes), 1)
    params = cstate.to_pure_dict()
    params.update({k: v for k, v in base_state.to_pure_dict().items() if k != "decoder"})
    params["decoder"].update(base_state.to_pure_dict()["decoder"])
    params["decoder"]["condition_gate"] = jnp.full_like(params["decoder"]["condition_gate"], gate)
    if "condition_gate_proj" in params["decoder"]:
        params["decoder"]["condition_gate_proj"] *= gate_proj
    if "head_out" in params["condition_embed"]:
        params["condition_embed"]["head_out"] *= head_out
    cstate.replace_by_pure_dict(params)
    return nnx.merge(graphdef, base_state), nnx.merge(cgraph, cstate)


@pytest.fixture(scope="module")
def models():
    return pair()


@pytest.fixture(scope="module")
def modulated_models():
    """Both paths: the condition attention and the head modulation."""
    return pair(conditioned=head_modulated())


@pytest.fixture(scope="module")
def token_gated_models():
    """Per-head gates 0: the conditions act through the token gate's W_g alone."""
    return pair(gate=0.0, conditioned=token_gated())


def batch(seed=0, clip_ids=None):
    rng = np.random.default_rng(seed)
    clip_ids = np.asarray([[0, 1, 2, 3], [0, 0, 1, 1]] if clip_ids is None else clip_ids)
    b = clip_ids.shape[0]
    return {"latents": jnp.asarray(rng.standard_normal((b, F, H, W, 4)), jnp.float32),
            "clip_ids": jnp.asarray(clip_ids, jnp.int32),
            "class_id": jnp.asarray(rng.integers(0, CLASSES, b), jnp.int32),
            "actions": jnp.asarray(rng.standard_normal((b, F, ACTION_DIM)), jnp.float32)}


@jax.jit
def _error(model, b, key):
    return diffusion.denoising_error(model, b["latents"], b["clip_ids"], 0.4, key,
                                     class_id=b.get("class_id"), actions=b.get("actions"))


def per_frame_error(model, b):
    return np.asarray(_error(model, b, jax.random.key(0)))


def unconditioned(b):
    return {k: v for k, v in b.items() if k in ("latents", "clip_ids")}


# ----------------------------------------------------------------------------- the mask rule


def test_condition_keys_follow_an_independent_per_token_reference():
    """Every (query, condition key) pair of a training sequence with a class and 4 actions,
    some dropped: a valid condition is seen by every valid token at or after its frame."""
    clip_ids = np.asarray([[0, 0, 1, 2]])
    lay = layout_lib.training_layout(clip_ids, L)
    frames = np.arange(F)[None]
    cond = layout_lib.condition_layout(frames, frames, L, num_global=1,
                                       frame_valid_BF=np.asarray([[True, False, True, True]]))
    q = layout_lib.token_meta(lay)
    expand = lambda m, ax: jax.tree.map(lambda a: jnp.expand_dims(a, ax), m)
    got = np.asarray(attention.visible(expand(q, 2), expand(cond, 1), L))[0]
    got_c = np.asarray(attention.visible(expand(cond, 2), expand(cond, 1), L))[0]
    key_frames = [None, 0, 1, 2, 3]             # None: the class token
    key_valid = [True, True, False, True, True]
    q_frame, q_valid = np.asarray(q.frame[0]), np.asarray(q.valid[0])
    for i in range(q_frame.size):
        for j, (kf, kv) in enumerate(zip(key_frames, key_valid)):
            want = bool(q_valid[i] and kv and (kf is None or kf <= q_frame[i]))
            assert got[i, j] == want, (i, j)
    for i, (qf, qv) in enumerate(zip(key_frames, key_valid)):
        for j, (kf, kv) in enumerate(zip(key_frames, key_valid)):
            qf_ = -1 if qf is None else qf
            want = bool(qv and kv and (kf is None or kf <= qf_))
            assert got_c[i, j] == want, (i, j)


def test_a_query_that_sees_no_condition_gets_exactly_zero():
    q = jax.random.normal(jax.random.key(0), (1, 2, 4, 8))
    kv = jax.random.normal(jax.random.key(1), (1, 3, 4, 8))
    cond = layout_lib.condition_layout(np.asarray([[0, 1, 2]]), np.asarray([[0, 1, 2]]), L,
                                       num_global=0)
    q_meta = layout_lib.ConditionLayout(frame=jnp.asarray([[-1, 5]]),
                                        valid=jnp.asarray([[True, True]]),
                                        position=jnp.zeros((1, 2), jnp.int32))
    out = np.asarray(attention.condition_attention(q, kv, kv, q_meta, cond, L))
    assert (out[0, 0] == 0).all() and np.abs(out[0, 1]).max() > 0


# ----------------------------------------------------------------------------- influence


@pytest.mark.parametrize("which", ["models", "token_gated_models", "modulated_models"])
def test_a_class_changes_every_frame_and_an_action_only_frames_from_its_own_on(which, request):
    _, cond = request.getfixturevalue(which)
    b = batch(clip_ids=[[0, 1, 2, 3], [0, 0, 1, 1]])
    ref = per_frame_error(cond, b)
    other_class = per_frame_error(cond, {**b, "class_id": (b["class_id"] + 1) % CLASSES})
    assert (np.abs(other_class - ref) > 0).all()
    for f in range(F):
        acts = b["actions"].at[:, f].add(1.0)
        changed = np.abs(per_frame_error(cond, {**b, "actions": acts}) - ref) > 0
        # One frame per clip (video 0): exactly the frames >= f. Two-frame clips (video 1): a
        # clip is denoised jointly, so f's clip-mate sees it too; earlier clips never.
        assert changed[0].tolist() == [g >= f for g in range(F)], f
        first_of_clip = f - f % 2
        assert changed[1].tolist() == [g >= first_of_clip for g in range(F)], f


def test_the_head_modulation_alone_moves_exactly_the_actions_own_frame():
    """Condition attention off (gates 0): a class modulates every frame's head, frame f's
    action frame f's alone, also inside a two-frame clip."""
    _, cond = pair(gate=0.0, conditioned=head_modulated())
    b = batch(clip_ids=[[0, 1, 2, 3], [0, 0, 1, 1]])
    ref = per_frame_error(cond, b)
    assert (np.abs(per_frame_error(cond, {**b, "class_id": (b["class_id"] + 1) % CLASSES})
                   - ref) > 0).all()
    for f in range(F):
        changed = np.abs(per_frame_error(cond, {**b, "actions": b["actions"].at[:, f].add(1.0)})
                         - ref) > 0
        assert changed.tolist() == [[g == f for g in range(F)]] * 2, f


def test_a_blocks_head_modulation_is_the_global_tokens_mean_plus_its_frames_own():
    """Global tokens (a caption's, padding excluded) are averaged, so a caption's length does
    not scale the modulation; per-frame tokens count for their own frame's blocks alone."""
    g = layout_lib.GLOBAL_FRAME
    layout = layout_lib.ConditionLayout(
        frame=jnp.asarray([[g, g, g, 0, 1]]), valid=jnp.asarray([[True, True, False, True, True]]),
        position=jnp.zeros((1, 5), jnp.int32))
    head = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 3)), jnp.float32)
    got = conditioning.block_modulation(head, layout, jnp.asarray([[0, 1, 1]]))
    mean_global = (head[0, 0] + head[0, 1]) / 2
    np.testing.assert_allclose(got[0], jnp.stack([mean_global + head[0, 3],
                                                  mean_global + head[0, 4],
                                                  mean_global + head[0, 4]]), rtol=1e-6)


def test_a_condition_kv_without_head_embeddings_is_refused_by_a_modulated_model():
    _, plain = pair()
    _, modulated = pair(conditioned=head_modulated())
    b = batch()
    frames = jnp.broadcast_to(jnp.arange(F), (2, F))
    conditions = conditioning.make_conditions(plain.cfg, frames, frames, L,
                                              class_id=b["class_id"], actions=b["actions"])
    kv = plain.condition_kv(conditions, L)
    with pytest.raises(ValueError, match="no head embeddings"):
        modulated._condition_head(kv)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("variant", ["per_head", "token_gate", "head_modulation"])
def test_zero_gates_give_the_unconditioned_model(variant):
    """Closed gates: the unconditioned model to float32 rounding. Not bitwise: the conditioned
    graph adds `0 * condition_attention`, exact in itself, but XLA:CPU may then fuse and tile
    the neighbouring dots differently (on an AVX2 CPU 2 of 8 errors differed in the last bit;
    on an AVX-512 one none did). A per-head gate of 1e-3 already moves them by 7.2e-6, 7x the
    tolerance."""
    conditioned = {"per_head": None, "token_gate": token_gated(),
                   "head_modulation": head_modulated()}[variant]
    base, cond = pair(gate=0.0, conditioned=conditioned, gate_proj=0.0, head_out=0.0)
    b = batch()
    unconditioned_error = per_frame_error(base, unconditioned(b))
    for request in (b, unconditioned(b)):
        np.testing.assert_allclose(per_frame_error(cond, request), unconditioned_error,
                                   rtol=1e-6, atol=0)


def test_a_zero_token_gate_gives_exactly_the_per_head_gates(models):
    """The token gate at initialisation (W_g = 0) over non-zero per-head gates: the model
    without it, whose parameters it shares."""
    _, per_head = models
    _, gated = pair(conditioned=token_gated(), gate_proj=0.0)
    b = batch()
    np.testing.assert_array_equal(per_frame_error(gated, b), per_frame_error(per_head, b))


@pytest.mark.parametrize("which", ["models", "modulated_models"])
def test_dropped_conditions_give_exactly_the_unconditioned_model(which, request):
    """Training with dropout 1 (every video's conditions dropped) is the unconditioned loss."""
    base, cond = request.getfixturevalue(which)
    b = batch()
    key = jax.random.key(3)
    always_drop = dataclasses.replace(cond.cfg, conditions=dataclasses.replace(
        cond.cfg.conditions, dropout=1.0))
    cond.cfg = always_drop  # a static field: read at trace time
    try:
        dropped = jax.jit(lambda m, b: diffusion.loss(m, b, key)[0])(cond, b)
    finally:
        cond.cfg = dataclasses.replace(always_drop, conditions=dataclasses.replace(
            always_drop.conditions, dropout=0.1))
    assert float(dropped) == float(jax.jit(lambda m, b: diffusion.loss(m, b, key)[0])(
        base, unconditioned(b)))


@functools.partial(jax.jit, static_argnums=0)
def _stream_each_call_and_once(L_, model, history, noisy, t, cond):
    """(full forward, cached denoising step, cache) with `cond` run beside the frames, and
    the same with the condition stream's keys/values computed once beforehand."""
    b, hist = history.shape[:2]
    clean = layout_lib.clip_layout(b, hist, L_, noisy=False, clip=0)
    new = layout_lib.clip_layout(b, noisy.shape[1], L_, noisy=True, clip=1, first_frame=hist,
                                 first_position=hist)
    both = layout_lib.concat(clean, new)
    t_all = jnp.concatenate([jnp.ones((b, hist)), t], axis=1)
    blocks = jnp.concatenate([history, noisy], axis=1)

    def outputs(c):
        cache = model.build_cache(history, clean, c)
        return (model(blocks, t_all, both, output_blocks=slice(hist, None), conditions=c),
                model.denoise_with_cache(noisy, t, new, cache, c), cache.kv)
    return outputs(cond), outputs(model.condition_kv(cond, L_))


@pytest.mark.parametrize("scan_layers,modulated", [(True, False), (False, False), (True, True)])
def test_condition_kv_computed_once_equals_the_stream_at_every_call(scan_layers, modulated):
    """Condition tokens see only condition tokens, so their keys/values computed alone
    (`condition_kv`: the sampler's once per clip, with the head embeddings) give every entry
    point the outputs of the stream run beside the frame tokens (the recompute of every Euler
    step)."""
    _, model = pair(scan_layers=scan_layers,
                    conditioned=head_modulated(scan_layers=scan_layers) if modulated else None)
    rng = np.random.default_rng(4)
    b, hist, n = 2, 2, 2
    frames = np.broadcast_to(np.arange(hist + n), (b, hist + n))
    cond = conditioning.make_conditions(
        model.cfg, frames, frames, L, class_id=np.asarray([0, 2]),
        actions=rng.standard_normal((b, hist + n, ACTION_DIM)).astype(np.float32))
    cond = cond.dropped(np.asarray([False, True]))  # video 1: the no-conditions branch
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    each_call, once = _stream_each_call_and_once(L, model, normal(b, hist, H, W, 4),
                                                 normal(b, n, H, W, 4), jnp.full((b, n), 0.3),
                                                 cond)
    for got, want in zip(jax.tree.leaves(once), jax.tree.leaves(each_call)):
        assert np.abs(np.asarray(want)).max() > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(np.asarray(want)).max())


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_backends_agree_with_conditions(impl):
    """The frame-key attention runs on the chosen backend, the condition keys beside it."""
    if impl == "splash":
        pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    _, dense = pair()
    _, other = pair(attention=dict(impl=impl, block_q=128, block_kv=128, blockwise_tile=12))
    b = batch()
    np.testing.assert_allclose(per_frame_error(other, b), per_frame_error(dense, b), rtol=1e-4)


# ----------------------------------------------------------------------------- sampling


CONTEXT, CLIPS, WINDOW = 1, (2, 2), 4  # history 1 -> 3, then a window reset to the newest 2


@pytest.mark.parametrize("which", ["models", "token_gated_models", "modulated_models"])
def test_cached_sampling_equals_recomputation_with_conditions(which, request):
    """Both guidances (three branches: the history rows and the no-conditions rows encoded
    apart), a class and per-frame actions, across a window reset."""
    _, cond = request.getfixturevalue(which)
    rng = np.random.default_rng(0)
    context = rng.standard_normal((2, CONTEXT, H, W, 4)).astype(np.float32)
    actions = rng.standard_normal((2, CONTEXT + sum(CLIPS), ACTION_DIM)).astype(np.float32)
    cfg = sampling.SamplerConfig(steps=2, guidance=2.0, window=WINDOW, condition_guidance=3.0)
    run = lambda c, acts=actions: sampling.sample_video(
        cond, CLIPS, c, [0, 1], context_BFhwc=context, class_id=[0, 2], actions=acts)
    cached = run(cfg)
    recomputed = run(dataclasses.replace(cfg, cache_mode="recompute"))
    np.testing.assert_allclose(cached, recomputed, atol=2e-5 * np.abs(recomputed).max())
    # The actions reach the samples: others give other videos.
    assert np.abs(run(cfg, actions[:, ::-1].copy()) - cached).max() > 1e-3


def test_guidance_combines_branches_as_documented():
    """A denoiser whose branch outputs are known: v = v0 + (s_h-1)(v0-v_h) + (s_c-1)(v0-v_c)."""
    v0, vh, vc = 1.0, 4.0, -2.0

    def denoiser_of(values):  # prediction "v": the output is the velocity of each branch row
        return lambda z, t: jnp.broadcast_to(jnp.tile(jnp.asarray(values), z.shape[0] // len(
            values))[:, None, None, None, None], z.shape)

    z0 = jnp.zeros((2, 1, 1, 1, 1))
    sigmas = jnp.asarray([0.0, 1.0])
    out = sampling.euler(denoiser_of([v0, vh, vc]), z0, sigmas, jnp.asarray([1.5, 3.0]),
                         sampling.guidance_branches(True, True), "v")
    np.testing.assert_allclose(np.asarray(out), v0 + 0.5 * (v0 - vh) + 2.0 * (v0 - vc),
                               rtol=1e-6)
    one = sampling.euler(denoiser_of([v0, vc]), z0, sigmas, jnp.asarray([2.0]),
                         sampling.guidance_branches(False, True), "v")
    np.testing.assert_allclose(np.asarray(one), vc + 2.0 * (v0 - vc), rtol=1e-6)


def test_condition_guidance_one_and_unconditioned_requests(models):
    """s_c = 1 runs no extra branch; missing or extra conditions are named."""
    base, cond = models
    cfg = sampling.SamplerConfig(steps=2, guidance=1.0, window=WINDOW)
    actions = np.zeros((1, 2, ACTION_DIM), np.float32)
    with pytest.raises(ValueError, match="actions: missing"):
        sampling.sample_video(cond, (2,), cfg, [0], latent_hw=(H, W), class_id=[0])
    with pytest.raises(ValueError, match="class_id: given"):
        sampling.sample_video(base, (2,), cfg, [0], latent_hw=(H, W), class_id=[0])
    with pytest.raises(ValueError, match="outside"):
        sampling.sample_video(cond, (2,), cfg, [0], latent_hw=(H, W), class_id=[5],
                              actions=actions)
