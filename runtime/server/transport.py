"""Thin I/O glue around the sans-I/O protocol core: one :class:`RealtimeConnection` per realtime session.

The core decides what every client message means; this module only moves bytes and runs the core's
actions against a runtime session (typed as `contract.ServedSession`): it decodes images on a worker
thread (with a pixel limit), caps the rate of appended frames and holds back those that show nothing
new (one sampler with its own scene-change filter per input: a WebRTC track's frames were capped and
filtered by the track's own sampler, and the session does neither again), streams a
response's deltas back into the core, sends ``input_video.stats`` while frames flow and, when the
session ends, cancels the response and closes the session.

Outgoing events go through an :class:`EventSink` whose ``send`` never blocks: events are queued in the
order the core produced them, so a response's deltas can never overtake its ``response.created``.
Two sinks exist, one per transport: :class:`WebSocketSink` (bounded per connection: a client that stops
reading is closed) and :class:`ChannelSink` (WebRTC data channel). :class:`Call` is one WebRTC peer,
either feeding video into an existing connection or carrying a whole session over its ``oai-events``
channel.

A session outlives a lost connection (:class:`SessionResumer`, around the sans-I/O `resume` core): a
resumable connection logs every event it sends in a `ReplayLog`, runs on without a sink while
detached, and `RealtimeConnection.attach` puts it on a new sink, replaying what the client missed.
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
from aiohttp import WSCloseCode, WSMsgType, web

from runtime.errors import EngineUnavailable, ResponseActive
from runtime.wire import FINAL_STATUSES, ResponseStatus, ResumeInfo, SessionStats
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
from .resume import Claimed, Refused, ReplayGap, ReplayLog, ResumeRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "RESUME_REFUSAL_STATUS",
    "Call",
    "ChannelSink",
    "ConnectionOptions",
    "EventSink",
    "ImageRejected",
    "RealtimeConnection",
    "SessionResumer",
    "WebSocketSink",
    "decode_image",
    "read_websocket",
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


SLOW_CLIENT_REASON = "send buffer full: the client is not reading its events"
TAKEN_OVER = 4000  # close code of a socket whose session another connection resumed (no point resuming)
RESUME_REFUSAL_STATUS = {"session_not_resumable": 404, "invalid_value": 400, "replay_unavailable": 410}
"""The HTTP status of a refused resume (``POST /v1/realtime/calls?resume=``), by error code."""


class WebSocketSink:
    """Writes one WebSocket's events from a single writer task, in order, holding a bounded number of bytes.

    What the sink holds is its queue of unsent events plus the socket's own write buffer, which aiohttp
    stops filling past its high-water mark (64 KiB) once the peer stops reading: then the writer task
    waits and the queue grows. When an event would take the queue past ``max_buffered_bytes`` (one
    event alone always goes), the client is not reading: the socket is closed with 1008 and a reason
    (logged, counted in ``speakwatch_websocket_closed_by_server_total{reason="slow_client"}``), the
    queue is dropped, and if the close frame cannot get out within ``close_timeout`` the connection is
    aborted, so a client that stopped reading costs the server at most the bound plus the socket
    buffer. A resumable session loses nothing by it: its events are in its `ReplayLog`.

    `replay` makes the writer send a preface and then events straight from a replay log before the
    queued live ones (the log already holds them: replaying costs no second copy).
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.BaseTransport | None = None,
        *,
        max_buffered_bytes: int = 1024 * 1024,
        close_timeout: float = 2.0,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.max_buffered_bytes = max_buffered_bytes
        self.close_timeout = close_timeout
        self.metrics = metrics
        self.overflowed = False
        self.peak_buffered_bytes = 0  # the most this sink has held at once (queue + socket buffer)
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._replay: tuple[bytes | None, ReplayLog, int] | None = None  # preface, log, next seq
        self._wake = asyncio.Event()
        self._closing = False
        self._writer = asyncio.create_task(self._write(), name="WebSocketSink.writer")

    @property
    def buffered_bytes(self) -> int:
        """Bytes this connection holds now: the queued events and the socket's unsent write buffer."""
        held = self._queued_bytes
        if isinstance(self.transport, asyncio.WriteTransport):
            with contextlib.suppress(Exception):  # a closed transport may refuse to say
                held += self.transport.get_write_buffer_size()
        return held

    def send(self, event: ServerEvent) -> None:
        self.send_data(event.to_json().encode())

    def send_data(self, data: bytes) -> None:
        """Queue one encoded event (UTF-8 JSON); past the bound the connection is closed instead."""
        if self._closing or self.ws.closed:
            return
        if self._replay is not None:  # the event is in the log the replay reads: it goes out from there
            self._wake.set()
            return
        queued = self._queued_bytes + len(data)
        if queued > self.max_buffered_bytes and self._queued_bytes > 0:  # one event alone always goes out
            self._overflow(queued)
            return
        self._queue.append(data)
        self._queued_bytes = queued
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
        self._wake.set()

    def replay(self, preface: bytes, log: ReplayLog, first: int) -> None:
        """Send ``preface``, then the logged events from ``first`` on, read from the log as they go out
        until the replay has caught up with it (new events meanwhile are the log's too: nothing is
        queued twice); then the queued live ones. Call it before anything is queued."""
        self._replay = (preface, log, first)
        self._wake.set()

    async def close(self, code: int = 1000, reason: str = "", *, flush_timeout: float = 2.0) -> None:
        """Send what is queued (bounded wait), then close the socket."""
        self._closing = True
        self._wake.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(self._writer), flush_timeout)
        await self._stop_writer()
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]), flush_timeout)

    def abort(self) -> None:
        """Drop the connection at once, without a close frame (what a network failure looks like)."""
        self._closing = True
        self._clear()
        self._wake.set()
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]  # every socket transport has it

    def _clear(self) -> None:
        self._queue.clear()
        self._queued_bytes = 0
        self._replay = None

    def _overflow(self, held: int) -> None:
        logger.warning(
            "closing a WebSocket (1008): %d bytes would be buffered, more than the bound of %d; %s",
            held,
            self.max_buffered_bytes,
            SLOW_CLIENT_REASON,
        )
        if self.metrics is not None:
            self.metrics.ws_closed.labels(reason="slow_client").inc()
        self.overflowed = True
        self._closing = True
        self._clear()
        self._wake.set()
        _background(self._close_slow())

    async def _close_slow(self) -> None:
        """Close 1008 with the reason; a close frame stuck behind unread data is given up on (abort)."""
        try:
            await self._stop_writer()
            async with asyncio.timeout(self.close_timeout):
                await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=SLOW_CLIENT_REASON.encode())
        except (TimeoutError, Exception):
            pass
        finally:  # (aiohttp may also raise CancelledError here: the stopped writer's drain waiter)
            transport = self.transport
            if transport is not None and (not transport.is_closing() or self.buffered_bytes):
                transport.abort()  # type: ignore[attr-defined]  # still open, or closing with unsent bytes

    async def _stop_writer(self) -> None:
        if self._writer is not asyncio.current_task():
            self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer

    def _next(self) -> bytes | None:
        """The next frame to write: the replay first, then the queue; None when there is nothing."""
        while self._replay is not None:
            preface, log, seq = self._replay
            if preface is not None:
                self._replay = (None, log, seq)
                return preface
            if seq > log.last_seq:  # caught up: live events are queued from now on
                self._replay = None
                break
            data = log.data(seq)
            if data is None:  # dropped from the log while the replay was going out
                logger.warning("replay lost event #%d (the session's log dropped it); closing", seq)
                self._closing = True
                self._clear()
                _background(self.close(WSCloseCode.POLICY_VIOLATION, "replay lost events; resume again"))
                return None
            self._replay = (None, log, seq + 1)
            return data
        if self._queue:
            data = self._queue.popleft()
            self._queued_bytes -= len(data)
            return data
        return None

    async def _write(self) -> None:
        while True:
            while (data := self._next()) is not None:
                if self.ws.closed:
                    self._clear()
                    return
                try:
                    await self.ws.send_frame(data, WSMsgType.TEXT)
                except (ConnectionError, RuntimeError):  # the peer went away mid-write
                    self._clear()
                    return
            if self._closing:
                return
            self._wake.clear()
            await self._wake.wait()


