"""Atari episodes (the `atari` extra: ale-py ships the ROMs; skipped without it, as in CI, which
installs test,eval,tpu): deterministic recording, one-hot actions before each frame, and
`vgpt make-atari` writing them into a latent store."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ale_py")

from vgpt_jax.data import atari  # noqa: E402


def test_episodes_are_deterministic_with_one_hot_actions():
    a = atari.record_episodes("breakout", 2, 6, 32, seed=3)
    b = atari.record_episodes("breakout", 2, 6, 32, seed=3)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    ep = a[0]
    assert ep.frames.shape == (6, 32, 32, 3) and ep.frames.dtype == np.uint8
    assert ep.actions.shape == (6, len(ep.action_names)) == (6, 4)
    assert not ep.actions[0].any() and (ep.actions[1:].sum(1) == 1).all()
    other = atari.record_episodes("breakout", 1, 6, 32, seed=3, split="test")[0]
    assert not np.array_equal(other.actions, ep.actions)


def test_make_atari_writes_a_store_with_actions(tmp_path):
    from vgpt_jax.commands import make_atari
    from vgpt_jax.data.store import LatentStore
    out = str(tmp_path / "store")
    assert make_atari.main(["--game", "breakout", "--output", out, "--episodes", "2",
                            "--frames", "4", "--size", "32"]) == 0
    store = LatentStore(out)
    assert len(store) == 2 and store[0]["latents"].shape == (4, 8, 8, 48)
    assert np.asarray(store[1]["extra"]["actions"]).shape == (4, 4)
    assert store[0]["extra"]["action_names"][0] == "NOOP"
    with pytest.raises(ValueError, match="not among ale-py's ROMs"):
        make_atari.main(["--game", "nope", "--output", str(tmp_path / "x"), "--episodes", "1"])
