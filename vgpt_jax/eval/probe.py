"""Linear probes on frozen features: what a representation makes linearly readable.

Protocol (`linear_probe`): a held-out test split (by group when groups are given, so two
near-identical takes of one scenario never straddle it); features standardised with the
training split's statistics; multinomial logistic regression trained full-batch with optax
(Adam, a fixed number of steps), one model per weight decay (an L2 penalty on the weights)
trained side by side with vmap; the weight decay is picked on a validation split carved from
the training split (by group too), the winner refitted on the whole training split and scored
once on the test split. The majority class of the training split is the floor to beat.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclasses.dataclass
class ProbeResult:
    top1: float                   # test accuracy of the refitted probe
    majority: float               # test accuracy of always answering the training majority
    weight_decay: float           # chosen on the validation split
    val_top1: dict[float, float]  # validation accuracy per weight decay
    classes: list[str]
    confusion: np.ndarray         # int [classes, classes]: rows truth, columns prediction
    num_train: int
    num_test: int


def split_by_group(groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out): about `fraction` of the distinct groups are held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction {fraction}: must be in (0, 1)")
    unique = np.unique(groups)
    if len(unique) < 2:
        raise ValueError(f"{len(unique)} group(s): a held-out split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_out = min(max(1, int(round(fraction * len(unique)))), len(unique) - 1)
    out = np.isin(groups, unique[order[:n_out]])
    return np.nonzero(~out)[0], np.nonzero(out)[0]


@functools.partial(jax.jit, static_argnums=(2, 4, 5))
def _fit(x, y, num_classes, weight_decays, steps, lr):
    """Weights {w: [K, D, C], b: [K, C]} for K weight decays, trained side by side."""
    def loss(params, wd):
        logits = x @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * wd * jnp.sum(params["w"] ** 2)

    opt = optax.adam(lr)

    def train(wd):
        params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params, wd)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return params
    return jax.vmap(train)(weight_decays)


def _predict(params, x, k):
    return np.asarray(jnp.argmax(x @ params["w"][k] + params["b"][k], axis=-1))


def _standardize(train, *others):
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features carry nothing; keep them at 0
    return [(a - mean) / std for a in (train, *others)]


def linear_probe(x: np.ndarray, labels: Sequence, groups: Sequence | None = None, *,
                 test_fraction: float = 0.3, val_fraction: float = 0.25,
                 weight_decays: Sequence[float] = WEIGHT_DECAYS, steps: int = 300,
                 lr: float = 0.05, seed: int = 0) -> ProbeResult:
    """Probe features x [N, D] for labels [N] (any hashable values; groups [N] optional)."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    labels = np.asarray([str(v) for v in labels])
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} labels for {len(x)} feature rows")
    groups = np.arange(len(x)) if groups is None else np.asarray([str(g) for g in groups])
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise ValueError(f"labels: {len(classes)} class(es); a probe needs at least 2")
    y = np.searchsorted(np.asarray(classes), labels)
    train, test = split_by_group(groups, test_fraction, seed)
    fit, val = split_by_group(groups[train], val_fraction, seed + 1)
    fit, val = train[fit], train[val]
    wds = [float(w) for w in weight_decays]

    xf, xv = _standardize(x[fit], x[val])
    params = _fit(jnp.asarray(xf), jnp.asarray(y[fit]), len(classes),
                  jnp.asarray(wds, jnp.float32), steps, lr)
    val_top1 = {w: float((_predict(params, xv, k) == y[val]).mean()) for k, w in enumerate(wds)}
    best = max(wds, key=lambda w: (val_top1[w], w))  # ties: the stronger regulariser

    xt, xs = _standardize(x[train], x[test])
    params = _fit(jnp.asarray(xt), jnp.asarray(y[train]), len(classes),
                  jnp.asarray([best], jnp.float32), steps, lr)
    pred = _predict(params, xs, 0)
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (y[test], pred), 1)
    majority = np.bincount(y[train], minlength=len(classes)).argmax()
    return ProbeResult(top1=float((pred == y[test]).mean()),
                       majority=float((y[test] == majority).mean()), weight_decay=best,
                       val_top1=val_top1, classes=classes, confusion=confusion,
                       num_train=len(train), num_test=len(test))


def plot_confusion(result: ProbeResult, path: str, title: str) -> str:
    """The confusion matrix as a PNG (rows: truth, columns: prediction, counts in cells)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(result.classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.7 * k), dpi=100)
    ax.imshow(result.confusion, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(result.confusion[i, j]), ha="center", va="center")
    ax.set_xticks(range(k), result.classes, rotation=45, ha="right")
    ax.set_yticks(range(k), result.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\ntop-1 {result.top1:.3f} (majority {result.majority:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
