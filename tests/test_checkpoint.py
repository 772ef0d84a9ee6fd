"""Resumable training: SIGKILL and SIGTERM mid-run resume bitwise, `load_model` reads a training
workdir, stages chain through `init_from`, and mismatched checkpoints fail with clear errors.

The runs are subprocesses (one per train() call, as a real restart is), sharing a persistent
compilation cache so only the first one compiles.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import subproc  # noqa: E402
from train_checks import make_config, tiny_source  # noqa: E402

STEPS = 6


def _run(workdir, out, *extra, ok=True):
    proc = subproc.run(["tests/scripts/train_checks.py", "run", str(workdir), str(out),
                        "--steps", str(STEPS), *extra])
    if ok:
        assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def _state(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_bitwise_equal(a, b):
    keys = [k for k in a if k.startswith(("params", "opt"))]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(("params", "opt")))
    for k in keys:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d, lock = subproc.shared_dir(tmp_path_factory, "uninterrupted")
    with lock():  # one uninterrupted run per test run, shared by the xdist workers
        if not (d / "out.npz").exists():
            d.mkdir(exist_ok=True)
            _run(d / "work", d / "out.npz")
    return d / "work", _state(d / "out.npz")


def test_resume_after_sigkill_is_bitwise_exact(reference, tmp_path):
    killed = _run(tmp_path / "work", tmp_path / "unused.npz", "--kill-at", "5", ok=False)
    assert killed.returncode == -9, killed.stdout[-2000:]
    steps = sorted(int(s) for s in os.listdir(tmp_path / "work" / "checkpoints") if s.isdigit())
    assert steps and max(steps) <= 4  # step 5 was never saved
    _run(tmp_path / "work", tmp_path / "out.npz")
    got, want = _state(tmp_path / "out.npz"), reference[1]
    assert int(got["step"]) == STEPS
    _assert_bitwise_equal(got, want)
    # The restart logs steps 5 and 6 again: metrics.jsonl keeps each step once.
    lines = (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(1, STEPS + 1))


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(reference, tmp_path):
    _run(tmp_path / "work", tmp_path / "first.npz", "--term-at", "3")
    first = _state(tmp_path / "first.npz")
    assert bool(first["preempted"]) and int(first["step"]) == 3
    assert "3" in os.listdir(tmp_path / "work" / "checkpoints")  # saved at once, not at step 4
    _run(tmp_path / "work", tmp_path / "out.npz")
    got = _state(tmp_path / "out.npz")
    assert int(got["step"]) == STEPS and not bool(got["preempted"])
    _assert_bitwise_equal(got, reference[1])


def test_metrics_jsonl_has_the_run_scalars(reference):
    lines = [json.loads(l) for l in (reference[0] / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_time_s"):
        assert all(np.isfinite(l[key]) for l in lines), key
    assert lines[0]["lr"] == 0.0 and lines[-1]["lr"] == pytest.approx(1e-3)  # 2 warmup steps


def test_load_model_reads_a_training_workdir(reference):
    from flax import nnx
    from vgpt_jax import checkpoint
    model, config = checkpoint.load_model(str(reference[0]))
    assert config.train.steps == STEPS
    params = nnx.state(model, nnx.Param).to_pure_dict()
    np.testing.assert_array_equal(np.asarray(params["decoder"]["qkv_proj"]),
                                  reference[1]["params['decoder']['qkv_proj']"])
    model4, _ = checkpoint.load_model(str(reference[0]), step=4)
    assert not np.array_equal(np.asarray(nnx.state(model4, nnx.Param).to_pure_dict()
                                         ["decoder"]["qkv_proj"]),
                              reference[1]["params['decoder']['qkv_proj']"])


def test_mismatched_checkpoint_names_the_parameter(reference, tmp_path):
    import shutil
    from vgpt_jax import checkpoint, train
    from vgpt_jax.config import ModelConfig
    cfg = make_config()
    cfg.model.mlp_dim = 96
    with pytest.raises(ValueError, match=r"gate_up_proj.*checkpoint \(2, 64, 256\) vs config "
                                         r"\(2, 64, 192\)"):
        checkpoint.load_params(str(reference[0]), ModelConfig.from_config(cfg.model))
    # Resuming a workdir with a changed model fails at restore, before any step.
    cfg.train.steps = STEPS + 1
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"does not match the model config.*gate_up_proj"):
        train.train(cfg, str(tmp_path), tiny_source())


def test_next_stage_starts_from_previous_params(reference, tmp_path):
    from vgpt_jax import checkpoint, train
    cfg = make_config(**{"checkpoint.init_from": str(reference[0]), "data.clip_mode": "one_frame"})
    setup = train.build(cfg, tiny_source())
    with checkpoint.TrainCheckpointer(str(tmp_path), cfg.checkpoint) as ckpt:
        state, start = train.initial_state(setup, ckpt, iter(setup.dataset))
    assert start == 0 and int(state.step) == 0
    assert int(state.opt_state[1][0].count) == 0  # params only: a fresh optimiser
    np.testing.assert_array_equal(np.asarray(state.params["markers"]),
                                  reference[1]["params['markers']"])
    np.testing.assert_array_equal(np.asarray(state.params["decoder"]["qkv_proj"]),
                                  reference[1]["params['decoder']['qkv_proj']"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path):
    import shutil
    shutil.copytree(reference[0], tmp_path / "work")
    for s in os.listdir(tmp_path / "work" / "checkpoints"):
        if s.isdigit() and int(s) > 4:
            shutil.rmtree(tmp_path / "work" / "checkpoints" / s)
    proc = _run(tmp_path / "work", tmp_path / "out.npz", "--nan", ok=False)
    assert proc.returncode == 1
    assert "FloatingPointError: non-finite loss nan at step 5" in proc.stdout
    assert "last good checkpoint is step 4" in proc.stdout
    assert max(int(s) for s in os.listdir(tmp_path / "work" / "checkpoints") if s.isdigit()) == 4


def test_non_finite_state_never_reaches_disk(tmp_path):
    # An infinite learning rate: step 1's loss and gradient are finite, its updated params are
    # not. The old loss-only check saved that state as "the last good checkpoint".
    proc = _run(tmp_path / "work", tmp_path / "out.npz", "--set", "optim.learning_rate=Infinity",
                "--set", "optim.warmup_steps=0", "--set", "checkpoint.save_interval_steps=1",
                ok=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "non-finite train state at step 1" in proc.stdout
    assert "newest state checked finite is step 0" in proc.stdout
    ckpts = tmp_path / "work" / "checkpoints"
    assert not [s for s in os.listdir(ckpts) if s[0].isdigit()]


def _copy_run(reference, dest):
    import shutil
    shutil.copytree(reference[0], dest)
    return dest / "checkpoints" / str(STEPS)


def _flip_bit(step_dir):
    """Flip one bit in the middle of the largest params data file."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "params") for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_bit_flip_in_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
    _flip_bit(_copy_run(reference, tmp_path / "work"))
    proc = _run(tmp_path / "work", tmp_path / "out.npz")
    assert f"skipping checkpoint step {STEPS}: corrupt/unreadable checkpoint" in proc.stdout
    assert f"resumed from step {STEPS - 2}, the newest checkpoint that verifies" in proc.stdout
    # Resumed from step 4 and retrained 5 and 6: the same state as the uninterrupted run.
    _assert_bitwise_equal(_state(tmp_path / "out.npz"), reference[1])
    assert (tmp_path / "work" / "corrupt_checkpoints" / str(STEPS)).is_dir()


