"""Physics world: determinism, conservation, no tunnelling, takes, pendulum, speed."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from vgpt_jax.data import physics_world as pw
from vgpt_jax.data.physics_world import WorldConfig, make_dataset

BALLS_ONLY = WorldConfig(scenarios=("balls",))


def _ball_starts(n_balls, count, config=BALLS_ONLY, seed=0):
    config = dataclasses.replace(config, min_balls=n_balls, max_balls=n_balls)
    samples = [pw.sample_balls(np.random.default_rng(seed + s), config) for s in range(count)]
    return [np.stack([s[k] for s in samples]) for k in range(3)]


def test_deterministic_for_a_seed_and_shapes():
    a = make_dataset(6, num_frames=12, size=48, seed=7)
    b = make_dataset(6, num_frames=12, size=48, seed=7)
    c = make_dataset(6, num_frames=12, size=48, seed=8)
    assert [x.name for x in a] == [x.name for x in b] and len(a) == 6
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.frames, y.frames)
        np.testing.assert_array_equal(x.positions, y.positions)
    assert any(not np.array_equal(x.frames, y.frames) for x, y in zip(a, c))
    for clip in a:
        n = clip.positions.shape[1]
        assert clip.frames.shape == (12, 48, 48, 3) and clip.frames.dtype == np.uint8
        assert clip.positions.shape == clip.velocities.shape == (12, n, 2)
        assert clip.frames.std() > 0  # something is drawn
    assert {clip.scenario for clip in make_dataset(16, 4)} == {"balls", "pendulum"}


def test_train_and_test_seeds_are_disjoint_and_test_has_two_takes():
    train = {pw.video_seed(0, "train", i) for i in range(2000)}
    test = {pw.video_seed(0, "test", i) for i in range(2000)}
    assert len(train) == len(test) == 2000 and not train & test
    clips = make_dataset(3, num_frames=4, split="test")
    assert [c.name.split("-take")[1] for c in clips] == ["0", "1"] * 3
    assert all(c0.seed == c1.seed for c0, c1 in zip(clips[::2], clips[1::2]))


def test_energy_bounded_over_a_long_run():
    for n_balls in (1, 3):
        pos0, vel0, radii = _ball_starts(n_balls, 8)
        pos, vel = pw.simulate_balls(pos0, vel0, radii, 400, BALLS_ONLY)  # 25 s of simulated time
        energy = pw.balls_energy(pos, vel, radii[:, None] ** 2, BALLS_ONLY.gravity)
        relative = np.abs(energy - energy[:, :1]) / np.abs(energy[:, :1])
        # Flight is integrated exactly and bounces conserve energy, so only round-off remains.
        assert relative.max() < 1e-6, relative.max(1)


def test_no_ball_passes_through_a_wall_or_another_ball():
    pos0, vel0, radii = _ball_starts(4, 8, config=dataclasses.replace(BALLS_ONLY, max_speed=3.0))
    pos, _ = pw.simulate_balls(pos0, vel0, radii, 120, BALLS_ONLY, record_substeps=True)  # every substep
    r = radii[:, None, :, None]
    assert (pos - r >= -1e-9).all() and (pos + r <= 1 + 1e-9).all()
    for i in range(4):
        for j in range(i + 1, 4):
            dist = np.linalg.norm(pos[:, :, i] - pos[:, :, j], axis=-1)
            assert (dist >= 0.98 * (radii[:, None, i] + radii[:, None, j])).all()
    # A ball moves far less than any radius per substep, so it cannot hop over a ball or a wall
    # between two checks.
    step = np.linalg.norm(np.diff(pos, axis=1), axis=-1)
    assert step.max() < radii.min()


def test_head_on_collision_conserves_momentum_and_energy():
    config = dataclasses.replace(BALLS_ONLY, gravity=0.0)
    pos0 = np.array([[[0.3, 0.5], [0.7, 0.5]]])
    vel0 = np.array([[[1.0, 0.0], [-0.5, 0.0]]])
    radii = np.array([[0.1, 0.05]])
    pos, vel = pw.simulate_balls(pos0, vel0, radii, 6, config)
    masses = radii[0] ** 2
    assert pos[0, -1, 0, 0] < pos[0, -1, 1, 0]  # they bounced rather than passed
    momentum = (masses[:, None] * vel[0]).sum(1)
    np.testing.assert_allclose(momentum, momentum[:1].repeat(6, 0), atol=1e-12)
    kinetic = 0.5 * (masses * (vel[0] ** 2).sum(-1)).sum(-1)
    np.testing.assert_allclose(kinetic, kinetic[0], rtol=1e-9)
    # 1-D elastic collision, closed form
    m1, m2 = masses
    expected_v1 = ((m1 - m2) * 1.0 + 2 * m2 * -0.5) / (m1 + m2)
    assert vel[0, -1, 0, 0] == pytest.approx(expected_v1)


def test_takes_start_within_epsilon_and_diverge():
    epsilon = 1e-3
    config = dataclasses.replace(BALLS_ONLY, min_balls=3, max_balls=3, epsilon=epsilon)
    clips = make_dataset(6, num_frames=120, size=32, split="test", config=config)
    final_gaps = []
    for take0, take1 in zip(clips[::2], clips[1::2]):
        gap = np.abs(take0.positions - take1.positions).max(axis=(1, 2))
        assert 0 < gap[0] <= epsilon * (1 + 1e-9)
        np.testing.assert_array_equal(take0.velocities[0], take1.velocities[0])
        final_gaps.append(gap[-1])
    assert np.median(final_gaps) > 100 * epsilon, final_gaps  # chaos: 1 mm becomes a visible difference


def test_pendulum_rods_rigid_energy_conserved():
    config = dataclasses.replace(WorldConfig(), scenarios=("pendulum",))
    clips = make_dataset(4, num_frames=200, size=32, config=config)
    for clip in clips:
        lengths = np.array(clip.params["rod_lengths"])
        pivot = np.array(clip.params["pivot"])
        np.testing.assert_allclose(np.linalg.norm(clip.positions[:, 0] - pivot, axis=-1), lengths[0], rtol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(clip.positions[:, 1] - clip.positions[:, 0], axis=-1),
                                   lengths[1], rtol=1e-12)
        energy = pw.pendulum_energy(clip.params["angles"], lengths, clip.masses, config.gravity)
        scale = clip.masses.sum() * config.gravity * lengths.sum()
        assert np.abs(energy - energy[0]).max() < 1e-4 * scale
        # bob velocity is tangent to its rod (rigid rod: no stretching)
        radial = ((clip.positions[:, 0] - pivot) * clip.velocities[:, 0]).sum(-1)
        np.testing.assert_allclose(radial, 0, atol=1e-12)


def test_small_swing_matches_the_analytic_period():
    # With a near-massless second bob, a small swing is a simple pendulum: T = 2 pi sqrt(L / g).
    config = WorldConfig(fps=50.0, substeps=8)
    length, g = 0.2, config.gravity
    state = np.array([[0.02, 0.02, 0.0, 0.0]])
    states = pw.simulate_pendulum(state, np.array([[length, 0.1]]), np.array([[1.0, 1e-6]]), 400, config)
    theta = states[0, :, 0]
    crossings = np.where(np.diff(np.sign(theta)) != 0)[0]
    period = 2 * np.mean(np.diff(crossings)) / config.fps
    assert period == pytest.approx(2 * np.pi * np.sqrt(length / g), rel=0.02)


def test_generation_speed():
    start = time.perf_counter()
    clips = make_dataset(256, num_frames=32, size=64, seed=0)
    elapsed = time.perf_counter() - start
    assert len(clips) == 256
    assert elapsed < 60, f"256 videos x 32 frames took {elapsed:.1f} s"
