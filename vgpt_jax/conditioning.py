"""Condition tokens: a class per video and text tokens (global), an action per frame
(per-frame), embedded as tokens beside the frame blocks (`layout.ConditionLayout`, the rule in
`attention.visible`).

`Conditions` is what a caller gives the model: the raw condition values and their layout. The
model embeds them (`ConditionEmbed`: a class table, a linear map of the action vector, a linear
projection of a frozen text encoder's embeddings, each with a learned type embedding) and runs them through the decoder as a stream of their own: condition
tokens attend to condition tokens only, and frame tokens add a gated attention to them
(`attention.condition_attention`; the gates start at zero). Dropping a condition marks its token
invalid, so a video with every condition dropped sees no condition key and is computed exactly
as by the model without conditions: that is the unconditional branch of condition guidance and
of condition dropout in training.

As condition tokens see no frame token, the stream's per-layer keys and values are the same
beside any frame tokens: `ConditionKV` holds them, computed once (`VideoGPT.condition_kv`) for
many calls with the same conditions (a clip's denoising steps).

Condition parameters are `ConditionParam`s (an `nnx.Param` subclass), so an nnx filter selects
them: LoRA fine-tuning trains them with the adapters (`lora.TRAINABLE`).
"""
from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vgpt_jax import layout as layout_lib
from vgpt_jax.config import ModelConfig, dtype_of


class ConditionParam(nnx.Param):
    """A parameter of a condition path (embeddings, gates): new in a fine-tune, always trained."""


@flax.struct.dataclass
class Conditions:
    """Condition values and their token layout. `class_id` [B] int32 (the model has classes),
    `text` [B, N, text_dim] float32 (the model has text: N = `text_tokens` embeddings, padding
    marked invalid in `layout`), `actions` [B, F', A] float32 (the model has actions: one per
    per-frame token of `layout`, in its order), `layout` [B, C] with C = (1 if classes) +
    (N if text) + (F' if actions), in that order."""
    layout: layout_lib.ConditionLayout
    class_id: jax.Array | None = None
    actions: jax.Array | None = None
    text: jax.Array | None = None

    def dropped(self, drop_B) -> "Conditions":
        """The same conditions with video b's all invalid where `drop_B[b]`."""
        keep = ~jnp.asarray(drop_B, bool)[:, None]
        return self.replace(layout=self.layout.replace(valid=self.layout.valid & keep))


class ConditionKV(NamedTuple):
    """A condition stream's per-layer keys and values (after RoPE) `k`, `v` [layers, B, C, KV,
    D], its `layout` [B, C] and (`head_modulation`) each token's head embedding `head` [B, C,
    D]: all that frame tokens read of the conditions (`VideoGPT.condition_kv`); an entry point
    given it runs no condition stream."""
    k: jax.Array
    v: jax.Array
    layout: layout_lib.ConditionLayout
    head: jax.Array | None = None


def block_modulation(head_BCD, layout: layout_lib.ConditionLayout, frame_BN) -> jax.Array:
    """Each block's head modulation [B, NB, D]: the mean of the head embeddings of the valid
    global tokens (a caption's length does not scale it; one class token gives its own), plus
    the valid per-frame tokens' of the block's frame `frame_BN`."""
    is_global = layout.frame == layout_lib.GLOBAL_FRAME
    global_weight = (is_global & layout.valid).astype(head_BCD.dtype)
    global_weight = global_weight / jnp.maximum(global_weight.sum(-1, keepdims=True), 1.0)
    own = (layout.frame[:, None, :] == frame_BN[:, :, None]) & layout.valid[:, None, :]
    weight = own.astype(head_BCD.dtype) + global_weight[:, None, :]
    return jnp.einsum("bnc,bcd->bnd", weight, head_BCD)


class ConditionError(ValueError):
    """A bad condition input. `condition` names it (the keyword: class_id, actions, text,
    text_mask; or a store record's), `problem` what is wrong; the message is
    "condition: problem"."""

    def __init__(self, condition: str, problem: str):
        super().__init__(f"{condition}: {problem}")
        self.condition, self.problem = condition, problem


