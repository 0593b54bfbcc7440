"""Aaren state == fp64 softmax attention over the whole history, for any chunking and merge order.

Reference: softmax with max-subtraction in float64 over all items, computed in one shot. Tolerance:
rtol 1e-9 with atol 1e-12 * max|v| (the only differences are float64 summation order).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.memory import AarenState, combine

RTOL = 1e-9


def reference(values: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(K, d) softmax-weighted means in fp64; slots with all scores -inf give 0."""
    values = values.astype(np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(values.shape[0], -1)
    out = np.zeros((scores.shape[1], values.shape[1]))
    for k in range(scores.shape[1]):
        s = scores[:, k]
        keep = np.isfinite(s)
        if keep.any():
            e = np.exp(s[keep] - s[keep].max())
            out[k] = (e / e.sum()) @ values[keep]
    return out


def assert_close(actual: np.ndarray, expected: np.ndarray, values: np.ndarray) -> None:
    assert np.isfinite(actual).all()
    scale = float(np.abs(values).max()) if values.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-12 * scale)


def random_tree_merge(states: list[AarenState], rng: np.random.Generator) -> AarenState:
    """Merge states in a random order and random tree shape (merge is associative and commutative)."""
    pool = list(states)
    while len(pool) > 1:
        i, j = sorted(rng.choice(len(pool), size=2, replace=False))
        b = pool.pop(j)
        a = pool.pop(i)
        pool.append(combine(a, b) if rng.random() < 0.5 else combine(b, a))
    return pool[0]


def make_items(seed: int, n: int, k: int, d: int, scale: float, p_exclude: float):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, d)).astype(np.float32 if seed % 2 else np.float64) * 10
    scores = rng.uniform(-scale, scale, size=(n, k))
    scores[rng.random((n, k)) < p_exclude] = -np.inf
    return rng, values, scores


def split_points(rng: np.random.Generator, n: int, chunks: int) -> list[int]:
    return sorted(set(rng.integers(0, n + 1, size=chunks).tolist()) | {0, n})


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 120),
    k=st.integers(1, 4),
    d=st.integers(1, 5),
    scale=st.sampled_from([1.0, 30.0, 1e3, 1e4]),
    p_exclude=st.sampled_from([0.0, 0.3, 0.95]),
    chunks=st.integers(1, 12),
)
def test_any_chunking_and_merge_order_equals_softmax(seed, n, k, d, scale, p_exclude, chunks):
    rng, values, scores = make_items(seed, n, k, d, scale, p_exclude)
    expected = reference(values, scores)
    cuts = split_points(rng, n, chunks)
    parts = [AarenState.from_items(values[a:b], scores[a:b]) for a, b in pairwise(cuts)]
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        streamed = AarenState.empty(k, d)
        for a, b in pairwise(cuts):
            streamed.update(values[a:b], scores[a:b])
        merged = random_tree_merge(parts, rng)
        assert_close(streamed.output(), expected, values)
        assert_close(merged.output(), expected, values)
    np.testing.assert_array_equal(streamed.filled, np.isfinite(scores).any(axis=0))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 80), k=st.integers(1, 5), d=st.integers(1, 4))
def test_assigned_update_equals_dense_update(seed, n, k, d):
    """Sparse per-item slot assignment == dense scores with -inf outside the assigned slot."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, d))
    slots = rng.integers(0, k, size=n)
    scores = rng.uniform(-50, 50, size=n)
    dense = np.full((n, k), -np.inf)
    dense[np.arange(n), slots] = scores
    cut = int(rng.integers(0, n + 1))
    sparse = AarenState.empty(k, d)
    sparse.update_assigned(values[:cut], slots[:cut], scores[:cut])
    sparse.update_assigned(values[cut:], slots[cut:], scores[cut:])
    assert_close(sparse.output(), reference(values, dense), values)
    np.testing.assert_array_equal(sparse.filled, np.isin(np.arange(k), slots))


def test_per_item_recurrence_matches_the_paper_equations():
    """Item-by-item updates follow m' = max(m, s), u' = u e^(m-m') + e^(s-m'), w' = ... literally."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal((60, 3))
    scores = rng.normal(0, 20, size=60)
    state = AarenState.empty(1, 3)
    m, u, w = -np.inf, 0.0, np.zeros(3)
    for v, s in zip(values, scores, strict=True):
        state.update(v[None], np.array([s]))
        m_new = max(m, s)
        old = 0.0 if m == -np.inf else np.exp(m - m_new)
        u, w, m = u * old + np.exp(s - m_new), w * old + v * np.exp(s - m_new), m_new
        assert state.m[0] == m
        np.testing.assert_allclose(state.u[0], u, rtol=1e-12)
        np.testing.assert_allclose(state.w[0], w, rtol=1e-12, atol=1e-15)
    assert_close(state.output(), reference(values, scores), values)


@pytest.mark.parametrize("score_scale", [3.0, 1e4])
def test_1e5_items_streamed_and_tree_merged(score_scale):
    """1e5 items, scores up to +-1e4 (a naive exp overflows at ~709): no overflow, no NaN, exact."""
    n, k, d = 100_000, 3, 8
    rng, values, scores = make_items(11, n, k, d, score_scale, 0.0)
    values = values.astype(np.float32)
    expected = reference(values, scores)
    cuts = split_points(rng, n, 400)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        streamed = AarenState.empty(k, d)
        parts = []
        for a, b in pairwise(cuts):
            streamed.update(values[a:b], scores[a:b])
            parts.append(AarenState.from_items(values[a:b], scores[a:b]))
        merged = random_tree_merge(parts, rng)
    assert_close(streamed.output(), expected, values)
    assert_close(merged.output(), expected, values)
    assert np.isfinite(streamed.u).all() and np.isfinite(streamed.w).all()


def test_empty_slots_never_produce_nan():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        state = AarenState.empty(3, 2)
        np.testing.assert_array_equal(state.output(), 0.0)
        np.testing.assert_array_equal(state.output(fallback=np.array([1.0, 2.0])), [[1, 2]] * 3)
        state.merge(AarenState.empty(3, 2))
        state.update(np.ones((2, 2)), np.full((2, 3), -np.inf))  # excluded everywhere
        assert not state.filled.any()
        state.update(np.array([[5.0, -5.0]]), np.array([[-np.inf, 7.0, -np.inf]]))
        out = state.output()
    assert state.filled.tolist() == [False, True, False]
    np.testing.assert_array_equal(out, [[0, 0], [5, -5], [0, 0]])


def test_rejects_nan_and_positive_infinite_scores():
    state = AarenState.empty(1, 1)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError):
            state.update(np.ones((1, 1)), np.array([bad]))


def test_shift_is_exact_recentring():
    rng = np.random.default_rng(0)
    values, scores = rng.standard_normal((50, 4)), rng.normal(size=(50, 2))
    a = AarenState.from_items(values, scores)
    b = AarenState.from_items(values, scores - 123.0).shift(-123.0)
    assert_close(b.output(), a.output(), values)
    np.testing.assert_allclose(b.m, a.m, rtol=1e-12)
