"""Video-to-video retrieval on stored features (`vgpt features`): each video's target is the
other video of its group (the physics world: the other take of the same scenario, among all
videos of the store); R@1/5/10 and median rank per stored layer and pooling, the best first.

    vgpt retrieval --features feats/trained feats/random feats/pixels
    vgpt retrieval --features feats/mine --labels pairs.csv --center

--labels: a CSV with `name` and `group` columns (default: the first store's labels.csv).
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", required=True, help="feature stores")
    p.add_argument("--labels", default=None, help="CSV with name and group columns")
    p.add_argument("--keys", nargs="+", default=None, help="feature keys (default: all)")
    p.add_argument("--center", action="store_true",
                   help="subtract the mean feature before the cosine")
    p.add_argument("--json", default=None, help="write the table here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from vgpt_jax.commands.probe import aligned_labels, default_labels, load_features
    from vgpt_jax.eval import retrieval

    names, table = load_features(args.features, args.keys)
    labels_path = args.labels or default_labels(args.features[0])
    labels = aligned_labels(names, labels_path)
    if "group" not in labels:
        raise ValueError(f"labels {labels_path!r}: no 'group' column to pair videos by")
    queries, targets = retrieval.pair_targets(labels["group"])
    rows = {k: retrieval.summarize(retrieval.cosine_ranks(x, targets, queries, args.center))
            for k, x in table.items()}
    order = sorted(rows, key=lambda k: (-rows[k]["R@1"], rows[k]["median_rank"]))
    width = max(len(k) for k in rows)
    print(f"{'feature':<{width}}  {'R@1':>6} {'R@5':>6} {'R@10':>6} {'median rank':>12}   "
          f"({len(queries)} queries, {len(names) - 1} candidates each)")
    for k in order:
        r = rows[k]
        print(f"{k:<{width}}  {r['R@1']:>6.3f} {r['R@5']:>6.3f} {r['R@10']:>6.3f} "
              f"{r['median_rank']:>12g}")
    print(f"best: {order[0]} R@1 {rows[order[0]]['R@1']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"labels": labels_path, "center": args.center, "results": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
