"""Convert the released Video-GPT PyTorch checkpoint (`GrayShine/Video-GPT`) into a vgpt_jax export.

The official folder holds a Phi-3 `config.json`, tokenizer files and `model.safetensors` (or a
sharded `model.safetensors.index.json`, or `model.pt`) with the state dict of `LVM/model.py`:

    x_embedder.proj.{weight,bias}             Conv2d(C -> D, p, stride p), noisy frames
    input_x_embedder.proj.{weight,bias}       the same for clean frames
    time_token.mlp.{0,2}.{weight,bias}        Linear(256 -> D) -> SiLU -> Linear(D -> D)
    t_embedder.mlp.{0,2}.{weight,bias}        the final layer's time embedder
    final_layer.adaLN_modulation.1.{weight,bias}, final_layer.linear.{weight,bias}
    pos_embed                                 buffer [1, G*G, D]: the fixed 2-D sin-cos table
    llm.*                                     a transformers `Phi3Model`

`convert` streams it tensor by tensor into one preallocated numpy array per vgpt_jax parameter
(layer tensors stacked on the leading `layers` axis), so host memory stays near one copy of the
output; `load_pretrained` converts once into a cache keyed by the source files and loads the
export. The marker tokens are three rows of `llm.embed_tokens`, found by the tokenizer files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
from flax import nnx

from vgpt_jax import checkpoint
from vgpt_jax.config import ModelConfig, get_model_config
from vgpt_jax.model.video_gpt import pos_embed_2d

CONVERTER_VERSION = 1
MARKER_TOKENS = ("<|diffusion|>", "<img>", "</img>")  # rows of `model.markers`, in this order
SAFETENSORS, SAFETENSORS_INDEX, TORCH_PICKLE = (
    "model.safetensors", "model.safetensors.index.json", "model.pt")
TOKENIZER_FILES = ("tokenizer.json", "added_tokens.json", "tokenizer_config.json")
HUB_PATTERNS = ["config.json", *TOKENIZER_FILES, "special_tokens_map.json", "model.safetensors*",
                "model-*.safetensors", "model.pt"]
# The official model has an optional clean-input reconstruction head that inference never uses.
IGNORED_PREFIXES = ("input_final_layer.",)
# LVM/transform/sdpa_transform.py:52 calls rotary_emb(..., seq_len=5000): transformers 4.47 then
# picks the LongRoPE long factors whenever 5000 > original_max_position_embeddings.
OFFICIAL_ROPE_SEQ_LEN = 5000
ROPE_FACTOR_RULES = ("official", "by_length")
# The released model's latents: SDXL-VAE (video_gpt.md section 2); `Pipeline.from_checkpoint`
# builds it from this section of the export's config.
OFFICIAL_LATENT_SPACE = {"kind": "autoencoder_kl", "path": "stabilityai/sdxl-vae"}
OUTPUT_DTYPES = ("bfloat16", "float32")


class ConversionError(ValueError):
    """The source folder or state dict does not match the official Video-GPT format."""


# ----------------------------------------------------------------------------- source files


def find_weights(folder: str) -> str:
    for name in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_PICKLE):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ConversionError(f"{folder!r} has no weights: expected one of {SAFETENSORS}, "
                          f"{SAFETENSORS_INDEX} or {TORCH_PICKLE}")


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


class TensorSource:
    """Random access to the tensors of a checkpoint without loading all of it: shapes first,
    then one tensor (or a few rows of one) at a time, as numpy (bfloat16 via ml_dtypes)."""

    def __init__(self, weights_path: str):
        self.path = weights_path
        self._files, self._torch = {}, None
        self._where: dict[str, str] = {}
        if weights_path.endswith(".pt"):
            self._open_torch(weights_path)
        else:
            self._open_safetensors(weights_path)

    def _open_safetensors(self, path):
        from safetensors import safe_open
        if path.endswith(".json"):
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
            folder = os.path.dirname(path)
            files = {s: os.path.join(folder, s) for s in shards}
        else:
            files = {os.path.basename(path): path}
        for name, file_path in files.items():
            if not os.path.isfile(file_path):
                raise ConversionError(f"{path!r} names the shard {name!r}, which is missing")
            handle = safe_open(file_path, framework="np")
            self._files[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def _open_torch(self, path):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"{path!r} is a PyTorch pickle: install torch to convert it "
                                  "(or convert it to model.safetensors)") from e
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        # Training scripts sometimes wrap the state dict; unwrap a single obvious container.
        for wrapper in ("state_dict", "module", "model"):
            if isinstance(state.get(wrapper), dict) and len(state) == 1:
                state = state[wrapper]
        self._torch = state
        self._where = {k: TORCH_PICKLE for k, v in state.items() if hasattr(v, "shape")}

    def keys(self):
        return self._where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        if self._torch is not None:
            return tuple(self._torch[key].shape)
        return tuple(self._files[self._where[key]].get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        if self._torch is not None:
            return _torch_to_numpy(self._torch[key])
        return self._files[self._where[key]].get_tensor(key)

    def read_rows(self, key: str, rows) -> np.ndarray:
        """Rows `rows` of a 2-D tensor (the marker rows of the 32k-row embedding table)."""
        if self._torch is not None:
            return _torch_to_numpy(self._torch[key][list(rows)])
        sl = self._files[self._where[key]].get_slice(key)
        return np.concatenate([sl[r:r + 1] for r in rows], axis=0)

    def close(self):
        self._files.clear()
        self._torch = None

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
            rope_factor_rule: str = "official") -> ml_collections.ConfigDict:
    """Convert an official checkpoint folder into a vgpt_jax export (config.json + params/).

    Returns the export's config (`model` section plus the `pretrained` provenance). All checks
    (config, tokenizer, every key and shape, the position table) run before any weight is read.
    """
    import ml_dtypes
    if not os.path.isdir(source_dir):
        raise ConversionError(f"source {source_dir!r} is not a folder")
    phi3 = read_phi3_config(source_dir)
    marker_ids = marker_token_ids(source_dir)
    weights = find_weights(source_dir)
    with TensorSource(weights) as src:
        shapes = {k: src.shape(k) for k in src.keys()}
        model_cfg_dict = model_config_from_phi3(phi3, shapes, dtype, rope_factor_rule)
        cfg = ModelConfig.from_config(model_cfg_dict)
        vocab = int(phi3.get("vocab_size", shapes.get("llm.embed_tokens.weight", (0,))[0]))
        check_state_dict(shapes, expected_shapes(cfg, vocab), weights)
        bad = [(t, i) for t, i in zip(MARKER_TOKENS, marker_ids) if not 0 <= i < vocab]
        if bad:
            raise ConversionError(f"marker token ids {bad} are outside the embedding table "
                                  f"(vocab_size={vocab})")
        check_pos_embed(src.read("pos_embed"), cfg)
        np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        params = convert_tensors(src, cfg, marker_ids, np_dtype)
    config = ml_collections.ConfigDict({"model": model_cfg_dict,
                                        "latent_space": dict(OFFICIAL_LATENT_SPACE)})
    config.pretrained = ml_collections.ConfigDict(dict(
        source=os.path.abspath(source_dir), weights=os.path.basename(weights),
        marker_token_ids=list(marker_ids), rope_factor_rule=rope_factor_rule,
        converter_version=CONVERTER_VERSION))
    checkpoint.export_model(output_dir, _model_with_params(cfg, params), config)
    return config


def _model_with_params(cfg: ModelConfig, params: dict):
    """A VideoGPT holding `params` without allocating a random initialisation first."""
    graphdef, abstract_params, rest = nnx.split(checkpoint.abstract_model(cfg), nnx.Param, ...)
    abstract_params.replace_by_pure_dict(params)
    return nnx.merge(graphdef, abstract_params, rest)


def resolve_source(path_or_repo: str, cache_dir: str | None = None) -> str:
    """A local folder as is; a Hugging Face repo id (`owner/name`) via `snapshot_download`."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    if os.path.exists(path_or_repo) or path_or_repo.startswith((".", "/", "~")) or \
            not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_repo):
        raise ConversionError(f"{path_or_repo!r} is neither a checkpoint folder nor a Hugging "
                              "Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_repo, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)


def source_fingerprint(folder: str, dtype: str, rope_factor_rule: str) -> str:
    """Cache key: the source files' resolved paths, sizes and mtimes plus the options (hashing
    7.5 GB of weights would cost more than converting; hub snapshots resolve to content-hashed
    blobs, so their paths already change with the content)."""
    entries = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            st = os.stat(path)
            entries.append((name, os.path.realpath(path), st.st_size, st.st_mtime_ns))
    blob = json.dumps([entries, dtype, rope_factor_rule, CONVERTER_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("VGPT_JAX_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "vgpt_jax"))


def is_export(path: str) -> bool:
    """A vgpt_jax export or training workdir (as opposed to an official checkpoint folder)."""
    return os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)) or \
        os.path.isdir(os.path.join(path, checkpoint.CHECKPOINTS_DIR))


def pretrained_export(path_or_repo: str, cache_dir: str | None = None, dtype: str = "bfloat16",
                      rope_factor_rule: str = "official") -> str:
    """The folder of the converted export of an official checkpoint, converting on first use.

    `path_or_repo`: an official checkpoint folder or a hub repo id (`GrayShine/Video-GPT`).
    The export lands in `cache_dir/converted/<fingerprint>`; a changed source or option
    converts again.
    """
    cache_dir = cache_dir or default_cache_dir()
    source = resolve_source(path_or_repo, os.path.join(cache_dir, "hub"))
    target = os.path.join(cache_dir, "converted", source_fingerprint(source, dtype,
                                                                     rope_factor_rule))
    if not os.path.isfile(os.path.join(target, checkpoint.CONFIG_FILE)):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", dir=os.path.dirname(target))
        try:
            convert(source, staging, dtype, rope_factor_rule)
            os.replace(staging, target)  # atomic: a crash never leaves a half-written cache entry
        except OSError:
            if not os.path.isfile(os.path.join(target, checkpoint.CONFIG_FILE)):
                raise  # not a lost race with another process converting the same source
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_pretrained(path_or_repo: str, cache_dir: str | None = None, dtype: str = "bfloat16",
                    rope_factor_rule: str = "official", shardings=None):
    """(model, config) of the released weights, converted on first use and cached (see
    `pretrained_export`); `shardings` is passed to `checkpoint.load_model`."""
    return checkpoint.load_model(
        pretrained_export(path_or_repo, cache_dir, dtype, rope_factor_rule), shardings)
