"""The `vgpt` entry point: an error is one line (the traceback only with --debug), and a command
on a host without an accelerator prints none of libtpu's TPU-probing warnings."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vgpt(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "VGPT_DEBUG")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "vgpt_jax", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


TRAIN_MISSING_STORE = ("train", "--config", "configs/tiny_test.py", "--workdir", "unused",
                       "--config.data.store=/nonexistent/store")


def test_an_error_is_one_line_without_tpu_noise(tmp_path):
    from vgpt_jax import cli
    proc = _vgpt(*TRAIN_MISSING_STORE[:4], str(tmp_path / "w"), TRAIN_MISSING_STORE[5])
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["vgpt train: error: StoreError: /nonexistent/store: latent store directory "
                     "does not exist (--debug shows the traceback)"], proc.stderr
    if not cli._has_accelerator():  # libtpu's probe is what printed these
        assert "TPU" not in proc.stdout + proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = _vgpt(*TRAIN_MISSING_STORE[:4], str(tmp_path / "w"), TRAIN_MISSING_STORE[5],
                 "--debug")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "StoreError" in proc.stderr


def test_a_finished_command_enters_the_distributed_shutdown_barrier(monkeypatch):
    """Returning 0 or exiting 0 (absl's app.run, as `vgpt train` does) enters jax.distributed's
    shutdown barrier while the backends are alive; a failed command does not."""
    import types

    import pytest

    from vgpt_jax import cli
    entered = []
    monkeypatch.setattr(cli, "_leave_distributed_runtime", lambda: entered.append(True))
    outcomes = {"returns": lambda rest: 0, "exits": lambda rest: sys.exit(0),
                "fails": lambda rest: sys.exit(1), "raises": lambda rest: 1 / 0}
    for name, main in outcomes.items():
        monkeypatch.setitem(sys.modules, f"fake_{name}", types.SimpleNamespace(main=main))
        monkeypatch.setitem(cli.COMMANDS, name, f"fake_{name}")
    assert cli.main(["returns"]) == 0 and len(entered) == 1
    with pytest.raises(SystemExit):
        cli.main(["exits"])
    assert len(entered) == 2
    with pytest.raises(SystemExit):
        cli.main(["fails"])
    assert cli.main(["raises"]) == 1 and len(entered) == 2
