"""Convert the released Video-GPT PyTorch checkpoint (`GrayShine/Video-GPT`) into a vgpt_jax export.

An official checkpoint is a folder with the Phi-3 `config.json` and the tokenizer files, and the
weights beside them or in a `transformer/` subfolder (the official inference script runs as
`--model_name ckpt --model_ckpt ckpt/transformer`), optionally with a diffusers VAE in `vae/`.
The weights are the state dict of `LVM/model.py` in one of, in the official script's order:
`model.pt`, `model.safetensors`, `pytorch_model.bin`, a `pytorch_model.bin/` folder of `.bin`
shards; Hugging Face's sharded `model.safetensors.index.json` and `pytorch_model.bin.index.json`
are accepted too. The keys:

    x_embedder.proj.{weight,bias}             Conv2d(C -> D, p, stride p), noisy frames
    input_x_embedder.proj.{weight,bias}       the same for clean frames
    time_token.mlp.{0,2}.{weight,bias}        Linear(256 -> D) -> SiLU -> Linear(D -> D)
    t_embedder.mlp.{0,2}.{weight,bias}        the final layer's time embedder
    final_layer.adaLN_modulation.1.{weight,bias}, final_layer.linear.{weight,bias}
    pos_embed                                 buffer [1, G*G, D]: the fixed 2-D sin-cos table
    llm.*                                     a transformers `Phi3Model`

Pickles (`.pt`, `.bin`) are read only with `torch.load(weights_only=True)`, which rebuilds
tensors and plain containers and runs no code from the file; a pickle that needs anything else
is refused.

`convert` streams the weights tensor by tensor into one preallocated numpy array per vgpt_jax
parameter (layer tensors stacked on the leading `layers` axis), so host memory stays near one
copy of the output; `load_pretrained` converts once into a cache keyed by the source files and
loads the export. The marker tokens are three rows of `llm.embed_tokens`, found by the
tokenizer files. The export records the prediction type (`objective.prediction_type`; the
official script samples `model.pt` weights as v-prediction, every other file as x1-prediction)
and the VAE (`latent_space`: a copy of the bundled `vae/`, else SDXL-VAE from the hub).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from vgpt_jax import checkpoint
from vgpt_jax.config import ModelConfig, get_model_config
from vgpt_jax.model.video_gpt import pos_embed_2d

CONVERTER_VERSION = 2
MARKER_TOKENS = ("<|diffusion|>", "<img>", "</img>")  # rows of `model.markers`, in this order
TORCH_PICKLE, SAFETENSORS, TORCH_BIN = "model.pt", "model.safetensors", "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# The official script tries model.pt, model.safetensors, pytorch_model.bin (a file, else a folder
# of .bin shards) in this order; the index files (Hugging Face sharding) come after their kind.
WEIGHT_FILES = (TORCH_PICKLE, SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
WEIGHTS_SUBFOLDER, VAE_SUBFOLDER = "transformer", "vae"
TOKENIZER_FILES = ("tokenizer.json", "added_tokens.json", "tokenizer_config.json")
CONFIG_FILES = ("config.json", *TOKENIZER_FILES, "special_tokens_map.json")
# The official model has an optional clean-input reconstruction head that inference never uses.
IGNORED_PREFIXES = ("input_final_layer.",)
# LVM/transform/sdpa_transform.py:52 calls rotary_emb(..., seq_len=5000): transformers 4.47 then
# picks the LongRoPE long factors whenever 5000 > original_max_position_embeddings.
OFFICIAL_ROPE_SEQ_LEN = 5000
ROPE_FACTOR_RULES = ("official", "by_length")
# The official pipeline's VAE when the checkpoint bundles none (`LVMPipeline.from_pretrained`);
# `Pipeline.from_checkpoint` builds it from this section of the export's config.
OFFICIAL_LATENT_SPACE = {"kind": "autoencoder_kl", "path": "stabilityai/sdxl-vae"}
OUTPUT_DTYPES = ("bfloat16", "float32")
PREDICTION_TYPES = ("x1", "v")


class ConversionError(ValueError):
    """The source folder or state dict does not match the official Video-GPT format."""


# ----------------------------------------------------------------------------- source files


@dataclasses.dataclass(frozen=True)
class SourceLayout:
    """Where an official checkpoint's files are."""
    root: str                   # the folder with config.json and the tokenizer files
    weights: tuple[str, ...]    # the tensor files: one, or the shards
    vae: str | None             # a bundled diffusers VAE folder

    @property
    def official_prediction_type(self) -> str:
        """The official script switches to v-prediction when it loads `model.pt`."""
        return "v" if [os.path.basename(w) for w in self.weights] == [TORCH_PICKLE] else "x1"

    def files(self) -> list[str]:
        """Every file the conversion reads (the cache fingerprint)."""
        found = [os.path.join(self.root, n) for n in CONFIG_FILES]
        if self.vae:
            found += [os.path.join(d, n) for d, _, names in os.walk(self.vae) for n in names]
        return sorted(p for p in found if os.path.isfile(p)) + list(self.weights)


