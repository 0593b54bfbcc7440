"""Tests of positional/schemes.py against /work/shared/design/positions.md.

The worked example of the note is checked literally; everything else is checked with hypothesis
against independent per-token reference implementations written here from the note's text (and,
for `sequential`, from vLLM's native Qwen2-VL numbering).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from positional import DEFAULT_GAP, SCHEMES, assign, next_position, streaming_mask, token_count

PROPS = settings(max_examples=100, deadline=None)
DEEP = settings(max_examples=200, deadline=None)  # the full comparisons against references

# ---------------------------------------------------------------------------------------------
# strategies

text_seg = st.tuples(st.sampled_from(["input", "output"]), st.integers(0, 5))
vision_seg = st.tuples(st.just("vision"), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
segment = st.one_of(text_seg, text_seg, vision_seg)
segments = st.lists(segment, max_size=8)
taus = st.one_of(
    st.sampled_from([1, 2, 0.5, 1.5, 0, 0.25, 3, 1.0, 2.0]),
    st.floats(min_value=0, max_value=4, allow_nan=False, allow_infinity=False),
)
gaps = st.sampled_from([0, 1, 7, 100, DEFAULT_GAP])
schemes = st.sampled_from(SCHEMES)


# ---------------------------------------------------------------------------------------------
# independent references


def tokens_of(segs):
    """Per token: (kind, item index, (j, r, c) or None), in arrival order."""
    out = []
    for index, (kind, value) in enumerate(segs):
        if kind == "vision":
            t, h, w = value
            for j in range(t):
                for r in range(h):
                    for c in range(w):
                        out.append(("vision", index, (j, r, c)))
        else:
            out.extend([(kind, index, None)] * value)
    return out


def item_positions(value, base, tau):
    t, h, w = value
    return [
        (base + math.floor(tau * j), base + r, base + c) for j in range(t) for r in range(h) for c in range(w)
    ]


def native_qwen(segs, tau):
    """vLLM's native Qwen2-VL / Qwen2.5-VL numbering: text at the running index, a vision item at
    st_idx + grid indices with st_idx = (max so far) + 1. Returns (positions list, next)."""
    pos: list[tuple[int, int, int]] = []

    def st_idx():
        return max(max(p) for p in pos) + 1 if pos else 0

    for kind, value in segs:
        if kind == "vision":
            t, h, w = value
            start = st_idx()
            for j in range(t):
                for r in range(h):
                    for c in range(w):
                        # vLLM: (t_index * second_per_grid_t * tokens_per_second).long()
                        pos.append((start + int(j * tau), start + r, start + c))
        else:
            for _ in range(value):
                p = st_idx()
                pos.append((p, p, p))
    return pos, st_idx()


def reference(scheme, segs, tau, gap=DEFAULT_GAP):
    """Per-token transcription of positions.md. Returns (positions list, next)."""
    pos: list[tuple[int, int, int]] = []
    if scheme == "overlapped":
        e = -1
        run = None  # [base, length]
        for kind, value in segs:
            if kind == "input":
                if run is not None and value:
                    e = max(e, run[0] + run[1] - 1)
                    run = None
                for _ in range(value):
                    e += 1
                    pos.append((e, e, e))
            elif kind == "output":
                if value and run is None:
                    run = [e + 1, 0]
                for _ in range(value):
                    p = run[0] + run[1]
                    pos.append((p, p, p))
                    run[1] += 1
            else:
                base = run[0] if run is not None else e + 1
                block = item_positions(value, base, tau)
                pos.extend(block)
                largest = max(max(p) for p in block)
                e = max(run[0] + run[1] - 1, largest) if run is not None else largest
                run = None
        nxt = run[0] + run[1] if run is not None else e + 1
        return pos, nxt

    c_in = 0
    c_out = {"sequential": None, "group-decoupled": 0, "gap-isolated": gap}[scheme]
    for kind, value in segs:
        if kind == "vision":
            block = item_positions(value, c_in, tau)
            pos.extend(block)
            c_in = max(max(p) for p in block) + 1
        elif kind == "input" or c_out is None:
            for _ in range(value):
                pos.append((c_in, c_in, c_in))
                c_in += 1
        else:
            for _ in range(value):
                pos.append((c_out, c_out, c_out))
                c_out += 1
    return pos, c_in if c_out is None else c_out


def as_array(pos):
    return np.array(pos, dtype=np.int64).reshape(-1, 3).T


# ---------------------------------------------------------------------------------------------
# the worked example of positions.md (tau = 2)

EXAMPLE = [
    ("input", 20),
    ("vision", (1, 2, 2)),
    ("output", 6),
    ("vision", (1, 2, 2)),
    ("output", 3),
    ("vision", (1, 2, 2)),
]
# (input, V1, output 6, V2, output 3, V3, next), T channel
EXAMPLE_TABLE = {
    "sequential": (range(0, 20), [20] * 4, range(22, 28), [28] * 4, range(30, 33), [33] * 4, 35),
    "overlapped": (range(0, 20), [20] * 4, range(22, 28), [22] * 4, range(28, 31), [28] * 4, 31),
    "group-decoupled": (range(0, 20), [20] * 4, range(0, 6), [22] * 4, range(6, 9), [24] * 4, 9),
    "gap-isolated": (
        range(0, 20),
        [20] * 4,
        range(10000, 10006),
        [22] * 4,
        range(10006, 10009),
        [24] * 4,
        10009,
    ),
}
# token slices of the example
S_IN, S_V1, S_O1, S_V2, S_O2, S_V3 = (
    slice(0, 20),
    slice(20, 24),
    slice(24, 30),
    slice(30, 34),
    slice(34, 37),
    slice(37, 41),
)


def test_example_table_covers_every_scheme():
    assert set(EXAMPLE_TABLE) == set(SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_worked_example_t_channel_and_next(scheme):
    pos = assign(scheme, EXAMPLE, tau=2)
    assert pos.shape == (3, 41)
    assert pos.dtype == np.int64
    inp, v1, o1, v2, o2, v3, nxt = EXAMPLE_TABLE[scheme]
    t = pos[0]
    assert t[S_IN].tolist() == list(inp)
    assert t[S_V1].tolist() == v1
    assert t[S_O1].tolist() == list(o1)
    assert t[S_V2].tolist() == v2
    assert t[S_O2].tolist() == list(o2)
    assert t[S_V3].tolist() == v3
    assert next_position(scheme, EXAMPLE, tau=2) == nxt
    # text tokens: (p, p, p)
    for s in (S_IN, S_O1, S_O2):
        assert (pos[1, s] == pos[0, s]).all() and (pos[2, s] == pos[0, s]).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_worked_example_v1_h_w(scheme):
    pos = assign(scheme, EXAMPLE, tau=2)
    assert pos[1, S_V1].tolist() == [20, 20, 21, 21]
    assert pos[2, S_V1].tolist() == [20, 21, 20, 21]


def test_worked_example_v2_group_decoupled():
    pos = assign("group-decoupled", EXAMPLE, tau=2)
    assert pos[0, S_V2].tolist() == [22] * 4
    assert pos[1, S_V2].tolist() == [22, 22, 23, 23]
    assert pos[2, S_V2].tolist() == [22, 23, 22, 23]


def test_worked_example_v2_sequential():
    pos = assign("sequential", EXAMPLE, tau=2)
    assert pos[0, S_V2].tolist() == [28] * 4
    assert pos[1, S_V2].tolist() == [28, 28, 29, 29]
    assert pos[2, S_V2].tolist() == [28, 29, 28, 29]
    assert set(pos[1:, S_V2].ravel().tolist()) == {28, 29}


def test_worked_example_default_gap_and_token_count():
    assert DEFAULT_GAP == 10000
    assert token_count(EXAMPLE) == 41
    np.testing.assert_array_equal(
        assign("gap-isolated", EXAMPLE, tau=2), assign("gap-isolated", EXAMPLE, tau=2, gap=10000)
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_worked_example_matches_reference(scheme):
    ref, nxt = reference(scheme, EXAMPLE, 2)
    np.testing.assert_array_equal(assign(scheme, EXAMPLE, tau=2), as_array(ref))
    assert next_position(scheme, EXAMPLE, tau=2) == nxt


# ---------------------------------------------------------------------------------------------
# properties


@DEEP
@given(scheme=schemes, segs=segments, tau=taus, gap=gaps)
def test_matches_reference_dtype_shape(scheme, segs, tau, gap):
    pos = assign(scheme, segs, tau=tau, gap=gap)
    ref, nxt = reference(scheme, segs, tau, gap)
    assert isinstance(pos, np.ndarray)
    assert pos.dtype == np.int64
    assert pos.shape == (3, len(ref)) == (3, token_count(segs))
    np.testing.assert_array_equal(pos, as_array(ref))
    assert next_position(scheme, segs, tau=tau, gap=gap) == nxt
    assert isinstance(next_position(scheme, segs, tau=tau, gap=gap), int)


@PROPS
@given(scheme=schemes, segs=segments, more=segments, tau=taus, gap=gaps)
def test_prefix_stable(scheme, segs, more, tau, gap):
    head = assign(scheme, segs, tau=tau, gap=gap)
    full = assign(scheme, segs + more, tau=tau, gap=gap)
    np.testing.assert_array_equal(full[:, : head.shape[1]], head)
    # deterministic: same list, same answer
    np.testing.assert_array_equal(assign(scheme, list(segs), tau=tau, gap=gap), head)


@PROPS
@given(
    scheme=schemes,
    segs=segments,
    n=st.integers(1, 8),
    extra=st.integers(1, 5),
    cut=st.integers(0, 8),
    tau=taus,
    gap=gaps,
)
def test_output_run_append_and_split(scheme, segs, n, extra, cut, tau, gap):
    base = [*segs, ("output", n)]
    before = assign(scheme, base, tau=tau, gap=gap)
    grown = assign(scheme, [*segs, ("output", n + extra)], tau=tau, gap=gap)
    np.testing.assert_array_equal(grown[:, : before.shape[1]], before)
    # appending a second output segment = extending the run
    np.testing.assert_array_equal(assign(scheme, [*base, ("output", extra)], tau=tau, gap=gap), grown)
    # splitting an output segment anywhere gives identical positions (and next)
    k = min(cut, n)
    split = [*segs, ("output", k), ("output", n - k)]
    np.testing.assert_array_equal(assign(scheme, split, tau=tau, gap=gap), before)
    assert next_position(scheme, split, tau=tau, gap=gap) == next_position(scheme, base, tau=tau, gap=gap)


@PROPS
@given(scheme=schemes, segs=segments, cut=st.integers(0, 5), tau=taus, gap=gaps)
def test_split_any_text_segment(scheme, segs, cut, tau, gap):
    """Splitting any text segment into two of the same kind changes nothing."""
    whole = assign(scheme, segs, tau=tau, gap=gap)
    nxt = next_position(scheme, segs, tau=tau, gap=gap)
    for i, (kind, value) in enumerate(segs):
        if kind == "vision":
            continue
        k = min(cut, value)
        split = [*segs[:i], (kind, k), (kind, value - k), *segs[i + 1 :]]
        np.testing.assert_array_equal(assign(scheme, split, tau=tau, gap=gap), whole)
        assert next_position(scheme, split, tau=tau, gap=gap) == nxt


@PROPS
@given(scheme=schemes, segs=segments, k=st.integers(1, 6), tau=taus, gap=gaps)
def test_decode_consistent(scheme, segs, k, tau, gap):
    nxt = next_position(scheme, segs, tau=tau, gap=gap)
    one = assign(scheme, [*segs, ("output", 1)], tau=tau, gap=gap)
    assert one[:, -1].tolist() == [nxt, nxt, nxt]
    many = assign(scheme, [*segs, ("output", k)], tau=tau, gap=gap)
    expected = np.arange(nxt, nxt + k, dtype=np.int64)
    for ch in range(3):
        np.testing.assert_array_equal(many[ch, -k:], expected)
    # token by token: each decode step's next is the previous one + 1
    steps = [*segs]
    for i in range(k):
        assert next_position(scheme, steps, tau=tau, gap=gap) == nxt + i
        steps.append(("output", 1))
    np.testing.assert_array_equal(assign(scheme, steps, tau=tau, gap=gap), many)
    # vLLM's scalar delta holds while the sequence ends in an output run
    delta = nxt - token_count(segs)
    assert next_position(scheme, steps, tau=tau, gap=gap) - token_count(steps) == delta


@PROPS
@given(scheme=schemes, segs=segments, tau=taus, gap=gaps)
def test_text_tokens_equal_channels(scheme, segs, tau, gap):
    pos = assign(scheme, segs, tau=tau, gap=gap)
    is_text = np.array([kind != "vision" for kind, _, _ in tokens_of(segs)], dtype=bool)
    text = pos[:, is_text]
    assert (text[0] == text[1]).all() and (text[0] == text[2]).all()


@PROPS
@given(scheme=schemes, segs=segments, tau=taus, gap=gaps)
def test_vision_layout(scheme, segs, tau, gap):
    pos = assign(scheme, segs, tau=tau, gap=gap)
    toks = tokens_of(segs)
    bases: dict[int, int] = {}
    for i, (kind, item, jrc) in enumerate(toks):
        if kind != "vision":
            continue
        base = bases.setdefault(item, int(pos[0, i]))  # first token of an item: j = r = c = 0
        j, r, c = jrc
        assert pos[:, i].tolist() == [base + math.floor(tau * j), base + r, base + c]


@PROPS
@given(scheme=st.sampled_from(["group-decoupled", "gap-isolated"]), segs=segments, tau=taus, gap=gaps)
def test_frames_independent_of_output(scheme, segs, tau, gap):
    pos = assign(scheme, segs, tau=tau, gap=gap)
    kept = [kind != "output" for kind, _, _ in tokens_of(segs)]
    no_output = [s for s in segs if s[0] != "output"]
    np.testing.assert_array_equal(pos[:, np.array(kept, dtype=bool)], assign(scheme, no_output, tau=tau))
    # and the input group is numbered exactly as sequential numbers the output-free session
    np.testing.assert_array_equal(
        assign("sequential", no_output, tau=tau), assign(scheme, no_output, tau=tau)
    )


@PROPS
@given(segs=segments, tau=taus, gap=gaps)
def test_group_decoupled_outputs_count_from_zero(segs, tau, gap):
    pos = assign("group-decoupled", segs, tau=tau, gap=gap)
    is_out = np.array([kind == "output" for kind, _, _ in tokens_of(segs)], dtype=bool)
    n_out = int(is_out.sum())
    np.testing.assert_array_equal(pos[0, is_out], np.arange(n_out))
    assert next_position("group-decoupled", segs, tau=tau, gap=gap) == n_out


@DEEP
@given(segs=segments, tau=taus)
def test_sequential_is_native_qwen(segs, tau):
    ref, nxt = native_qwen(segs, tau)
    np.testing.assert_array_equal(assign("sequential", segs, tau=tau), as_array(ref))
    assert next_position("sequential", segs, tau=tau) == nxt


@PROPS
@given(segs=segments, tau=taus, gap=gaps)
def test_gap_isolated_is_shifted_group_decoupled(segs, tau, gap):
    gd = assign("group-decoupled", segs, tau=tau)
    gi = assign("gap-isolated", segs, tau=tau, gap=gap)
    is_out = np.array([kind == "output" for kind, _, _ in tokens_of(segs)], dtype=bool)
    np.testing.assert_array_equal(gi[:, is_out], gd[:, is_out] + gap)
    np.testing.assert_array_equal(gi[:, ~is_out], gd[:, ~is_out])
    assert next_position("gap-isolated", segs, tau=tau, gap=gap) == (
        next_position("group-decoupled", segs, tau=tau) + gap
    )
    # gap 0 is group-decoupled
    np.testing.assert_array_equal(assign("gap-isolated", segs, tau=tau, gap=0), gd)


@PROPS
@given(segs=segments, tau=taus)
def test_overlapped_frames_overlay_pending_run(segs, tau):
    """A vision item right after an output run starts at that run's first position."""
    full = [*segs, ("input", 1), ("output", 2), ("vision", (1, 1, 1))]
    pos = assign("overlapped", full, tau=tau)
    assert pos[0, -1] == pos[0, -3]


