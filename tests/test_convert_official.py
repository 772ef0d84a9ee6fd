"""The official checkpoint converts, and the converted model reproduces the official forward.

A tiny checkpoint folder in the released format (Phi-3 `config.json`, tokenizer files,
`model.safetensors` with every key of `LVM/model.py`) is built from a PyTorch model assembled
here with the reference semantics: transformers `Phi3Model`, Conv2d patch embedders plus the
cropped sin-cos buffer, the two time embedders, the DiT final layer, unpatchify (p, q, c). The
torch sequence uses the *reference* block order [NS(clip1) CL(clip1) NS(clip2) ... NS(clipK)],
positions and mask; our model runs the frame-major layout; predictions per noisy frame agree.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from flax import nnx  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Phi3Config, Phi3Model  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from vgpt_jax import checkpoint, convert_official, layout, sampling  # noqa: E402
from vgpt_jax.config import ModelConfig  # noqa: E402

D, HEADS, KV_HEADS, LAYERS, MLP, VOCAB = 64, 4, 2, 2, 96, 40
C, P, GRID, FREQ = 4, 2, 192, 256
H, W = 4, 6                        # latent frame: a 2 x 3 patch grid (non-square on purpose)
L = (H // P) * (W // P) + 2        # tokens per frame block
MARKERS = {"<|diffusion|>": 37, "<img>": 35, "</img>": 36}
CLIP_IDS = np.array([[0, 0, 1, 2], [0, 1, 1, 1]], np.int32)
ORIG_MAX = 32                      # > the longest test sequence (4 * L): stock transformers
HALF = D // HEADS // 2             # would use the short LongRoPE factors here


# ----------------------------------------------------------------------------- official model


def official_pos_embed(dim, grid, base_size=64, interpolation_scale=1.0):
    """The official get_2d_sincos_pos_embed (SD3 style): meshgrid(w, h), float32 coordinates."""
    coords = np.arange(grid, dtype=np.float32) / (grid / base_size) / interpolation_scale
    mesh = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)


class PatchEmbed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(C, D, P, stride=P, bias=True)

    def forward(self, x_NCHW):
        return self.proj(x_NCHW).flatten(2).transpose(1, 2)


class TimestepEmbedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(FREQ, D), torch.nn.SiLU(),
                                       torch.nn.Linear(D, D))

    def forward(self, t):  # t in [0, 1], not x1000; [cos, sin]
        half = FREQ // 2
        freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class FinalLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_final = torch.nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = torch.nn.Linear(D, P * P * C)
        self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class OfficialVideoGPT(torch.nn.Module):
    def __init__(self, phi3_config):
        super().__init__()
        self.x_embedder, self.input_x_embedder = PatchEmbed(), PatchEmbed()
        self.time_token, self.t_embedder = TimestepEmbedder(), TimestepEmbedder()
        self.final_layer = FinalLayer()
        table = torch.from_numpy(official_pos_embed(D, GRID)).float()[None]
        self.register_buffer("pos_embed", table, persistent=True)
        self.llm = Phi3Model(phi3_config)

    def patches(self, embedder, x_NCHW):
        top, left = (GRID - H // P) // 2, (GRID - W // P) // 2
        pos = self.pos_embed.reshape(1, GRID, GRID, D)[:, top:top + H // P, left:left + W // P]
        return embedder(x_NCHW) + pos.reshape(1, -1, D)

    def unpatchify(self, x):
        x = x.reshape(x.shape[0], H // P, W // P, P, P, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, H, W)


def reference_sequence(model, noisy_FCHW, clean_FCHW, t_F, clip_ids):
    """Embeddings, positions, block kinds and frames in the reference order, no padding."""
    emb = model.llm.embed_tokens.weight
    mark = lambda name: emb[MARKERS[name]][None]
    tokens, blocks = [], []  # blocks: (noisy, clip, frame)
    num_clips = clip_ids.max() + 1
    for k in range(num_clips):
        frames = np.nonzero(clip_ids == k)[0]
        for f in frames:
            img = model.patches(model.x_embedder, noisy_FCHW[f:f + 1])[0]
            tokens.append(torch.cat([mark("<|diffusion|>"), model.time_token(t_F[f:f + 1]), img]))
            blocks.append((True, k, f))
        if k < num_clips - 1:  # the last clip appears only in noisy form
            for f in frames:
                img = model.patches(model.input_x_embedder, clean_FCHW[f:f + 1])[0]
                tokens.append(torch.cat([mark("<img>"), img, mark("</img>")]))
                blocks.append((False, k, f))
    positions = np.concatenate([f * L + np.arange(L) for _, _, f in blocks])
    return torch.cat(tokens), positions, blocks


def reference_mask(blocks):
    """The hierarchical mask written per block pair, from the official mask builder's rules."""
    n = len(blocks)
    mask = np.zeros((n * L, n * L), bool)
    clean_in_frame = np.zeros((L, L), bool)
    clean_in_frame[0, 0] = True                  # <img> sees only itself
    clean_in_frame[1:L - 1, :L - 1] = True       # image tokens: <img> and the frame's image
    clean_in_frame[L - 1] = True                 # </img> sees its whole block
    noisy_in_clip = np.zeros((L, L), bool)
    noisy_in_clip[:, 0] = True                   # <|diffusion|> seen by every row of the clip
    noisy_in_clip[1:, 1] = True                  # the t token by rows with offset >= 1
    noisy_in_clip[2:, 2:] = True                 # image tokens by rows with offset >= 2
    for i, (q_noisy, q_clip, q_frame) in enumerate(blocks):
        for j, (k_noisy, k_clip, k_frame) in enumerate(blocks):
            tile = mask[i * L:(i + 1) * L, j * L:(j + 1) * L]
            if not q_noisy and not k_noisy:
                if k_frame < q_frame:
                    tile[:] = True
                elif k_frame == q_frame:
                    tile[:] = clean_in_frame
            elif q_noisy and not k_noisy and k_clip < q_clip:
                tile[:] = True
            elif q_noisy and k_noisy and k_clip == q_clip:
                tile[:] = noisy_in_clip
    return mask


