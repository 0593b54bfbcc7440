"""Thin I/O glue around the sans-I/O protocol core: one :class:`RealtimeConnection` per realtime session.

The core decides what every client message means; this module only moves bytes and runs the core's
actions against a runtime session (typed as `contract.ServedSession`): it decodes images on a worker
thread (with a pixel limit), caps the rate of appended frames and holds back those that show nothing
new (one sampler with its own scene-change filter per input: a WebRTC track's frames were capped and
filtered by the track's own sampler, and the session does neither again), streams a
response's deltas back into the core, sends ``input_video.stats`` while frames flow and, whatever ends
the connection, cancels the response and closes the session.

Outgoing events go through an :class:`EventSink` whose ``send`` never blocks: events are queued in the
order the core produced them, so a response's deltas can never overtake its ``response.created``.
Two sinks exist, one per transport: :class:`WebSocketSink` and :class:`ChannelSink` (WebRTC data
channel). :class:`Call` is one WebRTC peer, either feeding video into an existing connection or
carrying a whole session over its ``oai-events`` channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from aiohttp import WSCloseCode, web

from runtime.errors import EngineUnavailable, ResponseActive
from runtime.wire import FINAL_STATUSES, ResponseStatus, SessionStats
from streams import (
    ChangeFilter,
    ChangeFilterSettings,
    ChannelClosed,
    EventChannel,
    Frame,
    FrameSampler,
    StreamStats,
    TrackSource,
    WebRTCPeer,
)
from streams.frame import rgb_pixels

from .contract import ServedResponse, ServedSession
from .metrics import ServerMetrics
from .protocol import (
    AddUserMessage,
    AppendFrame,
    CancelResponse,
    ErrorEvent,
    Limits,
    Output,
    RealtimeProtocol,
    ServerEvent,
    SessionConfig,
    StartResponse,
    UpdateSession,
    error_event,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Call",
    "ChannelSink",
    "ConnectionOptions",
    "EventSink",
    "ImageRejected",
    "RealtimeConnection",
    "WebSocketSink",
    "decode_image",
]


_BACKGROUND: set[asyncio.Future[Any]] = set()


def _background(awaitable: Awaitable[Any]) -> None:
    """Run ``awaitable`` without waiting for it, holding a reference until it ends (no GC mid-flight)."""
    task = asyncio.ensure_future(awaitable)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


class ImageRejected(ValueError):
    """An image that cannot be used: undecodable, or more pixels than the server allows."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """JPEG/PNG bytes to an HxWx3 uint8 RGB array. Blocking: call it on a worker thread.

    The pixel count is checked from the header before anything is decoded, so a small file that
    expands to gigapixels (a decompression bomb) costs nothing.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image of {width}x{height} pixels is larger than the limit of {max_pixels} pixels"
                )
            rgb = np.asarray(image.convert("RGB"))
    except ImageRejected:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise ImageRejected(f"cannot decode the image: {exc}") from None
    try:
        return rgb_pixels(rgb)
    except ValueError as exc:
        raise ImageRejected(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Sinks: where server events go
# ---------------------------------------------------------------------------------------------


class EventSink(Protocol):
    """Where one connection's server events go. ``send`` queues and never blocks."""

    def send(self, event: ServerEvent) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class WebSocketSink:
    """Queues events for one WebSocket and writes them from a single writer task, in order.

    The queue is bounded by ``max_queued`` events: a client that stops reading while an answer streams
    is disconnected (1008) instead of growing the server's memory.
    """

    def __init__(self, ws: web.WebSocketResponse, *, max_queued: int = 10_000) -> None:
        self.ws = ws
        self.max_queued = max_queued
        self._queue: deque[str] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._writer = asyncio.create_task(self._write(), name="WebSocketSink.writer")

    def send(self, event: ServerEvent) -> None:
        if self._closing or self.ws.closed:
            return
        if len(self._queue) >= self.max_queued:
            logger.warning("client is not reading its events; closing the WebSocket")
            self._closing = True
            self._queue.clear()
            self._wake.set()
            _background(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too slow"))
            return
        self._queue.append(event.to_json())
        self._wake.set()

    async def close(self, code: int = 1000, reason: str = "", *, flush_timeout: float = 2.0) -> None:
        """Send what is queued (bounded wait), then close the socket."""
        self._closing = True
        self._wake.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(self._writer), flush_timeout)
        self._writer.cancel()
        with contextlib.suppress(BaseException):
            await self._writer
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]), flush_timeout)

    async def _write(self) -> None:
        while True:
            while self._queue:
                text = self._queue.popleft()
                if self.ws.closed:
                    self._queue.clear()
                    return
                try:
                    await self.ws.send_str(text)
                except (ConnectionError, RuntimeError):  # the peer went away mid-write
                    self._queue.clear()
                    return
            if self._closing:
                return
            self._wake.clear()
            await self._wake.wait()


