"""The optimiser: optax AdamW with gradient clipping, learning-rate schedules, and gradient
accumulation over microbatches inside one jitted step.

Defaults are the recipe's (the paper and the official training scripts): AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-5,
weight decay 0.1 on every parameter (torch AdamW over `model.parameters()`), global-norm clip
1.0, constant learning rate after a linear warmup.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from vgpt_jax.config import OptimConfig


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant / cosine / linear decay to `end_lr_ratio * lr`.
    `optim_cfg`: the `optim` section (a ConfigDict or `config.OptimConfig`)."""
    o = OptimConfig.from_config(optim_cfg)
    lr, warmup = o.learning_rate, o.warmup_steps
    if o.schedule == "constant_with_warmup":
        return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    decay = o.decay_steps or max(total_steps - warmup, 1)
    end = lr * o.end_lr_ratio
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=o.end_lr_ratio)
    elif o.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay)
    else:
        raise ValueError(f"optim.schedule={o.schedule!r}: unknown schedule")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


class ParamEmaState(NamedTuple):
    """The exponential moving average of the parameters after each update."""
    ema: optax.Params


def param_ema(decay: float) -> optax.GradientTransformation:
    """Keeps `ema <- decay * ema + (1 - decay) * new_params` in the optimiser state; the updates
    pass through unchanged. Placed last in a chain, `new_params` are the params the step applies.
    Living in the optimiser state, the average is sharded, checkpointed and resumed with it."""
    def init(params):
        # A copy: the average must not alias params that a donating step overwrites.
        return ParamEmaState(jax.tree.map(jnp.copy, params))

    def update(updates, state, params):
        new_params = optax.apply_updates(params, updates)
        return updates, ParamEmaState(optax.incremental_update(new_params, state.ema, 1 - decay))
    return optax.GradientTransformation(init, update)


def ema_params(opt_state, params) -> optax.Params | None:
    """The parameter average kept by a `param_ema` in `opt_state`, or None when it keeps none.
    Parameters it does not average (frozen by an adapters-only optimiser, `finetune`) are taken
    from `params`, so the result is always a whole params tree."""
    is_ema = lambda x: isinstance(x, ParamEmaState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_ema) if is_ema(s)]
    if not found:
        return None
    masked = lambda x: isinstance(x, optax.MaskedNode)
    return jax.tree.map(lambda e, p: p if masked(e) else e, found[0].ema, params,
                        is_leaf=masked)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
    """AdamW after global-norm clipping; with `optim.ema_decay` > 0 also a parameter average
    (`param_ema`) for sampling. The recipe keeps none (`--use_ema` unset in the official
    scripts)."""
    o = OptimConfig.from_config(optim_cfg)
    schedule = make_schedule(o, total_steps)
    parts = [optax.clip_by_global_norm(o.grad_clip_norm),
             optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)]
    if o.ema_decay:
        parts.append(param_ema(o.ema_decay))
    return optax.chain(*parts), schedule


def split_microbatches(batch, num: int):
    """[B, ...] -> [num, B / num, ...], microbatch i holding rows i, i + num, ... so that every
    microbatch keeps the batch sharding (each device contributes rows to every microbatch)."""
    def one(x):
        b = x.shape[0]
        if b % num:
            raise ValueError(f"batch of {b} does not split into {num} microbatches")
        return jnp.swapaxes(x.reshape(b // num, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def accumulate_gradients(loss_fn, params, batch, rng, num: int):
    """Mean loss, metrics and gradients of `loss_fn(params, batch, rng) -> (loss, metrics)` over
    `num` equal microbatches (a `lax.scan`, so one microbatch's activations live at a time).
    Microbatch i uses `fold_in(rng, i)`; with num == 1 the whole batch uses `rng` itself."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, metrics, grads
    micro = split_microbatches(batch, num)

    def body(carry, xs):
        i, mb = xs
        (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params,
                                                          jax.tree.map(lambda x: x[0], micro), rng))
    (loss, metrics), grads = zeros
    total, _ = jax.lax.scan(body, (loss, metrics, grads), (jnp.arange(num), micro))
    return jax.tree.map(lambda x: x / num, total)
