"""Train Video-GPT from a config file (`vgpt train`, or `python tools/train.py`):

    vgpt train --config configs/curriculum.py:stage1 --workdir runs/stage1 [--config.train.steps=1000 ...]

Re-running with the same workdir resumes from its newest checkpoint that verifies (a corrupt
one is skipped with a warning). A SIGTERM (preemption) saves a checkpoint and exits with status
0; a non-finite step exits with an error and is never saved. Resuming with a config that differs
in what the run learns (model, objective, optimiser, data) is refused unless
--allow-config-change is given; a change of parameter shapes is always refused.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from vgpt_jax.commands import start_config_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
_ALLOW_CHANGE = flags.DEFINE_bool("allow-config-change", False,
                                  "resume a checkpoint trained with a different config")


def _run(argv) -> None:
    start_config_run(argv, _CONFIG, _WORKDIR)
    from vgpt_jax import train
    result = train.train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
    logging.info("finished at step %d%s: %s", result.step,
                 " (preempted, checkpoint saved)" if result.preempted else "", result.metrics)


def main(argv=None) -> int:
    """`argv` without the program name (as `vgpt_jax.cli` passes it); default `sys.argv[1:]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    app.run(_run, argv=[sys.argv[0]] + argv)  # exits the process with the run's status
    return 0
