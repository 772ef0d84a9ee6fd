"""Fine-tune a model to segment video by rendering masks as video (`vgpt segment-finetune`):

    vgpt segment-finetune --config configs/segmentation.py --workdir runs/segment/pretrained
    vgpt segment-finetune --config configs/segmentation.py --workdir runs/segment/scratch \
        --config.from_scratch=True

Pairs of (source clip, mask clip) come from the physics world (masks from the simulator); the
model learns the mask clip as the clip after the source clip (`vgpt_jax.segmentation`). Prints
J, F and J&F on held-out windows for the model and for the threshold baseline; writes
<workdir>/report.json, masks.png (source | predicted | true), metrics.jsonl and model/ (an
export, for `Pipeline.from_checkpoint`).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from vgpt_jax.commands import start_config_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/segmentation.py (or :quick)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (model, metrics, report)")


def _run(argv) -> None:
    start_config_run(argv, _CONFIG, _WORKDIR)
    from vgpt_jax import segmentation
    report = segmentation.run(segmentation.SegmentationConfig.from_config(_CONFIG.value),
                              _WORKDIR.value)
    print(f"{report['arm']}: {report['steps']} steps x batch {report['batch_size']} in "
          f"{report['train_seconds']:.0f} s; {report['test_windows']} held-out windows of "
          f"{report['frames_per_window']} frames")
    for name in ("model", "threshold_baseline"):
        s = report[name]
        print(f"  {name:<20} J {s['J']:.3f}  F {s['F']:.3f}  J&F {s['J&F']:.3f}")
    print(f"wrote {_WORKDIR.value}/report.json and masks.png")


def main(argv=None) -> int:
    """`argv` without the program name (as `vgpt_jax.cli` passes it); default `sys.argv[1:]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    app.run(_run, argv=[sys.argv[0]] + argv)  # exits the process with the run's status
    return 0
