"""The media path through the transport, with the fake runtime: one sampler (and change filter) per input.

A track's frames are rate-capped by the track's own sampler and handed to the session as they are
(``Session.ingest``): no second cap, and each keeps its arrival time. Before, the session capped them
again at the same fps and an aiortc peer at 25 fps with ``--max-fps 2`` reached the model at 1 fps.
"""

from __future__ import annotations

import asyncio
import io
import json
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError
from fake_runtime import FakeRuntime
from PIL import Image

from runtime.server.protocol import ServerEvent
from runtime.server.transport import RealtimeConnection
from runtime.wire import InputVideoStats, SessionUpdated, image_data_url
from streams import TrackSource
from streams.sources import pts_of

CAMERA_FPS, MAX_FPS, SECONDS = 25.0, 2.0, 10.0
CLOCK = Fraction(1, 90000)


class JitteredCamera:
    """A 25 fps aiortc video track: frames whose pts jitter up to 30% of an interval either way."""

    kind = "video"

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        n = int(SECONDS * CAMERA_FPS)
        jitter = rng.uniform(-0.3, 0.3, n) / CAMERA_FPS
        self.timestamps = [max(0.0, i / CAMERA_FPS + float(j)) for i, j in zip(range(n), jitter, strict=True)]
        self._next = 0
        self._pixels = np.zeros((48, 64, 3), np.uint8)

    async def recv(self) -> av.VideoFrame:
        if self._next == len(self.timestamps):
            raise MediaStreamError
        await asyncio.sleep(0.001)  # a camera paces its frames; the converter keeps up
        frame = av.VideoFrame.from_ndarray(self._pixels, format="rgb24")
        frame.pts, frame.time_base = pts_of(self.timestamps[self._next]), CLOCK
        self._next += 1
        return frame

    def stop(self) -> None:
        pass


class Events:
    """An `EventSink` that keeps what it is sent."""

    def __init__(self) -> None:
        self.sent: list[ServerEvent] = []

    def send(self, event: ServerEvent) -> None:
        self.sent.append(event)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


async def test_a_25_fps_track_capped_at_2_fps_reaches_the_session_at_2_fps() -> None:
    runtime = FakeRuntime()
    await runtime.start()
    session = runtime.open_session()
    connection = RealtimeConnection(session, Events(), model="fake", positions="group-decoupled")
    connection.start()
    # the camera shows one still picture: the change filter is off, this test is about the rate cap
    video = {"max_fps": MAX_FPS, "change_filter": {"enabled": False}}
    update = {"type": "session.update", "session": {"video": video}}
    await connection.handle(json.dumps(update))
    camera = JitteredCamera()
    source = TrackSource(camera, max_age=None)  # type: ignore[arg-type]
    connection.attach_track(source)  # as `Call._video` does: the track's sampler gets the session's cap
    delivered = []
    async with asyncio.timeout(30):
        async for frame in source:
            delivered.append(frame)
            await connection.push_video_frame(frame)
    stats = connection.video_stats()
    connection.detach_track(source)

    assert len(session.ingested) / SECONDS == pytest.approx(MAX_FPS, rel=0.05)
    assert stats.frames_received == len(camera.timestamps)
    assert stats.frames_sampled == stats.frames_ingested == len(session.ingested)
    assert stats.frames_dropped_by_reason == {"rate": stats.frames_received - stats.frames_sampled}
    assert stats.max_fps == MAX_FPS
    # each frame reaches the session as its track delivered it: stream time and arrival time kept
    times = [(f.timestamp, f.arrival) for f in delivered]
    assert [(f.timestamp, f.arrival) for f in session.ingested] == times
    await connection.close()
    await runtime.close()


def still_camera(noise: int, color: tuple[int, int, int] = (200, 40, 40)) -> np.ndarray:
    """A scene where nothing moves (a square of a tenth of the frame on grey), freshly noisy each frame."""
    picture = np.full((120, 160, 3), 110.0)
    picture[30:70, 40:88] = color
    rng = np.random.default_rng(noise)
    return np.clip(picture + rng.normal(0.0, 8.0, picture.shape), 0, 255).astype(np.uint8)


def append(rgb: np.ndarray, timestamp_ms: float) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    url = image_data_url(buffer.getvalue())
    return json.dumps({"type": "input_video.append", "image": url, "timestamp_ms": timestamp_ms})


async def test_appended_frames_of_a_still_scene_are_counted_unchanged_in_the_stats() -> None:
    runtime = FakeRuntime()
    await runtime.start()
    session = runtime.open_session()
    events = Events()
    connection = RealtimeConnection(session, events, model="fake", positions="group-decoupled")
    connection.start()
    for i in range(6):  # 3 s at 2 fps of a still scene: the first frame goes in, no keep-alive is due
        await connection.handle(append(still_camera(i), i * 500))
    await connection.handle(append(still_camera(6, (40, 40, 200)), 3000))  # the square turns blue
    assert len(session.ingested) == 2
    stats = connection.report_video_stats(force=True)
    assert stats is not None
    sent = [e for e in events.sent if isinstance(e, InputVideoStats)][-1].encode()  # as on the wire
    assert (sent["frames_received"], sent["frames_sampled"], sent["frames_ingested"]) == (7, 7, 2)
    assert sent["frames_dropped_by_reason"] == {"unchanged": 5} and sent["frames_pending"] == 0
    assert 'speakwatch_frames_dropped_total{reason="unchanged"} 5.0' in connection.metrics.render().decode()

    # session.update turns the filter off for every input of the connection, tracks attached later too
    off = {"type": "session.update", "session": {"video": {"change_filter": {"enabled": False}}}}
    await connection.handle(json.dumps(off))
    shown = [e for e in events.sent if isinstance(e, SessionUpdated)][-1].encode()["session"]["video"]
    assert shown["change_filter"] == {"enabled": False, "threshold": 6.0, "keepalive_s": 10.0}
    for i in range(7, 10):
        await connection.handle(append(still_camera(i, (40, 40, 200)), i * 500))
    assert len(session.ingested) == 5
    source = TrackSource(JitteredCamera(), max_age=None)  # type: ignore[arg-type]
    connection.attach_track(source)
    assert source.sampler.change is not None and not source.sampler.change.settings.enabled
    connection.detach_track(source)
    await source.close()
    await connection.close()
    await runtime.close()


async def test_a_track_gets_the_sessions_change_filter() -> None:
    runtime = FakeRuntime()
    await runtime.start()
    session = runtime.open_session()
    connection = RealtimeConnection(session, Events(), model="fake", positions="group-decoupled")
    connection.start()
    update = {"video": {"max_fps": MAX_FPS, "change_filter": {"keepalive_s": 60}}}
    await connection.handle(json.dumps({"type": "session.update", "session": update}))
    camera = JitteredCamera()  # 10 s of one still picture at 25 fps
    source = TrackSource(camera, max_age=None)  # type: ignore[arg-type]
    connection.attach_track(source)
    async with asyncio.timeout(30):
        async for frame in source:
            await connection.push_video_frame(frame)
    stats = connection.video_stats()
    connection.detach_track(source)
    assert len(session.ingested) == 1, "one still picture: only the first frame goes in"
    assert stats.frames_dropped_by_reason == {
        "rate": stats.frames_received - stats.frames_sampled,
        "unchanged": stats.frames_sampled - 1,
    }
    await connection.close()
    await runtime.close()