def test_empty_session():
    for scheme in SCHEMES:
        pos = assign(scheme, [])
        assert pos.shape == (3, 0) and pos.dtype == np.int64
        assert next_position(scheme, []) == (DEFAULT_GAP if scheme == "gap-isolated" else 0)
    mask = streaming_mask([])
    assert mask.shape == (0, 0) and mask.dtype == torch.bool


def test_integer_like_inputs():
    """numpy counts and numpy / torch integer grids (what vLLM hands over) are accepted."""
    segs = [("input", np.int64(3)), ("vision", torch.tensor([1, 2, 2])), ("output", np.int32(2))]
    plain = [("input", 3), ("vision", (1, 2, 2)), ("output", 2)]
    for scheme in SCHEMES:
        np.testing.assert_array_equal(assign(scheme, segs), assign(scheme, plain))
    np.testing.assert_array_equal(
        assign("sequential", [("vision", np.array([2, 1, 3]))]), assign("sequential", [("vision", (2, 1, 3))])
    )


# ---------------------------------------------------------------------------------------------
# streaming mask


def brute_mask(segs):
    kinds = [kind for kind, _, _ in tokens_of(segs)]
    n = len(kinds)
    out = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(i + 1):
            out[i, j] = not (kinds[i] == "vision" and kinds[j] == "output")
    return out