class ChannelSink:
    """Events over the ``oai-events`` data channel (the channel itself queues until it opens).

    `replay` sends a preface and then a replay log's events from a task that waits for the channel to
    open and keeps its send buffer under ``max_buffered`` (the channel drops what it cannot buffer):
    nothing of a replay is dropped, and live events meanwhile go out from the log too, in order.
    """

    def __init__(self, channel: EventChannel, *, max_buffered: int = 1024 * 1024) -> None:
        self.channel = channel
        self.max_buffered = max_buffered
        self._replay: asyncio.Task[None] | None = None

    def send(self, event: ServerEvent) -> None:
        if self._replay is not None:  # in the log the replay reads: it goes out from there
            return
        with contextlib.suppress(ChannelClosed):
            self.channel.send(event.encode())

    def replay(self, preface: bytes, log: ReplayLog, first: int) -> None:
        self._replay = asyncio.create_task(self._send_log(preface, log, first), name="ChannelSink.replay")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._replay is not None and self._replay is not asyncio.current_task():
            self._replay.cancel()
            with contextlib.suppress(BaseException):
                await self._replay
        self.channel.close()

    async def _send_log(self, preface: bytes, log: ReplayLog, seq: int) -> None:
        try:
            await self.channel.wait_open(timeout=30.0)
            self.channel.send_text(preface.decode())
            while seq <= log.last_seq:
                while self.channel.buffered_amount > self.max_buffered:
                    await asyncio.sleep(0.005)
                data = log.data(seq)
                if data is None:  # dropped from the log while the replay went out: resume again
                    logger.warning("replay lost event #%d (the session's log dropped it); closing", seq)
                    self.channel.close()
                    return
                self.channel.send_text(data.decode())
                seq += 1
        except (ChannelClosed, TimeoutError):
            return
        finally:
            self._replay = None  # caught up (no await since the last check): live events from now on


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
    it is done (idempotent, also on errors and cancellation). A resumable one (``log`` set, by
    `SessionResumer.register`) also goes through :meth:`detach` and :meth:`attach` as its client's
    connections come and go; its ``sink`` is None while detached.
    """

    def __init__(
        self,
        session: ServedSession,
        sink: EventSink | None,
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
        self.close_callbacks: list[Callable[[RealtimeConnection], None]] = []  # after on_close
        self.closers: list[Callable[[], Awaitable[None]]] = []  # attached calls, closed with the session
        # a resumable session: its token and grace, and the log of every event it sent (for a replay)
        self.resume: ResumeInfo | None = None
        self.log: ReplayLog | None = None
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
        """Send ``session.created`` (with the resume token, when resumable) and start the periodic
        video statistics."""
        self._emit(self.proto.start(self.resume))
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

    def detach(self, sink: EventSink) -> bool:
        """``sink``'s socket is gone: from now on events only go to the log (until `attach`). False when
        ``sink`` is not this connection's any more (it resumed on another socket meanwhile)."""
        if self.sink is not sink:
            return False
        self.sink = None
        return True

    def attach(
        self, sink: WebSocketSink | ChannelSink, token: str, after: int, last_event_id: str | None
    ) -> int:
        """Continue on a new socket: ``session.resumed`` (with the new ``token``), then every logged
        event after sequence number ``after``, then the live ones; returns how many are replayed. A socket
        still attached (its loss not noticed yet) is closed."""
        if self.log is None or self.resume is None:
            raise RuntimeError("this session cannot be resumed")
        old, self.sink = self.sink, sink
        self.resume = ResumeInfo(token, self.resume.grace_s)
        replayed = self.log.last_seq - after
        preface = self.proto.resumed(self.resume, replayed, last_event_id)
        sink.replay(preface.to_json().encode(), self.log, after + 1)
        if old is not None:
            _background(old.close(TAKEN_OVER, "session resumed on another connection"))
        return replayed

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
        """Log the event (a resumable session) and send it, if a socket is attached."""
        if isinstance(event, ErrorEvent):
            self.metrics.errors.labels(event.error.code).inc()
        if self.log is None:
            if self.sink is not None:
                self.sink.send(event)
            return
        data = event.to_json().encode()
        self.log.append(event.event_id, data)
        if isinstance(self.sink, WebSocketSink):
            self.sink.send_data(data)
        elif self.sink is not None:
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
            refusal = self.proto.engine_error(failure, retry_after_s=exc.retry_after_s)
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
            for callback in self.close_callbacks:
                callback(self)
            if self.sink is not None:
                await self.sink.close(code, reason)


