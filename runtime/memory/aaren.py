"""Aaren slot memory: exact softmax pooling of an unbounded stream in constant memory.

"Attention as an RNN" (Feng et al., arXiv 2405.13956): softmax attention of one fixed query over a
stream is an RNN with state (m, u, w) = running max of scores, running denominator, running
numerator. For an item with score s and value v::

    m' = max(m, s);  u' = u*exp(m - m') + exp(s - m');  w' = w*exp(m - m') + v*exp(s - m')

and the output is w / u. Two states merge with the same rule (associative and commutative up to
rounding), so any chunking, merge order or prefix scan gives the same pooled result. Every slot's
output is an exact softmax-weighted mean of real token embeddings, i.e. it stays in the model's own
embedding space and can be fed back as ``image_embeds``.

State is float64 (m, u of shape (K,), w of shape (K, d)): K * (d + 2) numbers whatever the stream
length. Empty slots have m = -inf, u = 0, w = 0 and never produce NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np

__all__ = ["AarenState", "SlotMemory", "adaptive_pool_pairs", "combine"]

SlotMode = Literal["spatial", "prototype"]

# Re-centre the time origin once decay * (t - t_ref) leaves [-RECENTER, RECENTER]: keeps every
# stored max m and every time term O(RECENTER) so float64 never loses precision over long streams.
RECENTER = 64.0
_LOWEST = np.finfo(np.float64).min


def _safe_max(m: np.ndarray) -> np.ndarray:
    """Running max with -inf clamped to a finite number, so exp(x - m) is 0 (not NaN) for empty slots.

    Only a slot whose max is -inf is clamped, and then every score in it is -inf too.
    """
    return np.maximum(m, _LOWEST)


def _check_scores(scores: np.ndarray) -> None:
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError("scores must be finite or -inf (an -inf score means 'not in this slot')")


class AarenState:
    """(m, u, w) for K slots of dimension d, float64, updated in place.

    All update methods are exact batched versions of the per-item recurrence: a batch is folded
    into its own (max, denominator, numerator) and merged, which equals feeding items one by one up
    to float64 summation order.
    """

    __slots__ = ("m", "u", "w")

    def __init__(self, m: np.ndarray, u: np.ndarray, w: np.ndarray) -> None:
        self.m = np.asarray(m, dtype=np.float64)
        self.u = np.asarray(u, dtype=np.float64)
        self.w = np.asarray(w, dtype=np.float64)
        if self.m.ndim != 1 or self.u.shape != self.m.shape or self.w.shape[:1] != self.m.shape:
            raise ValueError(f"inconsistent state shapes m{self.m.shape} u{self.u.shape} w{self.w.shape}")

    @classmethod
    def empty(cls, num_slots: int, dim: int) -> AarenState:
        """All slots empty: m = -inf, u = 0, w = 0."""
        return cls(np.full(num_slots, -np.inf), np.zeros(num_slots), np.zeros((num_slots, dim)))

    @classmethod
    def from_items(cls, values: np.ndarray, scores: np.ndarray) -> AarenState:
        """State of a chunk of items alone (dense scores of shape (n, K) or (n,) for K = 1)."""
        values = np.asarray(values)
        scores = np.asarray(scores, dtype=np.float64)
        k = 1 if scores.ndim == 1 else scores.shape[1]
        return cls.empty(k, values.shape[1]).update(values, scores)

    @property
    def num_slots(self) -> int:
        return self.m.shape[0]

    @property
    def dim(self) -> int:
        return self.w.shape[1]

    @property
    def nbytes(self) -> int:
        return self.m.nbytes + self.u.nbytes + self.w.nbytes

    @property
    def filled(self) -> np.ndarray:
        """Boolean mask of slots that have received at least one item with a finite score."""
        return ~np.isneginf(self.m)

    def copy(self) -> AarenState:
        return AarenState(self.m.copy(), self.u.copy(), self.w.copy())

    def _rescale(self, m_new: np.ndarray) -> np.ndarray:
        """Bring (u, w) to the new running max; returns the max with -inf made safe for exp."""
        safe = _safe_max(m_new)
        scale = np.exp(self.m - safe)  # exp(-inf) = 0 for empty slots, exp(<=0) never overflows
        self.u *= scale
        self.w *= scale[:, None]
        self.m = m_new
        return safe

    def update(self, values: np.ndarray, scores: np.ndarray) -> AarenState:
        """Fold n items into every slot with a dense score matrix.

        ``values`` (n, d), any float dtype; ``scores`` (n, K), or (n,) when K = 1; -inf excludes an
        item from a slot.
        """
        values = np.asarray(values)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim == 1:
            scores = scores[:, None]
        n = values.shape[0]
        if values.ndim != 2 or values.shape[1] != self.dim or scores.shape != (n, self.num_slots):
            raise ValueError(
                f"expected values (n, {self.dim}) and scores (n, {self.num_slots}), "
                f"got {values.shape} and {scores.shape}"
            )
        if n == 0:
            return self
        _check_scores(scores)
        self._fold_dense(values, scores)
        return self

    def _fold_dense(self, values: np.ndarray, scores: np.ndarray) -> None:
        """update() without validation (scores (n, K) finite or -inf, n >= 1): the hot path."""
        safe = self._rescale(np.maximum(self.m, scores.max(axis=0)))
        e = np.exp(scores - safe)  # (n, K), all <= 1
        self.u += e.sum(axis=0)
        self.w += e.T @ values.astype(np.float64, copy=False)

    def update_assigned(self, values: np.ndarray, slots: np.ndarray, scores: np.ndarray) -> AarenState:
        """Fold n items, item i into slot ``slots[i]`` only, with score ``scores[i]``.

        Cost O(n * d) instead of O(n * K * d): used for spatial slots where each item has one slot.
        """
        values = np.asarray(values)
        slots = np.asarray(slots, dtype=np.intp)
        scores = np.asarray(scores, dtype=np.float64)
        n = values.shape[0]
        if values.ndim != 2 or values.shape[1] != self.dim or slots.shape != (n,) or scores.shape != (n,):
            raise ValueError(
                f"expected values (n, {self.dim}), slots (n,), scores (n,); "
                f"got {values.shape}, {slots.shape}, {scores.shape}"
            )
        if n == 0:
            return self
        if slots.min() < 0 or slots.max() >= self.num_slots:
            raise ValueError(f"slot index out of range [0, {self.num_slots})")
        _check_scores(scores)
        batch_max = np.full(self.num_slots, -np.inf)
        np.maximum.at(batch_max, slots, scores)
        safe = self._rescale(np.maximum(self.m, batch_max))
        e = np.exp(scores - safe[slots])
        self.u += np.bincount(slots, weights=e, minlength=self.num_slots)
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
        weighted = values[order].astype(np.float64) * e[order, None]
        self.w[sorted_slots[starts]] += np.add.reduceat(weighted, starts, axis=0)
        return self

    def merge(self, other: AarenState) -> AarenState:
        """Fold another state (same K, d) into this one, in place: the associative combine."""
        if other.m.shape != self.m.shape or other.w.shape != self.w.shape:
            raise ValueError(f"cannot merge states of shapes {other.w.shape} and {self.w.shape}")
        self._fold_state(other.m, other.u, other.w)
        return self

    def _fold_state(self, m: np.ndarray, u: np.ndarray, w: np.ndarray) -> None:
        """merge() of raw (m, u, w) arrays without validation: the hot path."""
        safe = self._rescale(np.maximum(self.m, m))
        scale = np.exp(m - safe)
        self.u += u * scale
        self.w += w * scale[:, None]

    def shift(self, delta: float | np.ndarray) -> AarenState:
        """Subtract ``delta`` from every stored score (exact: outputs unchanged, m re-centred)."""
        self.m = self.m - delta
        return self

    def output(self, fallback: float | np.ndarray = 0.0) -> np.ndarray:
        """(K, d) float64 pooled values w / u; empty slots get ``fallback`` (scalar or (d,))."""
        out = np.empty_like(self.w)
        filled = self.filled
        out[filled] = self.w[filled] / self.u[filled, None]
        out[~filled] = fallback
        return out


def combine(a: AarenState, b: AarenState) -> AarenState:
    """Pure associative combine: a new state equal to folding ``a``'s items then ``b``'s."""
    return a.copy().merge(b)


def _bounds(size: int, out: int) -> list[tuple[int, int]]:
    """torch AdaptiveAvgPool regions: [floor(i*size/out), ceil((i+1)*size/out)), never empty."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _parse_grid(grid: Sequence[int]) -> tuple[int, int, int]:
    g = tuple(int(x) for x in grid)
    if len(g) == 2:
        g = (1, *g)
    if len(g) != 3 or min(g) <= 0:
        raise ValueError(f"grid must be (t, h, w) or (h, w) of positive ints, got {tuple(grid)!r}")
    return g  # type: ignore[return-value]