def official_rotary(model, phi3_config):
    """What the official attention does: rotary_emb(..., seq_len=5000) at every length."""
    rot = model.llm.rotary_emb
    inv, _ = ROPE_INIT_FUNCTIONS["longrope"](phi3_config, None, seq_len=5000)
    rot.original_inv_freq, rot.long_inv_freq = inv.clone(), inv.clone()


@torch.no_grad()
def reference_predictions(model, noisy, clean, t, clip_ids):
    """x1 predictions [F, h, w, C] of one sample, frame by frame."""
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    seq, positions, blocks = reference_sequence(model, to_t(noisy), to_t(clean),
                                                torch.from_numpy(t), clip_ids)
    additive = np.where(reference_mask(blocks), 0.0, np.finfo(np.float32).min)
    hidden = model.llm(inputs_embeds=seq[None], position_ids=torch.from_numpy(positions)[None],
                       attention_mask=torch.from_numpy(additive).float()[None, None]
                       ).last_hidden_state[0]
    out = np.zeros(noisy.shape, np.float32)
    for b, (is_noisy, _, f) in enumerate(blocks):
        if is_noisy:
            img = hidden[b * L + 2:(b + 1) * L][None]
            x = model.final_layer(img, model.t_embedder(torch.from_numpy(t[f:f + 1])))
            out[f] = model.unpatchify(x)[0].permute(1, 2, 0).numpy()
    return out


# ----------------------------------------------------------------------------- folder


def phi3_json(longrope: bool, rng) -> dict:
    cfg = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=VOCAB,
               hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=4 * ORIG_MAX,
               original_max_position_embeddings=ORIG_MAX, hidden_act="silu", rope_scaling=None,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if longrope:
        cfg["rope_scaling"] = dict(type="longrope",
                                   long_factor=(1 + 30 * rng.random(HALF)).tolist(),
                                   short_factor=(1 + 0.2 * rng.random(HALF)).tolist())
    return cfg


def write_folder(folder, config_json, state_dict):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_json, f)
    added = [dict(id=i, content=tok, special=True) for tok, i in MARKERS.items()]
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(dict(added_tokens=added, model=dict(type="BPE", vocab={"a": 3})), f)
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump(MARKERS, f)
    save_file({k: v.contiguous() for k, v in state_dict.items()},
              os.path.join(folder, convert_official.SAFETENSORS))


