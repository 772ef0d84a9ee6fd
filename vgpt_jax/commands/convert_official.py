"""Convert the released Video-GPT PyTorch weights into a vgpt_jax model export.

    vgpt convert-official --source GrayShine/Video-GPT --output exports/video_gpt
    vgpt convert-official --source ckpt --output out/ --dtype float32
    vgpt convert-official --source ckpt --weights runs/stage4/model.pt --output out/

`--source` is a Hugging Face repo id or a folder with the official `config.json` and tokenizer
files (or its `transformer/` subfolder), the weights found as the official inference script
finds them: beside the config or in `transformer/`, as `model.pt`, `model.safetensors`,
`pytorch_model.bin` or a `pytorch_model.bin/` folder of shards (or a safetensors / bin index).
`--weights` names them when they are elsewhere. A bundled `vae/` is copied into the export;
`--lora` merges a peft LoRA adapter folder into the weights.
The output is `config.json` + `params/`, loadable with `vgpt_jax.checkpoint.load_model` and
`Pipeline.from_checkpoint`.
"""
from __future__ import annotations

import argparse
import os
import sys

from vgpt_jax import convert_official


def summary(output: str, config) -> str:
    """One line: what was written and how it will sample."""
    m, rs = config.model, config.model.rope_scaling
    rope = "none" if rs.type == "none" else f"{rs.type} ({rs.factor_rule})"
    return (f"wrote {os.path.abspath(output)}: {m.num_layers} layers, hidden {m.hidden_size}, "
            f"{m.param_dtype}, rope: {rope}, prediction: {config.objective.prediction_type}, "
            f"vae: {config.pretrained.vae}, weights: {', '.join(config.pretrained.weights)}, "
            f"marker ids {list(config.pretrained.marker_token_ids)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="official checkpoint folder or hub repo id")
    p.add_argument("--output", required=True, help="folder for the vgpt_jax export")
    p.add_argument("--weights", default=None,
                   help="weights file or folder, when not beside config.json or in transformer/")
    p.add_argument("--dtype", default="bfloat16", choices=convert_official.OUTPUT_DTYPES,
                   help="parameter dtype of the export")
    p.add_argument("--rope-factor-rule", default="official",
                   choices=convert_official.ROPE_FACTOR_RULES,
                   help="LongRoPE factors: 'official' (as the released code: long factors at "
                        "every length) or 'by_length' (stock transformers)")
    p.add_argument("--prediction-type", default=None, choices=convert_official.PREDICTION_TYPES,
                   help="what the network predicts; default: the official script's rule "
                        "(v for model.pt weights, x1 otherwise)")
    p.add_argument("--lora", default=None,
                   help="a peft LoRA adapter folder to merge in (as the official merge_lora)")
    p.add_argument("--cache-dir", default=None, help="hub download cache (repo ids only)")
    args = p.parse_args(argv)
    try:
        source = convert_official.resolve_source(args.source, args.cache_dir)
        config = convert_official.convert(source, args.output, args.dtype, args.rope_factor_rule,
                                          weights=args.weights,
                                          prediction_type=args.prediction_type, lora=args.lora)
    except (ValueError, OSError) as e:  # ConversionError, config checks, file and hub errors
        # What the user got wrong (a path, a file, a layout) in one line, not a traceback.
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    print(summary(args.output, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
