"""The atari_actions recipe's embedded defaults (`vgpt_jax.recipes`; the `atari` extra, ale-py):

    vgpt recipe atari_actions --workdir runs/atari            (record, ingest, train, measure)
    vgpt make-atari --game breakout --output runs/atari/latents --episodes 256 --frames 16 --size 32
    vgpt train --config configs/atari_actions.py --workdir runs/atari/train \
        --config.data.store=runs/atari/latents     (training alone, on a recorded store)

`model.conditions.action_dim` is the game's minimal action set (4 for breakout).
"""
from vgpt_jax.recipes import recipe_config


def get_config():
    return recipe_config("atari_actions")