def _index_shards(index_path: str) -> list[str]:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path!r} has no 'weight_map'")
    folder = os.path.dirname(index_path)
    shards = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if missing:
        raise ConversionError(f"{index_path!r} names the shard(s) {missing}, which are missing")
    return shards


def weights_in(folder: str) -> list[str] | None:
    """The tensor files of `folder` by the official order (`WEIGHT_FILES`), or None."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _index_shards(path) if name.endswith(".index.json") else [path]
    shard_dir = os.path.join(folder, TORCH_BIN)  # the official script's folder of .bin shards
    if os.path.isdir(shard_dir):
        shards = sorted(n for n in os.listdir(shard_dir) if n.endswith(".bin"))
        if not shards:
            raise ConversionError(f"{shard_dir!r} is a folder without .bin shards")
        return [os.path.join(shard_dir, n) for n in shards]
    return None


def weights_at(path: str) -> list[str]:
    """The tensor files named by `--weights`: a file (an index gives its shards) or a folder
    (its official weights file, else all its `.safetensors` or all its `.bin` files)."""
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return _index_shards(path)
        if not path.endswith((".safetensors", ".pt", ".bin", ".pth")):
            raise ConversionError(f"weights {path!r}: expected a .safetensors, .pt, .pth or "
                                  ".bin file, or a *.index.json")
        return [path]
    if not os.path.isdir(path):
        raise ConversionError(f"weights {path!r}: no such file or folder")
    found = weights_in(path)
    if found:
        return found
    for ext in (".safetensors", ".bin"):
        shards = sorted(n for n in os.listdir(path) if n.endswith(ext))
        if shards:
            return [os.path.join(path, n) for n in shards]
    raise ConversionError(f"weights folder {path!r} has no {', '.join(WEIGHT_FILES)}, "
                          f"{TORCH_BIN}/ shard folder, .safetensors or .bin files")


def locate(source: str, weights: str | None = None) -> SourceLayout:
    """Find config, weights and VAE as the official scripts do.

    `source`: the checkpoint folder (config.json and tokenizer), or its weights subfolder
    (config.json one level up, as `--model_ckpt ckpt/transformer`). Without `weights`, the
    weights are found beside config.json or in `transformer/`; finding both is an error.
    """
    if not os.path.isdir(source):
        raise ConversionError(f"source {source!r} is not a folder")
    root = source
    parent = os.path.dirname(os.path.abspath(source))
    if (not os.path.isfile(os.path.join(source, "config.json"))
            and os.path.isfile(os.path.join(parent, "config.json"))):
        root, weights = parent, source if weights is None else weights
    if weights is not None:
        files = weights_at(weights)
    else:
        found = {}
        for folder in (root, os.path.join(root, WEIGHTS_SUBFOLDER)):
            got = weights_in(folder) if os.path.isdir(folder) else None
            if got:
                found[folder] = got
        if len(found) > 1:
            raise ConversionError(f"{source!r} has weights both beside config.json and in "
                                  f"{WEIGHTS_SUBFOLDER}/: choose one with --weights")
        if not found:
            raise ConversionError(
                f"{source!r} has no weights: expected one of {', '.join(WEIGHT_FILES)} or a "
                f"{TORCH_BIN}/ folder of shards, beside config.json or in {WEIGHTS_SUBFOLDER}/ "
                "(or name them with --weights)")
        files = next(iter(found.values()))
    vae = os.path.join(root, VAE_SUBFOLDER)
    has_vae = os.path.isfile(os.path.join(vae, "config.json"))
    return SourceLayout(root, tuple(os.path.abspath(f) for f in files),
                        os.path.abspath(vae) if has_vae else None)


def read_phi3_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder!r} has no config.json (the Phi-3 config of the checkpoint)")
    with open(path) as f:
        return json.load(f)


def marker_token_ids(folder: str) -> tuple[int, int, int]:
    """Ids of `<|diffusion|>`, `<img>`, `</img>` from whichever tokenizer files exist; all agree."""
    found: dict[str, dict[str, int]] = {}

    def note(token, idx, source):
        if token in MARKER_TOKENS:
            found.setdefault(token, {})[source] = int(idx)

    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            data = json.load(f)
        if name == "tokenizer.json":
            for entry in data.get("added_tokens", []):
                note(entry.get("content"), entry.get("id"), name)
            vocab = (data.get("model") or {}).get("vocab")
            for token, idx in (vocab.items() if isinstance(vocab, dict) else ()):
                note(token, idx, name)
        elif name == "added_tokens.json":
            for token, idx in data.items():
                note(token, idx, name)
        else:
            for idx, entry in (data.get("added_tokens_decoder") or {}).items():
                note(entry.get("content"), idx, name)
    ids = []
    for token in MARKER_TOKENS:
        by_file = found.get(token)
        if not by_file:
            raise ConversionError(f"marker token {token!r} not found in the tokenizer files "
                                  f"{TOKENIZER_FILES} of {folder!r}")
        if len(set(by_file.values())) != 1:
            raise ConversionError(f"marker token {token!r} has conflicting ids {by_file}")
        ids.append(next(iter(by_file.values())))
    return tuple(ids)


# ----------------------------------------------------------------------------- tensors


def load_torch_pickle(path: str) -> dict:
    """A state dict from a `.pt` / `.bin` file via `torch.load(weights_only=True)` only."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path!r} is a PyTorch pickle: install torch to convert it "
                              "(or convert it to safetensors)") from e
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files in torch's legacy (pre-zip) format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ConversionError(f"{path!r} is not a PyTorch checkpoint ({e})") from e
        # torch's message is a page long; its line naming the offending global is the one that
        # matters.
        why = next((line.strip() for line in str(e).splitlines()
                    if "GLOBAL" in line or "Unsupported" in line), "")
        raise ConversionError(
            f"refused to load {path!r}: the pickle holds more than tensors ({why or 'see torch'}),"
            " and vgpt_jax reads pickles only with torch.load(weights_only=True), which runs no "
            "code from the file. If you trust the file, re-save its state dict as safetensors"
        ) from None
    except RuntimeError as e:
        raise ConversionError(f"{path!r} is not a readable PyTorch checkpoint ({e})") from e
    # Training scripts sometimes wrap the state dict; unwrap a single obvious container.
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) == 1:
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConversionError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if hasattr(v, "shape")}