@lru_cache(maxsize=64)
def _spatial_plan(grid: tuple[int, int, int], slot_grid: tuple[int, int]) -> tuple[tuple[int, ...], ...]:
    """Per slot (row-major over the slot grid): (r0, r1, c0, c1) of its region in the step grid."""
    _, h, w = grid
    sh, sw = slot_grid
    return tuple((r0, r1, c0, c1) for r0, r1 in _bounds(h, sh) for c0, c1 in _bounds(w, sw))


def adaptive_pool_pairs(grid: Sequence[int], slot_grid: Sequence[int]) -> tuple[np.ndarray, ...]:
    """(token index, slot index, tokens per slot) of adaptive pooling a (t, h, w) grid to (sh, sw).

    Regions follow torch's AdaptiveAvgPool2d (they may overlap by one row/column when h or w is not
    a multiple of sh or sw, and are never empty, even when the grid is smaller than the slot grid);
    all t temporal frames of a cell go to the same slot. Tokens are in (t, h, w) row-major order.
    """
    t, h, w = _parse_grid(grid)
    s = tuple(int(x) for x in slot_grid)
    if len(s) != 2 or min(s) <= 0:
        raise ValueError(f"slot_grid must be (sh, sw) of positive ints, got {tuple(slot_grid)!r}")
    index = np.arange(t * h * w).reshape(t, h, w)
    cells = [index[:, r0:r1, c0:c1].ravel() for r0, r1, c0, c1 in _spatial_plan((t, h, w), s)]
    slots = np.concatenate([np.full(c.size, i, dtype=np.intp) for i, c in enumerate(cells)])
    return np.concatenate(cells), slots, np.array([c.size for c in cells])


