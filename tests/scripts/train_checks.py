"""Subprocess side of the training tests (needs its own device count / process group).

    python train_checks.py sharded OUT.json               8 devices: mesh parity, resharding, errors
    python train_checks.py run WORKDIR OUT.npz [options]  one train() run (resume / multihost tests)

Prints nothing useful; results go to the OUT file.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))

import numpy as np  # noqa: E402


def tiny_source(num_videos: int = 12, frames: int = 10, seed: int = 0) -> list[dict]:
    """An in-memory latent source: smooth-ish random latents [frames, 4, 4, 4]."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(num_videos, 1, 4, 4, 4))
    drift = rng.normal(size=(num_videos, frames, 4, 4, 4)) * 0.3
    lat = (base + np.cumsum(drift, axis=1)).astype(np.float32)
    return [dict(latents=lat[i], fps=30.0, source=f"video{i}", num_frames=frames)
            for i in range(num_videos)]


def make_config(mesh: dict | None = None, **overrides):
    import tiny_test
    cfg = tiny_test.get_config()
    cfg.train.tensorboard = False
    cfg.checkpoint.async_save = True
    for k, v in (mesh or {}).items():
        cfg.mesh.ici[k] = v
    for path, v in overrides.items():
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def flat(tree) -> dict:
    import jax
    from jax.experimental import multihost_utils
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        out[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(x))
    return out


