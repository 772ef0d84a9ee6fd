"""The text_to_video recipe's embedded defaults on the physics world (`vgpt_jax.recipes`):

    vgpt recipe text_to_video --workdir runs/text_to_video            (simulate, caption, embed, ingest, train, measure)
    vgpt train --config configs/text_to_video.py --workdir runs/text_to_video/train \
        --config.data.store=runs/text_to_video/latents     (training alone, on an ingested store)

The store's records hold each caption's embeddings; `model.conditions.text_dim` must be the
encoder's width (32 for the embedded random T5; `vgpt recipe` sets it from the encoder).
"""
from vgpt_jax.recipes import recipe_config


def get_config():
    return recipe_config("text_to_video")
