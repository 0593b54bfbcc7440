"""Scene-change filter: drop a frame that shows nothing new since the last frame that went in.

At 2 fps every frame costs a vision-encoder pass and a prefill even when the camera watches an empty
room. This filter compares a frame with **the last kept frame** (not the previous frame, so a slow
drift adds up until it counts) and drops it, counted as ``"unchanged"``, unless something moved or
changed colour, or the keep-alive interval ran out, so the model's view is never older than that.

How, and why this statistic:

- **Thumbnail.** The frame is area-averaged into square cells of ``block`` pixels (``block`` =
  long side // 32, so 32-63 cells on the long side), per channel. Averaging ``block**2`` pixels
  divides per-pixel sensor noise by ``block``; nothing finer than a cell matters for "is there
  anything new". It is the only pass over the pixels (two integer sums), ~0.3 ms for 640x480; the
  whole decision takes about 1 ms on these CPUs.
- **Difference.** ``D`` = new thumbnail - reference thumbnail, signed, per cell and channel.
- **Noise, measured not assumed.** Per-pixel noise drawn afresh each frame makes ``D`` an
  independent random value in every cell, while a real change is a connected region of cells. The
  noise scale ``sigma`` (per channel) is estimated from the differences of *neighbouring* cells of
  ``D``, which a changed region touches only along its border and a smooth global change (lighting)
  not at all: their median per tile of 4 x 4 cells (robust to a thin strip crossing the tile), then
  the upper quartile over tiles (noise is uneven: a flat object may have none, and it is the noisiest
  part of the frame that must not pass). The estimate is capped at what a camera's per-pixel noise
  (`MAX_PIXEL_NOISE`) can give at this block size, so a busy new scene cannot pass itself off as
  noise.
- **Statistic: max over windows, not a mean.** A mean over the whole thumbnail dilutes a change of a
  tenth of the frame, and a single-cell max is swamped by noise on small frames. Instead ``D`` is
  box-averaged over windows of several shapes (1-8 cells on each side, rectangles too, since the
  border strip a moving object leaves is long and thin), at every position, with a summed-area table.
  Averaging ``n`` cells of independent noise divides it by ``sqrt(n)`` while a change that fills
  the window keeps its full size, so some window matches any local change. The score is the
  largest ``|window mean| - NOISE_Z * sigma / sqrt(n)`` over windows and channels: how many levels
  (0-255) the clearest change stands above the noise. The frame counts as changed when the score
  exceeds ``threshold``.

Pure numpy, no torch; the state is one thumbnail and one time (`ChangeFilter`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from .frame import rgb_pixels

#: Drop reason for a frame the filter holds back (counted in ``StreamStats.dropped``).
UNCHANGED = "unchanged"
#: Why a frame was kept.
FIRST = "first"  # nothing went in yet (or the filter was reset)
CHANGED = "changed"  # the score exceeded the threshold
RESIZED = "resized"  # the frame size differs from the reference's: not comparable, so it goes in
KEEPALIVE = "keepalive"  # unchanged, but the last kept frame is keepalive_s old (or time went back)
OFF = "off"  # the filter is disabled

THUMB_CELLS = 32  # at least this many cells along the long side (block = long side // 32)
WINDOW_SIDES = (1, 2, 4, 8)  # window heights and widths, in cells
MAX_WINDOW_ASPECT = 4  # rectangles up to 1:4 (8x2, 4x1, ...): a moved object's edge is a thin strip
NOISE_Z = 5.0  # a window must stand this many noise standard deviations clear of zero
NOISE_TILE = 4  # noise is measured per tile of this many cells square...
NOISE_QUANTILE = 0.75  # ...and the frame's noise is this quantile of the tiles'
MAX_PIXEL_NOISE = 40.0  # the most per-pixel noise (std, levels) a camera is credited with
_MAD_TO_STD = 1.4826  # standard deviation of a gaussian / its median absolute deviation


@dataclass(frozen=True)
class ChangeFilterSettings:
    """What the filter does; immutable, validated on construction (ValueError naming the field).

    ``threshold``: how many levels (0-255) a region's average colour must change, beyond what the
    measured noise explains, to count as new; 0 passes anything above the noise. ``keepalive_s``:
    the longest time, in seconds, between two frames that go in, changed or not. ``enabled``: False
    lets every frame through.
    """

    enabled: bool = True
    threshold: float = 6.0
    keepalive_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"change filter 'enabled' must be true or false, got {self.enabled!r}")
        threshold = _number("threshold", self.threshold)
        if not 0.0 <= threshold < 255.0:
            raise ValueError(f"change filter 'threshold' must be in [0, 255) levels, got {threshold}")
        keepalive = _number("keepalive_s", self.keepalive_s)
        if not keepalive > 0.0:
            raise ValueError(f"change filter 'keepalive_s' must be > 0 seconds, got {keepalive}")
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "keepalive_s", keepalive)

    def updated(self, changes: dict[str, object]) -> ChangeFilterSettings:
        """These settings with some fields replaced (a ``session.update``); unknown names are refused."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown change filter setting(s) {unknown}; expected some of {sorted(names)}")
        return replace(self, **changes)  # type: ignore[arg-type]  # each value is validated above


