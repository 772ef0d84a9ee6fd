"""The diffusers `AutoencoderKL` in Flax NNX and its diffusers-format loader/saver.

The latent space over it (`AutoencoderKLSpace`) lives with the interface, in `vgpt_jax.vae.latent_space`.

Architecture follows diffusers 0.42 (`models/autoencoders/{autoencoder_kl,vae}.py`, `resnet.py`,
`attention_processor.py`, `downsampling.py`, `upsampling.py`), but channels-last (NHWC) throughout:

  Encoder: conv_in -> DownEncoderBlock2D* (ResnetBlock2D x layers_per_block, Downsample2D except last)
           -> mid (resnet, single-head self-attention, resnet) -> GroupNorm -> SiLU -> conv_out (2*latent)
  Decoder: conv_in -> mid -> UpDecoderBlock2D* (ResnetBlock2D x (layers_per_block+1), Upsample2D except last)
           -> GroupNorm -> SiLU -> conv_out
  quant_conv / post_quant_conv: 1x1 convs, optional (`use_quant_conv`, `use_post_quant_conv`).

Parameter paths mirror the diffusers state-dict keys (`encoder.down_blocks.0.resnets.1.conv1.weight`), so
loading is a rename of the leaf (`kernel`/`scale` <-> `weight`) plus a layout change:
conv OIHW <-> HWIO, linear [out, in] <-> [in, out].
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vgpt_jax import noise

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose layout this mirrors; written into saved configs


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The fields of a diffusers `AutoencoderKL` config.json that this port implements."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32  # only used by diffusers' tiling; kept for round trips
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Any = None
    latents_std: Any = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):  # keeps the config hashable (it is static in the nnx graphdef)
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"AutoencoderKL config: down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(f"AutoencoderKL config: unsupported block type(s) {sorted(set(bad))}; only "
                             "DownEncoderBlock2D / UpDecoderBlock2D are implemented")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"AutoencoderKL config: unsupported act_fn {self.act_fn!r}; only 'silu' is implemented")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"AutoencoderKL config: block_out_channels {odd} not divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if self.latents_mean is not None or self.latents_std is not None:
            raise ValueError("AutoencoderKL config: per-channel latents_mean/latents_std are not supported; "
                             "use scaling_factor/shift_factor")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "AutoencoderKLConfig":
        """Parse a diffusers config dict; `_`-prefixed bookkeeping keys are ignored, unknown keys rejected."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unsupported AutoencoderKL config field(s) {unknown}")
        cls_name = d.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"{source}: _class_name is {cls_name!r}, expected 'AutoencoderKL'")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        d = {"_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION}
        for k, v in dataclasses.asdict(self).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d


# ----------------------------------------------------------------------------------------------- layers
class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC; statistics in float32 so bfloat16 inference stays stable."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        n, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        xg = (xg - mean) * jax.lax.rsqrt(var + self.eps)
        y = xg.reshape(n, h, w, c) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def _conv(cin, cout, k, rngs, stride=1, padding=None):
    pad = ((k // 2, k // 2),) * 2 if padding is None else padding
    return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=pad, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: norm-silu-conv twice, 1x1 shortcut when cin != cout."""

    def __init__(self, cin, cout, groups, rngs):
        self.norm1 = GroupNorm(cin, groups)
        self.conv1 = _conv(cin, cout, 3, rngs)
        self.norm2 = GroupNorm(cout, groups)
        self.conv2 = _conv(cout, cout, 3, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """The VAE mid-block attention: GroupNorm, one head of width C over all H*W positions, residual."""

    def __init__(self, c, groups, rngs):
        self.group_norm = GroupNorm(c, groups)
        self.to_q = nnx.Linear(c, c, rngs=rngs)
        self.to_k = nnx.Linear(c, c, rngs=rngs)
        self.to_v = nnx.Linear(c, c, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(c, c, rngs=rngs)])  # index 0 keeps the diffusers key `to_out.0`

    def __call__(self, x):
        n, h, w, c = x.shape
        t = self.group_norm(x).reshape(n, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        # diffusers upcasts the softmax; keep logits in float32 for bf16 runs too.
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(c)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = self.to_out[0](jnp.einsum("bqk,bkc->bqc", p, v))
        return x + o.reshape(n, h, w, c)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv after diffusers' asymmetric zero pad (right/bottom only, `padding=0`)."""

    def __init__(self, c, rngs):
        self.conv = _conv(c, c, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x, then 3x3 conv."""

    def __init__(self, c, rngs):
        self.conv = _conv(c, c, 3, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin, cout, layers, groups, add_downsample, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, rngs) for i in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, rngs)]) if add_downsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin, cout, layers, groups, add_upsample, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, rngs) for i in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, rngs)]) if add_upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class UNetMidBlock2D(nnx.Module):
    def __init__(self, c, groups, add_attention, rngs):
        self.resnets = nnx.List([ResnetBlock2D(c, c, groups, rngs), ResnetBlock2D(c, c, groups, rngs)])
        self.attentions = nnx.List([Attention(c, groups, rngs)]) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, rngs)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention, rngs)
        self.conv_norm_out = GroupNorm(ch[-1], g)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, rngs):
        rev, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, rev[0], 3, rngs)
        self.mid_block = UNetMidBlock2D(rev[0], g, cfg.mid_block_add_attention, rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < len(rev) - 1, rngs)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(rev[-1], g)
        self.conv_out = _conv(rev[-1], cfg.out_channels, 3, rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


def _posterior_sample(mean, logvar, key):
    """The posterior mean (key None) or a reparameterised sample, mean + sigma * eps."""
    if key is None:
        return mean
    return mean + jnp.exp(0.5 * logvar) * noise.normal(key, mean.shape, mean.dtype)


class AutoencoderKL(nnx.Module):
    """KL autoencoder. Pixels are NHWC in [-1, 1]; latents `z` are unscaled (scaling is the space's job)."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config, rngs)
        self.decoder = Decoder(config, rngs)
        self.quant_conv = _conv(2 * c, 2 * c, 1, rngs) if config.use_quant_conv else None
        self.post_quant_conv = _conv(c, c, 1, rngs) if config.use_post_quant_conv else None

    def encode_moments(self, x_NHW3):
        """[N, H, W, in] in [-1, 1] -> (mean, logvar), each [N, H/d, W/d, latent]; logvar clamped as diffusers."""
        h = self.encoder(x_NHW3)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, x_NHW3, key=None):
        """Posterior mean (key None) or a reparameterised sample, [N, h, w, latent]."""
        return _posterior_sample(*self.encode_moments(x_NHW3), key)

    def decode(self, z_NhwC):
        """[N, h, w, latent] -> [N, h*d, w*d, out], nominally in [-1, 1] (not clipped)."""
        if self.post_quant_conv is not None:
            z_NhwC = self.post_quant_conv(z_NhwC)
        return self.decoder(z_NhwC)

    def __call__(self, x_NHW3, key=None):
        """Reconstruction and posterior: (recon [N,H,W,out], mean, logvar)."""
        mean, logvar = self.encode_moments(x_NHW3)
        return self.decode(_posterior_sample(mean, logvar, key)), mean, logvar

    # ------------------------------------------------------------------------------------ diffusers I/O
    def save_pretrained(self, folder: str) -> None:
        """Write `config.json` + `diffusion_pytorch_model.safetensors` that diffusers and `load_autoencoder_kl` read."""
        from safetensors.numpy import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {key: _to_torch_layout(np.asarray(arr, np.float32)) for key, arr in _flat_params(self).items()}
        save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)


def init_autoencoder_kl(config: AutoencoderKLConfig, seed: int = 0) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL with torch's default init, drawn with numpy.

    Conv/linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's kaiming_uniform(a=sqrt(5)));
    norms at identity. On CPU this takes milliseconds, where flax's initialisers cost ~1 s of compile per
    distinct shape eagerly and ~15 s under one jit.
    """
    model = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    fan_in = {}
    for path, var in flat:  # kernels first so biases can reuse their layer's fan_in
        if path[-1] == "kernel":
            fan_in[path[:-1]] = int(np.prod(var.get_value().shape[:-1]))
    for path, var in flat:
        shape = var.get_value().shape
        if path[-1] in ("kernel", "bias") and path[:-1] in fan_in:
            bound = 1.0 / np.sqrt(fan_in[path[:-1]])
            val = rng.uniform(-bound, bound, shape)
        else:  # GroupNorm scale / bias
            val = np.ones(shape) if path[-1] == "scale" else np.zeros(shape)
        var.set_value(jnp.asarray(val, jnp.float32))
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------------------- weight mapping
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Pre-0.15 diffusers attention names, still present in some hub checkpoints.
_LEGACY_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """diffusers state-dict key -> our array (our layout)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *mods, leaf = (str(p) for p in path)
        out[".".join(mods + [_LEAF_TO_TORCH[leaf]])] = var[...]
    return out


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # HWIO -> OIHW
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if a.ndim == 2:  # [in, out] -> [out, in]
        return np.ascontiguousarray(a.T)
    return a


def _from_torch_layout(t: np.ndarray, ours_ndim: int) -> np.ndarray:
    if ours_ndim == 2 and t.ndim == 4 and t.shape[2:] == (1, 1):
        t = t[:, :, 0, 0]  # attention projections stored as 1x1 convs in old checkpoints
    if t.ndim == 4:
        return t.transpose(2, 3, 1, 0)
    if t.ndim == 2:
        return t.T
    return t


def _resolve_folder(path_or_repo: str, subfolder: str | None) -> str:
    if os.path.isdir(path_or_repo):
        folder = os.path.join(path_or_repo, subfolder) if subfolder else path_or_repo
    elif os.path.exists(path_or_repo) or path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise FileNotFoundError(f"VAE folder {path_or_repo!r} does not exist (and is not a hub repo id 'org/name')")
    else:  # a hub repo id
        from huggingface_hub import snapshot_download

        pre = f"{subfolder}/" if subfolder else ""
        root = snapshot_download(path_or_repo, allow_patterns=[pre + CONFIG_NAME, pre + WEIGHTS_NAME])
        folder = os.path.join(root, subfolder) if subfolder else root
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{os.path.join(folder, name)}: not found (expected a diffusers AutoencoderKL "
                                    f"folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    return folder


def load_autoencoder_kl(path_or_repo: str, *, subfolder: str | None = None, seed: int = 0) -> AutoencoderKL:
    """Load a diffusers-format AutoencoderKL from a local folder or a hub repo id (e.g. `stabilityai/sdxl-vae`).

    Raises FileNotFoundError when config/weights are absent, ValueError listing missing, unexpected and
    mis-shaped keys when the safetensors file does not match the config.
    """
    from safetensors.numpy import load_file

    folder = _resolve_folder(path_or_repo, subfolder)
    cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    with open(cfg_path) as f:
        config = AutoencoderKLConfig.from_dict(json.load(f), source=cfg_path)
    # Abstract init: every parameter is overwritten from the file, so skip running the initialisers.
    model = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(seed)))
    torch_sd = load_file(w_path)
    for old, new in _LEGACY_ATTN.items():
        torch_sd = {k.replace(old, new): v for k, v in torch_sd.items()}

    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    expected = {}
    for path, var in flat:
        *mods, leaf = (str(p) for p in path)
        expected[".".join(mods + [_LEAF_TO_TORCH[leaf]])] = (path, var)
    missing = sorted(set(expected) - set(torch_sd))
    unexpected = sorted(set(torch_sd) - set(expected))
    new_values, misshaped = {}, []
    for key, (path, var) in expected.items():
        if key not in torch_sd:
            continue
        shape = tuple(var.get_value().shape)  # a ShapeDtypeStruct here (abstract model)
        arr = _from_torch_layout(np.asarray(torch_sd[key]), len(shape))
        if arr.shape != shape:
            misshaped.append(f"{key}: file {tuple(torch_sd[key].shape)} vs model "
                             f"{tuple(_to_torch_layout(np.zeros(shape, np.int8)).shape)}")
            continue
        new_values[path] = arr.astype(np.float32)
    if missing or unexpected or misshaped:
        parts = [f"{w_path} does not match {cfg_path}:"]
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
            if keys:
                parts.append(f"  {name} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise ValueError("\n".join(parts))
    for path, var in flat:
        var.set_value(jnp.asarray(new_values[path]))
    nnx.update(model, state)
    return model
