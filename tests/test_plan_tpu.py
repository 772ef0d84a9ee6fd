"""The TPU planner: the tiny config's real train step and sampler compile for a small TPU
topology (libtpu, no TPU), and the figures behave (memory grows with the sequence, arguments
shrink with fsdp). The tables in docs/tpu.md are the planner's output for the commands they
list (each row names its command); no test re-reads them.

The compiles run in a subprocess: with libtpu installed, every JAX process of `pytest -n 2`
probes for a TPU and the second one to open libtpu must be allowed to (its lockfile).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
import subproc  # noqa: E402

SCRIPT = r"""
import json
from vgpt_jax import plan
common = dict(context_frames=2, clip_frames=2, sampler_steps=2)
out = {}
# The TPU attention path (splash) once, on 8x8 latents; the memory comparisons with dense
# attention on 16x16 latents (66 tokens per frame), where activations outweigh the optimiser's
# fixed buffers, and which compiles faster.
for name, mesh, frames, hw, attention in [
        ("base", dict(fsdp=2, context=2), 4, (8, 8), "splash"),
        ("dense", dict(fsdp=2, context=2), 4, (16, 16), "dense"),
        ("long", dict(fsdp=2, context=2), 12, (16, 16), "dense"),
        ("fsdp1", dict(fsdp=1, context=4), 4, (16, 16), "dense")]:
    p = plan.make_plan("tiny_test", "v5e:2x2", mesh, num_frames=frames, latent_hw=hw,
                       sampler=name == "base", attention=attention, **common)
    out[name] = dict(train=vars(p.train), sampler=vars(p.sampler) if p.sampler else None,
                     peak=p.train.peak_bytes, fits=p.fits(p.train), chips=p.chips,
                     tokens_per_step=p.tokens_per_step, global_batch=p.global_batch,
                     tokens_per_sample=p.tokens_per_sample, row=plan.markdown_row(p, "cmd"))
print("PLANS=" + json.dumps(out))
"""


def _have_libtpu():
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


needs_libtpu = pytest.mark.skipif(not _have_libtpu(), reason="libtpu not installed "
                                  "(pip install 'vgpt_jax[tpu]'): no TPU compiler")


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    path, lock = subproc.shared_dir(tmp_path_factory, "tpu_plans.json")
    with lock():  # the compiles run once per test run, shared by the xdist workers
        if not path.exists():
            env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                       PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            env.pop("XLA_FLAGS", None)
            proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                                  text=True, timeout=900, cwd=ROOT)
            line = [l for l in proc.stdout.splitlines() if l.startswith("PLANS=")]
            assert proc.returncode == 0 and line, proc.stderr[-4000:]
            path.write_text(line[0][len("PLANS="):])
    return json.loads(path.read_text())


@needs_libtpu
def test_tiny_train_step_and_sampler_compile_for_v5e(plans):
    base = plans["base"]
    assert base["chips"] == 4 and base["fits"]
    assert base["global_batch"] == 2  # one sample per fsdp row
    assert base["tokens_per_sample"] == 2 * 4 * (4 * 4 + 2)
    assert base["tokens_per_step"] == 2 * base["tokens_per_sample"]
    for program in (base["train"], base["sampler"]):
        assert program["argument_bytes"] > 0 and program["temp_bytes"] > 0
        assert program["compiler_flops"] > 0
    # The donated state comes back in place: most output bytes alias the arguments.
    assert base["train"]["alias_bytes"] > 0.9 * base["train"]["output_bytes"] > 0


@needs_libtpu
def test_memory_grows_with_sequence_and_shrinks_with_fsdp(plans):
    base, long, fsdp1 = plans["dense"], plans["long"], plans["fsdp1"]
    # 3x the frames: more temporaries and a larger batch argument (the optimiser's buffers, a
    # fixed ~6 MB at this size, keep the growth modest).
    assert long["train"]["temp_bytes"] > base["train"]["temp_bytes"]
    assert long["train"]["argument_bytes"] > base["train"]["argument_bytes"]
    assert long["peak"] > base["peak"] + 1_000_000
    # Params and AdamW moments are split over fsdp: halving it grows the arguments per chip.
    assert fsdp1["train"]["argument_bytes"] > 1.5 * base["train"]["argument_bytes"]
