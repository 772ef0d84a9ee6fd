"""Official peft LoRA adapters, merged into the official weights while they are converted.

The official pipeline's `merge_lora(path)` loads a peft LoRA folder onto the model and merges it
(`PeftModel.from_pretrained(model, path).merge_and_unload()`). Such a folder holds
`adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`) with, for each
adapted module `<m>` of the official model (`llm.layers.3.self_attn.qkv_proj`, `x_embedder.proj`,
...), `base_model.model.<m>.lora_A.weight` and `base_model.model.<m>.lora_B.weight`:

    Linear  weight [out, in]:        A [r, in],        B [out, r]         delta = B @ A
    Conv2d  weight [out, in, p, q]:  A [r, in, p, q],  B [out, r, 1, 1]   delta[o] = sum_r B[o, r] A[r]

Merging adds `scale * delta` to `<m>.weight`, with scale = alpha / r (alpha / sqrt(r) under
`use_rslora`), r the adapter's rank (from A's shape, so `rank_pattern` needs nothing more) and
alpha `lora_alpha` or the `alpha_pattern` entry matching the module name. The sum is formed in
float32 and rounded to the stored weight dtype, as peft merges on the CPU. Adapters this does not
merge exactly are refused by name: DoRA, LoRA biases, embedding adapters, `modules_to_save`,
`fan_in_fan_out`.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from vgpt_jax.convert_official import ConversionError, TensorSource
from vgpt_jax.lora import lora_scale

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def adapter_files(folder: str) -> list[str]:
    """The adapter's config and weights file (what the conversion cache fingerprints)."""
    config = os.path.join(folder, ADAPTER_CONFIG)
    weights = [os.path.join(folder, n) for n in ADAPTER_WEIGHTS
               if os.path.isfile(os.path.join(folder, n))]
    if not os.path.isfile(config) or not weights:
        raise ConversionError(f"LoRA {folder!r}: expected a peft adapter folder with "
                              f"{ADAPTER_CONFIG} and one of {ADAPTER_WEIGHTS}")
    return [config, weights[0]]


def _alpha(config: dict, module: str) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    return float(config["lora_alpha"])


def read_adapter(folder: str) -> dict[str, np.ndarray]:
    """{official weight key: scale * delta (float32, the weight's shape)} of a peft LoRA folder."""
    config_path, weights_path = adapter_files(folder)
    with open(config_path) as f:
        config = json.load(f)
    where = f"LoRA {folder!r}"
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{where}: peft_type={config['peft_type']!r}, only LORA merges")
    for field, why in (("use_dora", "DoRA rescales the merged weight"),
                       ("lora_bias", "LoRA biases"), ("fan_in_fan_out", "fan_in_fan_out"),
                       ("modules_to_save", "modules_to_save (full copies of modules)")):
        if config.get(field):
            raise ConversionError(f"{where}: {field}={config[field]!r} is not supported ({why})")
    if config.get("bias", "none") != "none":
        raise ConversionError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with TensorSource([weights_path]) as src:
        for key in src.keys():
            m = _KEY.match(key)
            if m is None:
                raise ConversionError(f"{where}: tensor {key!r} is not a LoRA A/B matrix (embedding "
                                      "adapters and other peft tensors are not supported)")
            pairs.setdefault(m["module"], {})[m["ab"]] = np.asarray(src.read(key), np.float32)
    deltas = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{where}: module {module!r} has lora_{''.join(ab)} only")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if b.shape[1] != rank or (b.ndim == 4 and b.shape[2:] != (1, 1)) or a.ndim != b.ndim:
            raise ConversionError(f"{where}: module {module!r}: lora_A {a.shape} and lora_B "
                                  f"{b.shape} do not form a Linear or Conv2d adapter")
        alpha = _alpha(config, module)
        scale = lora_scale(alpha, rank, bool(config.get("use_rslora")))
        delta = np.einsum("or,ri...->oi...", b.reshape(b.shape[0], rank), a)
        deltas[module + ".weight"] = (scale * delta).astype(np.float32)
    if not deltas:
        raise ConversionError(f"{where}: {os.path.basename(weights_path)} holds no LoRA tensors")
    return deltas


class MergedSource:
    """A TensorSource whose adapted weights read as weight + scale * delta (rounded to the
    weight's stored dtype); everything else passes through."""

    def __init__(self, base: TensorSource, deltas: dict[str, np.ndarray], where: str):
        missing = sorted(k for k in deltas if k not in base.keys())
        wrong = [f"{k}: delta {d.shape} vs weight {base.shape(k)}" for k, d in sorted(deltas.items())
                 if k in base.keys() and tuple(d.shape) != tuple(base.shape(k))]
        if missing or wrong:
            raise ConversionError(f"LoRA {where!r} does not fit the checkpoint: modules without a "
                                  f"weight {missing}, mis-shaped {wrong}")
        self.base, self.deltas = base, deltas

    def keys(self):
        return self.base.keys()

    def shape(self, key: str):
        return self.base.shape(key)

    def read(self, key: str) -> np.ndarray:
        w = self.base.read(key)
        if key not in self.deltas:
            return w
        return (w.astype(np.float32) + self.deltas[key]).astype(w.dtype)

    def read_rows(self, key: str, rows) -> np.ndarray:
        return self.base.read_rows(key, rows)  # embedding adapters are refused by read_adapter