class ChannelSink:
    """Events over the ``oai-events`` data channel (the channel itself queues until it opens)."""

    def __init__(self, channel: EventChannel) -> None:
        self.channel = channel

    def send(self, event: ServerEvent) -> None:
        with contextlib.suppress(ChannelClosed):
            self.channel.send(event.encode())

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.channel.close()


# ---------------------------------------------------------------------------------------------
# One realtime session
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionOptions:
    """Per-connection settings the app derives from its ``ServerConfig``."""

    limits: Limits = field(default_factory=Limits)
    defaults: SessionConfig = field(default_factory=SessionConfig)
    stats_interval: float = 1.0
    max_pending_images: int = 16  # images of user messages waiting for response.create
    cancel_timeout: float = 5.0  # how long close() waits for a cancelled answer to end


@dataclass
class _Active:
    """The response being streamed and its timing (for TTFT and tokens/s); its id is the wire id."""

    response: ServedResponse
    task: asyncio.Task[None] | None = None
    started: float = 0.0
    first_delta: float | None = None

    @property
    def id(self) -> str:
        return self.response.id


@dataclass
class _VideoInput:
    """One stream of frames into the session, with its own sampler (and the sampler's own change filter,
    since each input has its own last frame): the appended frames, or one track."""

    stats: Callable[[], StreamStats]
    sampler: FrameSampler


def _configure_change_filter(sampler: FrameSampler, settings: ChangeFilterSettings) -> None:
    """Give an input's sampler a filter with these settings; one it has keeps its reference frame
    (a new threshold does not resend the scene)."""
    if sampler.change is None:
        sampler.change = ChangeFilter(settings)
    else:
        sampler.change.configure(settings)


def _add_counts(total: StreamStats, part: StreamStats) -> None:
    total.received += part.received
    total.sampled += part.sampled
    total.delivered += part.delivered
    for reason, n in part.dropped.items():
        total.drop(reason, n)


