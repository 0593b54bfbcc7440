"""The four position schemes of positions.md, as pure functions of a segment list.

A session is a list of segments in arrival (KV-cache) order:

- ``("input", n)``: n text tokens the model reads (system, user turns, vision markers).
- ``("output", n)``: n text tokens of the model's own turns (assistant header, answer, ``<|im_end|>``).
- ``("vision", (t, h, w))``: one visual item after the 2x2 merge, t*h*w tokens in (j, r, c) order.

Every function here is deterministic in its arguments and prefix-stable: appending segments never
changes the positions of earlier tokens (cached keys are already rotated with them).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SCHEMES: tuple[str, ...] = ("sequential", "overlapped", "group-decoupled", "gap-isolated")
DEFAULT_GAP = 10000

Segment = tuple[str, object]


@dataclass(frozen=True)
class _Text:
    kind: str  # "input" or "output"
    n: int


@dataclass(frozen=True)
class _Vision:
    t: int
    h: int
    w: int

    @property
    def n(self) -> int:
        return self.t * self.h * self.w


def _grid_int(x: object) -> int:
    if isinstance(x, bool):
        raise TypeError("bool is not a grid size")
    return operator.index(x)  # type: ignore[arg-type]


def _parse(segments: Iterable[Segment]) -> list[_Text | _Vision]:
    parsed: list[_Text | _Vision] = []
    for index, segment in enumerate(segments):
        try:
            kind, value = segment
        except (TypeError, ValueError):
            raise ValueError(f"segment {index} must be a (kind, value) pair, got {segment!r}") from None
        if kind in ("input", "output"):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"segment {index}: {kind} count must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"segment {index}: {kind} count must be >= 0, got {value}")
            if value:
                parsed.append(_Text(kind, int(value)))
        elif kind == "vision":
            try:
                # operator.index, not int(): a float or str grid entry is malformed, not truncated
                # (t*h*w must equal the placeholder count); ints, numpy and torch integers pass.
                t, h, w = (_grid_int(x) for x in value)  # type: ignore[union-attr]
            except (TypeError, ValueError):
                raise ValueError(
                    f"segment {index}: vision grid must be (t, h, w) of ints, got {value!r}"
                ) from None
            if min(t, h, w) <= 0:
                raise ValueError(f"segment {index}: vision grid must be positive, got {(t, h, w)}")
            parsed.append(_Vision(t, h, w))
        else:
            raise ValueError(f"segment {index}: unknown segment kind {kind!r} (input, output or vision)")
    return parsed


def _check(scheme: str, tau: float, gap: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown position scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if isinstance(gap, bool) or not isinstance(gap, (int, np.integer)) or gap < 0:
        raise ValueError(f"gap must be an int >= 0, got {gap!r}")


@functools.lru_cache(maxsize=256)
def _vision_offsets(t: int, h: int, w: int, tau: float) -> np.ndarray:
    """(3, t*h*w) offsets from the base of an item, row-major (j, r, c); cached, read-only.

    The hook inside vLLM recomputes a whole session's positions at every streamed chunk, and a
    session repeats a handful of grids, so the layout is built once per grid.
    """
    j, r, c = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    temporal = np.floor(tau * j.astype(np.float64)).astype(np.int64)
    offsets = np.stack([temporal, r, c]).reshape(3, -1).astype(np.int64)
    offsets.flags.writeable = False
    return offsets


def _vision_block(item: _Vision, base: int, tau: float) -> np.ndarray:
    """(3, t*h*w) positions of a visual item placed at ``base``."""
    return _vision_offsets(item.t, item.h, item.w, float(tau)) + base


def _vision_extent(item: _Vision, tau: float) -> int:
    """Largest offset from the base inside an item."""
    return max(math.floor(tau * (item.t - 1)), item.h - 1, item.w - 1)


def _text_block(start: int, n: int) -> np.ndarray:
    return np.broadcast_to(np.arange(start, start + n, dtype=np.int64), (3, n))


def _walk(scheme: str, parsed: list[_Text | _Vision], tau: float, gap: int, emit: bool):
    """Run a scheme over parsed segments; return (blocks, next position)."""
    blocks: list[np.ndarray] = []
    if scheme == "overlapped":
        last = -1  # E: last used value
        run: tuple[int, int] | None = None  # pending output run: (base, length)
        for seg in parsed:
            if isinstance(seg, _Vision):
                if run is not None:
                    base = run[0]
                    last = max(run[0] + run[1] - 1, base + _vision_extent(seg, tau))
                    run = None
                else:
                    base = last + 1
                    last = base + _vision_extent(seg, tau)
                if emit:
                    blocks.append(_vision_block(seg, base, tau))
            elif seg.kind == "input":
                if run is not None:
                    last = max(last, run[0] + run[1] - 1)
                    run = None
                if emit:
                    blocks.append(_text_block(last + 1, seg.n))
                last += seg.n
            else:
                base, length = run if run is not None else (last + 1, 0)
                if emit:
                    blocks.append(_text_block(base + length, seg.n))
                run = (base, length + seg.n)
        nxt = run[0] + run[1] if run is not None else last + 1
        return blocks, nxt

    counter_in = 0
    if scheme == "sequential":
        counter_out = None  # one shared counter
    else:
        counter_out = gap if scheme == "gap-isolated" else 0
    for seg in parsed:
        if isinstance(seg, _Vision):
            if emit:
                blocks.append(_vision_block(seg, counter_in, tau))
            counter_in += _vision_extent(seg, tau) + 1
        elif seg.kind == "input" or counter_out is None:
            if emit:
                blocks.append(_text_block(counter_in, seg.n))
            counter_in += seg.n
        else:
            if emit:
                blocks.append(_text_block(counter_out, seg.n))
            counter_out += seg.n
    return blocks, counter_in if counter_out is None else counter_out


def assign(
    scheme: str, segments: Sequence[Segment], *, tau: float = 1.0, gap: int = DEFAULT_GAP
) -> np.ndarray:
    """Positions (T, H, W) of every token of ``segments`` under ``scheme``: int64 array (3, L)."""
    _check(scheme, tau, gap)
    blocks, _ = _walk(scheme, _parse(segments), tau, gap, emit=True)
    if not blocks:
        return np.zeros((3, 0), dtype=np.int64)
    return np.ascontiguousarray(np.concatenate(blocks, axis=1))


def next_position(
    scheme: str, segments: Sequence[Segment], *, tau: float = 1.0, gap: int = DEFAULT_GAP
) -> int:
    """Position (on all three channels) of the next generated token after ``segments``."""
    _check(scheme, tau, gap)
    _, nxt = _walk(scheme, _parse(segments), tau, gap, emit=False)
    return int(nxt)


def token_count(segments: Sequence[Segment]) -> int:
    """Number of tokens the segments hold."""
    return sum(seg.n for seg in _parse(segments))


def streaming_mask(segments: Sequence[Segment]):
    """Attention mask (L, L), True where query i may attend key j.

    Causal in arrival order, except that vision tokens never attend to output tokens
    (frames are encoded independently of what the model said).
    """
    import torch

    parsed = _parse(segments)
    kinds: list[int] = []  # 0 input, 1 output, 2 vision
    for seg in parsed:
        code = 2 if isinstance(seg, _Vision) else (1 if seg.kind == "output" else 0)
        kinds.extend([code] * seg.n)
    kind = torch.tensor(kinds, dtype=torch.int8)
    length = kind.numel()
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    blocked = (kind == 2).unsqueeze(1) & (kind == 1).unsqueeze(0)
    return mask & ~blocked
