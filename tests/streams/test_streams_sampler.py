"""FrameSampler decisions, without asyncio: rate cap on stream time, latest-N, age limit, counters."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import ChangeFilter, ChangeFilterSettings, Frame, FrameSampler

PIXELS = np.zeros((2, 2, 3), np.uint8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(sampler: FrameSampler, timestamps: list[float], clock: FakeClock) -> list[float]:
    kept = []
    for i, ts in enumerate(timestamps):
        if sampler.admit(ts):
            sampler.offer(Frame(PIXELS, ts, clock.now, i))
            kept.append(ts)
    return kept


def test_rate_cap_30_to_2_fps_on_stream_time() -> None:
    clock = FakeClock()
    sampler = FrameSampler(fps=2, buffer_size=100, max_age=None, clock=clock)
    kept = feed(sampler, [i / 30 for i in range(300)], clock)  # 10 s at 30 fps
    assert kept == [i * 0.5 for i in range(20)]
    stats = sampler.stats
    assert (stats.received, stats.sampled, stats.dropped) == (300, 20, {"rate": 280})


def test_rate_cap_keeps_average_with_jitter_and_restarts_after_gap_or_jump_back() -> None:
    clock = FakeClock()
    sampler = FrameSampler(fps=2, buffer_size=1000, max_age=None, clock=clock)
    rng = np.random.default_rng(0)
    ts = np.cumsum(rng.uniform(0.02, 0.05, 2000))  # ~29 fps with jitter, ~70 s
    kept = np.array(feed(sampler, list(ts), clock))
    assert abs(len(kept) / (ts[-1] - ts[0]) - 2.0) < 0.05
    assert np.diff(kept).min() >= 0.5 - 0.05  # on a 0.5 s grid, off by at most one frame gap
    # a 10 s gap does not produce a burst; a jump back (file loop) restarts the grid
    assert feed(sampler, [ts[-1] + 10, ts[-1] + 10.1, ts[-1] + 10.5], clock) == [ts[-1] + 10, ts[-1] + 10.5]
    assert feed(sampler, [0.0, 0.1, 0.5], clock) == [0.0, 0.5]


def test_fps_none_keeps_everything() -> None:
    clock = FakeClock()
    sampler = FrameSampler(fps=None, buffer_size=100, max_age=None, clock=clock)
    assert len(feed(sampler, [i / 30 for i in range(60)], clock)) == 60


def test_latest_n_keeps_the_newest_and_counts_overflow() -> None:
    clock = FakeClock()
    sampler = FrameSampler(fps=None, buffer_size=3, max_age=None, clock=clock)
    feed(sampler, [float(i) for i in range(10)], clock)
    assert [sampler.take().timestamp for _ in range(3)] == [7.0, 8.0, 9.0]
    assert sampler.take() is None
    assert sampler.stats.dropped == {"overflow": 7}
    assert sampler.stats.delivered == 3


def test_stale_frames_are_dropped_at_take_and_at_offer() -> None:
    clock = FakeClock()
    sampler = FrameSampler(fps=None, buffer_size=4, max_age=1.0, clock=clock)
    sampler.admit(0.0)
    sampler.offer(Frame(PIXELS, 0.0, clock.now - 5, 0))  # converted too late
    for i in range(1, 3):
        sampler.admit(float(i))
        sampler.offer(Frame(PIXELS, float(i), clock.now, i))
        clock.now += 0.8
    # frame 1 arrived 1.6 s ago, frame 2 0.8 s ago
    assert sampler.take().index == 2
    assert sampler.stats.dropped == {"stale": 2}


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["frame", "take", "tick"]), st.floats(0.0, 0.4)), max_size=200),
    fps=st.one_of(st.none(), st.floats(0.5, 30)),
    buffer_size=st.integers(1, 6),
    max_age=st.one_of(st.none(), st.floats(0.1, 3)),
    keepalive=st.one_of(st.none(), st.floats(0.1, 3)),
)
def test_every_frame_is_accounted_for(ops, fps, buffer_size, max_age, keepalive) -> None:
    clock = FakeClock()
    change = None if keepalive is None else ChangeFilter(ChangeFilterSettings(keepalive_s=keepalive))
    sampler = FrameSampler(fps=fps, buffer_size=buffer_size, max_age=max_age, clock=clock, change=change)
    ts = 0.0
    delivered = []
    for op, dt in ops:
        if op == "frame":
            ts += dt
            if sampler.admit(ts):
                sampler.offer(Frame(PIXELS, ts, clock.now, 0))
        elif op == "take":
            frame = sampler.take()
            if frame is not None:
                delivered.append(frame.timestamp)
                assert max_age is None or clock.now - frame.arrival <= max_age
        else:
            clock.now += dt * 5
        s = sampler.stats
        assert sampler.buffered <= buffer_size
        assert s.received == s.delivered + s.dropped_total + sampler.buffered
        assert s.sampled == s.decoded
    assert delivered == sorted(delivered)