class RealtimeConnection:
    """One realtime session: the protocol core, the runtime session and the tasks that serve them.

    The transport calls :meth:`start` once, :meth:`handle` for every client message (one at a time, in
    order), :meth:`push_video_frame` for frames of attached WebRTC tracks, and :meth:`close` exactly when
    it is done (idempotent, also on errors and cancellation).
    """

    def __init__(
        self,
        session: ServedSession,
        sink: EventSink,
        *,
        model: str,
        positions: str,
        options: ConnectionOptions | None = None,
        metrics: ServerMetrics | None = None,
        on_close: Callable[[RealtimeConnection], None] | None = None,
    ) -> None:
        self.session = session
        self.sink = sink
        self.options = options = options or ConnectionOptions()
        self.metrics = metrics or ServerMetrics()
        self.proto = RealtimeProtocol(
            session.id, model=model, positions=positions, limits=options.limits, defaults=options.defaults
        )
        self.on_close = on_close
        self.closers: list[Callable[[], Awaitable[None]]] = []  # attached calls, closed with the session
        self._pending_texts: list[str] = []
        self._pending_images: list[np.ndarray] = []
        self._active: _Active | None = None
        self._max_fps = float(self.proto.config.video["max_fps"])
        self._change_filter = self.proto.config.change_filter
        # a buffer of one without an age limit: each decoded frame is taken at once (or dropped)
        appended = FrameSampler(
            self._max_fps, buffer_size=1, max_age=None, change=ChangeFilter(self._change_filter)
        )
        self._appended = _VideoInput(stats=lambda: appended.stats, sampler=appended)
        self._tracks: list[_VideoInput] = []
        self._ended_tracks = StreamStats()  # the counts of tracks that have ended
        # what the metrics have counted so far (they only move forward)
        self._seen = SessionStats(session.id, self.proto.config.video["schedule"], positions)
        self._last_report: tuple[int, int, int] | None = None
        self._last_tick = (time.monotonic(), 0)
        self._stats_task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def max_fps(self) -> float:
        """The session's current frame-rate cap (frames above it are dropped and counted)."""
        return self._max_fps

    # -- driving ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Send ``session.created`` and start the periodic video statistics."""
        self._emit(self.proto.start())
        self._stats_task = asyncio.create_task(self._stats_loop(), name=f"stats {self.id}")

    async def handle(self, message: str | bytes) -> None:
        """One client message: validate it in the core, then run the resulting actions and events."""
        if self.closed:
            return
        await self._run(self.proto.receive(message), arrival=time.monotonic())

    async def push_video_frame(self, frame: Frame) -> None:
        """A frame of an attached WebRTC track, sampled and filtered by the track's own sampler: not
        capped or filtered again."""
        if self.closed:
            return
        try:
            self.session.ingest(frame)
        except Exception as exc:  # the session closing under us: never end the call
            logger.debug("session %s did not take a WebRTC frame: %s", self.id, exc)
            self.metrics.frames_dropped.labels("error").inc()
            return
        self.metrics.frame_lag.observe(max(0.0, time.monotonic() - frame.arrival))

    def attach_track(self, source: TrackSource) -> None:
        """Count a WebRTC video source into this session's statistics and apply the fps cap and the
        change filter to it."""
        source.sampler.fps = self._max_fps
        _configure_change_filter(source.sampler, self._change_filter)
        self._tracks.append(_VideoInput(stats=source.stats, sampler=source.sampler))

    def detach_track(self, source: TrackSource) -> None:
        for video in list(self._tracks):
            if video.sampler is source.sampler:
                self._tracks.remove(video)
                _add_counts(self._ended_tracks, source.stats())

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Cancel the response, close attached calls and the session, then the sink. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(code, reason), name=f"close {self.id}")
        await asyncio.shield(self._closing)

    # -- outputs of the core ------------------------------------------------------------------------

    def _emit(self, outputs: Sequence[Output]) -> None:
        for out in outputs:
            if isinstance(out, ServerEvent):
                self._send(out)
            else:  # only the paths that never yield actions call _emit
                raise TypeError(f"unexpected action {out!r}")

    def _send(self, event: ServerEvent) -> None:
        if isinstance(event, ErrorEvent):
            self.metrics.errors.labels(event.error.code).inc()
        self.sink.send(event)

    async def _run(self, outputs: Sequence[Output], arrival: float) -> None:
        """Actions first (as the core orders them), then the events, then what the actions caused."""
        follow_up: list[Output] = []
        for out in outputs:
            if isinstance(out, ServerEvent):
                self._send(out)
            elif isinstance(out, AddUserMessage):
                follow_up += await self._add_user_message(out)
            elif isinstance(out, AppendFrame):
                follow_up += await self._append_frame(out, arrival)
            elif isinstance(out, StartResponse):
                follow_up += await self._start_response(out)
            elif isinstance(out, CancelResponse):
                await self._cancel_response(out.response_id)
            elif isinstance(out, UpdateSession):
                follow_up += self._update_session(out)
        self._emit(follow_up)

    def _update_session(self, action: UpdateSession) -> list[Output]:
        video = action.config.video
        self._max_fps = min(float(video["max_fps"]), self.options.limits.max_video_fps)
        self._change_filter = action.config.change_filter
        for stream in (self._appended, *self._tracks):
            stream.sampler.fps = self._max_fps
            _configure_change_filter(stream.sampler, self._change_filter)
        try:  # the rate caps and filters are the inputs' samplers above: the session is told neither
            self.session.update(instructions=action.config.instructions, schedule=video["schedule"])
        except (ValueError, RuntimeError) as exc:
            return [error_event("invalid_value", f"the session could not apply the update: {exc}")]
        return []

    async def _add_user_message(self, action: AddUserMessage) -> list[Output]:
        if len(self._pending_images) + len(action.images) > self.options.max_pending_images:
            message = f"at most {self.options.max_pending_images} images per response"
            return self.proto.image_rejected(action.event_id, message, item_id=action.item_id)
        images: list[np.ndarray] = []
        for data in action.images:
            try:
                images.append(
                    await asyncio.to_thread(decode_image, data, self.options.limits.max_image_pixels)
                )
            except ImageRejected as exc:
                return self.proto.image_rejected(action.event_id, str(exc), item_id=action.item_id)
        if action.text:
            self._pending_texts.append(action.text)
        self._pending_images += images
        return []

    async def _append_frame(self, action: AppendFrame, arrival: float) -> list[Output]:
        sampler = self._appended.sampler
        stream_time = arrival if action.timestamp_ms is None else action.timestamp_ms / 1000.0
        if not sampler.admit(stream_time):  # above the fps cap: counted as dropped ("rate"), no decode
            return []
        try:
            rgb = await asyncio.to_thread(decode_image, action.image, self.options.limits.max_image_pixels)
        except ImageRejected as exc:
            sampler.stats.drop("invalid")
            return self.proto.image_rejected(action.event_id, str(exc))
        sampler.offer(Frame(rgb=rgb, timestamp=stream_time, arrival=arrival))
        frame = sampler.take()  # None: nothing new since the last frame that went in ("unchanged")
        if frame is None:
            return []
        self.session.ingest(frame)
        self.metrics.frame_lag.observe(max(0.0, time.monotonic() - arrival))
        return []

    async def _start_response(self, action: StartResponse) -> list[Output]:
        """Ask the session, under the protocol's response id. The session alone decides whether an answer
        may start: if it is still ending the previous one, this response fails (no retry here)."""
        text, images = "\n".join(self._pending_texts), list(self._pending_images)
        self._pending_texts.clear()
        self._pending_images.clear()
        started = time.monotonic()
        try:
            response = self.session.ask(
                text,
                action.max_output_tokens,
                images=images,
                instructions=action.instructions,
                response_id=action.response_id,
            )
        except ResponseActive as exc:  # the session is still ending the previous answer
            failure = str(exc) or "the previous response has not ended yet"
            refusal: list[Output] = [error_event("conversation_already_has_active_response", failure)]
        except EngineUnavailable as exc:
            failure = str(exc) or "the engine is unavailable"
            refusal = self.proto.engine_error(failure)
        except Exception as exc:
            logger.exception("session %s: ask failed", self.id)
            failure = f"{type(exc).__name__}: {exc}"
            refusal = self.proto.engine_error(failure)
        else:
            active = _Active(response, started=started)
            self._active = active
            active.task = asyncio.create_task(self._pump(active), name=f"response {action.response_id}")
            return []
        return [*refusal, *self._finish(action.response_id, "failed", {}, failure)]

    async def _pump(self, active: _Active) -> None:
        """Stream the answer's deltas into the core, then close the response with its final status."""
        status: ResponseStatus = "completed"
        reason: str | None = None
        events: list[Output] = []
        try:
            async for delta in active.response:
                if active.first_delta is None:
                    active.first_delta = time.monotonic()
                    self.metrics.ttft.observe(active.first_delta - active.started)
                self._emit(self.proto.text_delta(active.id, delta))
            if active.response.status in FINAL_STATUSES:
                status = active.response.status
        except asyncio.CancelledError:
            status, reason = "cancelled", "connection_closed"
            raise
        except Exception as exc:
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            logger.warning("session %s: response %s failed: %s", self.id, active.id, reason)
            events += self.proto.engine_error(str(exc) or type(exc).__name__)
        finally:
            if self._active is active:
                self._active = None
            events += self._finish(active.id, status, active.response.usage, reason, active)
            self._emit(events)

    def _finish(
        self,
        response_id: str,
        status: ResponseStatus,
        usage: Mapping[str, int],
        reason: str | None,
        active: _Active | None = None,
    ) -> list[Output]:
        self.metrics.responses.labels(status).inc()
        output_tokens = int(usage.get("output_tokens", 0))
        self.metrics.output_tokens.inc(output_tokens)
        self.metrics.input_tokens.inc(int(usage.get("input_tokens", 0)))
        if active is not None and active.first_delta is not None and output_tokens > 1:
            elapsed = time.monotonic() - active.first_delta
            if elapsed > 0:
                self.metrics.tokens_per_s.observe((output_tokens - 1) / elapsed)
        return self.proto.response_finished(response_id, status, dict(usage), reason)

    async def _cancel_response(self, response_id: str) -> None:
        active = self._active
        if active is None or active.id != response_id:
            return
        try:  # the session waits until the answer has really stopped; a hung engine must not block us
            await asyncio.wait_for(self.session.cancel(), self.options.cancel_timeout)
        except Exception as exc:
            logger.warning("session %s: cancel did not complete (%r); dropping the answer", self.id, exc)
            if active.task is not None:
                active.task.cancel()

    # -- statistics ---------------------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        interval = self.options.stats_interval
        while True:
            await asyncio.sleep(interval)
            self.report_video_stats()

    def report_video_stats(self, force: bool = False) -> SessionStats | None:
        """Update the metrics; send ``input_video.stats`` if anything moved since the last report."""
        stats = self.video_stats()
        key = (stats.frames_received, stats.frames_ingested, stats.frames_dropped)
        if not force and (key == self._last_report or key == (0, 0, 0)):
            return None
        self._last_report = key
        self._emit(self.proto.video_stats(stats))
        return stats

    def video_stats(self) -> SessionStats:
        """The session's numbers, its frame counters those of this connection's inputs (the appended
        frames, every WebRTC track, ended ones included); feeds the metrics."""
        inputs = StreamStats()
        _add_counts(inputs, self._ended_tracks)
        for stream in (self._appended, *self._tracks):
            _add_counts(inputs, stream.stats())
        session = self.session.stats()
        dropped = dict(inputs.dropped)  # at the inputs, then in the session (the reasons differ)
        for reason, n in session.frames_dropped_by_reason.items():
            dropped[reason] = dropped.get(reason, 0) + n
        now = time.monotonic()
        then, ingested_then = self._last_tick
        fps = (session.frames_ingested - ingested_then) / (now - then) if now > then else 0.0
        self._last_tick = (now, session.frames_ingested)
        stats = replace(
            session,
            max_fps=self._max_fps,
            frames_received=inputs.received,
            frames_sampled=inputs.sampled,
            frames_dropped_by_reason=dropped,
            ingest_fps=round(fps, 3),
        )
        self._count(stats)
        return stats

    def _count(self, stats: SessionStats) -> None:
        """Advance the Prometheus counters by what changed since the last look (never backwards)."""
        seen, m = self._seen, self.metrics
        m.frames_received.inc(max(0, stats.frames_received - seen.frames_received))
        m.frames_sampled.inc(max(0, stats.frames_sampled - seen.frames_sampled))
        m.frames_ingested.inc(max(0, stats.frames_ingested - seen.frames_ingested))
        m.rollovers.inc(max(0, stats.rollovers - seen.rollovers))
        for reason, n in stats.frames_dropped_by_reason.items():
            before = seen.frames_dropped_by_reason.get(reason, 0)
            if n > before:
                m.frames_dropped.labels(reason).inc(n - before)
        dropped = dict(seen.frames_dropped_by_reason)
        for reason, n in stats.frames_dropped_by_reason.items():
            dropped[reason] = max(n, dropped.get(reason, 0))
        self._seen = replace(
            seen,
            frames_received=max(stats.frames_received, seen.frames_received),
            frames_sampled=max(stats.frames_sampled, seen.frames_sampled),
            frames_ingested=max(stats.frames_ingested, seen.frames_ingested),
            rollovers=max(stats.rollovers, seen.rollovers),
            frames_dropped_by_reason=dropped,
        )

    # -- teardown ---------------------------------------------------------------------------------------

    async def _close(self, code: int, reason: str) -> None:
        self.closed = True
        try:
            if self._stats_task is not None:
                self._stats_task.cancel()
                await asyncio.gather(self._stats_task, return_exceptions=True)
            for closer in list(self.closers):
                with contextlib.suppress(Exception):
                    await closer()
            active = self._active
            if active is not None and active.task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.session.cancel(), self.options.cancel_timeout)
                done, _ = await asyncio.wait({active.task}, timeout=self.options.cancel_timeout)
                if not done:
                    active.task.cancel()
                    await asyncio.gather(active.task, return_exceptions=True)
            with contextlib.suppress(Exception):
                self.report_video_stats()
        finally:
            try:
                await self.session.close()
            except Exception:
                logger.exception("session %s: close failed", self.id)
            if self.on_close is not None:
                self.on_close(self)
            await self.sink.close(code, reason)


