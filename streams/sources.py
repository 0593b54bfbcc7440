"""Frame sources behind one async-iterator interface.

Every source runs the same bounded pipeline::

    producer ──admit (rate cap)──▶ 1-slot mailbox ──converter (worker thread)──▶ latest-N buffer ──▶ consumer

The producer never waits for the consumer (unless a file is read with ``realtime=False``), so a slow
consumer costs dropped frames, counted by reason, never memory or latency. Frames the rate cap rejects
are never converted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from . import pattern
from .convert import Size, run_off_loop, to_rgb
from .frame import Frame
from .sampler import CLOSED, ERROR, OVERFLOW, FrameSampler, StreamStats

logger = logging.getLogger(__name__)

_LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://", "srt://", "rtp://")


class FrameSource:
    """Base of every source: ``async for frame in source``, ``source.stats()``, ``await source.close()``.

    Subclasses implement :meth:`_produce`, which calls :meth:`_ingest` for every frame received and
    returns when the input ends. ``fps``/``buffer_size``/``max_age`` configure the :class:`FrameSampler`
    (or pass one); ``max_size`` (width, height) caps the resolution of delivered frames, keeping aspect.
    """

    def __init__(
        self,
        *,
        fps: float | None = 2.0,
        buffer_size: int = 4,
        max_age: float | None = 2.0,
        max_size: Size | None = None,
        sampler: FrameSampler | None = None,
    ) -> None:
        self.sampler = sampler or FrameSampler(fps=fps, buffer_size=buffer_size, max_age=max_age)
        self.max_size = max_size
        self.end_reason: str | None = None  # why the input ended: eof, track-ended, media-timeout, error, ...
        self._slot: tuple[Any, float, float, int] | None = None
        self._slot_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._producer_done = False
        self._finished = False
        self._closed = False
        self._converting = False
        self._error: BaseException | None = None
        self._received = 0

    # -- the interface ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the producer and converter tasks (idempotent; iteration starts them too)."""
        if self._started or self._closed:
            return
        self._started = True
        name = type(self).__name__
        self._tasks = [
            asyncio.create_task(self._run_producer(), name=f"{name}.producer"),
            asyncio.create_task(self._run_converter(), name=f"{name}.converter"),
        ]

    def __aiter__(self) -> AsyncIterator[Frame]:
        self.start()
        return self

    async def __anext__(self) -> Frame:
        self.start()
        while True:
            frame = self.sampler.take()
            self._room.set()  # take() may also have dropped queued frames (stale, unchanged): room
            if frame is not None:
                return frame
            if self._finished or self._closed:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    def stats(self) -> StreamStats:
        """A snapshot of the counters and current queue depths."""
        stats = self.sampler.stats.copy()
        stats.queues = {"buffer": self.sampler.buffered, "convert": int(self._slot is not None)}
        stats.queues.update(self._extra_queues())
        return stats

    @property
    def running(self) -> bool:
        return self._started and not self._finished and not self._closed

    async def close(self) -> None:
        """Stop every task of this source, release its input and drop what is still queued."""
        if self._closed:
            return
        self._closed = True
        if self.end_reason is None:
            self.end_reason = "closed"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in (self._slot is not None, self._converting):
            if pending:
                self.sampler.stats.drop(CLOSED)
        self._slot = None
        self._converting = False
        self.sampler.clear(CLOSED)
        try:
            await self._release()
        finally:
            self._wake.set()
            self._room.set()

    async def __aenter__(self) -> FrameSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- for subclasses --------------------------------------------------------------------------

    async def _produce(self) -> None:
        raise NotImplementedError

    async def _release(self) -> None:
        """Free the input (track, container). Called once, from close()."""

    def _extra_queues(self) -> dict[str, int]:
        return {}

    def _convert(self, raw: Any) -> np.ndarray:
        """Runs on a worker thread: raw input -> RGB array within max_size."""
        return to_rgb(raw, self.max_size)

    def _ingest(self, raw: Any, timestamp: float, arrival: float | None = None) -> bool:
        """Hand one received frame to the pipeline; returns whether it will be converted."""
        index = self._admit(timestamp)
        if index is None:
            return False
        self._enqueue(raw, timestamp, arrival, index)
        return True

    def _admit(self, timestamp: float) -> int | None:
        """Count a received frame; its index if the rate cap keeps it, else None."""
        index = self._received
        self._received += 1
        return index if self.sampler.admit(timestamp) else None

    def _enqueue(self, raw: Any, timestamp: float, arrival: float | None, index: int) -> None:
        if self._slot is not None:  # the converter is behind: newest wins
            self.sampler.stats.drop(OVERFLOW)
        self._slot = (raw, timestamp, time.monotonic() if arrival is None else arrival, index)
        self._slot_event.set()

    async def _wait_room(self) -> None:
        """Wait until the pipeline can take a frame without dropping (lossless reading of files)."""
        while not self._closed and (self._slot is not None or self._converting or self.sampler.full):
            self._room.clear()
            await self._room.wait()

    # -- internals -------------------------------------------------------------------------------

    async def _run_producer(self) -> None:
        try:
            await self._produce()
            if self.end_reason is None:
                self.end_reason = "eof"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("%s failed: %r", type(self).__name__, exc)
            self._error = exc
            self.end_reason = "error"
        finally:
            self._producer_done = True
            self._slot_event.set()

    async def _run_converter(self) -> None:
        try:
            while True:
                if self._slot is None:
                    if self._producer_done:
                        break
                    self._slot_event.clear()
                    await self._slot_event.wait()
                    continue
                # take the frame out of the slot first: a newer frame arriving during the conversion
                # must wait in the slot, not be wiped when this one is done
                raw, timestamp, arrival, index = self._slot
                self._slot = None
                self._converting = True
                try:
                    rgb = await run_off_loop(self._convert, raw)
                    frame = Frame(rgb=rgb, timestamp=timestamp, arrival=arrival, index=index)
                except Exception as exc:  # undecodable, or pixels `rgb_pixels` refuses
                    logger.warning("%s: frame conversion failed: %r", type(self).__name__, exc)
                    self.sampler.stats.drop(ERROR)
                    continue
                finally:
                    self._converting = False
                self.sampler.offer(frame)
                self._wake.set()
                self._room.set()
        finally:
            self._finished = True
            self._wake.set()