class SlotMemory:
    """K = sh * sw Aaren slots fed with visual tokens; read() is (K, d) float32 embeddings.

    Modes:

    - ``spatial``: the step's (t, h, w) merged grid is adaptively pooled to (sh, sw); every token
      goes into the slot(s) of its region with score ``decay * t + bonus - log(region size)``. The
      ``-log`` term gives every step the same total mass per slot whatever its resolution, so a slot
      is a recency/surprise-weighted mean over steps of the region's tokens. Read back with grid
      (1, sh, sw) so M-RoPE keeps the layout.
    - ``prototype``: K fixed random unit probes p_k (seeded); every token updates every slot with
      score ``beta * <p_k, x> + decay * t + bonus`` where x is L2-normalised when
      ``normalize_tokens`` (default), which makes beta scale-free: random-direction scores have
      standard deviation beta / sqrt(d). The slots are still laid out on (sh, sw) for feeding back.

    ``decay`` (lambda, per second) gives exact exponential forgetting: an item t seconds older has
    exp(-lambda * t) times the weight (half-life ln 2 / lambda). Timestamps are float64 and the
    time origin is re-centred, so nothing overflows over arbitrarily long streams.
    """

    def __init__(
        self,
        dim: int,
        *,
        mode: SlotMode = "spatial",
        slot_grid: tuple[int, int] = (8, 8),
        beta: float = 1.0,
        decay: float = 0.0,
        normalize_tokens: bool = True,
        seed: int = 0,
    ) -> None:
        if mode not in ("spatial", "prototype"):
            raise ValueError(f"unknown slot mode {mode!r}; choose 'spatial' or 'prototype'")
        sh, sw = (int(x) for x in slot_grid)
        if dim <= 0 or sh <= 0 or sw <= 0:
            raise ValueError(f"dim and slot_grid must be positive, got {dim} and {slot_grid}")
        if not (math.isfinite(beta) and math.isfinite(decay) and decay >= 0):
            raise ValueError(f"beta must be finite and decay finite and >= 0, got {beta}, {decay}")
        self.dim = int(dim)
        self.mode: SlotMode = mode
        self.slot_grid = (sh, sw)
        self.beta = float(beta)
        self.decay = float(decay)
        self.normalize_tokens = normalize_tokens
        self.seed = seed
        self.probes: np.ndarray | None = None
        if mode == "prototype":
            probes = np.random.default_rng(seed).standard_normal((sh * sw, self.dim))
            self.probes = probes / np.linalg.norm(probes, axis=1, keepdims=True)
            self.probes.flags.writeable = False
            self._scaled_probes_t = np.ascontiguousarray(self.beta * self.probes.T)
        self.state = AarenState.empty(sh * sw, self.dim)
        self.t_ref: float | None = None  # time origin of the stored scores (float64 seconds)
        self.writes = 0

    @property
    def num_slots(self) -> int:
        return self.slot_grid[0] * self.slot_grid[1]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Merged (t, h, w) grid to feed read() back as one image: (1, sh, sw)."""
        return (1, *self.slot_grid)

    @property
    def filled(self) -> np.ndarray:
        return self.state.filled

    def reset(self) -> None:
        self.state = AarenState.empty(self.num_slots, self.dim)
        self.t_ref = None
        self.writes = 0

    def state_bytes(self) -> int:
        """Bytes of the streaming state (m, u, w); constant whatever the stream length."""
        return self.state.nbytes

    def _time_term(self, timestamp: float) -> float:
        """decay * (t - t_ref) after re-centring the origin so the term stays within RECENTER."""
        timestamp = float(timestamp)
        if not math.isfinite(timestamp):
            raise ValueError(f"timestamp must be finite, got {timestamp}")
        if self.t_ref is None:
            self.t_ref = timestamp
        term = self.decay * (timestamp - self.t_ref)
        if abs(term) > RECENTER:
            self.state.shift(term)
            self.t_ref = timestamp
            term = 0.0
        return term

    def write(
        self,
        tokens: np.ndarray | object,
        timestamp: float,
        bonus: float | np.ndarray = 0.0,
        grid: Sequence[int] | None = None,
    ) -> None:
        """Pool one step's tokens (n, d) into the slots.

        ``tokens`` may also be a step object with ``embeds`` and ``grid`` attributes (a visual
        chunk). ``grid`` (t, h, w) or (h, w) with t*h*w = n is required in spatial mode. ``bonus``
        is added to every score (scalar, e.g. the step's surprise) or per token (shape (n,)).
        """
        embeds = getattr(tokens, "embeds", None)
        if embeds is not None:
            grid = getattr(tokens, "grid", None) if grid is None else grid
            tokens = embeds
        x = np.asarray(tokens)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"tokens must be (n, {self.dim}), got {x.shape}")
        n = x.shape[0]
        if n == 0:
            return
        b = np.asarray(bonus, dtype=np.float64)
        per_token = b.ndim > 0
        if per_token and b.shape != (n,):
            raise ValueError(f"bonus must be a scalar or shape ({n},), got {b.shape}")
        # One reduction per array: NaN and inf propagate through sums (overflow only past 1e308).
        if not (math.isfinite(b.sum()) and math.isfinite(x.sum(dtype=np.float64))):
            raise ValueError("tokens and bonus must be finite")
        term = self._time_term(timestamp)
        if self.mode == "spatial":
            if grid is None:
                raise ValueError("spatial slot memory needs the step's grid (t, h, w)")
            if per_token:
                self._write_spatial(x, _parse_grid(grid), b, term)
            else:
                self._write_spatial(x, _parse_grid(grid), None, term + float(b))
        else:
            self._write_prototype(x, term + b)
        self.writes += 1

    def _write_spatial(
        self, x: np.ndarray, grid: tuple[int, int, int], bonus: np.ndarray | None, base: float
    ) -> None:
        """Fold each slot's region into a chunk state (max, sum exp, sum exp * x), then merge.

        Item score = time term + bonus - log(region size); with a scalar bonus every item of a
        region has the same score, so the chunk is (score, count, sum of tokens).
        """
        t, h, w = grid
        if t * h * w != x.shape[0]:
            raise ValueError(f"grid {grid} has {t * h * w} cells but got {x.shape[0]} tokens")
        k, d = self.num_slots, self.dim
        cube = x.reshape(t, h, w, d)
        bcube = None if bonus is None else bonus.reshape(t, h, w)
        m, u, acc = np.empty(k), np.empty(k), np.empty((k, d))
        for s, (r0, r1, c0, c1) in enumerate(_spatial_plan(grid, self.slot_grid)):
            block = cube[:, r0:r1, c0:c1].reshape(-1, d)
            log_count = math.log(block.shape[0])
            if bcube is None:
                m[s] = base - log_count
                u[s] = block.shape[0]
                acc[s] = block.sum(axis=0, dtype=np.float64)
            else:
                scores = bcube[:, r0:r1, c0:c1].ravel() + (base - log_count)
                m[s] = scores.max()
                e = np.exp(scores - m[s])
                u[s] = e.sum()
                acc[s] = e @ block
        self.state._fold_state(m, u, acc)

    def _write_prototype(self, x: np.ndarray, base: float | np.ndarray) -> None:
        """Every token updates every slot with score beta * <probe, x(normalised)> + base."""
        assert self.probes is not None
        xf = x.astype(np.float64, copy=False)
        scores = xf @ self._scaled_probes_t  # (n, K) = beta * <x, probe_k>
        if self.normalize_tokens:
            norms = np.sqrt(np.einsum("ij,ij->i", xf, xf))
            norms[norms == 0] = 1.0
            scores /= norms[:, None]
        scores += np.reshape(base, (-1, 1))
        self.state._fold_dense(xf, scores)

    def read(self, fallback: float | np.ndarray = 0.0) -> np.ndarray:
        """(K, d) float32 pooled embeddings; empty slots (nothing written yet) get ``fallback``."""
        return self.state.output(fallback).astype(np.float32)

    def _check_compatible(self, other: SlotMemory) -> None:
        same = (
            self.dim == other.dim
            and self.mode == other.mode
            and self.slot_grid == other.slot_grid
            and self.decay == other.decay
            and (self.mode == "spatial" or (self.beta == other.beta and self.seed == other.seed))
        )
        if not same:
            raise ValueError("can only merge slot memories with the same dim, mode, grid, decay and probes")

    def merge(self, other: SlotMemory) -> None:
        """Fold another memory's history into this one (exact: as if its items were written here)."""
        self._check_compatible(other)
        if other.t_ref is None:
            return
        incoming = other.state.copy()
        if self.t_ref is None:
            self.t_ref = other.t_ref
        else:
            incoming.shift(self.decay * (self.t_ref - other.t_ref))
        self.state.merge(incoming)
        self.writes += other.writes
        # Keep stored maxima O(RECENTER) relative to the origin.
        finite = self.state.m[self.state.filled]
        if self.decay > 0 and finite.size and np.abs(finite).max() > 2 * RECENTER:
            top = float(finite.max())
            self.state.shift(top)
            self.t_ref += top / self.decay
