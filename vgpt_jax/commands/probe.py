"""Linear probes on stored features (`vgpt features`): a sweep over every stored layer and
pooling, top-1 per label against the majority class, the best of each label.

    vgpt probe --features feats/trained feats/random feats/pixels --out probes/
    vgpt probe --features feats/mine --labels my_labels.csv --label action

--labels: a CSV with a `name` column (the store's video names), an optional `group` column
(videos of one group stay on one side of every split) and one column per label (empty cells:
unlabelled). Default: the first store's labels.csv (`vgpt features` writes one for the physics
world). Probing uses `vgpt_jax.eval.probe.linear_probe`; --out gets report.json and, per label,
the confusion matrix of its best feature as a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

NOT_LABELS = ("name", "group", "take")


def build_parser() -> argparse.ArgumentParser:
    from vgpt_jax.eval import probe
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", required=True,
                   help="feature store folders or features.npz files (one table for all)")
    p.add_argument("--labels", default=None, help="labels CSV (default: <first store>/labels.csv)")
    p.add_argument("--label", nargs="+", default=None, help="label columns (default: all)")
    p.add_argument("--keys", nargs="+", default=None,
                   help="feature keys, e.g. layer2.mean (default: every stored key)")
    p.add_argument("--out", default=None, help="folder for report.json and confusion PNGs")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--weight-decays", type=float, nargs="+", default=list(probe.WEIGHT_DECAYS))
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per probe")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    return p


def default_labels(store: str) -> str:
    directory = store if os.path.isdir(store) else os.path.dirname(os.path.abspath(store))
    return os.path.join(directory, "labels.csv")


def store_name(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.basename(os.path.dirname(path) if path.endswith(".npz") else path)


def load_features(paths, keys=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Stores of the same videos -> (names, {"<store>/<key>": [N, D]}), rows in the first
    store's order; the store prefix is dropped when there is one store."""
    from vgpt_jax import feature_store
    names, table = None, {}
    for path in paths:
        n, arrays = feature_store.load(path)
        if names is None:
            names = n
        elif set(n) != set(names):
            raise ValueError(f"features {path!r}: other videos than {paths[0]!r}")
        order = {v: i for i, v in enumerate(n)}
        rows = np.asarray([order[v] for v in names])
        for k, v in arrays.items():
            if keys is None or k in keys:
                table[k if len(paths) == 1 else f"{store_name(path)}/{k}"] = v[rows]
    if not table:
        raise ValueError(f"features: none of the keys {keys} are stored")
    return names, table


def aligned_labels(names: np.ndarray, path: str) -> dict[str, np.ndarray]:
    """The labels CSV's columns in the order of `names` (every video must be listed)."""
    from vgpt_jax.eval.physics_probe import read_labels
    table = read_labels(path)
    index = {n: i for i, n in enumerate(table["name"])}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"labels {path!r}: no row for {len(missing)} video(s) of the store, "
                         f"e.g. {missing[0]!r}")
    rows = np.asarray([index[n] for n in names])
    return {k: v[rows] for k, v in table.items()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from vgpt_jax.eval import probe

    names, table = load_features(args.features, args.keys)
    labels_path = args.labels or default_labels(args.features[0])
    labels = aligned_labels(names, labels_path)
    columns = args.label or [k for k in labels if k not in NOT_LABELS]
    for c in columns:
        if c not in labels:
            raise ValueError(f"--label {c!r}: not a column of {labels_path} ({sorted(labels)})")
    groups = labels.get("group", names)

    results: dict[str, dict[str, probe.ProbeResult]] = {c: {} for c in columns}
    for c in columns:
        have = labels[c] != ""
        for key, x in table.items():
            results[c][key] = probe.linear_probe(
                x[have], labels[c][have], groups[have], test_fraction=args.test_fraction,
                weight_decays=args.weight_decays, steps=args.steps, seed=args.seed)

    width = max(len(k) for k in table)
    print(f"{'feature':<{width}}  " + "  ".join(f"{c:>10}" for c in columns))
    first = {c: next(iter(results[c].values())) for c in columns}
    print(f"{'(majority class)':<{width}}  "
          + "  ".join(f"{first[c].majority:>10.3f}" for c in columns))
    for key in table:
        print(f"{key:<{width}}  " + "  ".join(f"{results[c][key].top1:>10.3f}" for c in columns))
    report = {"labels": labels_path, "features": [os.path.abspath(f) for f in args.features],
              "best": {}, "results": {}}
    for c in columns:
        best = max(results[c], key=lambda k: results[c][k].top1)
        r = results[c][best]
        print(f"best for {c}: {best} top-1 {r.top1:.3f} (majority {r.majority:.3f}, "
              f"{r.num_train} train / {r.num_test} test videos, weight decay {r.weight_decay:g})")
        report["best"][c] = {"feature": best, "top1": r.top1, "majority": r.majority}
        report["results"][c] = {k: {"top1": v.top1, "majority": v.majority,
                                    "weight_decay": v.weight_decay, "classes": v.classes,
                                    "confusion": v.confusion.tolist(), "num_train": v.num_train,
                                    "num_test": v.num_test} for k, v in results[c].items()}
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            probe.plot_confusion(r, os.path.join(args.out, f"confusion_{c}.png"), f"{c}: {best}")
    if args.out:
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}/report.json and confusion_<label>.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
