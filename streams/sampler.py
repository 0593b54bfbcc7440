"""Which frames a session gets: a rate cap, a latest-N buffer, an age limit and a scene-change filter,
with every drop counted.

The logic is synchronous and clock-injectable so it can be tested without asyncio or real time.
A source asks :meth:`FrameSampler.admit` *before* it pays for converting a frame, hands the converted
frame to :meth:`FrameSampler.offer`, and the consumer pulls with :meth:`FrameSampler.take`. The
change filter (`streams.change`) runs in ``take``, last, so that its reference is always the last
frame actually delivered, and a frame it holds back costs no encoding and no prefill.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .change import UNCHANGED, ChangeFilter
from .frame import Frame

#: Drop reasons used by the sampler and the sources.
RATE = "rate"  # above the target fps
OVERFLOW = "overflow"  # pushed out of a full bounded queue by a newer frame
STALE = "stale"  # older than max_age when it would have been delivered
ERROR = "error"  # could not be converted, or is not an RGB picture
CLOSED = "closed"  # still queued when the source was closed
# and UNCHANGED ("unchanged", from streams.change): nothing new since the last delivered frame


@dataclass
class StreamStats:
    """Counters of one source. ``received == delivered + sum(dropped) + in flight`` at all times."""

    received: int = 0  # frames that reached the source (decoded by the transport or demuxer)
    decoded: int = 0  # frames converted to RGB arrays (the cost skipped for rate drops)
    sampled: int = 0  # frames that passed the rate cap
    delivered: int = 0  # frames handed to the consumer
    dropped: dict[str, int] = field(default_factory=dict)  # by reason
    queues: dict[str, int] = field(default_factory=dict)  # current queue depths (filled by the source)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "received": self.received,
            "decoded": self.decoded,
            "sampled": self.sampled,
            "delivered": self.delivered,
            "dropped": dict(self.dropped),
            "queues": dict(self.queues),
        }

    def copy(self) -> StreamStats:
        return StreamStats(
            self.received, self.decoded, self.sampled, self.delivered, dict(self.dropped), dict(self.queues)
        )


class FrameSampler:
    """Rate cap on stream time + bounded latest-N buffer + age limit on arrival time + change filter.

    ``fps=None`` keeps every frame; ``max_age=None`` never drops for age; ``change=None`` never drops a
    frame for showing nothing new (`UNCHANGED`). The rate cap keeps frames on a grid of 1/fps in stream
    time (no drift, no burst after a gap); a backwards jump of more than a second (a looping file, a
    restarted camera) restarts the grid. The change filter's keep-alive runs on arrival time, the
    clock on which the model's view goes stale.
    """

    def __init__(
        self,
        fps: float | None = 2.0,
        buffer_size: int = 4,
        max_age: float | None = 2.0,
        clock: Callable[[], float] = time.monotonic,
        change: ChangeFilter | None = None,
    ) -> None:
        if fps is not None and fps <= 0:
            raise ValueError("fps must be positive or None")
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.fps = fps
        self.buffer_size = buffer_size
        self.max_age = max_age
        self.clock = clock
        self.change = change
        self.stats = StreamStats()
        self._buffer: deque[Frame] = deque()
        self._next_due: float | None = None
        self._last_ts: float | None = None

    def admit(self, timestamp: float) -> bool:
        """Count a received frame and decide whether it is worth converting (rate cap)."""
        self.stats.received += 1
        if self.fps is not None:
            interval = 1.0 / self.fps
            eps = interval * 1e-3
            if self._last_ts is not None and timestamp < self._last_ts - 1.0:
                self._next_due = None
            self._last_ts = timestamp
            if self._next_due is not None and timestamp < self._next_due - eps:
                self.stats.drop(RATE)
                return False
            due = timestamp if self._next_due is None else self._next_due
            self._next_due = due + interval
            if self._next_due <= timestamp + eps:  # a gap: restart the grid here
                self._next_due = timestamp + interval
        self.stats.sampled += 1
        return True

    def offer(self, frame: Frame) -> None:
        """Queue a converted frame; the oldest queued frame is dropped when the buffer is full."""
        self.stats.decoded += 1
        if self._is_stale(frame, self.clock()):
            self.stats.drop(STALE)
            return
        if len(self._buffer) >= self.buffer_size:
            self._buffer.popleft()
            self.stats.drop(OVERFLOW)
        self._buffer.append(frame)

    def take(self) -> Frame | None:
        """The oldest queued frame that is still fresh and shows something new, or None.

        Stale and unchanged frames are dropped (and counted) on the way; a frame the change filter
        refuses as malformed is counted as `ERROR`, so ``take`` never loses a frame uncounted.
        """
        now = self.clock()
        while self._buffer:
            frame = self._buffer.popleft()
            if self._is_stale(frame, now):
                self.stats.drop(STALE)
                continue
            if self.change is not None:
                try:
                    decision = self.change.decide(frame.rgb, frame.arrival)
                except ValueError:
                    self.stats.drop(ERROR)
                    continue
                if not decision.keep:
                    self.stats.drop(UNCHANGED)
                    continue
                self.change.commit(decision)  # the reference is the last frame delivered
            self.stats.delivered += 1
            return frame
        return None

    def clear(self, reason: str = CLOSED) -> int:
        """Drop every queued frame (counted under ``reason``); returns how many."""
        n = len(self._buffer)
        self._buffer.clear()
        self.stats.drop(reason, n)
        return n

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.buffer_size

    def _is_stale(self, frame: Frame, now: float) -> bool:
        return self.max_age is not None and now - frame.arrival > self.max_age
