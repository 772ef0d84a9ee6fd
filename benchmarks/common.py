"""Shared helpers for the benchmarks: timing, a measured matmul peak, the attended-key count,
and where a traced program's time went (`profile_breakdown`)."""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def time_call(fn, *args, warmup=2, repeats=5):
    """Median wall seconds of `fn(*args)` after warmup (results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measured_matmul_peak(dtype=jnp.float32, n=None) -> float:
    """FLOP/s of a large square matmul on the default device: the MFU denominator."""
    n = n or (8192 if jax.default_backend() != "cpu" else 2048)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    seconds = time_call(f, a, warmup=2, repeats=5)
    return 2 * n**3 / seconds


def mean_attended_keys(mask_BTS) -> float:
    """Average number of visible keys per real query: the useful attention work."""
    m = np.asarray(mask_BTS)
    return float(m.sum(-1).mean())


def profile_breakdown(trace_dir: str, hlo_text: str, steps: int, groups: dict, top: int = 12):
    """Where a traced program's time went, from a `jax.profiler` trace of `steps` runs of it.

    Self time of every XLA op (an op's time minus that of the ops nested in it, e.g. a loop's
    body) on the host's XLA threads, per step. An op belongs to the first of `groups` (label ->
    a substring of source names in `hlo_text`, the compiled module's text) that its own source
    name or that of an op it runs inside (a loop, a branch) contains, else to "other": the ops
    in a loop's body carry no source names of their own. A thread in the executor's own frames
    or waiting (for a loop's body, for YNNPACK's helpers: `SlinkyThreadPool::Await`) is not
    busy. Returns (seconds per group, the `top` ops as (seconds, calls per step, op, source
    name), busy thread-seconds per step, the cores this process may run on, seconds per step
    with 0, 1 and 2 or more ops running at once).
    """
    import collections
    import glob

    group, source = _op_groups(hlo_text, groups)
    path = max(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
    self_ns, calls, edges = collections.Counter(), collections.Counter(), []
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            # XLA:CPU runs ops on its intra-op pool and on the PjRt client's threads (which take
            # e.g. the broadcasts and copies outside loops).
            if not any(kind in line.name for kind in ("XLAEigen", "XLAPjRtCpuClient")):
                continue
            events = [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events]
            for start, end, name in _innermost(events):
                self_ns[name] += end - start
                if not _is_frame(name):
                    edges += [(start, 1), (end, -1)]
            for _, _, name in events:
                calls[name] += 1
    for frame in [n for n in self_ns if _is_frame(n)]:
        del self_ns[frame]
    per_group = collections.Counter()
    for name, ns in self_ns.items():
        per_group[group.get(name) or "other"] += ns / 1e9 / steps
    ops = [(ns / 1e9 / steps, calls[name] // steps, name, source.get(name, ""))
           for name, ns in self_ns.most_common(top)]
    running, level, last = collections.Counter(), 0, None
    for t, step in sorted(edges):
        if last is not None:
            running[min(level, 2)] += (t - last) / 1e9 / steps
        level, last = level + step, t
    return (dict(per_group), ops, sum(self_ns.values()) / 1e9 / steps,
            len(os.sched_getaffinity(0)), [running[k] for k in range(3)])


def _is_frame(name: str) -> bool:
    """The thunk executor's own frames and its waits: not ops."""
    return name.startswith("ThunkExecutor") or "::Await" in name


def _innermost(events):
    """[(start, end, name)] of one thread, nested -> the same span cut into segments, each
    named by the innermost event covering it (its self time)."""
    segments, stack, cursor = [], [], 0
    for start, end, name in sorted(events, key=lambda x: (x[0], -x[1])):
        while stack and stack[-1][0] <= start:  # events that ended before this one began
            done_end, done_name = stack.pop()
            segments.append((cursor, done_end, done_name))
            cursor = done_end
        if stack:
            segments.append((cursor, start, stack[-1][1]))
        stack.append((end, name))
        cursor = start
    while stack:
        done_end, done_name = stack.pop()
        segments.append((cursor, done_end, done_name))
        cursor = done_end
    return [seg for seg in segments if seg[1] > seg[0]]


def _op_groups(hlo_text: str, groups: dict) -> tuple[dict, dict]:
    """(op name -> group label or None, op name -> source name) for the ops of a compiled
    module's text. An op's group: the first of `groups` whose key its source name (`op_name`
    metadata) contains, else that of the op whose computation it is in (a loop's body, a
    branch, a fusion), else None. Ops in a loop's body carry no source names of their own."""
    import re
    source, computation_of, callers = {}, {}, {}
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$", line)
        if header:
            computation = header.group(1)
            continue
        op = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)
        if not op:
            continue
        name, rest = op.groups()
        computation_of[name] = computation
        src = re.search(r'op_name="([^"]*)"', rest)
        source[name] = src.group(1) if src else ""
        for called in re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", rest) + [
                c for b in re.findall(r"branch_computations=\{([^}]*)\}", rest)
                for c in re.findall(r"%([\w.\-]+)", b)]:
            callers.setdefault(called, name)
    own = {n: next((g for g, key in groups.items() if key in src), None)
           for n, src in source.items()}
    label = {}

    def group_of(name, depth=0):
        if name not in label:
            caller = callers.get(computation_of.get(name))
            label[name] = own.get(name) or (group_of(caller, depth + 1)
                                            if caller and depth < 64 else None)
        return label[name]
    return {n: group_of(n) for n in source}, source
