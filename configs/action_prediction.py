"""The action_prediction recipe's embedded defaults on the physics world (`vgpt_jax.recipes`):

    vgpt recipe action_prediction --workdir runs/action_prediction            (simulate, ingest, train, measure)
    vgpt train --config configs/action_prediction.py --workdir runs/action_prediction/train \
        --config.data.store=runs/action_prediction/latents     (training alone, on an ingested store)
"""
from vgpt_jax.recipes import recipe_config


def get_config():
    return recipe_config("action_prediction")
