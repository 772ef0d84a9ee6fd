"""Peak host memory of converting a phi3_mini-shaped official checkpoint (random weights).

    python benchmarks/convert_memory.py                      # bf16 source, bf16 export, in /tmp
    python benchmarks/convert_memory.py --dtype float32 --workdir /scratch/bench

Writes a random `model.safetensors` in the official layout (bfloat16, ~7.6 GB, streamed tensor
by tensor from a random pool so writing it needs little memory), a Phi-3 `config.json` and
tokenizer files, then runs `vgpt_jax.convert_official.convert` in a child process and samples
its memory every 50 ms: peak RSS (`ru_maxrss`), and the peaks of its anonymous memory (the real
cost: numpy/jax buffers) and file-backed pages (the memory-mapped source, reclaimable).
Skips with a note when the disk lacks room. Also prints the analytic sampling-memory table of
docs/pretrained.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax import convert_official  # noqa: E402
from vgpt_jax.config import ModelConfig, get_model_config  # noqa: E402
from vgpt_jax.model.video_gpt import pos_embed_2d  # noqa: E402

GiB = 1024**3
VOCAB = 32064
MARKER_IDS = {"<|diffusion|>": 32011, "<img>": 32012, "</img>": 32013}


def phi3_json(cfg: ModelConfig) -> dict:
    return dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=VOCAB,
                hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=131072, original_max_position_embeddings=4096,
                rope_scaling=dict(type="longrope", long_factor=[1.0] * (cfg.head_dim // 2),
                                  short_factor=[1.0] * (cfg.head_dim // 2)))


def write_random_safetensors(path: str, shapes: dict, fixed: dict, seed: int = 0) -> int:
    """A bf16 safetensors file written tensor by tensor; `fixed` tensors are given, the rest
    tile a 16M-value random pool. Returns the file size."""
    import ml_dtypes
    pool = (np.random.default_rng(seed).standard_normal(1 << 24, np.float32) * 0.02
            ).astype(ml_dtypes.bfloat16)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape in shapes.items():
            if key in fixed:
                f.write(np.ascontiguousarray(fixed[key], ml_dtypes.bfloat16).tobytes())
                continue
            left, start = int(np.prod(shape)), 0
            while left:
                n = min(left, pool.size - start)
                f.write(pool[start:start + n].tobytes())
                left, start = left - n, (start + n) % pool.size
    return os.path.getsize(path)


def make_source(folder: str, cfg: ModelConfig) -> int:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(phi3_json(cfg), f)
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump(MARKER_IDS, f)
    shapes = convert_official.expected_shapes(cfg, VOCAB)
    fixed = {"pos_embed": pos_embed_2d(cfg, cfg.pos_embed_grid, cfg.pos_embed_grid)[None]}
    fixed.update({k: np.ones(s, np.float32) for k, s in shapes.items() if k.endswith("norm.weight")})
    return write_random_safetensors(os.path.join(folder, convert_official.SAFETENSORS), shapes, fixed)


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure_conversion(source: str, output: str, dtype: str) -> dict:
    code = ("import sys; from vgpt_jax import convert_official; "
            "convert_official.convert(sys.argv[1], sys.argv[2], sys.argv[3])")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, source, output, dtype], env=env)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}

    def sample():
        while proc.poll() is None:
            try:
                for k, v in _status(proc.pid).items():
                    peaks[k] = max(peaks[k], v)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rc = proc.wait()
    sampler.join()
    if rc:
        raise SystemExit(f"conversion failed with exit code {rc}")
    return dict(seconds=time.time() - start,
                ru_maxrss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                peak_anon=peaks["RssAnon"], peak_file=peaks["RssFile"], peak_rss=peaks["VmRSS"])


def sampling_memory_table(cfg: ModelConfig, tokens_per_frame: int = 222, window: int = 80,
                          gen_frames: int = 24) -> list[str]:
    """The per-device memory of sampling (docs/pretrained.md), one batch element, CFG on."""
    n = cfg.num_params()
    kv_frame = cfg.num_layers * 2 * tokens_per_frame * cfg.num_kv_heads * cfg.head_dim
    history = window - gen_frames
    gen_tokens = gen_frames * tokens_per_frame
    full_tokens = window * tokens_per_frame
    d, m = cfg.hidden_size, cfg.mlp_dim
    # One layer's live activations (scan over layers): residual, qkv, attention output,
    # gate_up and SwiGLU product, in the compute dtype (2 bytes).
    act = lambda t: t * (2 * d + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                         + 2 * m + m) * 2
    rows = [f"params: {n / 1e9:.3f} B -> {n * 2 / GiB:.2f} GiB bf16, {n * 4 / GiB:.2f} GiB fp32",
            f"KV cache per frame (bf16): {cfg.num_layers} x 2 x {tokens_per_frame} x "
            f"{cfg.num_kv_heads * cfg.head_dim} x 2 B = {kv_frame * 2 / 2**20:.1f} MiB",
            f"KV cache of a {history}-frame history: {history * kv_frame * 2 / GiB:.2f} GiB "
            f"(CFG's unconditional branch needs no history)",
            f"activations, one layer live, {gen_tokens} generated tokens x 2 (CFG): "
            f"{2 * act(gen_tokens) / GiB:.2f} GiB",
            f"activations without cache ({full_tokens} + {gen_tokens} tokens per step): "
            f"{act(full_tokens + gen_tokens) / GiB:.2f} GiB",
            f"dense attention scores for {full_tokens} tokens (avoid: use blockwise/cuDNN/"
            f"splash): {full_tokens**2 * cfg.num_heads * 4 / GiB:.1f} GiB"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where to write (default: a /tmp temp dir)")
    p.add_argument("--dtype", default="bfloat16", choices=convert_official.OUTPUT_DTYPES)
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = p.parse_args(argv)
    cfg = ModelConfig.from_config(get_model_config("phi3_mini"))
    for row in sampling_memory_table(cfg):
        print(row)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vgpt_convert_bench.")
    os.makedirs(workdir, exist_ok=True)
    source_bytes = sum(int(np.prod(s)) * 2 for s in convert_official.expected_shapes(cfg, VOCAB).values())
    out_bytes = cfg.num_params() * (2 if args.dtype == "bfloat16" else 4)
    free = shutil.disk_usage(workdir).free
    if free < 1.1 * (source_bytes + out_bytes):
        print(f"SKIPPED: {workdir} has {free / GiB:.1f} GiB free, needs "
              f"{1.1 * (source_bytes + out_bytes) / GiB:.1f} GiB")
        return 0
    try:
        t0 = time.time()
        size = make_source(os.path.join(workdir, "official"), cfg)
        print(f"wrote a random {size / GiB:.2f} GiB bf16 model.safetensors in {time.time() - t0:.0f} s")
        r = measure_conversion(os.path.join(workdir, "official"), os.path.join(workdir, "export"),
                               args.dtype)
        print(f"converted to {args.dtype} in {r['seconds']:.0f} s: peak RSS {r['ru_maxrss'] / GiB:.2f} "
              f"GiB (sampled: anonymous {r['peak_anon'] / GiB:.2f} GiB, file-backed "
              f"{r['peak_file'] / GiB:.2f} GiB); output params {out_bytes / GiB:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