def make_conditions(cfg: ModelConfig, frame_BF, position_BF, block_len: int, *, class_id=None,
                    actions=None, text=None, text_mask=None) -> Conditions | None:
    """The model's conditions over frames `frame_BF` (RoPE slots `position_BF`), or None when
    none are given (the unconditioned model). `class_id` [B], `text` [B, text_tokens, text_dim]
    (`text_mask` [B, text_tokens]: its real tokens, default all) and `actions` [B, F, A] (one
    per frame of `frame_BF`): given at all, each kind the model has is required and no other;
    errors name the missing or extra input."""
    cc = cfg.conditions
    if class_id is None and actions is None and text is None:
        return None
    frame = jnp.asarray(frame_BF, jnp.int32)
    b, f = frame.shape
    check_kinds(cc, class_id, actions, text)
    global_valid = [jnp.ones((b, 1), bool)] if class_id is not None else []
    if class_id is not None:
        class_id = jnp.asarray(class_id, jnp.int32)
        if class_id.shape != (b,):
            raise ConditionError("class_id", f"shape {class_id.shape}, expected [batch] = "
                                 f"({b},)")
    if text is not None:
        text = jnp.asarray(text, jnp.float32)
        if text.shape != (b, cc.text_tokens, cc.text_dim):
            raise ConditionError("text", f"shape {text.shape}, expected [batch, text_tokens, "
                                 f"text_dim] = {(b, cc.text_tokens, cc.text_dim)}")
        mask = (jnp.ones((b, cc.text_tokens), bool) if text_mask is None
                else jnp.asarray(text_mask, bool))
        if mask.shape != (b, cc.text_tokens):
            raise ConditionError("text_mask", f"shape {mask.shape}, expected [batch, "
                                 f"text_tokens] = {(b, cc.text_tokens)}")
        global_valid.append(mask)
    if actions is not None:
        actions = jnp.asarray(actions, jnp.float32)
        if actions.shape != (b, f, cc.action_dim):
            raise ConditionError("actions", f"shape {actions.shape}, expected [batch, frames, "
                                 f"action_dim] = {(b, f, cc.action_dim)}")
    else:
        frame, position_BF = frame[:, :0], jnp.asarray(position_BF)[:, :0]
    global_valid = (jnp.concatenate(global_valid, axis=1) if global_valid
                    else jnp.ones((b, 0), bool))
    layout = layout_lib.condition_layout(frame, position_BF, block_len,
                                         num_global=global_valid.shape[1],
                                         global_valid_B=global_valid)
    return Conditions(layout, class_id, actions, text)


def check_kinds(cc, class_id, actions, text=None) -> None:
    """Given any conditions, each kind the model (`cc`: its `ConditionConfig`) has is required
    and no other; the error names the missing or extra input."""
    for name, given, needed in (("class_id", class_id, cc.num_classes > 0),
                                ("actions", actions, cc.action_dim > 0),
                                ("text", text, cc.text_dim > 0)):
        if needed and given is None:
            raise ConditionError(name, f"missing; the model is conditioned on it ({cc})")
        if given is not None and not needed:
            raise ConditionError(name, f"given, but the model has no such condition ({cc})")


def check_class_ids(class_id_B, num_classes: int, what: str = "class_id") -> None:
    """Host-side range check (traced values are checked for nothing)."""
    if isinstance(class_id_B, jax.core.Tracer):
        return
    ids = np.asarray(class_id_B)
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
        raise ConditionError(what, f"class {int(bad[0])} outside [0, {num_classes}) (the "
                                   "model's conditions.num_classes)")


