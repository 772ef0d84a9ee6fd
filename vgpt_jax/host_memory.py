"""Host memory for JAX on the CPU: keep freed memory in the process, so that a train step reuses
the previous step's pages instead of page-faulting its buffers in anew.

XLA:CPU allocates each run of a compiled step's temporary buffer (one block: 304 MB for the
`small` model's 16-frame step, about 1.1 GB at 48 frames) with `malloc` from its worker threads
and frees it when the run ends. glibc serves a block above its mmap threshold (32 MB at most)
with a fresh `mmap` and returns it with `munmap`, and a worker thread's own arena cannot hold a
block over 64 MB at all, so every step faults its whole temporary buffer in again, page by
zeroed page: 274 thousand minor faults and 0.5 s of system time per 48-frame step on the 2-core
build machine, 69 thousand and 0.13 s per step of the main job.

`keep_freed_memory()` tells glibc (`mallopt`) to give every thread the main arena, to take
large blocks from the heap rather than `mmap`, and never to trim the heap: the next step's
buffer comes from the pages the last one freed. Measured on that machine (median step, runs
alternated): the main job's step 335-361 -> 291-304 ms, 0.2 thousand faults per step; 16 frames
`small` (unrolled) 698-716 -> 588 ms; 48 frames `small` (scanned layers) 2600-2640 -> 2311 ms, no
faults. Not everywhere: with unrolled layers at 48 frames it was slower (2626 and 3181 ms against
2489 and 2770), with fewer faults (73-112 thousand) but more system time, not explained.

The process keeps its peak heap for its lifetime (a few steps' buffers where XLA frees one
after the next step allocated its own, as on a loaded machine: `tests/test_host_memory.py`), and
its threads share one arena (one lock):
right for a CPU training or sampling process, not for a host that feeds accelerators, so `vgpt`
applies it only where JAX runs on the CPU (see `vgpt_jax.cli`), and `VGPT_JAX_KEEP_FREED_MEMORY=0`
turns it off. It must run before JAX creates its CPU client: a thread picks its arena at its
first allocation, and XLA's worker threads allocate when the client starts (applied after, the
faults stayed). Library users call it first thing in their script.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ENV = "VGPT_JAX_KEEP_FREED_MEMORY"


def enabled() -> bool:
    """Whether the environment allows it (`VGPT_JAX_KEEP_FREED_MEMORY`, default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's allocator to keep and reuse freed memory (the module docstring says why);
    True where applied, False where the C library is not glibc or refused a setting."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. The trim threshold is a size_t: -1 converts to its largest
    # value, i.e. never trim (a threshold of 2 GB still let 48-frame steps trim and re-fault).
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
