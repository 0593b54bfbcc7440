"""SlotMemory: spatial and prototype slots, exact time decay, merge, constant state size."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.memory import SlotMemory, adaptive_pool_pairs

RTOL = 1e-9


def softmax_pool(values: np.ndarray, slots: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Reference: per slot, fp64 softmax (max-subtracted) over every item ever assigned to it."""
    out = np.zeros((k, values.shape[1]))
    for s in range(k):
        sel = slots == s
        if sel.any():
            e = np.exp(scores[sel] - scores[sel].max())
            out[s] = (e / e.sum()) @ values[sel].astype(np.float64)
    return out


def spatial_reference(steps, slot_grid, decay):
    """Items of all steps: token in region r of step i, score decay*(t_i - t_0) + bonus - log|r|."""
    t0 = steps[0][2]
    values, slots, scores = [], [], []
    for tokens, grid, ts, bonus in steps:
        tok, slt, counts = adaptive_pool_pairs(grid, slot_grid)
        b = np.broadcast_to(np.asarray(bonus, dtype=np.float64), (tokens.shape[0],))
        values.append(tokens[tok])
        slots.append(slt)
        scores.append(decay * (ts - t0) + b[tok] - np.log(counts)[slt])
    k = slot_grid[0] * slot_grid[1]
    return softmax_pool(np.concatenate(values), np.concatenate(slots), np.concatenate(scores), k)


def random_steps(rng: np.random.Generator, count: int, d: int, t_start: float, per_token_bonus: bool):
    steps, ts = [], t_start
    for _ in range(count):
        grid = (int(rng.integers(1, 3)), int(rng.integers(1, 10)), int(rng.integers(1, 10)))
        n = math.prod(grid)
        tokens = (rng.standard_normal((n, d)) * 5 + rng.standard_normal(d)).astype(np.float32)
        bonus = rng.uniform(0, 3, size=n) if per_token_bonus else float(rng.uniform(0, 3))
        ts += float(rng.exponential(2.0))
        steps.append((tokens, grid, ts, bonus))
    return steps


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sh=st.integers(1, 4),
    sw=st.integers(1, 4),
    count=st.integers(1, 6),
    decay=st.sampled_from([0.0, 0.05, 3.0]),
    per_token_bonus=st.booleans(),
)
def test_spatial_read_is_exact_convex_pool_with_matching_grid(seed, sh, sw, count, decay, per_token_bonus):
    rng = np.random.default_rng(seed)
    d = 6
    steps = random_steps(rng, count, d, t_start=1.7e9, per_token_bonus=per_token_bonus)
    mem = SlotMemory(d, mode="spatial", slot_grid=(sh, sw), decay=decay)
    for tokens, grid, ts, bonus in steps:
        mem.write(tokens, ts, bonus=bonus, grid=grid)
    out = mem.read()
    assert out.shape == (sh * sw, d) and out.dtype == np.float32
    assert mem.grid == (1, sh, sw)
    assert mem.filled.all()  # adaptive pooling never leaves a region empty
    # Convex combination: each slot lies within the per-dim range of the tokens assigned to it.
    lo = np.full((sh * sw, d), np.inf)
    hi = np.full((sh * sw, d), -np.inf)
    for tokens, grid, _, _ in steps:
        tok, slots, _ = adaptive_pool_pairs(grid, (sh, sw))
        np.minimum.at(lo, slots, tokens[tok])
        np.maximum.at(hi, slots, tokens[tok])
    slack = 1e-5 * (np.abs(lo) + np.abs(hi) + 1)  # float32 rounding of the read
    assert ((out >= lo - slack) & (out <= hi + slack)).all()
    # And it is exactly the softmax pool of those tokens with the documented scores.
    expected = spatial_reference(steps, (sh, sw), decay)
    np.testing.assert_allclose(mem.state.output(), expected, rtol=RTOL, atol=1e-11)