def _number(name: str, value: object) -> float:
    """A finite real number (bool refused: ``True`` is not a threshold), or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"change filter {name!r} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"change filter {name!r} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class Thumbnail:
    """A frame reduced to cell means: ``cells`` is (3, rows, cols) float32 levels, channel first.

    ``block`` is the cell side in pixels (it sets how much pixel noise is left in a cell);
    ``size`` the source frame's (height, width), since thumbnails of different frame sizes do not
    compare.
    """

    cells: np.ndarray
    block: int
    size: tuple[int, int]


def thumbnail(rgb: np.ndarray) -> Thumbnail:
    """The area-averaged thumbnail of an H x W x 3 uint8 frame (ValueError for anything else).

    Square cells of ``long side // THUMB_CELLS`` pixels (at least 1); the few rows and columns that
    do not fill a cell are cut evenly from both edges (under a cell, so under 1/32 of the frame).
    """
    rgb = rgb_pixels(rgb)
    height, width = rgb.shape[:2]
    block = max(1, max(height, width) // THUMB_CELLS)
    rows, cols = height // block, width // block
    top, left = (height - rows * block) // 2, (width - cols * block) // 2
    # 255 * block must fit the accumulator of the first (row) sums
    wide = np.uint16 if block <= 257 else np.uint32
    strip = rgb[top : top + rows * block].reshape(rows, block, width * 3).sum(axis=1, dtype=wide)
    strip = strip.reshape(rows, width, 3)[:, left : left + cols * block]
    sums = np.add.reduceat(strip, np.arange(0, cols * block, block), axis=1, dtype=np.uint32)
    cells = np.ascontiguousarray(sums.transpose(2, 0, 1), dtype=np.float32) * np.float32(1 / block**2)
    return Thumbnail(cells, block, (height, width))


def _windows(rows: int, cols: int) -> list[tuple[int, int]]:
    """The window shapes (height, width in cells) that fit a thumbnail of this size."""
    return [
        (h, w)
        for h in WINDOW_SIDES
        for w in WINDOW_SIDES
        if h <= rows and w <= cols and max(h, w) <= MAX_WINDOW_ASPECT * min(h, w)
    ]


def noise_sigma(diff: np.ndarray, block: int) -> np.ndarray:
    """Per channel, the noise std of one cell of a thumbnail difference, estimated robustly.

    From the differences between neighbouring cells (variance ``2 sigma**2`` for independent noise):
    their median in each `NOISE_TILE` x `NOISE_TILE` tile of cells (a thin changed strip only touches
    a few of a tile's values), then the `NOISE_QUANTILE` of the tiles, because noise is uneven (a
    saturated or flat object has none) and the noisiest part of the frame is what must not pass.
    Capped at what `MAX_PIXEL_NOISE` of per-pixel noise in both frames leaves in a ``block``-pixel cell.
    """
    c, rows, cols = diff.shape
    cap = np.float32(MAX_PIXEL_NOISE * math.sqrt(2.0) / block)
    if rows < 2 or cols < 2:  # nothing to measure with: assume the worst
        return np.full(c, cap, np.float32)
    t = min(NOISE_TILE, rows - 1, cols - 1)
    ty, tx = (rows - 1) // t, (cols - 1) // t
    corner = diff[:, : ty * t, : tx * t]
    across = np.abs(diff[:, : ty * t, 1 : tx * t + 1] - corner).reshape(c, ty, t, tx, t)
    down = np.abs(diff[:, 1 : ty * t + 1, : tx * t] - corner).reshape(c, ty, t, tx, t)
    tiles = np.concatenate([across, down], axis=2).transpose(0, 1, 3, 2, 4).reshape(c, ty * tx, 2 * t * t)
    middle = t * t  # of 2 t**2 values: the upper median (partition is cheaper than np.median)
    medians = np.partition(tiles, middle, axis=2)[:, :, middle]
    rank = min(round(NOISE_QUANTILE * (ty * tx - 1)), ty * tx - 1)
    sigma = np.partition(medians, rank, axis=1)[:, rank] * np.float32(_MAD_TO_STD / math.sqrt(2.0))
    return np.minimum(sigma, cap)


def change_score(reference: Thumbnail, current: Thumbnail) -> float:
    """How many levels the clearest local change stands above the noise (<= 0: none at all).

    The largest ``|mean of D over a window| - NOISE_Z * sigma / sqrt(cells in it)`` over the window
    shapes of `_windows`, every position and every channel, ``D`` being the thumbnails' difference.
    Both thumbnails must come from frames of the same size.
    """
    if reference.size != current.size:
        raise ValueError(f"thumbnails of different frame sizes: {reference.size} vs {current.size}")
    diff = current.cells - reference.cells
    c, rows, cols = diff.shape
    margin = NOISE_Z * noise_sigma(diff, current.block)
    # box sums by prefix sums, first along rows (one per window width), then down the columns
    across = np.zeros((c, rows, cols + 1), np.float32)
    np.cumsum(diff, axis=2, out=across[:, :, 1:])
    best = -math.inf
    shapes = _windows(rows, cols)
    for w in sorted({w for _, w in shapes}):
        down = np.zeros((c, rows + 1, cols + 1 - w), np.float32)
        np.cumsum(across[:, :, w:] - across[:, :, :-w], axis=1, out=down[:, 1:])
        for h in (h for h, ww in shapes if ww == w):
            total = (down[:, h:] - down[:, :-h]).reshape(c, -1)
            peak = np.maximum(total.max(axis=1), -total.min(axis=1)) / np.float32(h * w)
            best = max(best, float((peak - margin / np.float32(math.sqrt(h * w))).max()))
    return best


@dataclass(frozen=True)
class ChangeDecision:
    """Whether a frame goes in, why (`UNCHANGED` for a drop), and its score (NaN where not compared).

    ``thumb`` is the frame's thumbnail (None when the filter is off), what `ChangeFilter.commit`
    keeps as the next reference.
    """

    keep: bool
    reason: str
    score: float
    timestamp: float
    thumb: Thumbnail | None


class ChangeFilter:
    """The filter's state: the thumbnail and time of the last frame that went in.

    `decide` looks and changes nothing; `commit` records a kept frame as the new reference. Call
    `commit` when the frame is actually ingested (so a kept frame that is dropped later, say for
    age, does not become the reference); `check` does both at once for a caller that ingests every
    kept frame. Timestamps are seconds on any clock that the caller uses consistently.
    """

    def __init__(self, settings: ChangeFilterSettings | None = None) -> None:
        self.settings = settings if settings is not None else ChangeFilterSettings()
        self._reference: Thumbnail | None = None
        self._kept_at: float | None = None

    def decide(self, rgb: np.ndarray, timestamp: float) -> ChangeDecision:
        """Keep or drop this frame, compared with the last committed one; ValueError for a bad frame."""
        if not math.isfinite(timestamp):
            raise ValueError(f"frame timestamp must be a finite number of seconds, got {timestamp!r}")
        settings = self.settings
        if not settings.enabled:
            rgb_pixels(rgb)  # the same errors whether the filter is on or off
            return ChangeDecision(True, OFF, math.nan, timestamp, None)
        thumb = thumbnail(rgb)
        reference, kept_at = self._reference, self._kept_at
        if reference is None or kept_at is None:
            return ChangeDecision(True, FIRST, math.nan, timestamp, thumb)
        if reference.size != thumb.size:
            return ChangeDecision(True, RESIZED, math.nan, timestamp, thumb)
        score = change_score(reference, thumb)
        if score > settings.threshold:
            return ChangeDecision(True, CHANGED, score, timestamp, thumb)
        elapsed = timestamp - kept_at
        if elapsed >= settings.keepalive_s or elapsed < 0:  # time going back: a restarted clock
            return ChangeDecision(True, KEEPALIVE, score, timestamp, thumb)
        return ChangeDecision(False, UNCHANGED, score, timestamp, thumb)

    def commit(self, decision: ChangeDecision) -> None:
        """Make a kept frame the reference; a drop changes nothing, a frame let through while the
        filter was off clears it (that frame went in uncompared, so the next one must go in too)."""
        if decision.reason == OFF:
            self.reset()
        elif decision.keep and decision.thumb is not None:
            self._reference, self._kept_at = decision.thumb, decision.timestamp

    def check(self, rgb: np.ndarray, timestamp: float) -> ChangeDecision:
        """`decide`, then `commit` the frame if it goes in."""
        decision = self.decide(rgb, timestamp)
        self.commit(decision)
        return decision

    def configure(self, settings: ChangeFilterSettings) -> None:
        """New settings; the reference stays (a threshold change does not resend the scene)."""
        self.settings = settings

    def reset(self) -> None:
        """Forget the reference: the next frame goes in (e.g. after the session's context is cleared)."""
        self._reference, self._kept_at = None, None
