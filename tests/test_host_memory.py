"""`host_memory`: with glibc's huge-page tunable a step's temporary buffer is faulted in 2 MiB at
a time, not 4 KiB; `restart_with_huge_pages` re-runs the process once with it set."""
import os
import platform
import re
import subprocess
import sys

import pytest

from tests.scripts import subproc
from vgpt_jax import host_memory

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
    or not os.path.exists(THP) or "[never]" in open(THP).read(),
    reason="glibc with transparent huge pages only")

# A jitted function whose [12288, 2048] float32 intermediate (96 MiB, above glibc's largest mmap
# threshold) lives in XLA's temporary buffer; minor page faults per call after the first, as a
# fraction of that buffer's 4 KiB pages.
SCRIPT = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b, c: (a @ b) @ c)
a, b, c = jnp.ones((12288, 64)), jnp.ones((64, 2048)), jnp.ones((2048, 1))
f(a, b, c).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    f(a, b, c).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8
print("RESULT", faults / (12288 * 2048 * 4 / resource.getpagesize()))
"""


def _faults_per_page(env: dict) -> float:
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=subproc.ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(re.search(r"RESULT (\S+)", done.stdout).group(1))


def test_huge_pages_fault_a_step_buffer_in_2mib_at_a_time():
    default = {k: v for k, v in subproc.env(1).items() if k != "GLIBC_TUNABLES"}
    # glibc's default maps the buffer afresh on every call: each 4 KiB page faults again.
    assert _faults_per_page(default) > 0.5
    # 96 MiB on 2 MiB pages: 48 faults per call, a share of 0.002.
    assert _faults_per_page(host_memory.huge_pages_environment(default)) < 0.05


def test_restart_sets_the_tunable_once():
    env = {k: v for k, v in subproc.env(1).items() if k != "GLIBC_TUNABLES"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"  # kept beside ours
    code = ("import os, sys; print('START', flush=True); from vgpt_jax import host_memory; "
            "host_memory.restart_with_huge_pages(); "
            "print('TUNABLES', os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, "x", "--y"], env=env, cwd=subproc.ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The first run printed START, then re-ran; the second found the tunable set and went on.
    assert done.stdout.count("START") == 2
    assert done.stdout.count("TUNABLES") == 1
    assert f"TUNABLES glibc.malloc.arena_max=4:{host_memory.TUNABLE} ['x', '--y']" in done.stdout
    env[host_memory.ENV] = "0"
    off = subprocess.run([sys.executable, "-c", code], env=env, cwd=subproc.ROOT,
                         capture_output=True, text=True, timeout=60)
    assert off.stdout.count("START") == 1 and "TUNABLES glibc.malloc.arena_max=4 " in off.stdout
