"""Convert the released Video-GPT PyTorch weights into a vgpt_jax model export.

    python tools/convert_official.py --source GrayShine/Video-GPT --output exports/video_gpt
    python tools/convert_official.py --source /path/to/Video-GPT --output out/ --dtype float32

`--source` is a folder with the official `config.json`, tokenizer files and `model.safetensors`
(or `model.pt`), or a Hugging Face repo id (downloaded with huggingface_hub). The output is
`config.json` + `params/`, loadable with `vgpt_jax.checkpoint.load_model`.
"""
from __future__ import annotations

import argparse
import os
import sys

from vgpt_jax import convert_official


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="official checkpoint folder or hub repo id")
    p.add_argument("--output", required=True, help="folder for the vgpt_jax export")
    p.add_argument("--dtype", default="bfloat16", choices=convert_official.OUTPUT_DTYPES,
                   help="parameter dtype of the export")
    p.add_argument("--rope-factor-rule", default="official",
                   choices=convert_official.ROPE_FACTOR_RULES,
                   help="LongRoPE factors: 'official' (as the released code: long factors at "
                        "every length) or 'by_length' (stock transformers)")
    p.add_argument("--cache-dir", default=None, help="hub download cache (repo ids only)")
    args = p.parse_args(argv)
    source = convert_official.resolve_source(args.source, args.cache_dir)
    config = convert_official.convert(source, args.output, args.dtype, args.rope_factor_rule)
    m = config.model
    print(f"wrote {os.path.abspath(args.output)}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"{m.param_dtype}, rope {m.rope_scaling.type} ({m.rope_scaling.factor_rule}), "
          f"marker ids {list(config.pretrained.marker_token_ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