# ---------------------------------------------------------------------------------------------
# Sessions that outlive their socket
# ---------------------------------------------------------------------------------------------


async def read_websocket(ws: web.WebSocketResponse, conn: RealtimeConnection) -> bool:
    """Feed the socket's messages to ``conn`` until it ends. True when the client closed it on purpose
    (a close frame with 1000 or no code): the session then ends at once; any other end (no close
    frame, 1001, an error, the server closing it) leaves it resumable for the grace period."""
    while True:
        message = await ws.receive()
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            await conn.handle(message.data)
        elif message.type == WSMsgType.CLOSE:
            return message.data in (WSCloseCode.OK, 0)
        elif message.type == WSMsgType.ERROR:
            logger.info("session %s: WebSocket error %s", conn.id, ws.exception())
            return False
        elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
            return False


class SessionResumer:
    """Thin glue around `ResumeRegistry`: gives WebSocket sessions a token and a `ReplayLog`, turns a
    lost socket into a grace period (a timer closes the session at its end, freeing its KV), and hands
    a reconnect with a valid token its session on the new socket, replaying what it missed.

    While detached a session goes on as if its socket were there: an answer in flight keeps streaming
    into the log (a resume replays it; the grace period's end cancels it), WebRTC calls attached to it
    keep feeding it video, and it keeps counting towards ``max_sessions`` and its KV reservation.
    ``grace`` 0 turns resumption off: a lost socket closes its session at once, as a deliberate close does.
    """

    def __init__(
        self,
        grace: float,
        connections: Mapping[str, RealtimeConnection],
        metrics: ServerMetrics,
        *,
        replay_max_events: int = 10_000,
        replay_max_bytes: int = 8 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = ResumeRegistry(grace)
        self.connections = connections
        self.metrics = metrics
        self.replay_max_events = replay_max_events
        self.replay_max_bytes = replay_max_bytes
        self.clock = clock
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self.registry.grace > 0

    @property
    def detached(self) -> list[str]:
        """Sessions waiting without a socket."""
        return [sid for sid in self.connections if self.registry.detached(sid)]

    def register(self, conn: RealtimeConnection) -> None:
        """Make a new WebSocket session resumable (before its ``start()``: the token goes in
        ``session.created``)."""
        if not self.enabled:
            return
        token = self.registry.issue(conn.id)
        conn.resume = ResumeInfo(token, self.registry.grace)
        conn.log = ReplayLog(self.replay_max_events, self.replay_max_bytes)
        conn.close_callbacks.append(self._closed)

    def check(self, token: str, last_event_id: str | None) -> ErrorEvent | None:
        """What `resume` would refuse, without resuming (a WebRTC call checks before it accepts the
        offer); None when it would resume now."""
        found = self._find(token, last_event_id)
        return found if isinstance(found, ErrorEvent) else None

    def resume(
        self, token: str, last_event_id: str | None, sink: WebSocketSink | ChannelSink
    ) -> RealtimeConnection | ErrorEvent:
        """The session ``token`` resumes, now on ``sink`` (``session.resumed`` and the replay are on
        their way); or the error to send before closing the socket. A replay that is no longer possible
        ends the session: nothing could make its transcript whole again."""
        found = self._find(token, last_event_id)
        if isinstance(found, ErrorEvent):
            return found
        conn, position = found
        claimed = self.registry.claim(conn.id, self.clock())
        assert isinstance(claimed, Claimed), "_find just found it, with no await since"
        replayed = conn.attach(sink, claimed.token, position, last_event_id)
        self.metrics.resumes.labels(result="resumed").inc()
        self.metrics.replayed_events.inc(replayed)
        logger.info("session %s resumed; %d events replayed", conn.id, replayed)
        self._set_gauge()
        self._arm()
        return conn

    def _find(self, token: str, last_event_id: str | None) -> tuple[RealtimeConnection, int] | ErrorEvent:
        """The session and the sequence number a resume replays after, or the refusal (counted)."""
        now = self.clock()
        found = self.registry.lookup(token, now)
        conn = None if isinstance(found, Refused) else self.connections.get(found)
        if conn is None or conn.closed or conn.log is None:
            self.metrics.resumes.labels(result="session_not_resumable").inc()
            refusal = (
                found
                if isinstance(found, Refused)
                else Refused("session_not_resumable", "the session has ended")
            )
            return error_event(refusal.code, refusal.message, param="resume")
        position = conn.log.position(last_event_id)
        if isinstance(position, ReplayGap):
            self.metrics.resumes.labels(result=position.code).inc()
            if position.code == "replay_unavailable":
                self.registry.forget(conn.id)
                self._set_gauge()
                _background(conn.close())
            return error_event(position.code, position.message, param="last_event_id")
        return conn, position

    async def disconnected(
        self, conn: RealtimeConnection, sink: WebSocketSink | ChannelSink, *, deliberate: bool
    ) -> None:
        """``sink``'s socket has ended: close the session (a deliberate close, or not resumable), or
        start its grace period."""
        resumable = self.enabled and conn.log is not None and not conn.closed and not deliberate
        if not conn.detach(sink):
            pass  # resumed on another socket meanwhile: that one carries the session now
        elif not resumable:
            await conn.close()
        else:
            self.registry.detach(conn.id, self.clock())
            logger.info("session %s lost its socket; resumable for %g s", conn.id, self.registry.grace)
            self._set_gauge()
            self._arm()
        await sink.close(WSCloseCode.GOING_AWAY, "")

    def close(self) -> None:
        """Stop the grace timer (server shutdown closes every session itself)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _closed(self, conn: RealtimeConnection) -> None:
        self.registry.forget(conn.id)
        self._set_gauge()

    def _set_gauge(self) -> None:
        self.metrics.detached.set(len(self.detached))

    def _arm(self) -> None:
        """One timer, at the earliest grace deadline."""
        self.close()
        deadline = self.registry.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        for session_id in self.registry.due(self.clock()):
            conn = self.connections.get(session_id)
            if conn is not None:
                logger.info(
                    "session %s was not resumed within %g s; closing it", session_id, self.registry.grace
                )
                self.metrics.grace_expired.inc()
                _background(conn.close(WSCloseCode.GOING_AWAY, "grace period over"))
        self._set_gauge()
        self._arm()


# ---------------------------------------------------------------------------------------------
# WebRTC calls
# ---------------------------------------------------------------------------------------------


class Call:
    """One WebRTC peer. Attached (``owns_connection=False``) it only feeds its video to a connection
    driven elsewhere and ends with the peer or that connection; standalone it also carries the
    connection's events over ``oai-events`` (its ``sink``) and, when it ends, closes the connection:
    at once on a hang-up (`close`), after the grace period (``resumer``) when the peer or its channel
    is lost, so that a new call with the resume token can take the session over."""

    def __init__(
        self,
        call_id: str,
        peer: WebRTCPeer,
        connection: RealtimeConnection,
        *,
        owns_connection: bool,
        on_close: Callable[[Call], None] | None = None,
        sink: ChannelSink | None = None,
        resumer: SessionResumer | None = None,
    ) -> None:
        self.id = call_id
        self.peer = peer
        self.connection = connection
        self.owns_connection = owns_connection
        self.on_close = on_close
        self.sink = sink
        self.resumer = resumer
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
        await self._end(deliberate=True)

    def _lost(self) -> None:
        """The peer or its channel went away: a standalone session waits for a resume."""
        _background(self._end(deliberate=False))

    async def _end(self, *, deliberate: bool) -> None:
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(deliberate), name=f"close call {self.id}")
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
        self._lost()

    async def _watch(self) -> None:
        await self.peer.wait_closed()
        self._lost()

    async def _close(self, deliberate: bool) -> None:
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
            if self.owns_connection and self.resumer is not None and self.sink is not None:
                await self.resumer.disconnected(self.connection, self.sink, deliberate=deliberate)
            elif self.owns_connection:
                await self.connection.close()
            if self.on_close is not None:
                self.on_close(self)
