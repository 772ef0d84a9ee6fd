"""Baselines and grids of the held-out evaluation."""
import numpy as np

from vgpt_jax import evaluate
from vgpt_jax.vae.latent_space import SpaceToDepth


def test_baselines():
    rng = np.random.default_rng(0)
    context = rng.integers(0, 200, (3, 8, 8, 3)).astype(np.uint8)
    np.testing.assert_array_equal(evaluate.copy_last_frame(context, 2), context[[2, 2]])
    # A brightness ramp continues linearly in pixel space (identity latents).
    ramp = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30)])
    pred = evaluate.linear_extrapolation(SpaceToDepth(2), ramp, 2)
    np.testing.assert_array_equal(pred[:, 0, 0, 0], [40, 50])


def test_grid_layout():
    context = np.zeros((2, 4, 4, 3), np.uint8)
    truth = np.full((3, 4, 4, 3), 200, np.uint8)
    pred = np.full((3, 4, 4, 3), 100, np.uint8)
    out = evaluate.grid(context, {"model": pred}, truth, gap=1)
    assert out.shape == (5, 4, 3 * 4 + 2, 3)
    assert (out[3, 2:, 5:9] == 100).all() and (out[3, 2:, 10:14] == 200).all()
    assert (out[3, :2] == (255, 0, 0)).all() and not (out[1, :2] == (255, 0, 0)).all()
    assert (out[:2, :, :4] == 0).all() and (out[4, 2:, :4] == 0).all()


def test_predict_options_reach_the_sampler():
    """The demo's rollout relies on its window and context noise reaching `Pipeline.predict`."""
    seen = []

    class Recorder:
        def predict(self, context, **kwargs):
            seen.append(kwargs)
            n = sum(kwargs["clip_sizes"])
            return type("Out", (), {"frames": np.zeros((len(context), n, 4, 4, 3), np.uint8)})

    videos = [evaluate.HeldOutVideo(f"v{i}", np.zeros((6, 4, 4, 3), np.uint8), None, 8.0, None)
              for i in range(3)]
    out = evaluate.predict_all(Recorder(), videos, 2, 4, clip_frames=1, steps=3, guidance=2.0,
                               seed=5, predict_options={"window": 16, "context_noise": 0.1},
                               batch_size=2)
    assert out.shape == (3, 4, 4, 4, 3)
    assert [s["clip_sizes"] for s in seen] == [[1, 1, 1, 1]] * 2
    assert all(s["window"] == 16 and s["context_noise"] == 0.1 for s in seen)
    assert [s["seed"] for s in seen] == [[5, 6], [7]]
