"""The change filter inside `FrameSampler.take`: a still scene costs one frame per keep-alive, a change
goes in at once, and every frame held back is counted as ``unchanged``."""

from __future__ import annotations

import math

import numpy as np

from streams import ChangeFilter, ChangeFilterSettings, Frame, FrameSampler
from streams.sampler import ERROR, UNCHANGED

RED, BLUE = (200, 40, 40), (40, 40, 200)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def camera(noise: int, color: tuple[int, int, int] = RED) -> np.ndarray:
    """A still scene (a square of a tenth of the frame on grey) with fresh sensor noise per ``noise``."""
    picture = np.full((120, 160, 3), 110.0)
    picture[30:70, 40:88] = color  # 40 x 48 of 120 x 160 pixels: 10% of the frame
    rng = np.random.default_rng(noise)
    return np.clip(picture + rng.normal(0.0, 8.0, picture.shape), 0, 255).astype(np.uint8)


def sampler(clock: FakeClock, keepalive_s: float = 2.0, buffer_size: int = 1) -> FrameSampler:
    change = ChangeFilter(ChangeFilterSettings(keepalive_s=keepalive_s))
    return FrameSampler(fps=None, buffer_size=buffer_size, max_age=None, clock=clock, change=change)


def push(s: FrameSampler, clock: FakeClock, rgb: np.ndarray) -> Frame | None:
    """One frame arriving now, offered and taken at once (as `Session.push_frame` does)."""
    assert s.admit(clock.now)
    s.offer(Frame(rgb, clock.now, clock.now))
    return s.take()


def test_a_still_scene_lets_only_keepalives_through_and_counts_the_rest() -> None:
    clock = FakeClock()
    s = sampler(clock, keepalive_s=2.0)
    delivered = []
    for i in range(20):  # 10 s at 2 fps of a scene where nothing moves, each frame freshly noisy
        clock.now = i * 0.5
        if push(s, clock, camera(noise=i)) is not None:
            delivered.append(clock.now)
    assert delivered == [0.0, 2.0, 4.0, 6.0, 8.0]  # the first frame, then one every keepalive_s
    stats = s.stats
    assert stats.dropped == {UNCHANGED: 15} and stats.delivered == 5
    assert stats.received == stats.delivered + stats.dropped_total + s.buffered


def test_a_colour_change_goes_in_at_once_and_becomes_the_reference() -> None:
    clock = FakeClock()
    s = sampler(clock, keepalive_s=100.0)
    assert push(s, clock, camera(0)) is not None
    clock.now = 0.5
    assert push(s, clock, camera(1)) is None, "noise alone is not a change"
    clock.now = 1.0
    changed = push(s, clock, camera(2, BLUE))
    assert changed is not None and changed.arrival == 1.0, "the square turned blue: it goes in"
    clock.now = 1.5
    assert push(s, clock, camera(3, BLUE)) is None, "compared with the blue frame that went in"
    clock.now = 2.0
    assert push(s, clock, camera(4, RED)) is not None, "and back to red is a change again"
    assert s.stats.dropped == {UNCHANGED: 2} and s.stats.delivered == 3


def test_the_reference_is_the_last_frame_delivered_not_the_last_offered() -> None:
    clock = FakeClock()
    s = sampler(clock, keepalive_s=100.0)
    assert push(s, clock, camera(0)) is not None
    s.admit(0.5)
    s.offer(Frame(camera(1, BLUE), 0.5, 0.5))  # a change, pushed out of the buffer before it is taken
    s.admit(1.0)
    s.offer(Frame(camera(2), 1.0, 1.0))
    clock.now = 1.0
    assert s.take() is None, "the blue frame never went in: red is still what the model saw"
    assert s.stats.dropped == {"overflow": 1, UNCHANGED: 1}


def test_turning_the_filter_off_lets_every_frame_in_and_on_again_resends_the_scene() -> None:
    clock = FakeClock()
    s = sampler(clock, keepalive_s=100.0)
    assert s.change is not None
    assert push(s, clock, camera(0)) is not None
    s.change.configure(ChangeFilterSettings(enabled=False))
    for i in range(1, 4):
        clock.now = i * 0.5
        assert push(s, clock, camera(i)) is not None
    s.change.configure(ChangeFilterSettings(keepalive_s=100.0))
    clock.now = 2.0
    assert push(s, clock, camera(4)) is not None, "frames went in unfiltered: the next one is a fresh start"
    clock.now = 2.5
    assert push(s, clock, camera(5)) is None
    assert s.stats.dropped == {UNCHANGED: 1} and s.stats.delivered == 5


def test_a_frame_the_filter_cannot_judge_is_counted_not_lost() -> None:
    clock = FakeClock()
    s = sampler(clock)
    s.admit(0.0)
    s.offer(Frame(camera(0), 0.0, math.nan))  # no arrival time to run the keep-alive on
    assert s.take() is None
    assert s.stats.dropped == {ERROR: 1} and s.stats.received == 1
