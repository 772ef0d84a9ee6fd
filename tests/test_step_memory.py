"""An 80-frame stage-4 train step at `small` width fits in 8 GB with no T x T array (compiled, not run)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vgpt_jax import config, diffusion, layout
from vgpt_jax.model import VideoGPT

FRAMES, LATENT_HW = 80, (22, 40)  # stage 4: 320x176 video through the 8x-down SDXL VAE


def compiled_step(cfg):
    abstract = nnx.eval_shape(lambda: VideoGPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    tx = optax.adamw(1e-4)
    opt_state = jax.eval_shape(tx.init, params)

    def step(params, opt_state, batch, key):
        loss_fn = lambda p: diffusion.loss(nnx.merge(graphdef, p), batch, key)[0]
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    clip_ids = layout.sample_clip_ids(np.random.default_rng(0), FRAMES)[None]
    batch = {"latents": jax.ShapeDtypeStruct((1, FRAMES, *LATENT_HW, cfg.latent_channels),
                                             jnp.float32),
             "clip_ids": jnp.asarray(clip_ids)}
    return jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt_state, batch, jax.random.key(0)).compile()


def test_stage4_step_memory_is_linear_in_length():
    mc = config.get_model_config("small")
    mc.attention.impl = "auto"
    cfg = config.ModelConfig.from_config(mc)
    tokens = 2 * FRAMES * config.block_len_for(cfg, *LATENT_HW)
    compiled = compiled_step(cfg)
    mem = compiled.memory_analysis()
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    assert total < 8 * 2**30, f"step needs {total / 2**30:.1f} GB"
    shapes = re.findall(r"(?:f32|bf16|pred|s32)\[([\d,]+)\]", compiled.as_text())
    largest = max(int(np.prod([int(d) for d in s.split(",")])) for s in shapes)
    # The biggest buffers are the per-layer activations saved for the backward ([layers, T,
    # mlp]: 0.15 G elements here); a mask or scores over all token pairs would be T x T (1.26 G).
    assert largest < tokens * tokens // 4, (largest, tokens)
