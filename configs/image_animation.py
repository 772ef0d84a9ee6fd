"""The image_animation recipe's embedded defaults on the physics world (`vgpt_jax.recipes`):

    vgpt recipe image_animation --workdir runs/image_animation            (simulate, ingest, train, measure)
    vgpt train --config configs/image_animation.py --workdir runs/image_animation/train \
        --config.data.store=runs/image_animation/latents     (training alone, on an ingested store)
"""
from vgpt_jax.recipes import recipe_config


def get_config():
    return recipe_config("image_animation")