# ---------------------------------------------------------------------------------------------
# WebRTC calls
# ---------------------------------------------------------------------------------------------


class Call:
    """One WebRTC peer. Attached (``owns_connection=False``) it only feeds its video to a connection
    driven elsewhere and ends with the peer or that connection; standalone it also carries the
    connection's events over ``oai-events`` and closes the connection when it ends."""

    def __init__(
        self,
        call_id: str,
        peer: WebRTCPeer,
        connection: RealtimeConnection,
        *,
        owns_connection: bool,
        on_close: Callable[[Call], None] | None = None,
    ) -> None:
        self.id = call_id
        self.peer = peer
        self.connection = connection
        self.owns_connection = owns_connection
        self.on_close = on_close
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: asyncio.Task[None] | None = None

    @property
    def session_id(self) -> str:
        return self.connection.id

    def start(self) -> None:
        self.connection.closers.append(self.close)
        self._tasks.append(asyncio.create_task(self._video(), name=f"call {self.id} video"))
        if self.owns_connection:
            self._tasks.append(asyncio.create_task(self._events(), name=f"call {self.id} events"))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"call {self.id} watch"))

    async def close(self) -> None:
        """Hang up: stop the tasks, close the peer and, for a standalone call, its session. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"close call {self.id}")
        await asyncio.shield(self._closing)

    async def _video(self) -> None:
        try:
            source = await self.peer.video()
        except ConnectionError:
            return
        self.connection.attach_track(source)
        try:
            async for frame in source:
                await self.connection.push_video_frame(frame)
        finally:
            self.connection.detach_track(source)
        if not self.owns_connection:  # an attached call is nothing but its video
            _background(self.close())

    async def _events(self) -> None:
        async for message in self.peer.events:  # ends when the channel or the peer closes
            await self.connection.handle(json.dumps(message))
        _background(self.close())

    async def _watch(self) -> None:
        await self.peer.wait_closed()
        _background(self.close())

    async def _close(self) -> None:
        current = asyncio.current_task()
        with contextlib.suppress(ValueError):
            self.connection.closers.remove(self.close)
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        try:
            await self.peer.close("hang up")
        finally:
            if self.owns_connection:
                await self.connection.close()
            if self.on_close is not None:
                self.on_close(self)