def official_model(config_json, seed):
    torch.manual_seed(seed)
    phi3 = Phi3Config(**config_json, attn_implementation="eager")
    model = OfficialVideoGPT(phi3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            elif name.startswith("llm."):  # O(1) attention logits: the mask and RoPE matter
                p.normal_(0.0, 0.15)
    return model, phi3


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    f = CLIP_IDS.shape[1]
    noisy = rng.normal(size=(2, f, H, W, C)).astype(np.float32)
    clean = rng.normal(size=(2, f, H, W, C)).astype(np.float32)
    t_clip = rng.random((2, f)).astype(np.float32)
    t = np.take_along_axis(t_clip, CLIP_IDS, axis=1)  # one t per clip
    return noisy, clean, t


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Official checkpoint folders without and with LongRoPE: {longrope: (folder, torch model)}."""
    out = {}
    for longrope in (False, True):
        config_json = phi3_json(longrope, np.random.default_rng(1))
        model, phi3 = official_model(config_json, seed=2)
        src = str(tmp_path_factory.mktemp("official"))
        write_folder(src, config_json, model.state_dict())
        out[longrope] = dict(src=src, torch_model=model, phi3=phi3)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["plain_rope", "longrope"])
def converted(request, folders, tmp_path_factory):
    folder = folders[request.param]
    out = str(tmp_path_factory.mktemp("export"))
    convert_official.convert(folder["src"], out, dtype="float32")
    ours, config = checkpoint.load_model(out)
    return dict(folder, longrope=request.param, ours=ours, config=config)


@nnx.jit
def _predict(model, blocks, t_blocks, lay):
    return model(blocks, t_blocks, lay, output_blocks=slice(0, None, 2))


def our_predictions(model, noisy, clean, t):
    b, f = t.shape
    blocks = np.stack([noisy, clean], axis=2).reshape(b, 2 * f, H, W, C)
    t_blocks = np.stack([t, np.ones_like(t)], axis=2).reshape(b, 2 * f)
    return np.asarray(_predict(model, blocks, t_blocks, layout.training_layout(CLIP_IDS, L)))


def test_converted_model_matches_official_forward(converted, inputs):
    noisy, clean, t = inputs
    model = converted["torch_model"]
    if converted["longrope"]:
        official_rotary(model, converted["phi3"])
    ours = our_predictions(converted["ours"], noisy, clean, t)
    for b in range(len(CLIP_IDS)):
        ref = reference_predictions(model, noisy[b], clean[b], t[b], CLIP_IDS[b])
        np.testing.assert_allclose(ours[b], ref, atol=1e-4, rtol=1e-4, err_msg=f"sample {b}")
    assert np.abs(ours).mean() > 0.1  # the comparison is not between near-zero outputs


def test_official_longrope_rule_is_always_long(converted, inputs):
    """Stock transformers uses the short factors for these short sequences; the official code
    (and our default) the long ones. The parity above would fail with the stock rule."""
    if not converted["longrope"]:
        pytest.skip("no LongRoPE in this checkpoint")
    mc = ModelConfig.from_config(converted["config"].model)
    assert mc.rope_scaling.factor_rule == "always_long"
    noisy, clean, t = inputs
    stock, _ = official_model(phi3_json(True, np.random.default_rng(1)), seed=2)
    ref = reference_predictions(stock, noisy[0], clean[0], t[0], CLIP_IDS[0])
    ours = our_predictions(converted["ours"], noisy, clean, t)[0]
    assert np.abs(ours - ref).max() > 1e-3


def test_config_and_markers(converted):
    model_cfg, phi3 = converted["config"].model, converted["phi3"]
    assert (model_cfg.num_layers, model_cfg.hidden_size, model_cfg.num_heads,
            model_cfg.num_kv_heads, model_cfg.mlp_dim) == (LAYERS, D, HEADS, KV_HEADS, MLP)
    assert (model_cfg.latent_channels, model_cfg.patch_size, model_cfg.pos_embed_grid) == (C, P, GRID)
    assert list(converted["config"].pretrained.marker_token_ids) == [37, 35, 36]
    rows = converted["torch_model"].llm.embed_tokens.weight.detach().numpy()[[37, 35, 36]]
    np.testing.assert_array_equal(np.asarray(converted["ours"].markers[...]), rows)
    if converted["longrope"]:
        rs = model_cfg.rope_scaling
        assert list(rs.long_factor) == phi3.rope_parameters["long_factor"]
        assert (rs.original_max_position_embeddings, rs.max_position_embeddings) == (
            ORIG_MAX, 4 * ORIG_MAX)


def test_cli_bfloat16_export(folders, tmp_path):
    from vgpt_jax.commands.convert_official import main
    out = str(tmp_path / "bf16")
    assert main(["--source", folders[True]["src"], "--output", out, "--dtype", "bfloat16"]) == 0
    model, config = checkpoint.load_model(out)
    assert config.model.param_dtype == "bfloat16" and config.model.dtype == "bfloat16"
    qkv = np.asarray(model.decoder.qkv_proj[...])
    assert qkv.dtype == np.dtype("bfloat16")
    assert config.model.rope_scaling.type == "longrope"
    sd = folders[True]["torch_model"].state_dict()
    expect = sd["llm.layers.1.self_attn.qkv_proj.weight"].T.bfloat16().float().numpy()
    np.testing.assert_array_equal(qkv[1].astype(np.float32), expect)


def test_load_pretrained_converts_once(folders, tmp_path, monkeypatch):
    calls = []
    real = convert_official.convert
    monkeypatch.setattr(convert_official, "convert",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    src = str(tmp_path / "src")
    shutil.copytree(folders[False]["src"], src)
    cache = str(tmp_path / "cache")
    model, _ = convert_official.load_pretrained(src, cache_dir=cache, dtype="float32")
    again, _ = convert_official.load_pretrained(src, cache_dir=cache, dtype="float32")
    assert len(calls) == 1
    expect = folders[False]["torch_model"].state_dict()["llm.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(np.asarray(model.decoder.o_proj[0]), expect.T.numpy())
    np.testing.assert_array_equal(np.asarray(again.decoder.o_proj[...]),
                                  np.asarray(model.decoder.o_proj[...]))
    os.utime(os.path.join(src, "config.json"), ns=(1, 1))  # a changed source converts again
    convert_official.load_pretrained(src, cache_dir=cache, dtype="float32")
    assert len(calls) == 2
    assert len(os.listdir(os.path.join(cache, "converted"))) == 2
    # The sampling pipeline's entry point uses the same cache.
    from vgpt_jax.pipeline import Pipeline
    from vgpt_jax.vae.latent_space import SpaceToDepth
    pipe = Pipeline.from_pretrained(src, cache_dir=cache, dtype="float32",
                                    latent_space=SpaceToDepth(1))
    assert len(calls) == 2
    assert pipe.config.latent_space.path == "stabilityai/sdxl-vae"
    np.testing.assert_array_equal(np.asarray(pipe.model.decoder.o_proj[...]),
                                  np.asarray(model.decoder.o_proj[...]))


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def source(folders):
    return folders[False]["src"]


def variant(src, dst, edit_state=None, drop=None):
    shutil.copytree(src, dst)
    if drop:
        os.remove(os.path.join(dst, drop))
    if edit_state:
        path = os.path.join(dst, convert_official.SAFETENSORS)
        sd = load_file(path)
        edit_state(sd)
        save_file(sd, path)
    return str(dst)


@pytest.mark.parametrize("drop, message", [
    ("config.json", "no config.json"),
    (convert_official.SAFETENSORS, "has no weights"),
    ("tokenizer.json", None),                 # added_tokens.json still names the markers
])
def test_missing_files(source, tmp_path, drop, message):
    folder = variant(source, tmp_path / "v", drop=drop)
    if message is None:
        assert convert_official.marker_token_ids(folder) == (37, 35, 36)
        return
    with pytest.raises(convert_official.ConversionError, match=message):
        convert_official.convert(folder, str(tmp_path / "out"))


def test_missing_marker_token(source, tmp_path):
    folder = variant(source, tmp_path / "v", drop="tokenizer.json")
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump({"<img>": 35, "</img>": 36}, f)
    with pytest.raises(convert_official.ConversionError, match=r"'<\|diffusion\|>' not found"):
        convert_official.convert(folder, str(tmp_path / "out"))


def _rename(sd, old, new):
    sd[new] = sd.pop(old)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("llm.layers.1.mlp.down_proj.weight"),
     r"missing keys \['llm.layers.1.mlp.down_proj.weight'\]"),
    (lambda sd: sd.__setitem__("llm.layers.2.mlp.down_proj.weight", torch.zeros(D, MLP)),
     r"unexpected keys \['llm.layers.2.mlp.down_proj.weight'\]"),
    (lambda sd: sd.__setitem__("t_embedder.mlp.2.weight", torch.zeros(D, D + 1)),
     r"mis-shaped keys \['t_embedder.mlp.2.weight: \(64, 65\) \(expected \(64, 64\)\)'\]"),
    (lambda sd: _rename(sd, "final_layer.linear.bias", "final_layer.linear.b"),
     r"missing keys \['final_layer.linear.bias'\], unexpected keys \['final_layer.linear.b'\]"),
])
def test_bad_state_dict_names_the_key(source, tmp_path, edit, message):
    folder = variant(source, tmp_path / "v", edit_state=edit)
    with pytest.raises(convert_official.ConversionError, match=message):
        convert_official.convert(folder, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # checked before anything is written


def test_bfloat16_source(source, folders, tmp_path):
    """Released checkpoints may store bf16 tensors (pos_embed included: checked to bf16 precision)."""
    def to_bf16(sd):
        for k in sd:
            sd[k] = sd[k].bfloat16()
    folder = variant(source, tmp_path / "v", edit_state=to_bf16)
    model, _ = convert_official.load_pretrained(folder, cache_dir=str(tmp_path / "c"),
                                                dtype="float32")
    emb = folders[False]["torch_model"].llm.embed_tokens.weight.detach()
    np.testing.assert_array_equal(np.asarray(model.markers[...]),
                                  emb[[37, 35, 36]].bfloat16().float().numpy())


def test_pos_embed_mismatch(source, tmp_path):
    def transpose_grid(sd):  # height channels first: a layout the model would misplace
        table = sd["pos_embed"].reshape(GRID, GRID, D)
        sd["pos_embed"] = table.transpose(0, 1).reshape(1, GRID * GRID, D).contiguous()
    folder = variant(source, tmp_path / "v", edit_state=transpose_grid)
    with pytest.raises(convert_official.ConversionError, match="'pos_embed' differs"):
        convert_official.convert(folder, str(tmp_path / "out"))


def test_rope_factor_rules():
    rng = np.random.default_rng(3)
    phi3 = phi3_json(True, rng)
    shapes = {"x_embedder.proj.weight": (D, C, P, P), "time_token.mlp.0.weight": (D, FREQ),
              "pos_embed": (1, GRID * GRID, D)}
    stock = convert_official.model_config_from_phi3(phi3, shapes, rope_factor_rule="by_length")
    assert stock.rope_scaling.factor_rule == "by_length"
    # With original_max >= 5000 the official seq_len=5000 picks the short factors everywhere.
    phi3["original_max_position_embeddings"] = 8192
    phi3["max_position_embeddings"] = 4 * 8192
    official = convert_official.model_config_from_phi3(phi3, shapes)
    assert official.rope_scaling.factor_rule == "always_long"
    assert list(official.rope_scaling.long_factor) == phi3["rope_scaling"]["short_factor"]
    phi3["rope_scaling"]["type"] = "dynamic"
    with pytest.raises(convert_official.ConversionError, match="rope_scaling type 'dynamic'"):
        convert_official.model_config_from_phi3(phi3, shapes)


# ----------------------------------------------------------------------------- layouts


def _split(sd):
    keys = sorted(sd)
    return [{k: sd[k] for k in keys[:len(keys) // 2]}, {k: sd[k] for k in keys[len(keys) // 2:]}]


def _save_shards(sd, folder, fmt):
    """Hugging Face sharding: two shard files and an index naming each key's shard."""
    names, weight_map = [], {}
    for i, part in enumerate(_split(sd)):
        name = fmt.format(i + 1)
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            save_file(part, path)
        else:
            torch.save(part, path)
        weight_map.update({k: name for k in part})
        names.append(name)
    index = "model.safetensors.index.json" if fmt.endswith("safetensors") else \
        "pytorch_model.bin.index.json"
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _bin_shard_folder(sd, folder):
    """The official script's layout: a folder named pytorch_model.bin holding .bin shards."""
    os.makedirs(os.path.join(folder, "pytorch_model.bin"))
    for i, part in enumerate(_split(sd)):
        torch.save(part, os.path.join(folder, "pytorch_model.bin", f"shard_{i}.bin"))


# name: (weights folder inside the checkpoint, writer, official prediction type)
LAYOUTS = {
    "transformer_safetensors": ("transformer", lambda sd, d: save_file(
        sd, os.path.join(d, "model.safetensors")), "x1"),
    "transformer_model_pt": ("transformer", lambda sd, d: torch.save(
        sd, os.path.join(d, "model.pt")), "v"),
    "transformer_pytorch_model_bin": ("transformer", lambda sd, d: torch.save(
        sd, os.path.join(d, "pytorch_model.bin")), "x1"),
    "transformer_bin_shards": ("transformer", _bin_shard_folder, "x1"),
    "safetensors_index": ("", lambda sd, d: _save_shards(sd, d, "model-{:05d}-of-00002.safetensors"),
                          "x1"),
    "bin_index": ("", lambda sd, d: _save_shards(sd, d, "pytorch_model-{:05d}-of-00002.bin"), "x1"),
}
TOKENIZER_AND_CONFIG = ("config.json", "tokenizer.json", "added_tokens.json")
VAE_PX = 2  # the tiny VAE's downsampling: latent 4x6 <-> pixels 8x12


def make_layout(base, folder, name, vae=False):
    """An official checkpoint folder with the base folder's weights in layout `name`."""
    sub, write, _ = LAYOUTS[name]
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for f in TOKENIZER_AND_CONFIG:
        shutil.copy(os.path.join(base, f), folder)
    sd = {k: v.contiguous() for k, v in load_file(os.path.join(base, "model.safetensors")).items()}
    write(sd, os.path.join(folder, sub))
    if vae:
        from vgpt_jax.vae.autoencoder_kl import AutoencoderKLConfig, init_autoencoder_kl
        cfg = AutoencoderKLConfig(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  latent_channels=C, scaling_factor=0.5)
        init_autoencoder_kl(cfg, seed=3).save_pretrained(os.path.join(folder, "vae"))
    return str(folder)


@pytest.fixture(scope="module")
def base_export(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base_export"))
    convert_official.convert(source, out, dtype="float32")
    return checkpoint.load_model(out)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param).to_pure_dict())


