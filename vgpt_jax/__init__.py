"""vgpt_jax: Video-GPT (next clip diffusion) in JAX and Flax NNX."""

__version__ = "0.1.0"