def test_adaptive_pool_regions_follow_torch_adaptive_avg_pool():
    """Regions [floor(i*h/sh), ceil((i+1)*h/sh)) as in torch's AdaptiveAvgPool2d (kept torch-free:
    importing torch costs seconds); overlapping when h % sh != 0, repeated cells when h < sh."""
    tok, slots, counts = adaptive_pool_pairs((1, 7, 1), (3, 1))
    regions = [sorted(tok[slots == s].tolist()) for s in range(3)]
    assert regions == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    tok, slots, counts = adaptive_pool_pairs((2, 3), (4, 4))  # smaller than the slot grid
    assert counts.tolist() == [1, 2, 2, 1] * 4  # torch pools [a, b, c] to 4 as [a, (a+b)/2, (b+c)/2, c]
    assert sorted(tok[slots == 5].tolist()) == [0, 1] and tok[slots == 15].tolist() == [1 * 3 + 2]
    tok, slots, counts = adaptive_pool_pairs((2, 4, 4), (2, 2))  # t frames share a slot
    assert sorted(tok[slots == 3].tolist()) == [10, 11, 14, 15, 26, 27, 30, 31]
    assert counts.tolist() == [8, 8, 8, 8]
    for h, w, sh, sw in [(16, 16, 8, 8), (9, 13, 6, 4), (1, 1, 3, 3), (5, 5, 5, 5)]:
        tok, slots, counts = adaptive_pool_pairs((h, w), (sh, sw))
        assert set(tok.tolist()) == set(range(h * w)) and (counts > 0).all()


@pytest.mark.parametrize(("decay", "span"), [(1e-3, 1e6), (5e-6, 1e7), (2.0, 1e4)])
def test_time_decay_equals_explicit_exponential_weights(decay, span):
    """Weights exp(lambda * t) normalised, over a span where lambda * t reaches 1e3..2e4 (and t ~ 1.7e9)."""
    rng = np.random.default_rng(5)
    n, d = 2000, 4
    t0 = 1.7e9  # unix-epoch-like timestamps: exp(lambda * t) itself would overflow
    times = t0 + np.sort(rng.uniform(0, span, size=n))
    values = rng.standard_normal((n, d))
    mem = SlotMemory(d, mode="spatial", slot_grid=(1, 1), decay=decay)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for v, t in zip(values, times, strict=True):
            mem.write(v[None], t, grid=(1, 1, 1))
    logits = decay * (times - times[-1])
    weights = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(mem.state.output()[0], weights @ values, rtol=RTOL, atol=1e-12)
    assert abs(mem.state.m[0]) <= 64.0  # re-centred: stored maxima stay small


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), beta=st.sampled_from([0.5, 8.0, 200.0]), normalize=st.booleans())
def test_prototype_slots_equal_reference(seed, beta, normalize):
    rng = np.random.default_rng(seed)
    d, grid = 5, (2, 3)
    mem = SlotMemory(
        d, mode="prototype", slot_grid=grid, beta=beta, decay=0.01, normalize_tokens=normalize, seed=7
    )
    values, scores = [], []
    for i in range(4):
        x = rng.standard_normal((int(rng.integers(1, 20)), d)) * 3
        bonus = rng.uniform(0, 2, size=x.shape[0]) if i % 2 else 0.7
        mem.write(x, 100.0 * i, bonus=bonus)
        xn = x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x
        scores.append(beta * xn @ mem.probes.T + 0.01 * 100.0 * i + np.reshape(bonus, (-1, 1)))
        values.append(x)
    values_all, scores_all = np.concatenate(values), np.concatenate(scores)
    k = grid[0] * grid[1]
    expected = np.stack(
        [softmax_pool(values_all, np.zeros(len(values_all), int), scores_all[:, s], 1)[0] for s in range(k)]
    )
    np.testing.assert_allclose(mem.state.output(), expected, rtol=RTOL, atol=1e-11)
    assert mem.read().shape == (k, d) and mem.grid == (1, *grid)


