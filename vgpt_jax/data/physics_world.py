"""A small deterministic physics world for training and probing video models on CPU.

Scenarios (world = the unit box [0, 1]^2, y up, gravity pulls -y):
- "balls": 1-4 discs under gravity, elastic collisions with the walls and with each other
  (mass ~ area). Collisions make the system chaotic, so nearby starts separate over time.
- "pendulum": a double pendulum hanging from a fixed pivot (rigid massless rods), integrated in
  angle coordinates with RK4, so rod lengths hold exactly and energy drifts only at O(dt^4).

Each scenario is simulated with `substeps` integration steps per frame (collisions stay stable:
a ball moves far less than its radius per substep), batched over videos with numpy, and rendered
as anti-aliased discs (and rods) on a plain background.

Test splits come in "takes": take 1 starts from take 0's state perturbed by `epsilon` (world
units for ball positions, radians for pendulum angles), for probing what a model predicts when
the future depends sensitively on the past.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

SPLITS = {"train": 0, "test": 1, "validation": 2}
SCENARIOS = ("balls", "pendulum")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    size: int = 64               # frame height = width, px
    fps: float = 16.0
    substeps: int = 16           # integration steps per frame
    gravity: float = 3.0         # world units / s^2 (the box is 1 unit tall)
    min_balls: int = 1
    max_balls: int = 4
    min_radius: float = 0.06
    max_radius: float = 0.12
    max_speed: float = 1.5       # initial ball speed bound, units / s
    rod_lengths: tuple[float, float] = (0.13, 0.22)  # range for each pendulum rod
    pivot: tuple[float, float] = (0.5, 0.5)
    bob_radius: float = 0.045
    epsilon: float = 1e-3        # take-1 perturbation
    scenarios: tuple[str, ...] = SCENARIOS
    background: tuple[int, int, int] = (20, 22, 30)


@dataclasses.dataclass
class PhysicsClip:
    """One rendered simulation. T = num_frames, n = bodies (balls, or the 2 pendulum bobs)."""
    name: str
    scenario: str
    seed: int
    take: int
    fps: float
    frames: np.ndarray       # uint8 [T, H, W, 3]
    positions: np.ndarray    # float64 [T, n, 2], world units
    velocities: np.ndarray   # float64 [T, n, 2], world units / s
    radii: np.ndarray        # float64 [n]
    masses: np.ndarray       # float64 [n]
    params: dict             # scenario constants (gravity, pivot, rod lengths, angles)
    colors: np.ndarray | None = None  # float64 [n, 3], RGB in [0, 255] as rendered

    def pixel_positions(self) -> np.ndarray:
        """Body centres in pixel coordinates `[T, n, 2]` as (x, y), y down; pixel (i, j)'s
        centre is (i + 0.5, j + 0.5)."""
        size = self.frames.shape[1]
        return np.stack([self.positions[..., 0] * size, (1.0 - self.positions[..., 1]) * size], -1)


# ----------------------------------------------------------------------------- balls

def balls_energy(positions, velocities, masses, gravity) -> np.ndarray:
    """Kinetic + potential energy: `[..., n, 2]` states -> `[...]`."""
    kinetic = 0.5 * (masses * (velocities ** 2).sum(-1)).sum(-1)
    potential = (masses * gravity * positions[..., 1]).sum(-1)
    return kinetic + potential


def _resolve_pair(pos, vel, radii, inv_mass, i, j) -> None:
    """Elastic impulse + overlap removal for bodies i, j, in place, batched over videos [B]."""
    delta = pos[:, j] - pos[:, i]
    dist = np.sqrt((delta ** 2).sum(-1))
    overlap = radii[:, i] + radii[:, j] - dist
    touching = overlap > 0
    if not touching.any():
        return
    normal = delta / np.maximum(dist, 1e-12)[:, None]
    inv_sum = inv_mass[:, i] + inv_mass[:, j]
    approach = ((vel[:, j] - vel[:, i]) * normal).sum(-1)
    impulse = np.where(touching & (approach < 0), -2.0 * approach / inv_sum, 0.0)
    vel[:, i] -= (impulse * inv_mass[:, i])[:, None] * normal
    vel[:, j] += (impulse * inv_mass[:, j])[:, None] * normal
    # Push apart in inverse-mass proportion: sum(m * y) is unchanged, so potential energy is too.
    push = np.where(touching, overlap / inv_sum, 0.0)
    pos[:, i] -= (push * inv_mass[:, i])[:, None] * normal
    pos[:, j] += (push * inv_mass[:, j])[:, None] * normal


def _walls(pos, vel, radii, gravity: float) -> None:
    """Mirror positions and velocities at the walls, in place, conserving energy exactly.

    Mirroring a ball that sank `depth` into the floor lifts it by 2*depth; without correction
    every bounce would gain 2*m*g*depth of potential energy and balls would creep ever higher.
    So the vertical speed is rescaled to pay for the height change (and gains it at the ceiling).
    """
    lo = radii[..., None]
    hi = 1.0 - lo
    below, above = pos < lo, pos > hi
    lift = np.where(below, 2 * (lo - pos), np.where(above, 2 * (hi - pos), 0.0))[..., 1]
    pos[:] = pos + np.where(below | above, np.where(below, 2 * (lo - pos), 2 * (hi - pos)), 0.0)
    vel[:] = np.where(below, np.abs(vel), np.where(above, -np.abs(vel), vel))
    speed_y = np.sqrt(np.maximum(vel[..., 1] ** 2 - 2 * gravity * lift, 0.0))
    vel[..., 1] = np.where(lift != 0, np.copysign(speed_y, vel[..., 1]), vel[..., 1])
    np.clip(pos, lo, hi, out=pos)  # a mirror can overshoot only if a ball moved > its radius


def simulate_balls(positions, velocities, radii, num_frames: int, config: WorldConfig,
                   record_substeps: bool = False):
    """Integrate balls: initial `[B, n, 2]` positions/velocities, radii `[B, n]` ->
    `(positions, velocities)` of shape `[B, T, n, 2]` with T = num_frames (frame 0 = initial state),
    or T = (num_frames - 1) * substeps + 1 with `record_substeps`.

    Exact ballistic flight, then three sweeps of pairwise collisions and walls, so
    chains of contacts (a ball pinched against a wall) settle.
    """
    pos = np.array(positions, np.float64)
    vel = np.array(velocities, np.float64)
    radii = np.asarray(radii, np.float64)
    inv_mass = 1.0 / radii ** 2
    n = pos.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    dt = 1.0 / (config.fps * config.substeps)
    out_pos, out_vel = [pos.copy()], [vel.copy()]
    for _ in range(num_frames - 1):
        for _ in range(config.substeps):
            # Exact ballistic step (constant gravity): unlike Euler variants it has no O(g^2 dt^2)
            # energy drift per step, so collisions are the only place energy could change.
            pos += vel * dt
            pos[..., 1] -= 0.5 * config.gravity * dt * dt
            vel[..., 1] -= config.gravity * dt
            for _ in range(3):  # sweeps: a push-apart can cause a new contact (stacks, wall pinches)
                for i, j in pairs:
                    _resolve_pair(pos, vel, radii, inv_mass, i, j)
                _walls(pos, vel, radii, config.gravity)
            if record_substeps:
                out_pos.append(pos.copy())
                out_vel.append(vel.copy())
        if not record_substeps:
            out_pos.append(pos.copy())
            out_vel.append(vel.copy())
    return np.stack(out_pos, 1), np.stack(out_vel, 1)


def sample_balls(rng: np.random.Generator, config: WorldConfig):
    """One start: `(positions [n, 2], velocities [n, 2], radii [n])`, n uniform in the config's
    ball range, non-overlapping."""
    n = int(rng.integers(config.min_balls, config.max_balls + 1))
    radii = rng.uniform(config.min_radius, config.max_radius, n)
    positions = np.zeros((n, 2))
    for k in range(n):  # rejection sampling: non-overlapping, inside the box
        for _ in range(1000):
            p = rng.uniform(radii[k], 1 - radii[k], 2)
            if all(np.linalg.norm(p - positions[q]) > radii[k] + radii[q] + 1e-3 for q in range(k)):
                break
        positions[k] = p
    speed = config.max_speed * np.sqrt(rng.uniform(0, 1, n))
    angle = rng.uniform(0, 2 * np.pi, n)
    velocities = np.stack([speed * np.cos(angle), speed * np.sin(angle)], -1)
    return positions, velocities, radii


# ----------------------------------------------------------------------------- double pendulum

def _pendulum_derivs(state, lengths, masses, g):
    """state `[B, 4]` = (theta1, theta2, omega1, omega2) -> d/dt state. Angles from straight down."""
    t1, t2, w1, w2 = state.T
    (l1, l2), (m1, m2) = lengths.T, masses.T
    d = t1 - t2
    den = 2 * m1 + m2 - m2 * np.cos(2 * d)
    a1 = (-g * (2 * m1 + m2) * np.sin(t1) - m2 * g * np.sin(t1 - 2 * t2)
          - 2 * np.sin(d) * m2 * (w2 ** 2 * l2 + w1 ** 2 * l1 * np.cos(d))) / (l1 * den)
    a2 = (2 * np.sin(d) * (w1 ** 2 * l1 * (m1 + m2) + g * (m1 + m2) * np.cos(t1)
                           + w2 ** 2 * l2 * m2 * np.cos(d))) / (l2 * den)
    return np.stack([w1, w2, a1, a2], -1)


def pendulum_cartesian(state, lengths, pivot):
    """Angles `[..., 4]` -> bob positions and velocities `[..., 2, 2]`."""
    t1, t2, w1, w2 = np.moveaxis(state, -1, 0)
    l1, l2 = lengths[..., 0], lengths[..., 1]
    p1 = np.stack([pivot[0] + l1 * np.sin(t1), pivot[1] - l1 * np.cos(t1)], -1)
    p2 = p1 + np.stack([l2 * np.sin(t2), -l2 * np.cos(t2)], -1)
    v1 = np.stack([l1 * w1 * np.cos(t1), l1 * w1 * np.sin(t1)], -1)
    v2 = v1 + np.stack([l2 * w2 * np.cos(t2), l2 * w2 * np.sin(t2)], -1)
    return np.stack([p1, p2], -2), np.stack([v1, v2], -2)


def simulate_pendulum(state, lengths, masses, num_frames: int, config: WorldConfig, record_substeps=False):
    """RK4 on `[B, 4]` angle states (rod lengths `[B, 2]`, bob masses `[B, 2]`) -> states `[B, T, 4]`."""
    s = np.array(state, np.float64)
    lengths, masses = np.asarray(lengths, np.float64), np.asarray(masses, np.float64)
    g, dt = config.gravity, 1.0 / (config.fps * config.substeps)
    out = [s.copy()]
    for _ in range(num_frames - 1):
        for _ in range(config.substeps):
            k1 = _pendulum_derivs(s, lengths, masses, g)
            k2 = _pendulum_derivs(s + 0.5 * dt * k1, lengths, masses, g)
            k3 = _pendulum_derivs(s + 0.5 * dt * k2, lengths, masses, g)
            k4 = _pendulum_derivs(s + dt * k3, lengths, masses, g)
            s = s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            if record_substeps:
                out.append(s.copy())
        if not record_substeps:
            out.append(s.copy())
    return np.stack(out, 1)


def _sample_pendulum(rng: np.random.Generator, config: WorldConfig):
    lengths = rng.uniform(*config.rod_lengths, 2)
    masses = rng.uniform(0.5, 1.5, 2)
    state = np.array([rng.uniform(0.5, 2.6) * rng.choice([-1, 1]), rng.uniform(-np.pi, np.pi),
                      rng.uniform(-1, 1), rng.uniform(-1, 1)])
    return state, lengths, masses


# ----------------------------------------------------------------------------- rendering

def palette(rng: np.random.Generator, n: int, first_hue: float | None = None) -> np.ndarray:
    """`n` distinct body colours [n, 3], bright (70..255 per channel): hues evenly spread from
    `first_hue` in [0, 1) (0: red; None: a random start)."""
    start = rng.uniform() if first_hue is None else first_hue
    hues = (start + np.arange(n) / max(n, 1)) % 1.0  # evenly spread: bodies stay distinguishable
    rgb = np.clip(np.abs((hues[:, None] * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)  # HSV, S=V=1
    return 70 + 185 * rgb  # bright, saturated colours, clear of the dark background


def _composite(canvas, pad, x0, y0, window, alpha_fn, color) -> None:
    """Blend `color` into `canvas [B, S+2p, S+2p, 3]` inside a `window`-px square per video whose
    top-left pixel is (x0, y0) `[B]` in frame pixels. `alpha_fn(xs [B,1,K], ys [B,K,1])` gives
    coverage from pixel-centre coordinates. Shapes are small, so working in a window instead of
    the whole frame cuts rendering cost ~10x."""
    offsets = np.arange(window)
    ix = (x0 + pad)[:, None] + offsets   # [B, K] canvas columns
    iy = (y0 + pad)[:, None] + offsets   # [B, K] canvas rows
    xs = (x0[:, None] + offsets + 0.5).astype(np.float32)[:, None, :]
    ys = (y0[:, None] + offsets + 0.5).astype(np.float32)[:, :, None]
    alpha = alpha_fn(xs, ys)[..., None]
    b = np.arange(len(x0))[:, None, None]
    region = canvas[b, iy[:, :, None], ix[:, None, :]]
    canvas[b, iy[:, :, None], ix[:, None, :]] = region * (1 - alpha) + color * alpha


def render(positions, radii, colors, config: WorldConfig, segments=None) -> np.ndarray:
    """Discs at `positions [B, T, n, 2]` (radii `[B, n]`, colors `[B, n, 3]`) -> uint8 `[B, T, S, S, 3]`.

    `segments`: optional list of (start `[B, T, 2]`, end `[B, T, 2]`) rods drawn under the discs.
    Anti-aliasing: coverage = clamp(radius - distance + 0.5), i.e. a 1-px linear edge ramp.
    """
    size = config.size
    B, T, n, _ = positions.shape
    to_px = lambda p: (p[..., 0] * size, (1.0 - p[..., 1]) * size)
    disc_window = 2 * int(np.ceil(radii.max() * size)) + 4
    rod_window = 0
    for start, end in segments or ():
        lengths = np.hypot(*(a - b for a, b in zip(to_px(end), to_px(start))))
        rod_window = max(rod_window, int(np.ceil(lengths.max())) + 5)
    pad = max(disc_window, rod_window)
    frames = np.empty((B, T, size, size, 3), np.uint8)
    background = np.asarray(config.background, np.float32)

    def corner(lo, window):  # window origin, kept inside the padded canvas
        return np.clip(np.floor(lo).astype(np.int64), -pad, size + pad - window)

    # The pad only catches window overhang and is never shown, so only the visible part needs
    # resetting each frame; whatever a window leaves in the pad cannot reach the frame.
    canvas = np.zeros((B, size + 2 * pad, size + 2 * pad, 3), np.float32)
    visible = canvas[:, pad:pad + size, pad:pad + size]
    for t in range(T):
        visible[...] = background
        for start, end in segments or ():
            (ax, ay), (bx, by) = to_px(start[:, t]), to_px(end[:, t])
            a_x, a_y, b_x, b_y = (v.astype(np.float32)[:, None, None] for v in (ax, ay, bx, by))

            def rod_alpha(xs, ys, a_x=a_x, a_y=a_y, b_x=b_x, b_y=b_y):
                dx, dy = b_x - a_x, b_y - a_y
                u = np.clip(((xs - a_x) * dx + (ys - a_y) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0, 1)
                return np.clip(1.2 - np.hypot(xs - a_x - u * dx, ys - a_y - u * dy), 0, 1)

            _composite(canvas, pad, corner(np.minimum(ax, bx) - 2, rod_window), corner(np.minimum(ay, by) - 2, rod_window),
                       rod_window, rod_alpha, np.float32(170.0))
        px, py = to_px(positions[:, t])
        for k in range(n):
            r_px = radii[:, k] * size
            cx, cy, r = (v.astype(np.float32)[:, None, None] for v in (px[:, k], py[:, k], r_px))
            disc_alpha = lambda xs, ys, cx=cx, cy=cy, r=r: np.clip(r - np.hypot(xs - cx, ys - cy) + 0.5, 0, 1)
            _composite(canvas, pad, corner(px[:, k] - r_px - 1, disc_window), corner(py[:, k] - r_px - 1, disc_window),
                       disc_window, disc_alpha, colors[:, k, None, None, :].astype(np.float32))
        frames[:, t] = np.clip(np.round(visible), 0, 255).astype(np.uint8)
    return frames


# ----------------------------------------------------------------------------- datasets

def video_seed(seed: int, split: str, index: int) -> int:
    """Per-video seed; train/test/validation draw from independent streams of the base seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return int(np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(1, np.uint64)[0] >> 1)


