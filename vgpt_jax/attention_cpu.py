"""The blockwise backend's native CPU kernel: built on first use, called through the XLA FFI.

`csrc/blockwise_attention_cpu.cc` computes what the blockwise tile loops compute (forward, and
the FlashAttention-2 backward from the saved logsumexp) for inputs the blockwise backend has
already arranged, spreading its (sample, head, tile) work items over as many threads as this
process may use cores (the calling thread and helpers on XLA's own intra-op pool, not threads
started per call), each running single-threaded OpenBLAS SGEMMs on whole tiles where every
pair is visible and, in the others, on the rectangles of query blocks that see the same span of
key blocks (so a partial tile costs its visible blocks, not its area: 3x less work for the
main job's 576 tokens, where the tile loops compute whole tiles). It exists because XLA:CPU
kept the 2 cores of a 48-frame train step about half busy: it runs each tile step's small
batched dots on one core (docs/results.md, "Where a 48-frame step's time goes").

When it is used (`available()` and `usable()`): the CPU backend, a single JAX device (under a
mesh or `shard_map` of several, the pure-JAX loops run: XLA knows how to partition those, not
a custom call), float32, `AttentionConfig.blockwise_cpu_kernel` on, and a working build. The
first use compiles the source with the C++ compiler (`$CXX`, default `g++`) for this machine
(`-march=native`) into `$VGPT_JAX_CACHE` (default `~/.cache/vgpt_jax`), keyed by the source,
the flags, the compiler and the CPU; later processes load the cached library. No compiler, a
failed build or no OpenBLAS logs one warning and the tile loops run instead.

SGEMM comes from the `scipy-openblas32` wheel (its own copy of the library, not numpy's), set
to one thread since the kernel parallelises over tiles. OpenBLAS picks its kernels by CPU
model at load; it takes the AMD Zen 5 of the build machine for a Haswell and uses AVX2 (114
GFLOP/s per core at 264 x 264 x 64) where its SkylakeX kernels run at 207 (and the build
machine's environment sets `OPENBLAS_CORETYPE=Haswell` for every process), so on a CPU with
AVX-512 F/BW/DQ/VL this copy loads with the SkylakeX kernels whatever `OPENBLAS_CORETYPE` says
(numpy's copy keeps it); `VGPT_JAX_OPENBLAS_CORETYPE` chooses another.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).parent / "csrc" / "blockwise_attention_cpu.cc"
# -w: the FFI headers' own warnings would fill a failed build's message, hiding its errors.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared",
         "-fPIC", "-w")
_FORWARD, _BACKWARD = "vgpt_blockwise_attention_fwd", "vgpt_blockwise_attention_bwd"
_AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
log = logging.getLogger(__name__)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> pathlib.Path:
    base = os.environ.get("VGPT_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vgpt_jax")
    return pathlib.Path(base)


def build(compiler: str | None = None) -> pathlib.Path:
    """Compile the kernel for this machine (or find it in the cache); returns the library's path.
    Raises RuntimeError naming the compiler and its output when the build fails."""
    compiler = compiler or os.environ.get("CXX", "g++")
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, include,
                                    platform.machine(), " ".join(sorted(_cpu_flags()))])
                         .encode()).hexdigest()[:16]
    out = cache_dir() / f"blockwise_attention_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: concurrent first uses (test workers)
    # never load a half-written library.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = pathlib.Path(tmp) / out.name
        done = subprocess.run([exe, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(part)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building {SOURCE.name} with {compiler} failed:\n"
                               f"{done.stderr.strip()[-2000:]}")
        os.replace(part, out)
    return out


@functools.cache
def _blas() -> ctypes.CDLL:
    """scipy-openblas32's library, loaded once, single-threaded. Its path is found without
    importing the package, as the import loads the library (before the core type is set)."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the scipy-openblas32 package is not installed")
    libs = sorted(pathlib.Path(spec.submodule_search_locations[0], "lib").glob(
        "libscipy_openblas*.so*"))
    if not libs:
        raise ImportError("scipy-openblas32 ships no libscipy_openblas*.so")
    core = os.environ.get("VGPT_JAX_OPENBLAS_CORETYPE") or (
        "SKYLAKEX" if _AVX512 <= _cpu_flags() else None)
    saved = os.environ.get("OPENBLAS_CORETYPE")
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core  # read once, when the library loads
    try:
        blas = ctypes.CDLL(str(libs[0]))
    finally:  # numpy's copy, and subprocesses, keep the environment's setting
        if saved is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = saved
    blas.scipy_openblas_set_num_threads(1)
    blas.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return blas


def blas_core() -> str:
    """The kernels OpenBLAS chose for this CPU (e.g. 'SkylakeX')."""
    return _blas().scipy_openblas_get_corename().decode()


@functools.cache
def available() -> bool:
    """Build and register the kernel once per process; False (with one warning) if it cannot."""
    try:
        lib = ctypes.CDLL(str(build()))
        lib.vgpt_set_sgemm(ctypes.cast(_blas().scipy_cblas_sgemm, ctypes.c_void_p))
        for name, symbol in ((_FORWARD, lib.VgptBlockwiseForward),
                             (_BACKWARD, lib.VgptBlockwiseBackward)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    except (RuntimeError, OSError, ImportError, AttributeError) as e:
        log.warning("blockwise attention: the native CPU kernel is unavailable, using the JAX "
                    "tile loops (%s)", e)
        return False
    return True


def usable(dtype) -> bool:
    """Whether a blockwise call traced now, on inputs of `dtype`, runs on the kernel (the
    module docstring says when)."""
    return (jax.default_backend() == "cpu" and jax.device_count() == 1
            and jnp.dtype(dtype) == jnp.float32 and available())


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _attrs(block_len, tile_q, tile_k):
    if not available():
        raise RuntimeError("the native blockwise attention kernel is unavailable (see the "
                           "warning above); use the JAX tile loops (cpu_kernel=False)")
    return dict(block_len=np.int64(block_len), tile_q=np.int64(tile_q), tile_k=np.int64(tile_k),
                threads=np.int64(_threads()))


def forward(q, k, v, pairs, offset_class, block_len, tile_q, tile_k):
    """Arranged q [B, T, H, D] (pre-scaled), k / v [B, S, H, D], the block-pair visibility
    `pairs` [B, T/L, S/L, R, R] and `offset_class` [L] -> (out [B, T, H, D], lse [B, H, T]),
    float32; T and S are whole tiles of `tile_q` / `tile_k` blocks."""
    b, t, h, _ = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
              jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    return jax.ffi.ffi_call(_FORWARD, shapes, vmap_method="sequential")(
        q, k, v, pairs.astype(jnp.uint8), offset_class, **_attrs(block_len, tile_q, tile_k))


def backward(q, k, v, pairs, offset_class, lse, dout, delta, block_len, tile_q, tile_k):
    """The gradients (dq, dk, dv) of `forward`'s output given its cotangent `dout` [B, T, H, D],
    the saved `lse` and delta = rowsum(dout * out) [B, H, T]."""
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    return jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")(
        q, k, v, pairs.astype(jnp.uint8), offset_class, lse, dout, delta,
        **_attrs(block_len, tile_q, tile_k))
