"""The class_to_video recipe's embedded defaults on the physics world (`vgpt_jax.recipes`):

    vgpt recipe class_to_video --workdir runs/class_to_video            (simulate, ingest, train, measure)
    vgpt train --config configs/class_to_video.py --workdir runs/class_to_video/train \
        --config.data.store=runs/class_to_video/latents     (training alone, on an ingested store)
"""
from vgpt_jax.recipes import recipe_config


def get_config():
    return recipe_config("class_to_video")