def run_steps(cfg, devices, n: int):
    """n steps without checkpoints: (losses, final params as numpy)."""
    from vgpt_jax import train
    setup = train.build(cfg, tiny_source(), devices=devices)
    state, it, losses = setup.init(), iter(setup.dataset), []
    for _ in range(n):
        state, m = setup.step_fn(state, setup.global_batch_of(next(it)))
        losses.append(float(m["loss"]))
    return losses, flat(state.params), state


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def shard_map_attention(devices) -> dict:
    """Blockwise attention and its gradients inside `jax.shard_map` (the batch split over the
    8 devices, the vma check on) against dense attention on one device: max abs differences."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    from vgpt_jax import attention, layout
    rng = np.random.default_rng(0)
    L = 6
    lay = layout.training_layout(np.stack([layout.sample_clip_ids(rng, 6) for _ in range(8)]), L)
    meta = layout.token_meta(lay)
    q, k, v = (jnp.asarray(rng.normal(size=(8, lay.num_tokens, 2, 8)), jnp.float32)
               for _ in range(3))

    def value_and_grads(attend):
        loss = lambda q, k, v, m: (attend(q, k, v, m) * v).sum()
        return attend(q, k, v, meta), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, meta)

    mesh = Mesh(np.asarray(devices), ("batch",))
    blockwise = jax.shard_map(
        lambda q, k, v, m: attention.blockwise_attention(q, k, v, m, m, L, 2 * L, 2 * L),
        mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
    got = jax.jit(lambda: value_and_grads(blockwise))()
    want = value_and_grads(lambda q, k, v, m: attention.dense_attention(q, k, v, m, m, L))
    return dict(out=float(jnp.abs(got[0] - want[0]).max()),
                grads=max(float(jnp.abs(a - b).max()) for a, b in zip(got[1], want[1])))


def sharded(out_path: str) -> None:
    import jax
    from vgpt_jax import train
    devices = jax.devices()
    assert len(devices) == 8, devices
    res = {}
    ref_losses, ref_params, _ = run_steps(make_config(), devices[:1], 5)
    res["ref_losses"] = ref_losses
    for name, mesh in {"data2_fsdp4": dict(data=2, fsdp=4),
                       "fsdp2_context2_tensor2": dict(data=1, fsdp=2, context=2, tensor=2)}.items():
        losses, params, state = run_steps(make_config(mesh), devices, 5)
        res[name] = dict(losses=losses, max_param_diff=max(
            float(np.max(np.abs(params[k] - ref_params[k]))) for k in ref_params),
            qkv_spec=str(state.params["decoder"]["qkv_proj"].sharding.spec))

    # Checkpoint on (data=8, fsdp=1), restore onto (data=2, fsdp=4), then keep training there.
    import tempfile
    from vgpt_jax import checkpoint as ckpt_lib
    workdir = tempfile.mkdtemp()
    cfg81 = make_config(dict(data=8, fsdp=1), **{"train.steps": 4})
    saved = train.train(cfg81, workdir, tiny_source())
    saved_params, saved_opt = flat(saved.state.params), flat(saved.state.opt_state)
    setup24 = train.build(make_config(dict(data=2, fsdp=4)), tiny_source())
    with ckpt_lib.TrainCheckpointer(workdir, cfg81.checkpoint) as ck:
        params, aux = ck.restore(4, setup24.abstract.params, setup24.abstract.aux())
    res["reshard"] = dict(
        params_equal=all(np.array_equal(v, flat(params)[k]) for k, v in saved_params.items()),
        opt_equal=all(np.array_equal(v, flat(aux["opt_state"])[k]) for k, v in saved_opt.items()),
        step=int(aux["step"]),
        qkv_spec=str(params["decoder"]["qkv_proj"].sharding.spec),
        count_spec=str(aux["opt_state"][1][0].count.sharding.spec))
    resumed = train.train(make_config(dict(data=2, fsdp=4), **{"train.steps": 6}), workdir,
                          tiny_source())
    res["reshard"]["resumed_step"] = resumed.step
    res["reshard"]["resumed_loss_finite"] = bool(np.isfinite(resumed.metrics["loss"]))

    res["shard_map_attention"] = shard_map_attention(devices)

    res["errors"] = {
        "mesh_vs_devices": error_of(lambda: train.build(make_config(dict(data=3, fsdp=1)),
                                                        tiny_source())),
        "batch_vs_mesh": error_of(lambda: train.build(
            make_config(dict(data=8, fsdp=1), **{"data.global_batch_size": 4}), tiny_source())),
        "unsharded": error_of(lambda: train.build(
            make_config(dict(data=1, fsdp=8), **{"mesh.rules": [["batch", ["data", "fsdp"]]]}),
            tiny_source())),
    }
    with open(out_path, "w") as f:
        json.dump(res, f)


def run(args) -> None:
    from vgpt_jax import train
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = make_config(json.loads(args.mesh), **{"train.steps": args.steps,
                                                 "mesh.num_slices": args.slices},
                      **{k: json.loads(v) for k, v in overrides.items()})
    if args.port:  # train() joins the process group from the config
        cfg.distributed.update(initialize="always", coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=2, process_id=args.process_id,
                               initialization_timeout=60, heartbeat_timeout=20,
                               shutdown_timeout=20)

    def on_step(step, metrics):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    source = tiny_source()
    if args.nan:  # every video non-finite: the first step after a resume gives a NaN loss
        source = [dict(r, latents=r["latents"] * np.nan) for r in source]
    result = train.train(cfg, args.workdir, source, on_step=on_step)
    arrays = {f"params{k}": v for k, v in flat(result.state.params).items()}
    arrays.update({f"opt{k}": v for k, v in flat(result.state.opt_state).items()})
    if args.out and (not args.port or args.process_id == 0):
        np.savez(args.out, step=result.step, preempted=result.preempted,
                 loss=result.metrics.get("loss", np.nan), **arrays)
    if args.port:  # as the CLI does: the shutdown barrier while the backends are alive
        import jax
        jax.distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sharded")
    s.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("workdir")
    r.add_argument("out")
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--mesh", default="{}")
    r.add_argument("--kill-at", type=int, default=-1)
    r.add_argument("--term-at", type=int, default=-1)
    r.add_argument("--slices", type=int, default=1, help="mesh.num_slices (hybrid mesh)")
    r.add_argument("--nan", action="store_true")
    r.add_argument("--set", action="append", default=[],
                   help="config override KEY=JSON (JSON's Infinity and NaN allowed)")
    r.add_argument("--port", type=int, default=0)
    r.add_argument("--process-id", type=int, default=0)
    args = p.parse_args()
    if args.cmd == "sharded":
        sharded(args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