def make_dataset(num_videos: int, num_frames: int = 32, size: int = 64, seed: int = 0, split: str = "train",
                 config: WorldConfig | None = None, num_takes: int | None = None) -> list[PhysicsClip]:
    """`num_videos` scenarios, each rendered as `num_takes` clips (default: 1 for train, 2 for
    test/validation), `[num_frames, size, size, 3]` uint8 each.

    Take 0 uses the sampled start; take k > 0 perturbs it by `config.epsilon` in a random direction.
    Deterministic in (num_videos, num_frames, size, seed, split, config).
    """
    config = dataclasses.replace(config or WorldConfig(), size=size)
    num_takes = num_takes or (1 if split == "train" else 2)
    # Sample every start first, then simulate groups with equal body count as one batch.
    groups: dict[tuple, list] = defaultdict(list)
    for index in range(num_videos):
        s = video_seed(seed, split, index)
        rng = np.random.default_rng(s)
        scenario = config.scenarios[int(rng.integers(len(config.scenarios)))]
        sample = sample_balls(rng, config) if scenario == "balls" else _sample_pendulum(rng, config)
        n_bodies = len(sample[2]) if scenario == "balls" else 2
        colors = palette(rng, n_bodies)
        for take in range(num_takes):
            perturbed = _perturb(sample, scenario, rng, config.epsilon) if take else sample
            groups[(scenario, n_bodies)].append((index, s, take, perturbed, colors))

    clips: dict[tuple[int, int], PhysicsClip] = {}
    for (scenario, n_bodies), members in groups.items():
        colors = np.stack([m[4] for m in members])
        if scenario == "balls":
            pos0, vel0, radii = (np.stack([m[3][k] for m in members]) for k in range(3))
            pos, vel = simulate_balls(pos0, vel0, radii, num_frames, config)
            masses, segments = radii ** 2, None
            params = [{"gravity": config.gravity} for _ in members]
        else:
            state0, lengths, masses = (np.stack([m[3][k] for m in members]) for k in range(3))
            states = simulate_pendulum(state0, lengths, masses, num_frames, config)
            pos, vel = pendulum_cartesian(states, lengths[:, None], config.pivot)
            radii = np.full((len(members), 2), config.bob_radius)
            pivot = np.broadcast_to(np.asarray(config.pivot), pos[:, :, 0].shape)
            segments = [(pivot, pos[:, :, 0]), (pos[:, :, 0], pos[:, :, 1])]
            params = [{"gravity": config.gravity, "pivot": list(config.pivot), "rod_lengths": lengths[b].tolist(),
                       "angles": states[b]} for b in range(len(members))]
        frames = render(pos, radii, colors, config, segments)
        for b, (index, s, take, _, _) in enumerate(members):
            clips[(index, take)] = PhysicsClip(
                name=f"{split}-{index:05d}-{scenario}-take{take}", scenario=scenario, seed=s, take=take,
                fps=config.fps, frames=frames[b], positions=pos[b], velocities=vel[b], radii=radii[b],
                masses=masses[b], params=params[b], colors=colors[b])
    return [clips[key] for key in sorted(clips)]


