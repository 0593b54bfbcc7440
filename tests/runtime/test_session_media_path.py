"""One media path, no engine: a real `Session` on a stub runtime (a stub vision tower, no vLLM).

A frame is rate-capped and change-filtered once, by the sampler of the input it came through:
`Session.push_frame` (the embedded SDK's input) caps and filters with its own `FrameSampler`,
`Session.ingest` takes frames another input's sampler already kept and never drops them again. The
frame's arrival time at its input is what its `VisualChunk` carries to the model.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import numpy as np
import pytest
from stub_runtime import stub_session

from runtime.perception import VisualChunk
from runtime.session import Session
from streams import ChangeFilterSettings, Frame, FrameSampler

PIXELS = np.zeros((8, 8, 3), np.uint8)
CAMERA_FPS, MAX_FPS, SECONDS = 25.0, 2.0, 60.0


def jittered_timestamps(seed: int = 0) -> list[float]:
    """A 25 fps camera's stream times, each frame up to 30% of an interval early or late."""
    rng = np.random.default_rng(seed)
    n = int(SECONDS * CAMERA_FPS)
    jitter = rng.uniform(-0.3, 0.3, n) / CAMERA_FPS
    return [i / CAMERA_FPS + float(j) for i, j in zip(range(n), jitter, strict=True)]


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    async with stub_session(max_fps=MAX_FPS) as session:
        chunks: list[VisualChunk] = []
        session.perception.on_chunks = chunks.extend  # the chunks stop here: no vLLM turn is run
        session.chunks = chunks  # type: ignore[attr-defined]
        yield session


def perceived(session: Session) -> list[Frame]:
    """The frames the session handed to perception (queued, or already encoded into chunks)."""
    chunks: list[VisualChunk] = session.chunks  # type: ignore[attr-defined]
    encoded = [
        Frame(PIXELS, ts, arrival, index)
        for chunk in chunks
        for ts, arrival, index in zip(chunk.timestamps, chunk.arrivals, chunk.indices, strict=True)
    ]
    return sorted([*encoded, *session.perception.queue], key=lambda f: f.index)


def rate(frames: Sequence[Frame]) -> float:
    return len(frames) / SECONDS


async def test_push_frame_caps_a_jittered_25_fps_camera_at_2_fps(session: Session) -> None:
    session.update(change_filter=ChangeFilterSettings(enabled=False))  # one still picture: only the cap
    timestamps = jittered_timestamps()
    kept = [await session.push_frame(PIXELS, ts) for ts in timestamps]
    frames = perceived(session)
    assert len(frames) == sum(kept)
    assert rate(frames) == pytest.approx(MAX_FPS, rel=0.05)
    stats = session.stats()
    assert stats.frames_received == len(timestamps) and stats.frames_sampled == len(frames)
    assert stats.frames_dropped_by_reason == {"rate": len(timestamps) - len(frames)}


async def test_frames_an_input_sampled_are_not_capped_again(session: Session) -> None:
    """The measured bug: a track's sampler kept 2 fps, the session's strict check then halved it."""
    track_sampler = FrameSampler(MAX_FPS, buffer_size=1, max_age=None)
    admitted = [ts for ts in jittered_timestamps(seed=1) if track_sampler.admit(ts)]
    assert any(b - a < 1 / MAX_FPS for a, b in itertools.pairwise(admitted)), "jitter puts some below 1/fps"
    for ts in admitted:
        session.ingest(Frame(PIXELS, ts, arrival=ts))
    frames = perceived(session)
    assert [f.timestamp for f in frames] == admitted, "every sampled frame reaches perception"
    assert rate(frames) == pytest.approx(MAX_FPS, rel=0.05)
    stats = session.stats()
    assert stats.frames_sampled == stats.frames_received == len(admitted) and stats.frames_dropped == 0


async def test_the_arrival_time_at_the_input_reaches_the_visual_chunk(session: Session) -> None:
    session.ingest(Frame(PIXELS, timestamp=3.25, arrival=1234.5))
    loop = asyncio.get_running_loop()
    before = loop.time()
    await session.push_frame(PIXELS, timestamp=10.0)
    after = loop.time()
    chunks: list[VisualChunk] = session.chunks  # type: ignore[attr-defined]
    async with asyncio.timeout(5):
        while len(chunks) < 2:
            await asyncio.sleep(0.01)
    first, second = chunks
    assert (first.timestamps, first.arrivals, first.indices) == ((3.25,), (1234.5,), (0,))
    assert second.timestamps == (10.0,) and before <= second.arrivals[0] <= after  # push_frame's now
    assert second.indices == (1,)


async def test_a_bad_pushed_frame_raises_and_is_counted(session: Session) -> None:
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((1, 8, 3), np.uint8)):
        with pytest.raises(ValueError):
            await session.push_frame(bad)
    stats = session.stats()
    assert stats.frames_received == 3 and stats.frames_dropped_by_reason == {"invalid": 3}
    assert stats.frames_pending == 0


def still_camera(noise: int, color: tuple[int, int, int] = (200, 40, 40)) -> np.ndarray:
    """A scene where nothing moves (a square of a tenth of the frame on grey), freshly noisy each frame."""
    picture = np.full((120, 160, 3), 110.0)
    picture[30:70, 40:88] = color
    rng = np.random.default_rng(noise)
    return np.clip(picture + rng.normal(0.0, 8.0, picture.shape), 0, 255).astype(np.uint8)


async def test_push_frame_holds_back_a_still_scene_and_lets_a_change_and_a_keepalive_in(
    session: Session,
) -> None:
    assert session.change_filter == ChangeFilterSettings(), "the runtime's settings: on, 6 levels, 10 s"
    kept = [await session.push_frame(still_camera(i), timestamp=i / MAX_FPS) for i in range(10)]
    assert kept == [True] + [False] * 9, "after the first frame nothing new: no keep-alive within 10 s"
    assert await session.push_frame(still_camera(10, (40, 40, 200)), timestamp=5.0), "the square turned blue"
    stats = session.stats()
    assert (stats.frames_received, stats.frames_sampled) == (11, 11)
    assert stats.frames_dropped_by_reason == {"unchanged": 9}
    assert stats.frames_received == stats.frames_ingested + stats.frames_dropped + stats.frames_pending
    assert [f.index for f in perceived(session)] == [0, 1], "only the kept frames reach perception"

    session.update(change_filter=replace(session.change_filter, keepalive_s=0.05))
    assert not await session.push_frame(still_camera(11, (40, 40, 200)), timestamp=5.5)
    await asyncio.sleep(0.06)  # the keep-alive runs on arrival (wall) time: the model's view is that old
    assert await session.push_frame(still_camera(12, (40, 40, 200)), timestamp=6.0)
    assert session.stats().frames_dropped_by_reason == {"unchanged": 10}


async def test_push_frame_with_the_filter_off_lets_every_frame_in(session: Session) -> None:
    session.update(change_filter=ChangeFilterSettings(enabled=False))
    kept = [await session.push_frame(still_camera(i), timestamp=i / MAX_FPS) for i in range(5)]
    assert kept == [True] * 5 and session.stats().frames_dropped == 0
    with pytest.raises(ValueError, match="ChangeFilterSettings"):
        session.update(change_filter={"enabled": True})  # type: ignore[arg-type]