def _sample(model, prediction_type):
    ctx = np.random.default_rng(0).standard_normal((1, 2, H, W, C)).astype(np.float32)
    cfg = sampling.SamplerConfig(steps=2, window=4, prediction_type=prediction_type)
    return sampling.sample_video(model, [2], cfg, [0], context_BFhwc=ctx)


@pytest.mark.parametrize("vae", [False, True], ids=["no_vae", "vae"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_official_layout_converts(name, vae, source, base_export, tmp_path):
    folder = make_layout(source, tmp_path / "ckpt", name, vae=vae)
    config = convert_official.convert(folder, str(tmp_path / "out"), dtype="float32")
    assert config.objective.prediction_type == LAYOUTS[name][2]
    assert config.latent_space.path == ("vae" if vae else "stabilityai/sdxl-vae")
    assert os.path.isfile(tmp_path / "out" / "vae" / "config.json") == vae
    model, _ = checkpoint.load_model(str(tmp_path / "out"))
    for ours, base in zip(_params(model), _params(base_export[0])):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(base))
    out = _sample(model, config.objective.prediction_type)
    assert out.shape == (1, 2, H, W, C) and np.isfinite(out).all()


def test_pointing_at_the_weights_subfolder_or_naming_the_weights(source, tmp_path):
    """`--source ckpt/transformer` (the official --model_ckpt) finds config.json one level up;
    `--weights` takes weights from anywhere (the prediction type rule is by name: model.pt)."""
    folder = make_layout(source, tmp_path / "ckpt", "transformer_model_pt")
    config = convert_official.convert(os.path.join(folder, "transformer"), str(tmp_path / "a"))
    assert config.pretrained.weights == ["transformer/model.pt"]
    assert config.objective.prediction_type == "v"
    elsewhere = tmp_path / "runs" / "step_1000.pt"
    os.makedirs(elsewhere.parent)
    shutil.move(os.path.join(folder, "transformer", "model.pt"), elsewhere)
    with pytest.raises(convert_official.ConversionError, match="has no weights"):
        convert_official.convert(folder, str(tmp_path / "b"))
    config = convert_official.convert(folder, str(tmp_path / "b"), weights=str(elsewhere))
    assert config.objective.prediction_type == "x1"
    config = convert_official.convert(folder, str(tmp_path / "c"), weights=str(elsewhere),
                                      prediction_type="v")
    assert config.objective.prediction_type == "v" and config.pretrained.prediction_type_rule == "given"


def test_weights_in_two_places_is_an_error(source, tmp_path):
    folder = make_layout(source, tmp_path / "ckpt", "transformer_safetensors")
    shutil.copy(os.path.join(source, "model.safetensors"), folder)
    with pytest.raises(convert_official.ConversionError, match="both beside config.json and in"):
        convert_official.convert(folder, str(tmp_path / "out"))


class _Payload:
    """A pickle that would run code: it creates a folder when unpickled."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused(source, tmp_path, capsys):
    folder = make_layout(source, tmp_path / "ckpt", "transformer_model_pt")
    marker = str(tmp_path / "pwned")
    sd = torch.load(os.path.join(folder, "transformer", "model.pt"), weights_only=True)
    sd["llm.norm.weight"] = _Payload(marker)
    torch.save(sd, os.path.join(folder, "transformer", "model.pt"))
    with pytest.raises(convert_official.ConversionError,
                       match=r"refused to load .*model\.pt.*weights_only=True"):
        convert_official.convert(folder, str(tmp_path / "out"))
    from vgpt_jax.commands.convert_official import main
    assert main(["--source", folder, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to load" in err and "makedirs" in err
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out")


def test_cli_errors_are_one_line_and_summary_names_plain_rope(source, tmp_path, capsys):
    from vgpt_jax.commands.convert_official import main
    assert main(["--source", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neither a checkpoint folder" in err
    assert main(["--source", source, "--output", str(tmp_path / "o"), "--dtype", "float32"]) == 0
    line = capsys.readouterr().out.strip()
    assert "rope: none" in line and "prediction: x1" in line and "vae: stabilityai/sdxl-vae" in line


# ----------------------------------------------------------------------------- Pipeline.from_pretrained


@pytest.fixture
def no_network_no_vae(monkeypatch):
    """Every socket connection fails, and building any VAE is an error."""
    import socket

    from vgpt_jax.vae import autoencoder_kl

    def refuse(*a, **k):
        raise AssertionError("network access")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(autoencoder_kl, "load_autoencoder_kl",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("VAE built")))


def test_from_pretrained_model_pt_samples_v_unless_told_otherwise(source, tmp_path,
                                                                  no_network_no_vae):
    from vgpt_jax.pipeline import Pipeline
    folder = make_layout(source, tmp_path / "ckpt", "transformer_model_pt")
    cache = str(tmp_path / "cache")
    pipe = Pipeline.from_pretrained(folder, cache_dir=cache, dtype="float32", latent_space=None)
    assert pipe.latent_space is None and pipe.prediction_type == "v"
    ctx = np.random.default_rng(0).standard_normal((1, 2, H, W, C)).astype(np.float32)
    out = pipe.predict(ctx, clip_sizes=[2], steps=2, window=4, seed=0).latents
    np.testing.assert_allclose(out, _sample(pipe.model, "v"), rtol=1e-6, atol=1e-6)
    as_x1 = Pipeline.from_pretrained(folder, cache_dir=cache, dtype="float32", latent_space=None,
                                     prediction_type="x1")
    assert len(os.listdir(os.path.join(cache, "converted"))) == 1  # an override, not a new export
    out_x1 = as_x1.predict(ctx, clip_sizes=[2], steps=2, window=4, seed=0).latents
    np.testing.assert_allclose(out_x1, _sample(pipe.model, "x1"), rtol=1e-6, atol=1e-6)
    assert np.abs(out_x1 - out).max() > 1e-3


def test_from_pretrained_uses_the_bundled_vae(source, tmp_path):
    from vgpt_jax.pipeline import Pipeline
    from vgpt_jax.vae.latent_space import AutoencoderKLSpace
    folder = make_layout(source, tmp_path / "ckpt", "transformer_safetensors", vae=True)
    pipe = Pipeline.from_pretrained(folder, cache_dir=str(tmp_path / "cache"), dtype="float32")
    assert pipe.config.latent_space.path == "vae" and pipe.config.pretrained.vae == "vae"
    assert isinstance(pipe.latent_space, AutoencoderKLSpace) and pipe.prediction_type == "x1"
    assert pipe.latent_space.downsample == VAE_PX
    pixels = np.random.default_rng(1).integers(0, 256, (2, H * VAE_PX, W * VAE_PX, 3), np.uint8)
    out = pipe.predict(pixels, clip_sizes=[1], steps=1, window=4)
    assert out.frames.shape == (1, H * VAE_PX, W * VAE_PX, 3) and out.latents.shape == (1, H, W, C)
    # A converted export holds its own copy of the VAE: the source may go.
    export = convert_official.pretrained_export(folder, str(tmp_path / "cache"), "float32")
    shutil.rmtree(folder)
    again = Pipeline.from_checkpoint(export)
    np.testing.assert_array_equal(again.latent_space.decode(out.latents), out.frames)


# ----------------------------------------------------------------------------- LoRA


def write_adapter(folder, adapters, **config):
    """A peft LoRA folder as `save_pretrained` writes it: {module: (A, B)} torch tensors."""
    os.makedirs(folder, exist_ok=True)
    cfg = dict(peft_type="LORA", r=2, lora_alpha=6, target_modules=sorted(adapters),
               use_rslora=False, use_dora=False, bias="none", fan_in_fan_out=False,
               modules_to_save=None, rank_pattern={}, alpha_pattern={})
    cfg.update(config)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = {}
    for module, (a, b) in adapters.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    return str(folder)


def test_lora_merges_as_peft(source, tmp_path):
    """Linear (qkv_proj of layer 1) and Conv2d (the noisy patch embedder) adapters: converting
    with the adapter equals converting the weights merged by hand with peft's formulas
    (delta = B A; conv: a sum over the rank; scale alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    g = torch.Generator().manual_seed(0)
    r, alpha, qkv = 2, 6.0, "llm.layers.1.self_attn.qkv_proj"
    adapters = {qkv: (torch.randn(r, D, generator=g),
                      torch.randn((HEADS + 2 * KV_HEADS) * (D // HEADS), r, generator=g)),
                "x_embedder.proj": (torch.randn(r, C, P, P, generator=g),
                                    torch.randn(D, r, 1, 1, generator=g))}
    sd = load_file(os.path.join(source, "model.safetensors"))
    for rslora in (False, True):
        scale = alpha / np.sqrt(r) if rslora else alpha / r
        (a, b), (ca, cb) = adapters[qkv], adapters["x_embedder.proj"]
        merged = {qkv + ".weight": sd[qkv + ".weight"] + scale * (b @ a),
                  "x_embedder.proj.weight": sd["x_embedder.proj.weight"]
                  + scale * torch.einsum("or,rikl->oikl", cb[:, :, 0, 0], ca)}
        by_hand = variant(source, tmp_path / f"merged_{rslora}",
                          edit_state=lambda s: s.update(merged))
        convert_official.convert(by_hand, str(tmp_path / f"expect_{rslora}"), dtype="float32")
        lora = write_adapter(tmp_path / f"lora_{rslora}", adapters, use_rslora=rslora,
                             lora_alpha=alpha)
        config = convert_official.convert(source, str(tmp_path / f"ours_{rslora}"),
                                          dtype="float32", lora=lora)
        assert config.pretrained.lora == lora
        ours, _ = checkpoint.load_model(str(tmp_path / f"ours_{rslora}"))
        expect, _ = checkpoint.load_model(str(tmp_path / f"expect_{rslora}"))
        for x, y in zip(_params(ours), _params(expect)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    base = load_file(os.path.join(source, "model.safetensors"))["x_embedder.proj.weight"]
    assert (merged["x_embedder.proj.weight"] - base).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(modules_to_save=["final_layer.linear"]), "modules_to_save"),
    (dict(module="llm.layers.5.mlp.down_proj"), r"modules without a weight \['llm.layers.5"),
])
def test_unsupported_lora_is_refused(source, tmp_path, change, message):
    module = change.pop("module", "llm.layers.0.mlp.down_proj")
    lora = write_adapter(tmp_path / "lora", {module: (torch.zeros(2, MLP), torch.zeros(D, 2))},
                         **change)
    with pytest.raises(convert_official.ConversionError, match=message):
        convert_official.convert(source, str(tmp_path / "out"), lora=lora)


def test_hub_download_picks_what_the_official_order_picks():
    listing = ["config.json", "tokenizer.json", "transformer/model.pt",
               "transformer/model.safetensors", "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors", "README.md"]
    patterns = convert_official.hub_patterns(listing)
    assert "transformer/model.pt" in patterns and "vae/*" in patterns
    assert "transformer/model.safetensors" not in patterns and "model.pt" not in patterns
    sharded = convert_official.hub_patterns(["config.json", "pytorch_model.bin/a.bin"])
    assert "pytorch_model.bin/*.bin" in sharded
    offline = convert_official.hub_patterns(None)  # every candidate: a cached snapshot serves
    assert {"model.safetensors", "transformer/model.pt", "transformer/model-*.safetensors"} <= set(offline)
