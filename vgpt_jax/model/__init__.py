"""The Video-GPT model: a Phi-3 decoder stack between clip embedders and a DiT output head."""
from vgpt_jax.model.video_gpt import KVCache, VideoGPT  # noqa: F401
