"""Export a LoRA fine-tune: its adapters alone, or the plain model with them merged.

    vgpt export-lora --checkpoint runs/ft/train --output runs/ft/adapters           # adapters + condition params
    vgpt export-lora --checkpoint runs/ft/train --output runs/ft/merged --merge     # a plain export
    vgpt export-lora --base runs/demo/model --adapters runs/ft/adapters --output runs/ft/merged --merge

`--checkpoint` is a training workdir (its latest checkpoint) or a model export with adapters.
The adapters-alone folder (`config.json` + `adapters/`, `finetune.export_adapters`) holds the
LoRA factors and the condition parameters, a fraction of the base; `--base` + `--adapters`
lays it onto the base export it was trained from (`finetune.load_with_adapters`). `--merge`
writes W + scale A B into every adapted kernel (`finetune.export_merged`): a model export that
loads and samples as a plain model (`model.lora.rank` 0), condition parameters kept.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgpt export-lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a fine-tune's training workdir or model export (with adapters)")
    p.add_argument("--base", default=None, help="the base model export the adapters were "
                                                "trained from (with --adapters)")
    p.add_argument("--adapters", default=None, help="an adapters-alone folder (with --base)")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapters into the kernels: a plain model export")
    p.add_argument("--step", type=int, default=None,
                   help="with a training workdir: the checkpoint step (default: the latest)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from vgpt_jax import checkpoint, finetune
    from vgpt_jax.config import ModelConfig

    if (args.checkpoint is None) == (args.adapters is None and args.base is None):
        raise ValueError("give --checkpoint, or --base with --adapters")
    if args.checkpoint is None and (args.base is None or args.adapters is None):
        raise ValueError("--base and --adapters go together")
    if args.step is not None and args.checkpoint is None:
        raise ValueError("--step is for --checkpoint (a training workdir)")
    if os.path.exists(os.path.join(args.output, checkpoint.CONFIG_FILE)):
        raise ValueError(f"--output {args.output!r}: already holds an export")
    if args.checkpoint is not None:
        model, config = checkpoint.load_model(args.checkpoint, step=args.step)
    else:
        for flag, path in (("--base", args.base), ("--adapters", args.adapters)):
            if not os.path.isdir(path):
                raise ValueError(f"{flag} {path!r}: no such folder")
        if not os.path.isdir(os.path.join(args.adapters, finetune.ADAPTERS_DIR)):
            raise ValueError(f"--adapters {args.adapters!r}: no {finetune.ADAPTERS_DIR}/ folder "
                             "(not written by vgpt export-lora)")
        model, config = finetune.load_with_adapters(args.base, args.adapters)
    cfg = ModelConfig.from_config(config.model)
    if args.merge:
        if not cfg.lora.rank:
            raise ValueError("--merge: the model has no LoRA adapters (model.lora.rank is 0)")
        out = finetune.export_merged(args.output, model, config)
        print(f"wrote the merged model (rank-{cfg.lora.rank} adapters in its kernels) to {out}")
    elif args.checkpoint is not None:
        if not cfg.lora.rank and not cfg.conditions.enabled:
            raise ValueError(f"--checkpoint {args.checkpoint!r}: no LoRA adapters or condition "
                             "parameters to export (model.lora.rank is 0, no conditions)")
        out = finetune.export_adapters(args.output, model, config)
        print(f"wrote the adapters and condition parameters alone to {out}")
    else:
        out = checkpoint.export_model(args.output, model, config)
        print(f"wrote the base model with the adapters laid on (unmerged) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