@settings(max_examples=80, deadline=None)  # torch's tril costs ~ms per call on a busy 2-core box
@given(segs=st.lists(segment, max_size=6))
def test_streaming_mask_matches_brute_force(segs):
    mask = streaming_mask(segs)
    n = token_count(segs)
    assert isinstance(mask, torch.Tensor)
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == (n, n)
    np.testing.assert_array_equal(mask.numpy(), brute_mask(segs))


def test_streaming_mask_example():
    segs = [("input", 2), ("output", 2), ("vision", (1, 1, 2)), ("input", 1), ("output", 1)]
    m = streaming_mask(segs).numpy()
    # tokens: in0 in1 | out2 out3 | vis4 vis5 | in6 | out7
    assert m[4, :4].tolist() == [True, True, False, False]  # frames never see output
    assert m[5, :6].tolist() == [True, True, False, False, True, True]
    assert m[6, :7].all()  # input text attends earlier output (multi-turn chat)
    assert m[7, :8].all()  # output attends everything before it, frames included
    assert not np.triu(m, 1).any()  # causal
    assert np.diag(m).all()


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("fn", [assign, next_position])
def test_unknown_scheme(fn):
    with pytest.raises(ValueError, match=r"unknown position scheme 'native'"):
        fn("native", [("input", 1)])
    with pytest.raises(ValueError, match=r"unknown position scheme"):
        fn("Sequential", [])