class TensorSource:
    """Random access to the tensors of a checkpoint's files without loading all of it: shapes
    first, then one tensor (or a few rows of one) at a time, as numpy (bfloat16 via ml_dtypes)."""

    def __init__(self, files: Sequence[str]):
        self._safetensors, self._torch = {}, {}
        self._where: dict[str, str] = {}
        for path in files:
            if path.endswith(".safetensors"):
                from safetensors import safe_open
                handle = safe_open(path, framework="np")
                self._safetensors[path] = handle
                keys = handle.keys()
            else:
                self._torch[path] = load_torch_pickle(path)
                keys = self._torch[path].keys()
            for key in keys:
                if key in self._where:
                    raise ConversionError(f"tensor {key!r} is in two weights files: "
                                          f"{self._where[key]!r} and {path!r}")
                self._where[key] = path

    def keys(self):
        return self._where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        path = self._where[key]
        if path in self._torch:
            return tuple(self._torch[path][key].shape)
        return tuple(self._safetensors[path].get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        path = self._where[key]
        if path in self._torch:
            return _torch_to_numpy(self._torch[path][key])
        return self._safetensors[path].get_tensor(key)

    def read_rows(self, key: str, rows) -> np.ndarray:
        """Rows `rows` of a 2-D tensor (the marker rows of the 32k-row embedding table)."""
        path = self._where[key]
        if path in self._torch:
            return _torch_to_numpy(self._torch[path][key][list(rows)])
        sl = self._safetensors[path].get_slice(key)
        return np.concatenate([sl[r:r + 1] for r in rows], axis=0)

    def close(self):
        self._safetensors.clear()
        self._torch.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _torch_to_numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ----------------------------------------------------------------------------- config


def model_config_from_phi3(phi3: dict, shapes: dict, dtype: str = "bfloat16",
                           rope_factor_rule: str = "official") -> ml_collections.ConfigDict:
    """Our model ConfigDict from the Phi-3 `config.json` and the checkpoint's tensor shapes.

    Patch size, latent channels and the time-feature width come from the embedders' shapes,
    the position table's grid from `pos_embed`; every other tensor is checked against them.
    """
    if dtype not in OUTPUT_DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {OUTPUT_DTYPES}")
    if rope_factor_rule not in ROPE_FACTOR_RULES:
        raise ConversionError(f"rope_factor_rule={rope_factor_rule!r}: choose one of "
                              f"{ROPE_FACTOR_RULES}")
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in phi3]
    if missing:
        raise ConversionError(f"config.json: missing field(s) {missing}")
    d, heads = int(phi3["hidden_size"]), int(phi3["num_attention_heads"])
    if phi3.get("head_dim") not in (None, d // heads):
        raise ConversionError(f"config.json: head_dim={phi3['head_dim']} != hidden_size / "
                              f"num_attention_heads = {d // heads} (Phi-3 derives it)")
    if phi3.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor="
                              f"{phi3['partial_rotary_factor']} is not supported (Phi-3 uses 1.0)")
    if phi3.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act={phi3['hidden_act']!r}, expected 'silu'")
    for key, ndim in (("x_embedder.proj.weight", 4), ("time_token.mlp.0.weight", 2),
                      ("pos_embed", 3)):
        if key not in shapes or len(shapes[key]) != ndim:
            raise ConversionError(f"state dict: {key!r} is missing or not {ndim}-D "
                                  f"(shape {shapes.get(key)})")
    _, channels, patch, _ = shapes["x_embedder.proj.weight"]
    grid = math.isqrt(shapes["pos_embed"][1])
    if grid * grid != shapes["pos_embed"][1]:
        raise ConversionError(f"state dict: 'pos_embed' has {shapes['pos_embed'][1]} rows, not "
                              "a square grid")
    cfg = get_model_config("phi3_mini")
    cfg.update(dict(
        num_layers=int(phi3["num_hidden_layers"]), hidden_size=d, num_heads=heads,
        num_kv_heads=int(phi3.get("num_key_value_heads") or heads),
        mlp_dim=int(phi3["intermediate_size"]), rms_norm_eps=float(phi3.get("rms_norm_eps", 1e-5)),
        rope_theta=float(phi3.get("rope_theta")
                         or (phi3.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        latent_channels=int(channels), patch_size=int(patch),
        time_freq_dim=int(shapes["time_token.mlp.0.weight"][1]), pos_embed_grid=grid,
        dtype=dtype, param_dtype=dtype))
    cfg.rope_scaling = _rope_scaling(phi3, rope_factor_rule)
    ModelConfig.from_config(cfg)  # validate now: errors name the field
    return cfg


def _rope_scaling(phi3: dict, rule: str) -> ml_collections.ConfigDict:
    rs = get_model_config("phi3_mini").rope_scaling
    scaling = phi3.get("rope_scaling") or phi3.get("rope_parameters") or None
    kind = (scaling or {}).get("type", (scaling or {}).get("rope_type", "default"))
    if kind == "default":
        return rs
    if kind not in ("longrope", "su"):
        raise ConversionError(f"config.json: rope_scaling type {kind!r} is not supported (only "
                              "Phi-3 LongRoPE: 'longrope' / 'su')")
    long_f, short_f = list(scaling["long_factor"]), list(scaling["short_factor"])
    orig = int(phi3.get("original_max_position_embeddings")
               or scaling.get("original_max_position_embeddings") or 4096)
    if rule == "official":
        rule = "always_long"
        if OFFICIAL_ROPE_SEQ_LEN <= orig:
            # The official seq_len=5000 then selects the short factors at every length; storing
            # them as the "long" set makes always_long reproduce that exactly.
            long_f = short_f
    # The attention factor is derived from max/orig as the official transformers 4.47 does;
    # a `factor` / `attention_factor` field (newer transformers only) is not read.
    rs.update(dict(type="longrope", long_factor=long_f, short_factor=short_f,
                   original_max_position_embeddings=orig,
                   max_position_embeddings=int(phi3.get("max_position_embeddings", orig)),
                   factor_rule=rule))
    return rs


# ----------------------------------------------------------------------------- key mapping


def expected_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict and its shape, for a model config."""
    d, c, p, m = cfg.hidden_size, cfg.latent_channels, cfg.patch_size, cfg.mlp_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    out = {"pos_embed": (1, cfg.pos_embed_grid**2, d), "llm.embed_tokens.weight": (vocab_size, d),
           "llm.norm.weight": (d,)}
    for name in ("x_embedder", "input_x_embedder"):
        out[f"{name}.proj.weight"], out[f"{name}.proj.bias"] = (d, c, p, p), (d,)
    for name in ("time_token", "t_embedder"):
        out.update({f"{name}.mlp.0.weight": (d, cfg.time_freq_dim), f"{name}.mlp.0.bias": (d,),
                    f"{name}.mlp.2.weight": (d, d), f"{name}.mlp.2.bias": (d,)})
    out.update({"final_layer.adaLN_modulation.1.weight": (2 * d, d),
                "final_layer.adaLN_modulation.1.bias": (2 * d,),
                "final_layer.linear.weight": (p * p * c, d), "final_layer.linear.bias": (p * p * c,)})
    for i in range(cfg.num_layers):
        pre = f"llm.layers.{i}."
        out.update({pre + "self_attn.qkv_proj.weight": (qkv, d),
                    pre + "self_attn.o_proj.weight": (d, cfg.num_heads * cfg.head_dim),
                    pre + "mlp.gate_up_proj.weight": (2 * m, d),
                    pre + "mlp.down_proj.weight": (d, m),
                    pre + "input_layernorm.weight": (d,),
                    pre + "post_attention_layernorm.weight": (d,)})
    return out


def check_state_dict(shapes: dict, expected: dict, where: str) -> None:
    """One error naming every missing, unexpected and mis-shaped key."""
    keys = {k for k in shapes if not k.startswith(IGNORED_PREFIXES)}
    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
    wrong = [f"{k}: {tuple(shapes[k])} (expected {expected[k]})" for k in sorted(expected)
             if k in keys and tuple(shapes[k]) != tuple(expected[k])]
    if missing or extra or wrong:
        show = lambda xs: f"{xs[:20]}{f' and {len(xs) - 20} more' if len(xs) > 20 else ''}"
        raise ConversionError(f"state dict of {where!r} does not match the official Video-GPT "
                              f"layout: missing keys {show(missing)}, unexpected keys "
                              f"{show(extra)}, mis-shaped keys {show(wrong)}")


def _conv_to_kernel(w):
    """Conv2d weight [D, C, p, q] -> our patch kernel [(p, q, c), D]."""
    d = w.shape[0]
    return w.transpose(2, 3, 1, 0).reshape(-1, d)


def _linear(w):
    return w.T  # torch Linear stores [out, in]


_identity = lambda w: w

# (our parameter path, official key, transform); the decoder's entries are per-layer templates.
_SINGLE = [(("noisy_embed", "proj", "kernel"), "x_embedder.proj.weight", _conv_to_kernel),
           (("noisy_embed", "proj", "bias"), "x_embedder.proj.bias", _identity),
           (("clean_embed", "proj", "kernel"), "input_x_embedder.proj.weight", _conv_to_kernel),
           (("clean_embed", "proj", "bias"), "input_x_embedder.proj.bias", _identity),
           (("final_layer", "adaln", "kernel"), "final_layer.adaLN_modulation.1.weight", _linear),
           (("final_layer", "adaln", "bias"), "final_layer.adaLN_modulation.1.bias", _identity),
           (("final_layer", "linear", "kernel"), "final_layer.linear.weight", _linear),
           (("final_layer", "linear", "bias"), "final_layer.linear.bias", _identity),
           (("decoder", "final_norm"), "llm.norm.weight", _identity)]
_SINGLE += [entry for name in ("time_token", "t_embedder") for fc, idx in (("fc1", 0), ("fc2", 2))
            for entry in (((name, fc, "kernel"), f"{name}.mlp.{idx}.weight", _linear),
                          ((name, fc, "bias"), f"{name}.mlp.{idx}.bias", _identity))]
# Largest first: the numpy buffer being filled is biggest while little else is held yet.
_PER_LAYER = [(("decoder", "gate_up_proj"), "mlp.gate_up_proj.weight", _linear),
              (("decoder", "down_proj"), "mlp.down_proj.weight", _linear),
              (("decoder", "qkv_proj"), "self_attn.qkv_proj.weight", _linear),
              (("decoder", "o_proj"), "self_attn.o_proj.weight", _linear),
              (("decoder", "input_norm"), "input_layernorm.weight", _identity),
              (("decoder", "post_attention_norm"), "post_attention_layernorm.weight", _identity)]


def check_pos_embed(table: np.ndarray, cfg: ModelConfig) -> None:
    """The official buffer must equal our `pos_embed_2d` table (grid, base size, channel order)."""
    import ml_dtypes
    ours = pos_embed_2d(cfg, cfg.pos_embed_grid, cfg.pos_embed_grid)
    theirs = np.asarray(table, np.float32).reshape(ours.shape)
    # Up to the rounding of the stored dtype (bf16 rounds values in [-1, 1] by < 4e-3).
    atol = max(1e-4, 2 * float(ml_dtypes.finfo(table.dtype).eps))
    err = np.abs(theirs - ours)
    if not err.max() <= atol:
        row = int(np.argmax(err.max(axis=1)))
        raise ConversionError(
            f"'pos_embed' differs from vgpt_jax's 2-D sin-cos table (max |diff| {err.max():.3g} "
            f"> {atol:.1g}, first at grid cell {divmod(row, cfg.pos_embed_grid)}): the official "
            f"table is a {cfg.pos_embed_grid}^2 grid with coordinates i/(grid/"
            f"{cfg.pos_embed_base_size}), width channels first; a different grid, base size or "
            "channel layout would place image tokens wrongly")


def convert_tensors(src: TensorSource, cfg: ModelConfig, marker_ids, dtype) -> dict:
    """The params pure dict (jax arrays, `dtype`), filled one parameter at a time."""
    params: dict = {}

    def put(path, value):
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        # device_put copies; the numpy buffer is dropped right after, so one parameter at most
        # exists twice.
        node[path[-1]] = jax.device_put(value)

    for path, suffix, fn in _PER_LAYER:
        first = fn(src.read(f"llm.layers.0.{suffix}"))
        stacked = np.empty((cfg.num_layers, *first.shape), dtype)
        stacked[0] = first
        for i in range(1, cfg.num_layers):
            stacked[i] = fn(src.read(f"llm.layers.{i}.{suffix}"))
        put(path, stacked)
        del first, stacked
    for path, key, fn in _SINGLE:
        put(path, fn(src.read(key)).astype(dtype))
    put(("markers",), src.read_rows("llm.embed_tokens.weight", marker_ids).astype(dtype))
    return params


# ----------------------------------------------------------------------------- entry points


def convert(source_dir: str, output_dir: str, dtype: str = "bfloat16",
            rope_factor_rule: str = "official", *, weights: str | None = None,
            prediction_type: str | None = None,
            lora: str | None = None) -> ml_collections.ConfigDict:
    """Convert an official checkpoint into a vgpt_jax export (config.json + params/ [+ vae/]).

    source_dir: the checkpoint folder, or its weights subfolder (see `locate`). weights: the
    tensor file(s) when they are elsewhere or named otherwise. prediction_type: "x1" or "v";
    None takes the official script's rule (v for `model.pt`, else x1). lora: a peft LoRA
    folder merged into the weights as the official `merge_lora` does (`vgpt_jax.peft_lora`).
    Returns the export's config: `model`, `latent_space` (the bundled VAE, copied into the
    export, else SDXL-VAE), `objective.prediction_type` and the `pretrained` provenance. All
    checks (config, tokenizer, every key and shape, the position table) run before any weight
    is read.
    """
    import ml_dtypes
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ConversionError(f"prediction_type={prediction_type!r}: choose one of "
                              f"{PREDICTION_TYPES}")
    layout = locate(source_dir, weights)
    phi3 = read_phi3_config(layout.root)
    marker_ids = marker_token_ids(layout.root)
    where = layout.weights[0] if len(layout.weights) == 1 else os.path.dirname(layout.weights[0])
    with TensorSource(layout.weights) as src:
        shapes = {k: src.shape(k) for k in src.keys()}
        model_cfg_dict = model_config_from_phi3(phi3, shapes, dtype, rope_factor_rule)
        cfg = ModelConfig.from_config(model_cfg_dict)
        vocab = int(phi3.get("vocab_size", shapes.get("llm.embed_tokens.weight", (0,))[0]))
        check_state_dict(shapes, expected_shapes(cfg, vocab), where)
        bad = [(t, i) for t, i in zip(MARKER_TOKENS, marker_ids) if not 0 <= i < vocab]
        if bad:
            raise ConversionError(f"marker token ids {bad} are outside the embedding table "
                                  f"(vocab_size={vocab})")
        if lora is not None:
            from vgpt_jax import peft_lora  # it builds on this module's TensorSource
            src = peft_lora.MergedSource(src, peft_lora.read_adapter(lora), lora)
        check_pos_embed(src.read("pos_embed"), cfg)
        np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        params = convert_tensors(src, cfg, marker_ids, np_dtype)
    # A relative latent-space path is relative to the export (`Pipeline.from_checkpoint`).
    latent_space = ({"kind": "autoencoder_kl", "path": VAE_SUBFOLDER} if layout.vae
                    else dict(OFFICIAL_LATENT_SPACE))
    root = os.path.abspath(layout.root)
    config = ml_collections.ConfigDict({
        "model": model_cfg_dict, "latent_space": latent_space,
        "objective": {"prediction_type": prediction_type or layout.official_prediction_type}})
    config.pretrained = ml_collections.ConfigDict(dict(
        source=root, weights=[os.path.relpath(w, root) for w in layout.weights],
        vae=os.path.relpath(layout.vae, root) if layout.vae else OFFICIAL_LATENT_SPACE["path"],
        prediction_type_rule="official" if prediction_type is None else "given",
        marker_token_ids=list(marker_ids), rope_factor_rule=rope_factor_rule,
        lora=os.path.abspath(lora) if lora else None, converter_version=CONVERTER_VERSION))
    checkpoint.export_model(output_dir, _model_with_params(cfg, params), config)
    if layout.vae:  # copied: the export stays usable when the source moves or goes
        shutil.copytree(layout.vae, os.path.join(output_dir, VAE_SUBFOLDER), dirs_exist_ok=True)
    return config


def _model_with_params(cfg: ModelConfig, params: dict):
    """A VideoGPT holding `params` without allocating a random initialisation first."""
    graphdef, abstract_params, rest = nnx.split(checkpoint.abstract_model(cfg), nnx.Param, ...)
    abstract_params.replace_by_pure_dict(params)
    return nnx.merge(graphdef, abstract_params, rest)


def hub_patterns(names: Sequence[str] | None) -> list[str]:
    """What to download of a hub repo: config, tokenizer, `vae/`, and in the root and in
    `transformer/` the weights the official order picks from the listing `names` (every
    candidate when the listing is unavailable, e.g. offline with a cached snapshot)."""
    patterns = list(CONFIG_FILES) + [f"{VAE_SUBFOLDER}/*"]
    shard_globs = {SAFETENSORS_INDEX: "model-*.safetensors", TORCH_BIN_INDEX: "pytorch_model-*.bin"}
    for prefix in ("", WEIGHTS_SUBFOLDER + "/"):
        candidates = [*WEIGHT_FILES, TORCH_BIN + "/"]
        if names is not None:
            present = set(names)
            candidates = [n for n in candidates if prefix + n in present
                          or (n.endswith("/") and any(p.startswith(prefix + n) for p in present))]
            candidates = candidates[:1]
        for name in candidates:
            patterns.append(prefix + (name + "*.bin" if name.endswith("/") else name))
            if name in shard_globs:
                patterns.append(prefix + shard_globs[name])
    return patterns


def resolve_source(path_or_repo: str, cache_dir: str | None = None) -> str:
    """A local folder as is; a Hugging Face repo id (`owner/name`) via `snapshot_download`,
    with its `transformer/` and `vae/` subfolders."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    if os.path.exists(path_or_repo) or path_or_repo.startswith((".", "/", "~")) or \
            not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_repo):
        raise ConversionError(f"{path_or_repo!r} is neither a checkpoint folder nor a Hugging "
                              "Face repo id (owner/name)")
    from huggingface_hub import list_repo_files, snapshot_download
    try:
        names = list_repo_files(path_or_repo)
    except Exception:  # offline or unreachable: a cached snapshot may still serve every pattern
        names = None
    try:
        return snapshot_download(path_or_repo, cache_dir=cache_dir,
                                 allow_patterns=hub_patterns(names))
    except Exception as e:  # the hub's errors are many types; the user needs one line
        raise ConversionError(f"could not download {path_or_repo!r} from the Hugging Face hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                              " pass a local checkpoint folder instead") from e


def source_fingerprint(layout: SourceLayout, *options, extra_files: Sequence[str] = ()) -> str:
    """Cache key: the source files' (and `extra_files'`) resolved paths, sizes and mtimes plus
    the options (hashing 7.5 GB of weights would cost more than converting; hub snapshots
    resolve to content-hashed blobs, so their paths already change with the content)."""
    entries = []
    for path in [*layout.files(), *extra_files]:
        st = os.stat(path)
        entries.append((os.path.abspath(path), os.path.realpath(path), st.st_size,
                        st.st_mtime_ns))
    blob = json.dumps([entries, list(options), CONVERTER_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _peft_files(folder: str) -> list[str]:
    from vgpt_jax import peft_lora
    return peft_lora.adapter_files(folder)


def default_cache_dir() -> str:
    return os.environ.get("VGPT_JAX_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "vgpt_jax"))


def is_export(path: str) -> bool:
    """A vgpt_jax export or training workdir (as opposed to an official checkpoint folder)."""
    return os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)) or \
        os.path.isdir(os.path.join(path, checkpoint.CHECKPOINTS_DIR))


def pretrained_export(path_or_repo: str, cache_dir: str | None = None, dtype: str = "bfloat16",
                      rope_factor_rule: str = "official", *, weights: str | None = None,
                      lora: str | None = None) -> str:
    """The folder of the converted export of an official checkpoint, converting on first use.

    `path_or_repo`: an official checkpoint folder (or its weights subfolder) or a hub repo id
    (`GrayShine/Video-GPT`); `weights` and `lora` as in `convert`. The export lands in
    `cache_dir/converted/<fingerprint>`; a changed source file or option converts again. It
    records the official prediction type; `Pipeline.from_pretrained` can override it without
    converting again.
    """
    cache_dir = cache_dir or default_cache_dir()
    source = resolve_source(path_or_repo, os.path.join(cache_dir, "hub"))
    lora_files = () if lora is None else _peft_files(lora)
    key = source_fingerprint(locate(source, weights), dtype, rope_factor_rule,
                             extra_files=lora_files)
    target = os.path.join(cache_dir, "converted", key)
    if not os.path.isfile(os.path.join(target, checkpoint.CONFIG_FILE)):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", dir=os.path.dirname(target))
        try:
            convert(source, staging, dtype, rope_factor_rule, weights=weights, lora=lora)
            os.replace(staging, target)  # atomic: a crash never leaves a half-written cache entry
        except OSError:
            if not os.path.isfile(os.path.join(target, checkpoint.CONFIG_FILE)):
                raise  # not a lost race with another process converting the same source
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_pretrained(path_or_repo: str, cache_dir: str | None = None, dtype: str = "bfloat16",
                    rope_factor_rule: str = "official", shardings=None, *,
                    weights: str | None = None, lora: str | None = None):
    """(model, config) of the released weights, converted on first use and cached (see
    `pretrained_export`); `shardings` is passed to `checkpoint.load_model`."""
    return checkpoint.load_model(pretrained_export(path_or_repo, cache_dir, dtype,
                                                   rope_factor_rule, weights=weights,
                                                   lora=lora), shardings)