class ConditionEmbed(nnx.Module):
    """Condition values -> tokens [B, C, D] in the layout's order (class token, action tokens)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cc, d, pdt = cfg.conditions, cfg.hidden_size, dtype_of(cfg.param_dtype)
        normal = nnx.initializers.normal(cfg.init_std)
        param = lambda shape, axes, init=normal: ConditionParam(
            init(rngs.params(), shape, pdt), logical_axes=axes)
        self.classes = param((cc.num_classes, d), (None, "embed")) if cc.num_classes else None
        if cc.action_dim:
            self.action_kernel = param((cc.action_dim, d), (None, "embed"),
                                       nnx.initializers.lecun_normal())
            self.action_type = param((d,), ("embed",))
        else:
            self.action_kernel = self.action_type = None
        if cc.text_dim:  # a projection of the frozen encoder's embeddings into the model width
            self.text_kernel = param((cc.text_dim, d), (None, "embed"),
                                     nnx.initializers.lecun_normal())
            self.text_type = param((d,), ("embed",))
        else:
            self.text_kernel = self.text_type = None
        if cc.head_modulation:  # token -> SiLU(token W1) W2, W2 zero: the base head at init
            self.head_in = param((d, d), ("embed", "mlp"), nnx.initializers.lecun_normal())
            self.head_out = param((d, d), ("mlp", "embed"), nnx.initializers.zeros)
        else:
            self.head_in = self.head_out = None

    def __call__(self, cond: Conditions, dtype) -> jax.Array:
        tokens = []
        if self.classes is not None:
            tokens.append(self.classes[...].astype(dtype)[cond.class_id][:, None])
        if self.text_kernel is not None:
            t = cond.text.astype(dtype) @ self.text_kernel[...].astype(dtype)
            tokens.append(t + self.text_type[...].astype(dtype))
        if self.action_kernel is not None:
            a = cond.actions.astype(dtype) @ self.action_kernel[...].astype(dtype)
            tokens.append(a + self.action_type[...].astype(dtype))
        return jnp.concatenate(tokens, axis=1)

    def head(self, tokens_BCD) -> jax.Array:
        """Each condition token's embedding for the output head's modulation [B, C, D]."""
        dtype = tokens_BCD.dtype
        hidden = jax.nn.silu(tokens_BCD @ self.head_in[...].astype(dtype))
        return hidden @ self.head_out[...].astype(dtype)


def batch_conditions(cfg: ModelConfig, batch: dict, block_len: int, drop_rng=None,
                     dropout: float = 0.0) -> Conditions | None:
    """The conditions of a training batch ({latents [B, F, ...], class_id [B], actions
    [B, F, A], text [B, N, E], text_mask [B, N]}) over its frames 0..F-1, each video's dropped with probability `dropout` (one
    draw per video from `drop_rng`: the unconditional branch that guidance needs)."""
    b, f = batch["latents"].shape[:2]
    frames = jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), (b, f))
    cond = make_conditions(cfg, frames, frames, block_len, class_id=batch.get("class_id"),
                           actions=batch.get("actions"), text=batch.get("text"),
                           text_mask=batch.get("text_mask"))
    if cond is None or drop_rng is None or dropout == 0.0:
        return cond
    return cond.dropped(jax.random.bernoulli(drop_rng, dropout, (b,)))


def record_conditions(record: dict, cc, frame_index, where: str) -> dict:
    """A store record's conditions for the sampled frames `frame_index` [N]: {class_id []
    int32, actions [N, A] float32, text [text_tokens, text_dim] float32, text_mask
    [text_tokens] bool} as `cc` (a `ConditionConfig`) needs. They live in the record's `extra`:
    `class_id` an int, `actions` one A-vector per stored frame, `text` a packed embedding
    (`text_encoder.pack`, written at ingestion)."""
    extra = record.get("extra") or {}
    source = record.get("source", "?")
    out = {}
    if cc.num_classes:
        if "class_id" not in extra:
            raise ValueError(f"{where}: video {source!r} has no class_id (the model has "
                             f"conditions.num_classes={cc.num_classes})")
        check_class_ids(np.asarray([extra["class_id"]]), cc.num_classes,
                        f"{where}: video {source!r} class_id")
        out["class_id"] = np.int32(extra["class_id"])
    if cc.action_dim:
        actions = np.asarray(extra.get("actions", np.zeros((0, 0))), np.float32)
        frames = np.shape(record["latents"])[0]
        if actions.shape != (frames, cc.action_dim):
            raise ValueError(f"{where}: video {source!r} has actions of shape {actions.shape}; "
                             f"the model needs one {cc.action_dim}-vector per frame "
                             f"({frames} frames)")
        out["actions"] = actions[np.asarray(frame_index)]
    if cc.text_dim:
        from vgpt_jax import text_encoder
        if "text" not in extra:
            raise ValueError(f"{where}: video {source!r} has no text embedding (the model has "
                             f"conditions.text_dim={cc.text_dim}; ingest with a text encoder)")
        emb = text_encoder.unpack(extra["text"])
        if emb.shape[1] != cc.text_dim:
            raise ValueError(f"{where}: video {source!r} has text embeddings of width "
                             f"{emb.shape[1]}; the model has conditions.text_dim={cc.text_dim}")
        out["text"], out["text_mask"] = text_encoder.pad(emb, cc.text_tokens)
    return out
