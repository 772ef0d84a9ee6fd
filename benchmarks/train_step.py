"""Train-step throughput: vgpt_jax (jit, AdamW) against the PyTorch stack the official code uses.

JAX: the training loop's own step (`train.build_step`: embedders, Phi-3 decoder, head, x1 loss,
clipping, AdamW; jit with explicit shardings, state donated) of a model preset on a 16-frame
clip sequence, on one device or a `--mesh` of `--cpu-devices`. PyTorch reference, in the same
run: transformers `Phi3Model` of the same width and depth with the same dense additive mask and positions, trained with
AdamW on an MSE over its hidden states (the decoder is >95% of the FLOPs), eager and under
`torch.compile`. Prints tokens/s, achieved GFLOP/s (analytic count, attention counted over the
keys the mask actually lets each query see), MFU against a matmul peak measured here, the
JAX / PyTorch ratios, and memory: the compiled JAX step's peak (XLA buffer assignment) and the
process's peak resident set after each row (cumulative, so rows run JAX first). The benchmark
runs as `vgpt` runs on the CPU, with glibc backing large blocks with huge pages, the PyTorch
rows too (`vgpt_jax.host_memory`: it re-runs itself once with the tunable set;
`--no-huge-pages` leaves glibc's default).

    python benchmarks/train_step.py --model small --frames 16 --latent 16 --batch 1
    python benchmarks/train_step.py --layers 8 --width 512 --heads 8 --mlp 1536
    python benchmarks/train_step.py --mode 48f      # 48 frames of 16x16 latents (6336 tokens)
    python benchmarks/train_step.py --mode stage4   # 80 frames of 40x22 SDXL latents (35520)
    python benchmarks/train_step.py --mode 48f --cpu-devices 2 --mesh tensor=2  # heads split
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import measured_matmul_peak, profile_breakdown  # noqa: E402
from vgpt_jax import (attention, attention_cpu, config, host_memory, layout,  # noqa: E402
                      sharding, train)

# Stage 4 trains on 320x176 video; the SDXL VAE (8x down) gives 40x22 latent frames.
MODES = {"16f": dict(frames=16, latent_hw=(16, 16)), "48f": dict(frames=48, latent_hw=(16, 16)),
         "stage4": dict(frames=80, latent_hw=(22, 40))}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


PROFILE_STEPS = 2
# Op groups of a profile, by the source names the ops carry (attention's tile loops are named).
PROFILE_GROUPS = {"attention forward": "blockwise_attention_fwd",
                  "attention backward": "blockwise_attention_bwd"}


def jax_step_seconds(train_cfg, batch, mesh_sizes, repeats, profile_dir=None):
    """The training loop's own step (`train.build_step`: jit with explicit shardings, state
    donated) on a mesh of `mesh_sizes` over the first devices. With `profile_dir`, then traces
    `PROFILE_STEPS` more steps there and also returns their `profile_breakdown`."""
    for axis, size in mesh_sizes.items():
        train_cfg.mesh.ici[axis] = size
    n = int(np.prod(list(mesh_sizes.values()) or [1]))
    setup = train.build_step(train_cfg, jax.devices()[:n])
    state = setup.init()
    batch = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = setup.step_fn.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes) / 2**30
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(2 + repeats):  # 2 warm-up steps; the state is donated: each feeds the next
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    profile = None
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(PROFILE_STEPS):
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
        profile = profile_breakdown(profile_dir, compiled.as_text(), PROFILE_STEPS,
                                    PROFILE_GROUPS)
    return float(np.median(times[2:])), compile_s, peak, profile


def print_profile(profile, step_s):
    per_group, ops, busy, cores, running = profile
    print(f"\nprofile: {busy * 1e3:.0f} ms of op time per step on {cores} cores "
          f"({busy / (step_s * cores):.0%} busy over the {step_s * 1e3:.0f} ms step); ops "
          f"running at once: none {running[0] * 1e3:.0f} ms, one {running[1] * 1e3:.0f} ms, two "
          f"or more {running[2] * 1e3:.0f} ms")
    for label, sec in sorted(per_group.items(), key=lambda kv: -kv[1]):
        print(f"  {label:20s} {sec * 1e3:8.1f} ms  {sec / busy:6.1%}")
    print("  largest ops (self time per step, calls per step, op, source):")
    for sec, calls, name, src in ops:
        print(f"  {sec * 1e3:8.1f} ms {calls:6d}x  {name:32s} {src[-70:]}")


def torch_step_seconds(cfg, positions, mask_bool, compiled, repeats):
    import torch
    from transformers import Phi3Config, Phi3Model

    torch.manual_seed(0)
    hf = Phi3Config(hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                    rope_theta=cfg.rope_theta, max_position_embeddings=int(positions.max()) + 1,
                    vocab_size=16, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                    attn_implementation="sdpa")
    model = Phi3Model(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5,
                            weight_decay=0.1)
    b, t = mask_bool.shape[:2]
    embeds = torch.randn(b, t, cfg.hidden_size)
    target = torch.randn(b, t, cfg.hidden_size)
    pos = torch.as_tensor(np.array(positions), dtype=torch.long)
    mask = torch.zeros(b, 1, t, t)
    mask.masked_fill_(~torch.as_tensor(np.array(mask_bool))[:, None], torch.finfo(torch.float32).min)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        loss = ((out - target) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    if compiled:
        step = torch.compile(step)
    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    for _ in range(1):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), compile_s, float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=config.MODEL_PRESETS)
    p.add_argument("--mode", choices=MODES, help="frames and latent size of a named setting")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=16, help="latent frame side (h = w)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention", default="blockwise",
                   choices=("auto", "dense", "blockwise", "dot_product"))
    p.add_argument("--no-cpu-kernel", action="store_true",
                   help="blockwise attention in JAX's tile loops, not the native CPU kernel")
    p.add_argument("--tile", type=int, default=0,
                   help="blockwise attention tile, tokens (0: AttentionConfig's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=0, help="override the depth (0: preset)")
    p.add_argument("--width", type=int, default=0, help="override the hidden size (0: preset)")
    p.add_argument("--heads", type=int, default=0, help="override the heads (= kv heads)")
    p.add_argument("--mlp", type=int, default=0, help="override the MLP width (0: preset)")
    p.add_argument("--unrolled", action="store_true", help="a Python loop over layers, no scan")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="split the host's CPU into this many JAX devices, for --mesh (on the "
                        "2-core build machine, tensor=2 over 2 was no faster than one device)")
    p.add_argument("--mesh", default="", help="mesh sizes, e.g. tensor=2 (heads split) or "
                                              "fsdp=2 (batch split); default one device")
    p.add_argument("--profile", metavar="DIR", help="trace the JAX step into DIR (TensorBoard's "
                                                    "profile plugin reads it) and print where "
                                                    "its time goes")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="leave glibc's allocator as it is (default: re-run with "
                        "vgpt_jax.host_memory's huge pages, as the vgpt commands do on the CPU)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true")
    args = p.parse_args(argv)
    if not args.no_huge_pages:
        host_memory.restart_with_huge_pages()
    huge = host_memory.TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    if args.cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    mesh_sizes = sharding.parse_mesh(args.mesh)

    train_cfg = config.get_train_config(args.model)
    train_cfg.mesh.ici.fsdp = 1
    mc = train_cfg.model
    mc.attention.impl = args.attention
    mc.attention.blockwise_cpu_kernel = not args.no_cpu_kernel
    if args.tile:
        mc.attention.blockwise_tile = args.tile
    mc.dtype = args.dtype
    for field, value in (("num_layers", args.layers), ("hidden_size", args.width),
                         ("num_heads", args.heads), ("num_kv_heads", args.heads),
                         ("mlp_dim", args.mlp)):
        if value:
            mc[field] = value
    mc.scan_layers = not args.unrolled
    cfg = config.ModelConfig.from_config(mc)
    rng = np.random.default_rng(0)
    f, (h, w) = (args.frames, (args.latent, args.latent)) if not args.mode else (
        MODES[args.mode]["frames"], MODES[args.mode]["latent_hw"])
    clip_ids = np.stack([layout.sample_clip_ids(rng, f) for _ in range(args.batch)])
    batch = {"latents": jnp.asarray(rng.normal(size=(args.batch, f, h, w, cfg.latent_channels)),
                                    jnp.float32),
             "clip_ids": jnp.asarray(clip_ids)}
    train_cfg.data.update(num_frames=f, global_batch_size=args.batch)
    L = config.block_len_for(cfg, h, w)
    lay = layout.training_layout(clip_ids, L)
    meta = layout.token_meta(lay)
    tokens = args.batch * lay.num_tokens
    # The mask row by row: the T x T mask itself does not fit at stage-4 lengths.
    rows_of = lambda i: layout.TokenMeta(*(m[:, i:i + 1024] for m in meta))
    attended = float(np.mean(np.concatenate([
        np.asarray(attention.dense_mask(rows_of(i), meta, L)).sum(-1).ravel()
        for i in range(0, lay.num_tokens, 1024)])))
    step_flops = 3 * cfg.matmul_flops_per_token(attended) * tokens  # forward + 2x backward

    peak = measured_matmul_peak(jnp.float32 if args.dtype == "float32" else jnp.bfloat16)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s ({args.dtype}); large host blocks on "
          f"{'huge pages (host_memory)' if huge else '4 KiB pages (glibc default)'}")
    print(f"model {args.model}: {cfg.num_layers} layers, width {cfg.hidden_size}, "
          f"{cfg.num_heads} heads, MLP {cfg.mlp_dim}, {cfg.num_params() / 1e6:.1f}M params; "
          f"{args.batch} x {f} frames of {h}x{w}, {L} tokens/block, {lay.num_tokens} "
          f"tokens/sample, {attended:.0f} keys/query on average; load {os.getloadavg()[0]:.1f}")
    rows = []
    backend = attention.resolve_impl(cfg.attention, lay.num_tokens)
    if backend == "blockwise" and cfg.attention.blockwise_cpu_kernel and \
            attention_cpu.usable(cfg.dtype):
        backend = "blockwise, CPU kernel"
        print(f"blockwise attention: the native CPU kernel, OpenBLAS {attention_cpu.blas_core()} "
              "SGEMMs")
    sec, comp, jax_peak, profile = jax_step_seconds(train_cfg, batch, mesh_sizes, args.repeats,
                                                    args.profile)
    layers = "unrolled" if args.unrolled else "scan"
    on = f", mesh {args.mesh}" if args.mesh else ""
    rows.append((f"vgpt_jax jit ({backend}, {layers}{on})", sec, comp, jax_peak, peak_rss_gb()))
    if not args.no_torch:
        pos = layout.token_positions(lay)
        mask = attention.dense_mask(meta, meta, L)
        rows.append(("PyTorch Phi3Model eager",
                     *torch_step_seconds(cfg, pos, mask, False, args.repeats), peak_rss_gb()))
        if not args.no_torch_compile:
            rows.append(("PyTorch Phi3Model torch.compile",
                         *torch_step_seconds(cfg, pos, mask, True, args.repeats), peak_rss_gb()))
    print(f"\n{'implementation':36s} {'step ms':>9s} {'tokens/s':>10s} {'GFLOP/s':>9s} "
          f"{'MFU':>6s} {'compile s':>9s} {'time/JAX':>8s} {'step GB':>8s} {'RSS GB':>7s}")
    for name, sec, comp, step_gb, rss in rows:
        print(f"{name:36s} {sec * 1e3:9.1f} {tokens / sec:10.0f} {step_flops / sec / 1e9:9.1f} "
              f"{step_flops / sec / peak:6.1%} {comp:9.1f} {sec / rows[0][1]:8.2f}x "
              f"{step_gb:8.2f} {rss:7.2f}")
    if profile:
        print_profile(profile, rows[0][1])


if __name__ == "__main__":
    main()
