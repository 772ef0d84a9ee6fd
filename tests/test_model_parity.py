"""The decoder stack equals transformers' `Phi3Model` given the same embeddings, positions and mask.

A tiny random `Phi3Config` (grouped-query attention, eager attention) runs in PyTorch with our
dense mask passed as a 4-D additive float mask (0 / finfo.min); its weights are copied into
`model.decoder`. RoPE: plain, LongRoPE with the stock by-length rule on both sides of
`original_max_position_embeddings`, and the official always-long rule.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import Phi3Config, Phi3Model  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from vgpt_jax import attention, layout  # noqa: E402
from vgpt_jax.config import ModelConfig, get_model_config  # noqa: E402
from vgpt_jax.model import VideoGPT  # noqa: E402

D, HEADS, KV_HEADS, LAYERS, MLP = 64, 4, 2, 2, 96
L = 6
CLIP_IDS = np.array([[0, 0, 1, 2, 2], [0, 1, 1, 1, 1]], np.int32)  # max position 4 * L + 5 = 29
RNG = np.random.default_rng(0)
LONG = (1 + 30 * RNG.random(D // HEADS // 2)).tolist()
SHORT = (1 + 0.2 * RNG.random(D // HEADS // 2)).tolist()


def phi3_config(rope):
    """rope: None, or (original_max_position_embeddings, factor_rule)."""
    kw = dict(vocab_size=8, hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
              rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              attn_implementation="eager")
    if rope is not None:
        kw.update(original_max_position_embeddings=rope[0], max_position_embeddings=4 * rope[0],
                  rope_scaling=dict(type="longrope", long_factor=LONG, short_factor=SHORT))
    return Phi3Config(**kw)


def our_model(rope):
    cfg = get_model_config("tiny")
    cfg.update(dict(hidden_size=D, num_heads=HEADS, num_kv_heads=KV_HEADS, num_layers=LAYERS,
                    mlp_dim=MLP))
    cfg.attention.impl = "dense"
    if rope is not None:
        cfg.rope_scaling.update(dict(type="longrope", long_factor=LONG, short_factor=SHORT,
                                     original_max_position_embeddings=rope[0],
                                     max_position_embeddings=4 * rope[0], factor_rule=rope[1]))
    return VideoGPT(ModelConfig.from_config(cfg), rngs=nnx.Rngs(0))


def copy_weights(hf: Phi3Model, model: VideoGPT):
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    per_layer = lambda name, fn: jnp.asarray(np.stack([fn(sd[f"layers.{i}.{name}.weight"])
                                                       for i in range(LAYERS)]))
    dec = model.decoder
    dec.qkv_proj[...] = per_layer("self_attn.qkv_proj", np.transpose)
    dec.o_proj[...] = per_layer("self_attn.o_proj", np.transpose)
    dec.gate_up_proj[...] = per_layer("mlp.gate_up_proj", np.transpose)
    dec.down_proj[...] = per_layer("mlp.down_proj", np.transpose)
    dec.input_norm[...] = per_layer("input_layernorm", lambda w: w)
    dec.post_attention_norm[...] = per_layer("post_attention_layernorm", lambda w: w)
    dec.final_norm[...] = jnp.asarray(sd["norm.weight"])


@pytest.fixture(scope="module")
def problem():
    lay = layout.training_layout(CLIP_IDS, L)
    meta = layout.token_meta(lay)
    x = RNG.normal(size=(len(CLIP_IDS), lay.num_tokens, D)).astype(np.float32)
    return lay, meta, x


@pytest.mark.parametrize("rope", [None, (64, "by_length"), (16, "by_length"), (64, "always_long")],
                         ids=["plain", "stock_short_factors", "stock_long_factors", "always_long"])
def test_decoder_matches_phi3model(problem, rope):
    lay, meta, x = problem
    torch.manual_seed(0)
    hf_cfg = phi3_config(rope)
    hf = Phi3Model(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    if rope is not None and rope[1] == "always_long":  # the official rotary_emb(seq_len=5000)
        inv = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, None, seq_len=5000)[0]
        hf.rotary_emb.original_inv_freq, hf.rotary_emb.long_inv_freq = inv.clone(), inv.clone()
    model = our_model(rope)
    copy_weights(hf, model)

    positions = np.asarray(layout.token_positions(lay))
    mask = np.asarray(attention.dense_mask(meta, meta, L))
    additive = torch.from_numpy(np.where(mask, 0.0, np.finfo(np.float32).min)[:, None]).float()
    embeds = torch.from_numpy(x)
    pos_t = torch.from_numpy(positions).long()
    # transformers 5 must use a user 4-D mask as is (no causal mask merged in).
    assert create_causal_mask(config=hf_cfg, inputs_embeds=embeds, attention_mask=additive,
                              cache=None, position_ids=pos_t) is additive
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, position_ids=pos_t, attention_mask=additive
                 ).last_hidden_state.numpy()
    ours = np.asarray(model.decoder(jnp.asarray(x), jnp.asarray(positions), meta, L))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # The hierarchical mask is not causal: a causal mask would change the outputs.
    assert not np.array_equal(mask[0], np.tril(mask[0]))


def test_longrope_rules_differ(problem):
    """The factor rule matters at these lengths (so the cases above test distinct code paths)."""
    lay, meta, x = problem
    positions = jnp.asarray(layout.token_positions(lay))
    outs = []
    for rule in ("by_length", "always_long"):
        model = our_model((64, rule))
        outs.append(np.asarray(model.decoder(jnp.asarray(x), positions, meta, L)))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