def _perturb(sample, scenario: str, rng: np.random.Generator, epsilon: float):
    if scenario == "balls":
        positions, velocities, radii = sample
        angle = rng.uniform(0, 2 * np.pi, len(radii))
        offset = epsilon * np.stack([np.cos(angle), np.sin(angle)], -1)
        return positions + offset, velocities.copy(), radii
    state, lengths, masses = sample
    return state + np.array([epsilon, 0.0, 0.0, 0.0]), lengths, masses


def pendulum_energy(states, lengths, masses, gravity) -> np.ndarray:
    """Total energy of double-pendulum angle states `[..., 4]` (lengths, masses `[..., 2]`)."""
    t1, t2, w1, w2 = np.moveaxis(states, -1, 0)
    l1, l2, m1, m2 = lengths[..., 0], lengths[..., 1], masses[..., 0], masses[..., 1]
    kinetic = (0.5 * m1 * (l1 * w1) ** 2
               + 0.5 * m2 * ((l1 * w1) ** 2 + (l2 * w2) ** 2 + 2 * l1 * l2 * w1 * w2 * np.cos(t1 - t2)))
    potential = -(m1 + m2) * gravity * l1 * np.cos(t1) - m2 * gravity * l2 * np.cos(t2)
    return kinetic + potential


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """A physics world and its split sizes, as `make_world` builds them; the defaults are the
    main job's world (`vgpt demo`), which its model is trained on."""
    num_train_videos: int = 2048
    num_test_videos: int = 16
    num_frames: int = 16
    frame_size: int = 32
    fps: float = 32.0
    scenarios: tuple[str, ...] = ("balls",)
    max_balls: int = 2
    min_radius: float = 0.06
    max_radius: float = 0.12
    seed: int = 0


def make_world(spec) -> tuple[list[PhysicsClip], list[PhysicsClip]]:
    """(training clips, test clips in two takes) of `spec`: a `WorldSpec` or any object with
    its fields as attributes (the demo's `cfg.world` ConfigDict)."""
    world = WorldConfig(size=spec.frame_size, fps=spec.fps, scenarios=tuple(spec.scenarios),
                        max_balls=spec.max_balls, min_radius=spec.min_radius,
                        max_radius=spec.max_radius)
    train = make_dataset(spec.num_train_videos, spec.num_frames, spec.frame_size, spec.seed,
                         "train", config=world)
    test = make_dataset(spec.num_test_videos, spec.num_frames, spec.frame_size, spec.seed,
                        "test", config=world, num_takes=2)
    return train, test
