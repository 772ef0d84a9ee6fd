"""`vgpt <command> [options]`: the command-line face of vgpt_jax, thin over the library.

    vgpt demo             the main job: physics world -> latents -> training -> evaluation
    vgpt make-physics     write physics-world videos to a folder
    vgpt make-atari       record Atari episodes (frames + actions) into a latent store
    vgpt prepare          encode a folder of videos into a latent store (resumable)
    vgpt train-vae        train a small AutoencoderKL on your frames
    vgpt train            train Video-GPT from a config file (resumable, sharded)
    vgpt sample           continue a video file with a checkpoint, write mp4
    vgpt eval             score a checkpoint on held-out videos against baselines
    vgpt eval physics-iq  score generated videos on a Physics-IQ release (official numbers)
    vgpt physics-iq       generate the Physics-IQ predictions from a checkpoint, then score them
    vgpt convert-official convert the released PyTorch weights
    vgpt plan             compile the train step / sampler for a TPU topology, print memory
    vgpt features         pooled hidden states per video into a resumable npz store
    vgpt probe            linear probes on stored features: top-1 per label, layer/pool sweep
    vgpt retrieval        video-to-video retrieval by cosine similarity: R@1/5/10, median rank
    vgpt segment-finetune fine-tune to render segmentation masks as video; J and F per frame
    vgpt recipe           class-to-video, text-to-video, action-conditioned prediction, animation
    vgpt export-lora      a LoRA fine-tune's adapters alone, or merged into a plain export

`vgpt <command> --help` lists a command's options. An error prints one line; `--debug`
(anywhere on the command line) or VGPT_DEBUG=1 prints its traceback instead.
"""
from __future__ import annotations

import glob
import importlib
import os
import sys

from vgpt_jax import host_memory

COMMANDS = {
    "demo": "vgpt_jax.commands.demo",
    "make-physics": "vgpt_jax.commands.make_physics_videos",
    "make-atari": "vgpt_jax.commands.make_atari",
    "prepare": "vgpt_jax.commands.prepare_latents",
    "train-vae": "vgpt_jax.commands.train_vae",
    "train": "vgpt_jax.commands.train",
    "sample": "vgpt_jax.commands.sample",
    "eval": "vgpt_jax.commands.evaluate",
    "convert-official": "vgpt_jax.commands.convert_official",
    "plan": "vgpt_jax.commands.plan_tpu",
    "physics-iq": "vgpt_jax.commands.physics_iq",
    "features": "vgpt_jax.commands.features",
    "probe": "vgpt_jax.commands.probe",
    "retrieval": "vgpt_jax.commands.retrieval",
    "segment-finetune": "vgpt_jax.commands.segment_finetune",
    "recipe": "vgpt_jax.recipes",
    "export-lora": "vgpt_jax.commands.export_lora",
}
# `vgpt eval physics-iq ...` scores videos, not a checkpoint: it is `vgpt physics-iq score ...`.
ALIASES = {("eval", "physics-iq"): ("physics-iq", "score")}


# PCI vendor ids of the accelerators JAX has backends for: Google (TPU), NVIDIA, AMD.
_ACCELERATOR_VENDORS = ("0x1ae0", "0x10de", "0x1002")


def _has_accelerator() -> bool:
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() in _ACCELERATOR_VENDORS:
                    return True
        except OSError:
            continue
    return False


def _quiet_accelerator_probe() -> None:
    """On a Linux host with no accelerator, run JAX on the CPU outright. Otherwise an installed
    libtpu (the `tpu` extra, for `vgpt plan`) probes for a TPU on every command and prints TPU
    hostname and accelerator-type warnings. `vgpt plan` compiles for TPUs without one either
    way; an explicit JAX_PLATFORMS is always kept."""
    if "JAX_PLATFORMS" in os.environ or not os.path.isdir("/sys/bus/pci/devices"):
        return
    if not _has_accelerator():
        os.environ["JAX_PLATFORMS"] = "cpu"


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _leave_distributed_runtime() -> None:
    """After a command that ran in a `jax.distributed` runtime succeeded: enter the shutdown
    barrier now, with every backend alive. Left to JAX's exit hook, the barrier runs after
    the backends are torn down; a process slow there missed it on a loaded 2-core machine,
    and every process of a finished job aborted (SIGABRT, "Shutdown barrier has failed")."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        jax.distributed.shutdown()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VGPT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if (command, rest[0] if rest else None) in ALIASES:
        command, subcommand = ALIASES[(command, rest[0])]
        rest = [subcommand, *rest[1:]]
    if command not in COMMANDS:
        print(f"vgpt: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"vgpt {command}"  # what argparse and absl print as the program name
    _quiet_accelerator_probe()
    try:
        # Imported on demand: `vgpt prepare` should not pay for what `vgpt train` imports.
        code = importlib.import_module(COMMANDS[command]).main(rest) or 0
        if code == 0:
            _leave_distributed_runtime()
        return code
    except SystemExit as done:  # absl's app.run (vgpt train) ends every command with sys.exit
        if done.code in (None, 0):
            _leave_distributed_runtime()
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vgpt {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is reported the same way; --debug keeps the trace
        if debug:
            raise
        print(f"vgpt {command}: error: {_one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def entry() -> int:
    """The `vgpt` console script and `python -m vgpt_jax`: `main` in a process whose allocator
    backs large blocks with huge pages where JAX runs on the CPU (`vgpt_jax.host_memory`: the
    process re-runs itself once with the glibc tunable set). Not in `main`, which tests and
    scripts call in their own processes."""
    _quiet_accelerator_probe()
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        host_memory.restart_with_huge_pages()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