class SyntheticSource(FrameSource):
    """The counter test pattern (:mod:`streams.pattern`) at ``rate`` frames/s of ``size`` (w, h).

    Frame ``i`` carries counter ``start + i`` and timestamp ``i / rate``. ``realtime`` paces frames on
    the wall clock (a camera); otherwise frames come as fast as the consumer takes them. ``count`` ends
    the source after that many frames. Pictures are only drawn for frames the sampler keeps.
    """

    def __init__(
        self,
        rate: float = 30.0,
        size: Size = (640, 480),
        *,
        count: int | None = None,
        start: int = 0,
        realtime: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self.size = size
        self.count = count
        self.start_counter = start
        self.realtime = realtime
        self.started_at: float | None = None  # monotonic time of frame 0: frame i is "captured" at +i/rate

    def _convert(self, raw: Any) -> np.ndarray:
        return to_rgb(pattern.encode(raw, *self.size), self.max_size)

    async def _produce(self) -> None:
        t0 = self.started_at = time.monotonic()
        i = 0
        while self.count is None or i < self.count:
            if self.realtime:
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await self._wait_room()
            self._ingest((self.start_counter + i) & pattern.MAX_COUNTER, i / self.rate)
            i += 1


class PushSource(FrameSource):
    """Frames pushed by application code (the SDK): numpy arrays or ``av.VideoFrame`` objects.

    :meth:`push` never blocks: the pipeline is bounded and drops what the consumer cannot take. Call
    :meth:`end` when no more frames will come. ``timestamp`` defaults to seconds since the first push.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ended = asyncio.Event()
        self._t0: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def push(self, image: np.ndarray | av.VideoFrame, timestamp: float | None = None) -> bool:
        """Offer one frame (call on the event loop thread); returns whether it was kept for conversion."""
        if self._ended.is_set() or self._closed:
            raise RuntimeError("push() after end() or close()")
        return self._push(image, timestamp, copy=True)

    def push_threadsafe(self, image: np.ndarray | av.VideoFrame, timestamp: float | None = None) -> None:
        """:meth:`push` from another thread (a capture thread); the array is copied first."""
        if self._loop is None:
            raise RuntimeError("start() the source on its event loop first")
        if isinstance(image, np.ndarray):
            image = image.copy()
        self._loop.call_soon_threadsafe(self._push, image, timestamp, False)

    def _push(self, image: np.ndarray | av.VideoFrame, timestamp: float | None, copy: bool) -> bool:
        if self._ended.is_set() or self._closed:
            return False
        self.start()
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        if timestamp is None:
            timestamp = now - self._t0
        index = self._admit(timestamp)
        if index is None:
            return False
        if copy and isinstance(image, np.ndarray):
            image = image.copy()  # only kept frames are copied: the caller may reuse its buffer
        self._enqueue(image, timestamp, now, index)
        return True

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        super().start()

    def end(self) -> None:
        """No more frames: iteration stops after the queued ones."""
        self._ended.set()

    async def _produce(self) -> None:
        await self._ended.wait()


class FileSource(FrameSource):
    """A media file or URL through PyAV: mp4, mkv, webm, RTSP, HTTP...

    Files are paced at their own frame rate (``realtime=True``, like a camera) or read as fast as the
    consumer takes frames with no overflow drops (``realtime=False``). Live URLs (rtsp:// etc.) are
    never paced. ``loop=True`` restarts a file at its end, keeping timestamps increasing. Demuxing and
    decoding run on worker threads; ``options`` go to ``av.open`` (e.g. ``{"rtsp_transport": "tcp"}``).
    """

    def __init__(
        self,
        url: str,
        *,
        loop: bool = False,
        realtime: bool = True,
        options: dict[str, str] | None = None,
        open_timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.url = str(url)
        self.loop = loop
        self.live = self.url.lower().startswith(_LIVE_SCHEMES)
        self.realtime = realtime
        self.options = options or {}
        self.open_timeout = open_timeout
        self._container: Any = None

    def _open(self) -> Any:
        return av.open(self.url, options=self.options, timeout=self.open_timeout)

    async def _produce(self) -> None:
        self._container = await run_off_loop(self._open)
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        frame_duration = 1.0 / float(rate)
        offset = 0.0  # added to timestamps on each loop
        t0: float | None = None
        while True:
            frames = self._container.decode(stream)
            first: float | None = None
            last = 0.0
            while True:
                frame = await run_off_loop(_next_or_none, frames)
                if frame is None:
                    break
                arrival = time.monotonic()
                pts = frame.time if frame.time is not None else last + frame_duration
                if first is None:
                    first = pts
                last = pts - first
                timestamp = offset + last
                if self.live:
                    pass
                elif self.realtime:
                    if t0 is None:
                        t0 = arrival - timestamp
                    delay = t0 + timestamp - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                        arrival = time.monotonic()
                else:
                    await self._wait_room()
                self._ingest(frame, timestamp, arrival)
            if not self.loop or self.live or first is None:
                return
            offset += last + frame_duration
            await run_off_loop(self._container.seek, 0)

    async def _release(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            await run_off_loop(container.close)


def _next_or_none(iterator: Any) -> Any:
    return next(iterator, None)


class TrackSource(FrameSource):
    """An aiortc video track read by one task that always drains it (aiortc's queues are unbounded).

    Only frames the sampler keeps are converted to RGB. ``media_timeout`` ends the source when no frame
    has arrived for that long (a peer whose camera stopped without saying so). ``receiver`` (the
    track's RTCRtpReceiver) only lets :meth:`stats` report aiortc's own queue depths.
    """

    def __init__(
        self,
        track: MediaStreamTrack,
        *,
        receiver: Any = None,
        media_timeout: float | None = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.track = track
        self.receiver = receiver
        self.media_timeout = media_timeout

    async def _produce(self) -> None:
        t0: float | None = None
        while True:
            try:
                async with asyncio.timeout(self.media_timeout):
                    frame = await self.track.recv()
            except MediaStreamError:
                self.end_reason = "track-ended"
                return
            except TimeoutError:
                self.end_reason = "media-timeout"
                return
            arrival = time.monotonic()
            if not isinstance(frame, av.VideoFrame):
                continue
            if t0 is None:
                t0 = arrival
            timestamp = frame.time if frame.time is not None else arrival - t0
            self._ingest(frame, timestamp, arrival)

    async def _release(self) -> None:
        self.track.stop()

    def _extra_queues(self) -> dict[str, int]:
        queues: dict[str, int] = {}
        track_queue = getattr(self.track, "_queue", None)
        if isinstance(track_queue, asyncio.Queue):
            queues["track"] = track_queue.qsize()
        decoder_queue = getattr(self.receiver, "_RTCRtpReceiver__decoder_queue", None)
        if decoder_queue is not None:
            with contextlib.suppress(Exception):
                queues["decoder"] = decoder_queue.qsize()
        return queues


def pts_of(timestamp: float, clock_rate: int = 90000) -> int:
    """Presentation timestamp in ``1/clock_rate`` units (the RTP video clock by default)."""
    return math.floor(timestamp * clock_rate + 0.5)