@pytest.mark.parametrize(
    ("segs", "pattern"),
    [
        ([("input", -1)], r"segment 0: input count must be >= 0"),
        ([("input", 1), ("output", -3)], r"segment 1: output count must be >= 0"),
        ([("input", 1.5)], r"segment 0: input count must be an int"),
        ([("output", "2")], r"segment 0: output count must be an int"),
        ([("input", True)], r"segment 0: input count must be an int"),
        ([("input", None)], r"segment 0: input count must be an int"),
        ([("vision", ())], r"segment 0: vision grid must be \(t, h, w\)"),
        ([("input", 2), ("vision", (1, 2))], r"segment 1: vision grid must be \(t, h, w\)"),
        ([("vision", (1, 2, 2, 2))], r"segment 0: vision grid must be \(t, h, w\)"),
        ([("vision", None)], r"segment 0: vision grid must be \(t, h, w\)"),
        ([("vision", 4)], r"segment 0: vision grid must be \(t, h, w\)"),
        ([("vision", (1.5, 2, 2))], r"segment 0: vision grid must be \(t, h, w\)"),
        ([("vision", (1, "2", 2))], r"segment 0: vision grid must be \(t, h, w\)"),
        ([("vision", (0, 2, 2))], r"segment 0: vision grid must be positive"),
        ([("vision", (1, 0, 2))], r"segment 0: vision grid must be positive"),
        ([("vision", (1, 2, -1))], r"segment 0: vision grid must be positive"),
        ([("audio", 3)], r"segment 0: unknown segment kind 'audio'"),
        ([("input", 1), ("text", 3)], r"segment 1: unknown segment kind 'text'"),
        ([("input",)], r"segment 0 must be a \(kind, value\) pair"),
        ([("input", 1, 2)], r"segment 0 must be a \(kind, value\) pair"),
        ([("input", 1), 5], r"segment 1 must be a \(kind, value\) pair"),
        ([None], r"segment 0 must be a \(kind, value\) pair"),
    ],
)
def test_bad_segments(segs, pattern):
    for scheme in SCHEMES:
        with pytest.raises(ValueError, match=pattern):
            assign(scheme, segs)
        with pytest.raises(ValueError, match=pattern):
            next_position(scheme, segs)
    with pytest.raises(ValueError, match=pattern):
        token_count(segs)
    with pytest.raises(ValueError, match=pattern):
        streaming_mask(segs)


@pytest.mark.parametrize("tau", [-1, -0.5, float("nan"), float("inf"), float("-inf"), "2", None])
@pytest.mark.parametrize("fn", [assign, next_position])
def test_bad_tau(fn, tau):
    with pytest.raises(ValueError, match=r"tau must be a finite number >= 0"):
        fn("sequential", [("input", 1)], tau=tau)


@pytest.mark.parametrize("gap", [-1, 1.5, "10", None, True])
@pytest.mark.parametrize("fn", [assign, next_position])
def test_bad_gap(fn, gap):
    with pytest.raises(ValueError, match=r"gap must be an int >= 0"):
        fn("gap-isolated", [("output", 1)], gap=gap)


def test_zero_counts_are_allowed():
    segs = [("input", 0), ("output", 0), ("input", 2), ("output", 0), ("output", 2)]
    for scheme in SCHEMES:
        np.testing.assert_array_equal(assign(scheme, segs), assign(scheme, [("input", 2), ("output", 2)]))
