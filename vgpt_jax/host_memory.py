"""Host memory for JAX on the CPU: back the large blocks a train step allocates with transparent
huge pages, so that a step does not page-fault its buffers in 4 KiB at a time.

XLA:CPU allocates each run of a compiled step's temporary buffer (one block: 304 MB for the
`small` model's 16-frame step, about 1.1 GB at 48 frames) with `malloc` from its worker threads
and frees it when the run ends. glibc maps a block that large afresh (`mmap`; its mmap threshold
is at most 32 MB, and a worker thread's arena holds no block over 64 MB) and unmaps it on `free`,
so every step faults its whole buffer in again, page by zeroed 4 KiB page: 274 thousand minor
faults and 0.5 s of system time per 48-frame step on the 2-core build machine, 69 thousand and
0.12-0.16 s per step of the main job. glibc's tunable `glibc.malloc.hugetlb=1` makes it ask the
kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on the blocks it maps: 2 MiB per
fault, 360 to 1000 faults per step. Memory is still returned to the system as before.

Measured on that machine (AMD EPYC Zen 4, 2 cores, transparent huge pages in `madvise` mode;
median of 30 steps for the main job, mean of 6 at 48 frames; runs back to back): the main job's
step 415 / 376 ms -> 362 / 318 ms; 48 frames `small` 2796 -> 2416 ms (scanned layers),
2487 -> 2416 ms (unrolled). Tried first and not kept:
keeping freed memory in the process (`mallopt`: one arena, no `mmap`, no trimming) removed the
faults too, but fragmented the heap: the 80-frame stage-4 step's resident set grew from 6.95 to
12.6 GB and its step from 41.7 to 48.3 s.

glibc reads its tunables when a process starts, so `restart_with_huge_pages` re-runs the process
(same interpreter and arguments) with `GLIBC_TUNABLES` extended. `vgpt` does this once at start
where JAX runs on the CPU (`vgpt_jax.cli.entry`); `VGPT_JAX_HUGE_PAGES=0` turns it off, and a
`GLIBC_TUNABLES` that already sets `glibc.malloc.hugetlb` is kept as it is. Where the kernel has
transparent huge pages off (`never`), the tunable changes nothing.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "VGPT_JAX_HUGE_PAGES"


def huge_pages_environment(environ=None) -> dict | None:
    """`environ` (default: this process's) with `TUNABLE` added to `GLIBC_TUNABLES`, or None
    where nothing is to change: turned off (`VGPT_JAX_HUGE_PAGES=0`), already set, or not a
    Linux glibc process."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, TUNABLE) if t)}


def restart_with_huge_pages() -> None:
    """Replace this process by itself run with `huge_pages_environment` (which the new process
    then finds set, so this happens once); returns only where nothing is to change or the
    restart failed. Call it first thing, before any work worth keeping."""
    env = huge_pages_environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # run on without: the allocator setting is a speed-up, not a requirement
        pass