@pytest.mark.parametrize("damage", ["no_manifest", "empty_metadata", "truncated_data_json"])
def test_unreadable_checkpoint_is_called_corrupt(reference, tmp_path, damage):
    from vgpt_jax import checkpoint, train
    step_dir = _copy_run(reference, tmp_path / "work")
    if damage == "no_manifest":
        os.remove(step_dir / "params" / "manifest.ocdbt")
    elif damage == "empty_metadata":
        (step_dir / "params" / "_METADATA").write_text("")
    else:
        path = step_dir / "data" / "process_0-of-1.json"
        path.write_text(path.read_text()[:5])
    setup = train.build(make_config(), tiny_source())
    with checkpoint.TrainCheckpointer(str(tmp_path / "work"), setup.config.checkpoint) as ckpt:
        with pytest.raises(checkpoint.CorruptCheckpointError,
                           match="corrupt/unreadable checkpoint" + (
                               ".*process_0-of-1.json" if damage == "truncated_data_json" else "")):
            ckpt.restore(STEPS, setup.abstract.params, setup.abstract.aux(), iter(setup.dataset))


def test_changed_rope_theta_is_reported(reference, tmp_path, caplog):
    from vgpt_jax import train
    _copy_run(reference, tmp_path / "work")
    cfg = make_config(**{"train.steps": STEPS, "model.rope_theta": 20000.0})
    with pytest.raises(ValueError, match=r"model\.rope_theta: 10000\.0 -> 20000\.0.*"
                                         r"--allow-config-change"):
        train.train(cfg, str(tmp_path / "work"), tiny_source())
    # Allowed: the run resumes (nothing left to train) and the warning lists the change.
    with caplog.at_level("WARNING"):
        result = train.train(cfg, str(tmp_path / "work"), tiny_source(),
                             allow_config_change=True)
    assert result.step == STEPS
    assert "model.rope_theta: 10000.0 -> 20000.0" in caplog.text


def test_a_field_added_later_at_its_default_is_no_change():
    from vgpt_jax import checkpoint
    from vgpt_jax.config import get_train_config
    current = get_train_config()
    older = current.to_dict()
    del older["optim"]["ema_decay"]  # a checkpoint written before the field existed
    assert checkpoint.config_changes(older, current) == []
    current.optim.ema_decay = 0.99
    assert checkpoint.config_changes(older, current) == [("optim.ema_decay", "<absent>", 0.99)]