def test_prototype_probes_are_seeded_and_deterministic():
    a, b, c = (SlotMemory(8, mode="prototype", slot_grid=(2, 2), beta=3.0, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.probes, b.probes)
    assert not np.allclose(a.probes, c.probes)
    np.testing.assert_allclose(np.linalg.norm(a.probes, axis=1), 1.0)
    x = np.random.default_rng(0).standard_normal((30, 8))
    for m in (a, b, c):
        m.write(x, 0.0)
    np.testing.assert_array_equal(a.read(), b.read())
    assert not np.allclose(a.read(), c.read())


@pytest.mark.parametrize("mode", ["spatial", "prototype"])
def test_merge_equals_writing_everything_into_one(mode):
    """Two memories fed disjoint steps (far-apart time origins, re-centred) merge into the single one."""
    rng = np.random.default_rng(9)
    d, decay = 4, 1.0
    steps = random_steps(rng, 40, d, t_start=1000.0, per_token_bonus=True)
    whole, left, right = (SlotMemory(d, mode=mode, slot_grid=(2, 3), decay=decay, beta=4.0) for _ in range(3))
    for i, (tokens, grid, ts, bonus) in enumerate(steps):
        whole.write(tokens, ts, bonus=bonus, grid=grid)
        (left if i < 10 or i % 3 == 0 else right).write(tokens, ts, bonus=bonus, grid=grid)
    assert left.t_ref != right.t_ref
    left.merge(right)
    np.testing.assert_allclose(left.state.output(), whole.state.output(), rtol=RTOL, atol=1e-11)
    assert left.writes == whole.writes == 40
    with pytest.raises(ValueError):
        left.merge(SlotMemory(d, mode=mode, slot_grid=(3, 2), decay=decay))


# 1e5 writes for the default (spatial) mode; prototype mode shares the same state code and runs
# 1e4 to keep the suite fast on shared CPUs.
@pytest.mark.parametrize(("mode", "writes"), [("spatial", 100_000), ("prototype", 10_000)])
def test_state_size_is_constant_over_long_streams(mode, writes):
    """state_bytes() and the whole pickled object do not grow from 1e3 to 1e5 writes."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 3)).astype(np.float32)
    mem = SlotMemory(3, mode=mode, slot_grid=(1, 2), decay=0.1, beta=2.0)
    sizes = {}
    for i in range(writes):
        mem.write(tokens, 0.5 * i, bonus=float(i % 7), grid=(1, 1, 2))
        if i + 1 in (1_000, writes):
            sizes[i + 1] = (mem.state_bytes(), len(pickle.dumps(mem)))
    assert sizes[1_000][0] == sizes[writes][0] == mem.num_slots * (3 + 2) * 8
    assert abs(sizes[1_000][1] - sizes[writes][1]) <= 8  # only the int write counter's encoding
    assert np.isfinite(mem.read()).all() and mem.writes == writes


def test_accepts_a_step_object_and_validates_input():
    @dataclass
    class Chunk:
        embeds: np.ndarray
        grid: tuple[int, int, int]

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    a, b = SlotMemory(4, slot_grid=(1, 2)), SlotMemory(4, slot_grid=(1, 2))
    a.write(Chunk(x, (1, 2, 3)), 1.0)
    b.write(x, 1.0, grid=(2, 3))
    np.testing.assert_array_equal(a.read(), b.read())
    with pytest.raises(ValueError, match="grid"):
        a.write(x, 2.0)
    with pytest.raises(ValueError, match="cells"):
        a.write(x, 2.0, grid=(1, 2, 2))
    with pytest.raises(ValueError):
        a.write(x, 2.0, bonus=np.zeros(5), grid=(2, 3))
    with pytest.raises(ValueError):
        a.write(x * np.nan, 2.0, grid=(2, 3))


def test_empty_read_fallback_and_reset():
    mem = SlotMemory(3, slot_grid=(2, 2), decay=0.1)
    np.testing.assert_array_equal(mem.read(), np.zeros((4, 3), np.float32))
    np.testing.assert_array_equal(mem.read(fallback=np.array([1.0, 2.0, 3.0])), [[1, 2, 3]] * 4)
    size = mem.state_bytes()
    mem.write(np.ones((4, 3)), 5.0, grid=(2, 2))
    np.testing.assert_array_equal(mem.read(), np.ones((4, 3)))
    mem.reset()
    assert not mem.filled.any() and mem.t_ref is None and mem.state_bytes() == size
    np.testing.assert_array_equal(mem.read(), np.zeros((4, 3)))
