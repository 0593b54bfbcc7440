"""A test picture that carries its own frame counter, so a receiver can tell exactly which frames arrived.

The whole picture is a grid of 8 x 4 large black/white cells: 24 bits of counter and an 8-bit check.
Large flat cells survive VP8/H.264 compression, scaling and colour conversion; the decoder reads the
mean of each cell's centre and rejects pictures whose check does not match.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

COLS = 8
ROWS = 4
COUNTER_BITS = 24
MAX_COUNTER = (1 << COUNTER_BITS) - 1

_WHITE = 235  # video-range luma extremes: they survive limited-range YUV round trips unclipped
_BLACK = 16


def _check(counter: int) -> int:
    return ((counter ^ (counter >> 8) ^ (counter >> 16)) & 0xFF) ^ 0x5A


def _bits(counter: int) -> np.ndarray:
    word = (counter & MAX_COUNTER) | (_check(counter & MAX_COUNTER) << COUNTER_BITS)
    return ((word >> np.arange(ROWS * COLS)) & 1).astype(bool).reshape(ROWS, COLS)


@lru_cache(maxsize=16)
def _cell_maps(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(height) * ROWS // height
    cols = np.arange(width) * COLS // width
    return rows, cols


def encode(counter: int, width: int = 640, height: int = 480) -> np.ndarray:
    """The pattern for ``counter`` as an H x W x 3 uint8 RGB picture."""
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError(f"counter must be in [0, {MAX_COUNTER}], got {counter}")
    if width < COLS * 2 or height < ROWS * 2:
        raise ValueError(f"picture too small for the pattern: {width}x{height}")
    rows, cols = _cell_maps(width, height)
    levels = np.where(_bits(counter), _WHITE, _BLACK).astype(np.uint8)
    grey = levels[rows[:, None], cols[None, :]]
    return np.repeat(grey[:, :, None], 3, axis=2)


def decode(rgb: np.ndarray) -> int | None:
    """The counter carried by a picture made by :func:`encode` (any size), or None if unreadable."""
    if rgb.ndim != 3 or rgb.shape[0] < ROWS * 2 or rgb.shape[1] < COLS * 2:
        return None
    height, width = rgb.shape[:2]
    luma = rgb.mean(axis=2) if rgb.shape[2] >= 3 else rgb[:, :, 0].astype(np.float32)
    word = 0
    for r in range(ROWS):
        y0, y1 = r * height // ROWS, (r + 1) * height // ROWS
        q = (y1 - y0) // 4
        for c in range(COLS):
            x0, x1 = c * width // COLS, (c + 1) * width // COLS
            p = (x1 - x0) // 4
            if luma[y0 + q : y1 - q, x0 + p : x1 - p].mean() > 127.5:
                word |= 1 << (r * COLS + c)
    counter = word & MAX_COUNTER
    if (word >> COUNTER_BITS) != _check(counter):
        return None
    return counter
