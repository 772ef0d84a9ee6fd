"""Physics-IQ with the official numbers: score a folder of generated videos, or make them.

    vgpt eval physics-iq --release physics-IQ-benchmark --generated my_videos [--out report]
    vgpt physics-iq score ...        (the same)
    vgpt physics-iq generate --checkpoint exports/run1 --release physics-IQ-benchmark \
        --out physiq_run [--seeds 4] [--fps 8]

`score` writes report.json and report.md (both scores, per-view and per-category tables, the
physical-variance ceiling) to --out (default: next to --generated, `<generated>-physics-iq`).
The frame rate comes from the generated videos, as in the official scorer. `generate` predicts
the 5 s after each 3 s conditioning video, one folder per seed (resumable), then scores every
seed and prints mean +- std, as the Verified leaderboard asks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vgpt_jax.eval import physics_iq

METRIC_NAMES = {"spatiotemporal_iou": "spatiotemporal IoU (higher is better)",
                "spatial_iou": "spatial IoU (higher is better)",
                "weighted_spatial_iou": "weighted spatial IoU (higher is better)",
                "mse": "MSE (lower is better)"}


def _breakdown_table(title: str, table: dict | None, missing: str) -> list[str]:
    lines = [f"## {title}", ""]
    if not table:
        return lines + [missing, ""]
    lines += ["| | samples | Original | Verified | ST IoU | S IoU | WS IoU | MSE |",
              "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        m = row["metrics"]
        lines.append(f"| {name} | {row['num_samples']} | {row['original']:.2f} | "
                     f"{row['verified']:.2f} | {m['spatiotemporal_iou']:.4f} | "
                     f"{m['spatial_iou']:.4f} | {m['weighted_spatial_iou']:.4f} | {m['mse']:.5f} |")
    return lines + [""]


def markdown_report(result: dict) -> str:
    """The scores of `physics_iq.score_release` as a markdown page."""
    lines = [f"# Physics-IQ: {result['generated']}", "",
             f"Release {result['release']}, {result['fps']} FPS, {result['num_samples']} samples "
             f"({result['num_scenarios']} scenarios x views), the first {result['frames_scored']} "
             "frames scored.", "",
             "| score | value |", "|---|---|",
             f"| Physics-IQ (original) | {result['original']:.2f} |",
             f"| Physics-IQ Verified | {result['verified']:.2f} |",
             f"| original, variances rounded first (`calculate_iq_score.py`) | "
             f"{result['original_rounded_variances']:.2f} |", "",
             "## Against the physical variance", "",
             "The physical variance is take 2 scored against take 1: a prediction as close to "
             "take 1 as a second real take scores 100 (the ceiling).", "",
             "| metric | generated | physical variance |", "|---|---|---|"]
    for key, label in METRIC_NAMES.items():
        lines.append(f"| {label} | {result['metrics'][key]:.5f} | "
                     f"{result['physical_variance'][key]:.5f} |")
    lines.append("")
    lines += _breakdown_table("Per view", result["per_view"], "")
    lines += _breakdown_table("Per category", result["per_category"],
                              "No --descriptions CSV given, so no per-category table (the "
                              "official `descriptions/descriptions.csv` has the categories).")
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown_report(result))


def score_folder(release: str, generated: str, out_dir: str, *, fps=None,
                 descriptions: str | None = None, progress: bool = True) -> dict:
    """`physics_iq.score_release` with a progress bar, written to `out_dir`."""
    from tqdm import tqdm

    categories = physics_iq.load_categories(descriptions) if descriptions else None
    with tqdm(desc=f"scoring {os.path.basename(os.path.normpath(generated))}", unit="video",
              disable=not progress, file=sys.stderr) as bar:
        result = physics_iq.score_release(release, generated, fps=fps, categories=categories,
                                          progress=lambda sample: bar.update(1))
    write_report(result, out_dir)
    return result


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", required=True,
                   help="the Physics-IQ release folder (it holds split-videos/ and video-masks/)")
    p.add_argument("--descriptions", default=None,
                   help="descriptions CSV with scenario and category columns (per-category table)")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgpt physics-iq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    score = sub.add_parser("score", help="score a folder of generated videos")
    _add_common(score)
    score.add_argument("--generated", required=True, help="folder of {id}_{view}_{scene}.mp4")
    score.add_argument("--out", default=None, help="report folder")
    score.add_argument("--fps", default=None,
                       help="expected frame rate (checked against the videos; default: theirs)")
    from vgpt_jax.commands import physics_iq_generate
    physics_iq_generate.add_arguments(sub.add_parser("generate", help=physics_iq_generate.__doc__
                                                     .splitlines()[0]), _add_common)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "generate":
        from vgpt_jax.commands import physics_iq_generate
        return physics_iq_generate.run(args)
    out = args.out or os.path.normpath(args.generated) + "-physics-iq"
    result = score_folder(args.release, args.generated, out, fps=args.fps,
                          descriptions=args.descriptions, progress=not args.no_progress)
    print(markdown_report(result))
    print(f"wrote {os.path.join(out, 'report.json')} and report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
