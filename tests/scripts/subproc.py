"""Launch the test helper scripts in fresh processes with their own fake device count.

Compiles dominate CPU test time, so helper processes run XLA's CPU backend at optimisation
level 0 and share one persistent compilation cache (identical programs compile once per
session); results are compared only between processes that use the same flags.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(tempfile.gettempdir(), f"vgpt_jax_test_xla_cache_{os.getuid()}")


def env(devices: int) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # XLA:CPU aborts a collective whose device threads have not all arrived within 40 s; 8
    # fake devices on a loaded 2-core box can miss that, so the limit is the test's own timeout.
    e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def run(args: list[str], devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <args>` (paths relative to the repo root); never left running on timeout."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # SIGKILL: JAX may swallow SIGTERM
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(args_of, devices_each: int = 4, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Two processes joined by jax.distributed on localhost: `args_of(port, process_id)`."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *args_of(port, i)], cwd=ROOT,
                              env=env(devices_each), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1, deadline - time.time()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, "") for p, o in zip(procs, outs)]


def shared_dir(tmp_path_factory, name: str):
    """A directory shared by all pytest-xdist workers of this run (per run, never reused), so an
    expensive module fixture runs once even when its tests land on different workers."""
    import fcntl
    import pathlib
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    root = pathlib.Path(base.parent if run_id else base) / f"shared-{run_id or 'local'}"
    root.mkdir(parents=True, exist_ok=True)
    return root / name, lambda: _Lock(root / f"{name}.lock", fcntl)


class _Lock:
    def __init__(self, path, fcntl):
        self.path, self.fcntl = path, fcntl

    def __enter__(self):
        self.f = open(self.path, "w")
        self.fcntl.flock(self.f, self.fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self.fcntl.flock(self.f, self.fcntl.LOCK_UN)
        self.f.close()
