"""Video-to-video retrieval by cosine similarity of features.

Every query video ranks all the other videos of the gallery (itself excluded) by cosine
similarity; its target is the one other video of its group (on the physics world: the other
take of the same scenario). Ties count against the query (the target's rank is 1 + the number
of videos scoring at least as high), so a constant feature cannot look good.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)


def cosine_ranks(features: np.ndarray, targets: np.ndarray, queries: np.ndarray | None = None,
                 center: bool = False) -> np.ndarray:
    """1-based rank of `targets[q]` for each query q among all videos but q: [Q].

    features [N, D]; queries [Q] indices (default all); targets [Q] indices. `center`
    subtracts the mean feature first (it removes a direction every video shares).
    """
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    if center:
        x = x - x.mean(0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    queries = np.arange(len(x)) if queries is None else np.asarray(queries)
    targets = np.asarray(targets)
    sim = x[queries] @ x.T                                   # [Q, N]
    sim[np.arange(len(queries)), queries] = -np.inf          # a video never retrieves itself
    target_sim = sim[np.arange(len(queries)), targets]
    others = np.ones_like(sim, bool)
    others[np.arange(len(queries)), targets] = False
    return 1 + ((sim >= target_sim[:, None]) & others).sum(axis=1)


def summarize(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """{"R@k": fraction with rank <= k, ..., "median_rank", "num_queries"}."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float((ranks <= k).mean()) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["num_queries"] = int(len(ranks))
    return out


def pair_targets(groups: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(queries, targets): every video whose group holds exactly one other video, and that one."""
    groups = np.asarray([str(g) for g in groups])
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    queries, targets = [], []
    for idx in members.values():
        if len(idx) == 2:
            queries += idx
            targets += idx[::-1]
    if not queries:
        raise ValueError("groups: no group holds exactly two videos, so there is nothing to "
                         "retrieve")
    order = np.argsort(queries)
    return np.asarray(queries)[order], np.asarray(targets)[order]
