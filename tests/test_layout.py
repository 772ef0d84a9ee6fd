"""The sequence layout and the mask rule, checked against an independent per-token reference.

The reference below rebuilds the official sequence order [NS(clip1) CL(clip1) ... NS(clipK)] and
its mask token by token from the official mask builder's rules (loops, no shared code with
`vgpt_jax.attention`); our frame-major layout must give the same mask on every pair of real
tokens, and no real token may see padding.
"""
import numpy as np
import pytest

from vgpt_jax import attention, layout


def reference_tokens(clip_ids, L):
    """Official order: per clip, its noisy blocks then (except the last clip) its clean blocks."""
    tokens = []  # (noisy, frame, clip, offset, position)
    last = clip_ids[-1]
    for c in range(last + 1):
        frames = [f for f, cid in enumerate(clip_ids) if cid == c]
        kinds = [True] if c == last else [True, False]
        for noisy in kinds:
            for f in frames:
                for o in range(L):
                    tokens.append((noisy, f, c, o, f * L + o))
    return tokens


def reference_visible(q, k, L):
    qn, qf, qc, qo, _ = q
    kn, kf, kc, ko, _ = k
    if not qn:  # clean query
        if kn:
            return False
        if kf < qf:
            return True
        if kf > qf:
            return False
        if qo == 0:
            return ko == 0            # <img> sees only itself
        if qo == L - 1:
            return True               # </img> sees its whole block
        return ko != L - 1            # image tokens: <img> and the image, not </img>
    if not kn:
        return kc < qc                # noisy query: clean frames of earlier clips
    if kc != qc:
        return False
    if ko == 0:
        return True
    if ko == 1:
        return qo >= 1
    return qo >= 2


@pytest.mark.parametrize("seed", range(6))
def test_mask_matches_reference_rules(seed):
    rng = np.random.default_rng(seed)
    F, L = int(rng.integers(2, 7)), int(rng.integers(3, 7))
    mode = "one_frame" if seed == 0 else "random"
    clip_ids = layout.sample_clip_ids(rng, F, mode)
    lay = layout.training_layout(clip_ids[None], L)
    meta = layout.token_meta(lay)
    ours = np.asarray(attention.dense_mask(meta, meta, L))[0]
    pos = np.asarray(layout.token_positions(lay))[0]
    m = {k: np.asarray(v)[0] for k, v in meta._asdict().items()}

    index = {}
    for i in range(lay.num_tokens):
        if m["valid"][i]:
            index[(bool(m["noisy"][i]), int(m["frame"][i]), int(m["offset"][i]))] = i
    ref = reference_tokens(list(clip_ids), L)
    assert len(index) == len(ref), "real tokens must be exactly the reference's tokens"
    for q in ref:
        qi = index[(q[0], q[1], q[3])]
        assert m["clip"][qi] == q[2] and pos[qi] == q[4], "clip id and RoPE position as reference"
        for k in ref:
            ki = index[(k[0], k[1], k[3])]
            assert ours[qi, ki] == reference_visible(q, k, L), (q, k)
    real = m["valid"]
    assert not ours[np.ix_(real, ~real)].any(), "a real token sees padding"
    assert ours.any(axis=1).all(), "every row sees something (no NaN rows)"


def test_positions_shared_by_noisy_and_clean_copies():
    lay = layout.training_layout(np.array([[0, 0, 1, 2]]), 5)
    pos = np.asarray(layout.token_positions(lay)).reshape(8, 5)
    np.testing.assert_array_equal(pos[0::2], pos[1::2])
    np.testing.assert_array_equal(pos[0::2, 0], np.arange(4) * 5)


@pytest.mark.parametrize("F", [2, 5, 16])
def test_sample_clip_ids_is_a_random_composition(F):
    rng = np.random.default_rng(F)
    counts = set()
    for _ in range(200):
        ids = layout.sample_clip_ids(rng, F)
        layout.check_clip_ids(ids[None], F)
        counts.add(ids[-1] + 1)
    assert counts <= set(range(2, F + 1))
    assert len(counts) >= min(F - 1, 10), "the number of clips K varies over {2..F}"
    np.testing.assert_array_equal(layout.sample_clip_ids(rng, F, "one_frame"), np.arange(F))


@pytest.mark.parametrize("ids, message", [
    ([[0, 1, 3]], "not contiguous at frame 2"),
    ([[1, 1, 2]], "starts with clip 1"),
    ([[0, 1, 0]], "not contiguous"),
    ([[0, 1]], "must cover every frame"),
    ([0, 1, 2], "expected shape"),
])
def test_bad_clip_ids_name_the_problem(ids, message):
    with pytest.raises(ValueError, match=message):
        layout.check_clip_ids(np.array(ids), 3)
