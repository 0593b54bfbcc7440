"""Remote SDK: the embedded ``Session`` API over the realtime WebSocket of a speakwatch server.

::

    async with client.connect("ws://127.0.0.1:8000/v1/realtime") as session:
        await session.push_frame(rgb)                  # H x W x 3 uint8, sent as JPEG (input_video.append)
        async for delta in session.ask("What do you see?"):
            print(delta, end="")
        print(session.stats())                         # the server's SessionStats, as embedded

The protocol's rules live in the sans-I/O core (`client.core.ClientProtocol`) and its events in
`runtime.wire`; this module is the I/O around them: one reader task feeds server messages to the
core, and the core's outputs become WebSocket sends, answer deltas, resolved futures and events for
``events()`` subscribers.

**Reconnects by itself.** When the socket drops unexpectedly (no close frame, or a close code other
than 1000, 1001 and 4000), the reader reconnects with the session's resume token and the id of the last
event it got (`ReconnectPolicy`: bounded tries with back-off, within the server's grace period). The
server replays what was missed, exactly once and in order, so an answer being iterated just goes on.
Meanwhile ``push_frame`` drops frames (counted in ``frames_dropped``: stale video is worth nothing)
and other events wait in a bounded outbox, sent first once the session is back. If the resume fails,
the session closes as before: waiting answers and requests raise ``connection_closed``. Events written
to the old socket that never reached the server are sent again: ``session.resumed`` names the last
client event the server received (``last_client_event_id``), and the SDK remembers the last 256 it
sent by ``event_id`` (frames are not sent again).

:class:`SyncSession` (``connect_sync``) runs the same session on a loop in
a background thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
from PIL import Image
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from runtime.wire import (
    ClientEvent,
    ErrorEvent,
    InputVideoStats,
    JSONObject,
    ResponseStatus,
    ServerEvent,
    SessionCreated,
    SessionResumed,
    SessionStats,
    decode_server_event,
    image_data_url,
)

from .core import (
    Answer,
    AnswerEnded,
    AnswerReleased,
    ClientProtocol,
    Delta,
    Output,
    RealtimeError,
    ReconnectPolicy,
    Reply,
    Send,
    Unclaimed,
    session_fields,
)

__all__ = [
    "EventStream",
    "RealtimeError",
    "ReconnectPolicy",
    "RemoteResponse",
    "RemoteSession",
    "SyncResponse",
    "SyncSession",
    "connect",
    "connect_sync",
    "realtime_url",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()  # end of a response's delta queue
Opener = Callable[[Mapping[str, str]], Awaitable[ClientConnection]]  # query parameters -> a new socket
MAX_OUTBOX = 256  # client events held while reconnecting
DEFAULT_RECONNECT = ReconnectPolicy()


def realtime_url(url: str) -> str:
    """``ws(s)://`` URL of the realtime endpoint; ``http(s)://host:port`` alone means ``/v1/realtime``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use ws://, wss://, http:// or https://")
    path = parts.path if parts.path not in ("", "/") else "/v1/realtime"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


# ---------------------------------------------------------------------------------------------
# Images: checked at once, JPEG-encoded off the event loop
# ---------------------------------------------------------------------------------------------


def _rgb(frame: Any) -> np.ndarray:
    """An H x W x 3 uint8 array from an array or an ``av.VideoFrame`` (anything with ``to_ndarray``)."""
    if not isinstance(frame, np.ndarray) and hasattr(frame, "to_ndarray"):
        frame = frame.to_ndarray(format="rgb24")
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"expected an H x W x 3 uint8 array or av.VideoFrame, got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {frame.dtype}")
    return frame


def _jpeg_data_url(rgb: np.ndarray, quality: int) -> str:
    """Blocking (PIL): run it off the event loop."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_part(image: Any) -> str | np.ndarray:
    """An ``ask`` image: a data URL (from a data URL or JPEG/PNG bytes), or an RGB array still to
    encode (from an array, a PIL image or a frame)."""
    if isinstance(image, str):
        if not image.startswith("data:"):
            raise ValueError("image strings must be data URLs (data:image/jpeg;base64,...)")
        return image
    if isinstance(image, bytes | bytearray):
        return image_data_url(bytes(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return _rgb(image)


# ---------------------------------------------------------------------------------------------
# Responses and event subscriptions
# ---------------------------------------------------------------------------------------------


CLOSE_TIMEOUT_S = 2.0  # a close handshake the server does not answer by then is cut (Ctrl-C exits promptly)


class RemoteResponse:
    """One answer: ``async for delta in response``; ``id``, ``status``, ``usage`` are set by the end.

    ``id`` is the server's response id (from ``response.created``), the only id an answer has. The
    iteration ends at ``response.done``: normally for completed, cancelled and incomplete answers,
    with :class:`RealtimeError` for failed ones and for errors the server reports for this ask.
    """

    def __init__(self, session: RemoteSession, answer: Answer) -> None:
        self._session = session
        self._answer = answer
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._ended = asyncio.Event()
        self._released = asyncio.Event()  # the server holds nothing for this answer any more
        self._submit: asyncio.Task[None] | None = None

    @property
    def id(self) -> str | None:
        """The server's response id, from ``response.created`` (None until then)."""
        return self._answer.id

    @property
    def status(self) -> ResponseStatus:
        return self._answer.status

    @property
    def done(self) -> bool:
        return self._answer.done

    @property
    def text(self) -> str:
        """The answer text received so far."""
        return self._answer.text

    @property
    def max_tokens(self) -> int | None:
        return self._answer.max_tokens

    @property
    def error(self) -> RealtimeError | None:
        return self._answer.error

    @property
    def ttft_ms(self) -> float | None:
        return self._answer.ttft_ms

    @property
    def tokens_per_s(self) -> float | None:
        return self._answer.tokens_per_s

    @property
    def status_details(self) -> JSONObject | None:
        details = self._answer.status_details
        return None if details is None else details.encode()

    @property
    def usage(self) -> JSONObject | None:
        usage = self._answer.usage
        return None if usage is None else usage.encode()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends again
            if self._answer.error is not None:
                raise self._answer.error
            raise StopAsyncIteration
        assert isinstance(item, str)
        return item

    async def read(self) -> str:
        """Wait for the end and return the whole answer (raises like iteration does)."""
        async for _ in self:
            pass
        return self.text

    def __await__(self) -> Generator[Any, None, str]:
        return self.read().__await__()

    async def wait(self) -> str:
        """Wait for the end without consuming the deltas; returns the final status (never raises)."""
        await self._ended.wait()
        return self.status

    async def cancel(self) -> None:
        """Stop this answer and wait until the server has let it go; no-op once it has."""
        await self._session._apply(self._session._core.cancel(self._answer))
        await self._released.wait()


class EventStream:
    """What ``session.events()`` returns: a bounded queue of events; the oldest are dropped when full."""

    def __init__(self, session: RemoteSession, size: int) -> None:
        self._session = session
        self._queue: deque[ServerEvent | None] = deque(maxlen=size)
        self._wake = asyncio.Event()
        self.dropped = 0

    def put(self, event: ServerEvent | None) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[ServerEvent]:
        return self

    async def __anext__(self) -> ServerEvent:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        event = self._queue.popleft()
        if event is None:
            self._queue.append(None)
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        self._session._subscriptions.discard(self)
        self.put(None)


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------


class RemoteSession:
    """A realtime session on a server, with the same methods as the embedded ``Session``.

    Make one with :func:`connect`. ``id`` is the server's session id (``session.created``), the id a
    WebRTC call attaches its video to (``POST /v1/realtime/calls?session_id=``). With an ``opener``
    (what `connect` passes) and a ``reconnect`` policy, a lost socket is replaced by a resumed one
    (see the module docstring); ``reconnects`` counts the resumes, ``frames_dropped`` the frames not
    sent meanwhile.
    """

    def __init__(
        self,
        ws: ClientConnection,
        *,
        jpeg_quality: int = 80,
        on_error: Callable[[RealtimeError], None] | None = None,
        opener: Opener | None = None,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        self.jpeg_quality = jpeg_quality
        self.on_error = on_error
        self.frames_dropped = 0
        self._ws = ws
        self._opener = opener
        self._policy = reconnect
        self._closing = False  # close() was called: a lost socket is not replaced
        self._outbox: deque[tuple[str | None, str]] = deque()  # (event_id, text) waiting for a socket
        self._resume_failure: RealtimeError | None = None
        self._core = ClientProtocol()
        self._created: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._responses: dict[Answer, RemoteResponse] = {}
        self._requests: dict[str, asyncio.Future[JSONObject]] = {}
        self._callbacks: list[Callable[[ServerEvent], None]] = []
        self._subscriptions: set[EventStream] = set()
        self._reader = asyncio.create_task(self._read(), name="RemoteSession.reader")

    # -- the embedded Session API ----------------------------------------------------------------

    async def push_frame(self, frame: Any, timestamp: float | None = None) -> None:
        """Send one video frame (H x W x 3 uint8 RGB or ``av.VideoFrame``) as JPEG; ValueError on a bad one.

        ``timestamp`` is in seconds on the caller's clock; the server samples frames to the session's
        ``max_fps``, so pushing faster only costs bandwidth.
        """
        rgb = _rgb(frame)
        if timestamp is not None and (not np.isfinite(timestamp) or timestamp < 0):
            raise ValueError(f"timestamp must be a non-negative number of seconds, got {timestamp}")
        self._core.check_open()
        url = await asyncio.to_thread(_jpeg_data_url, rgb, self.jpeg_quality)
        await self._send(self._core.append_frame(url, timestamp), droppable=True)

    def ask(
        self,
        text: str,
        max_tokens: int | None = None,
        *,
        images: Iterable[Any] = (),
        instructions: str | None = None,
    ) -> RemoteResponse:
        """Add a user turn and start an answer; iterate the returned response for its deltas.

        One answer at a time (like the server): asking while an answer streams raises
        :class:`RealtimeError` ``conversation_already_has_active_response``.
        """
        parts = [_image_part(image) for image in images]
        answer = self._core.ask(text, max_tokens, instructions=instructions)
        response = RemoteResponse(self, answer)
        self._responses[answer] = response
        response._submit = asyncio.create_task(self._submit(answer, parts), name="RemoteSession.ask")
        return response

    async def cancel(self) -> None:
        """Stop the answer in progress and wait for its end (status ``cancelled``); no-op when idle."""
        latest = self._core.latest
        if latest is not None and latest in self._responses:
            await self._responses[latest].cancel()

    def stats(self) -> SessionStats:
        """The server's latest `SessionStats` of this session: the embedded ``Session.stats()``, over
        the wire (refreshed by each ``input_video.stats``). Client-side numbers: `frames_sent`, and
        each response's own ``ttft_ms`` / ``tokens_per_s``."""
        return self._core.stats()

    @property
    def frames_sent(self) -> int:
        """Frames this client sent (``input_video.append``)."""
        return self._core.frames_sent

    async def close(self) -> None:
        """Close the connection (1000: on purpose); the server aborts the session's generation and
        frees its memory at once, without waiting for a resume."""
        self._closing = True
        reconnecting = not self._core.online and self._core.session is not None
        if not self._core.closed:
            await self._apply(self._core.close("closed by the client"))
            await self._ws.close()
        if reconnecting:  # waiting between tries: no need to wait for the next one
            self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> RemoteSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- beyond the embedded API -----------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._core.session_id

    @property
    def session(self) -> JSONObject:
        """The session as the server last reported it (``session.created`` / ``session.updated``)."""
        return self._core.session.encode() if self._core.session is not None else {}

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def close_reason(self) -> str | None:
        return self._core.close_reason

    @property
    def last_error(self) -> RealtimeError | None:
        return self._core.last_error

    @property
    def video_stats(self) -> InputVideoStats | None:
        """The latest ``input_video.stats`` event, typed (``.stats`` is the server's `SessionStats`)."""
        return self._core.video

    async def update(
        self,
        *,
        instructions: str | None = None,
        max_fps: float | None = None,
        schedule: str | None = None,
        max_output_tokens: int | Literal["inf"] | None = None,
        change_filter: Mapping[str, bool | float] | None = None,
        video: Mapping[str, object] | None = None,
        timeout: float = 10.0,
    ) -> JSONObject:
        """``session.update`` with the given fields (``max_fps``, ``schedule`` and ``change_filter``,
        e.g. ``{"enabled": False}``, go into ``video``, as in the embedded ``Session.update``);
        returns the session from ``session.updated``."""
        fields = session_fields(
            instructions=instructions,
            max_output_tokens=max_output_tokens,
            max_fps=max_fps,
            schedule=schedule,
            change_filter=change_filter,
            video=video,
        )
        event = self._core.update(fields)
        assert event.event_id is not None
        future: asyncio.Future[JSONObject] = asyncio.get_running_loop().create_future()
        self._requests[event.event_id] = future
        try:
            await self._send(event)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RealtimeError("timeout", f"no reply to session.update within {timeout} s") from None
        finally:
            self._requests.pop(event.event_id, None)
            self._core.forget(event.event_id)

    def events(self, buffer: int = 1024) -> EventStream:
        """Every server event from now on, typed: ``async for event in session.events()``.

        Ends when the connection closes. A consumer that falls ``buffer`` events behind loses the oldest.
        """
        subscription = EventStream(self, buffer)
        if self._core.closed and self._reader.done():
            subscription.put(None)
        else:
            self._subscriptions.add(subscription)
        return subscription

    def on_event(self, callback: Callable[[ServerEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every server event (on the loop); returns an unsubscribe function."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    async def send_event(self, event: JSONObject) -> None:
        """Send any client event as is (for protocol features this SDK does not wrap)."""
        self._core.check_open()
        event_id = event.get("event_id")
        await self._send_text(
            json.dumps(event, separators=(",", ":")), event_id=event_id if isinstance(event_id, str) else None
        )

    # -- I/O ---------------------------------------------------------------------------------------

    @property
    def reconnects(self) -> int:
        """How many times the session was resumed on a new socket."""
        return self._core.reconnects

    async def _send(self, event: ClientEvent, *, droppable: bool = False) -> None:
        await self._send_text(event.to_json(), droppable=droppable, event_id=event.event_id)

    async def _send_text(self, text: str, *, droppable: bool = False, event_id: str | None = None) -> None:
        """Send now; while reconnecting, drop it (``droppable``: a frame) or hold it in the outbox.
        What went out is remembered by ``event_id``, to be sent again if a resume says it was lost."""
        self._core.check_open()
        if self._core.online:
            try:
                await self._ws.send(text)
                self._core.sent(event_id, None if droppable else text)
                return
            except ConnectionClosed as exc:
                if not self._resumable():
                    raise RealtimeError(
                        "connection_closed", f"the server closed the connection ({exc})"
                    ) from None
        if droppable:
            self.frames_dropped += 1
            return
        if len(self._outbox) >= MAX_OUTBOX:
            raise RealtimeError("connection_closed", f"reconnecting, and {MAX_OUTBOX} events already wait")
        self._outbox.append((event_id, text))

    def _resumable(self, ws: ClientConnection | None = None) -> bool:
        """Whether a lost socket is to be replaced by a resumed one."""
        if self._closing or self._opener is None or self._policy is None:
            return False
        code = (ws or self._ws).close_code
        return self._core.should_reconnect(code)

    async def _reconnect(self) -> bool:
        """Resume the session on a new socket (bounded tries with back-off, within the grace period):
        then the outbox goes out and the reader goes on; False when no resume worked (the reason is in
        ``last_error``)."""
        assert self._opener is not None and self._policy is not None
        self._core.disconnected()
        grace = self._core.resume.grace_s if self._core.resume is not None else None
        for attempt, delay in enumerate(self._policy.delays(grace), 1):
            await asyncio.sleep(delay)
            if self._closing:
                return False
            ws: ClientConnection | None = None
            try:
                async with asyncio.timeout(self._policy.open_timeout):
                    ws = await self._opener(self._core.resume_params())
                    first = await ws.recv()
            except (RealtimeError, ConnectionClosed, TimeoutError, OSError) as exc:
                logger.info("resume attempt %d failed: %s", attempt, exc)
                if ws is not None:
                    await ws.close()
                if isinstance(exc, RealtimeError) and exc.code == "invalid_api_key":
                    self._resume_failure = exc  # the key will not be any better next time
                    return False
                continue
            try:
                payload = json.loads(first)
            except ValueError:
                payload = None
            event = decode_server_event(payload) if isinstance(payload, dict) else None
            if self._closing:  # close() came while this try was under way
                await ws.close()
                return False
            if not isinstance(event, SessionResumed):
                await ws.close()
                if isinstance(event, ErrorEvent) and event.error.code != "engine_unavailable":
                    # refused: the session is gone, or its replay is (an engine restart is worth a retry)
                    self._resume_failure = self._core.last_error = RealtimeError.from_info(event.error)
                    logger.warning("the session could not be resumed: %s", self._resume_failure)
                    return False
                continue
            self._ws = ws
            outputs = self._core.receive(first, time.monotonic())
            resend = self._core.resend_after(event.last_client_event_id)
            if resend is None:
                logger.warning("cannot tell which client events the server missed; none is sent again")
            try:  # offline until these have gone out: sends meanwhile queue behind them
                for text in resend or ():  # sent before the loss, never received
                    await ws.send(text)
                while self._outbox:
                    event_id, text = self._outbox[0]
                    await ws.send(text)
                    self._core.sent(event_id, text)
                    self._outbox.popleft()
            except ConnectionClosed:
                continue  # lost again at once: what is left waits for the next try
            self._core.online = True
            await self._apply(outputs)
            logger.info("session %s resumed after %d attempt(s)", self.id, attempt)
            return True
        self._resume_failure = RealtimeError("connection_failed", "every try to resume the session failed")
        return False

    async def _submit(self, answer: Answer, parts: list[str | np.ndarray]) -> None:
        """Encode the ask's images off the loop, then hand it to the core (which sends or queues it)."""
        urls = [
            part
            if isinstance(part, str)
            else await asyncio.to_thread(_jpeg_data_url, part, self.jpeg_quality)
            for part in parts
        ]
        with contextlib.suppress(RealtimeError):  # the connection is gone: the reader ends the ask
            await self._apply(self._core.submit(answer, urls, time.monotonic()))

    async def _read(self) -> None:
        try:
            while True:
                ws = self._ws
                try:
                    async for message in ws:
                        await self._apply(self._core.receive(message, time.monotonic()))
                except ConnectionClosed:
                    pass
                if not self._resumable(ws) or not await self._reconnect():
                    break
        finally:
            code, why = self._ws.close_code, self._ws.close_reason
            reason = f"code {code} {why or ''}".strip() if code is not None else "connection lost"
            if self._resume_failure is not None:
                reason = f"{reason}; not resumed: {self._resume_failure}"
            self._outbox.clear()
            await self._apply(self._core.close(f"closed by the server ({reason})"))
            if not self._created.done():
                error = RealtimeError(
                    "connection_closed", f"the session is closed ({self._core.close_reason})"
                )
                self._created.set_exception(self._core.last_error or error)
            for subscription in self._subscriptions:
                subscription.put(None)
            self._subscriptions.clear()

    async def _apply(self, outputs: list[Output]) -> None:
        """Carry out the core's outputs, in order."""
        for out in outputs:
            if isinstance(out, Send):
                with contextlib.suppress(RealtimeError):  # closed: the server has dropped it already
                    await self._send(out.event)
            elif isinstance(out, Delta):
                self._responses[out.answer]._queue.put_nowait(out.text)
            elif isinstance(out, AnswerEnded):
                response = self._responses[out.answer]
                response._ended.set()
                response._queue.put_nowait(_END)
            elif isinstance(out, AnswerReleased):
                self._responses.pop(out.answer)._released.set()
            elif isinstance(out, Reply):
                future = self._requests.get(out.event_id)
                if future is not None and not future.done():
                    if isinstance(out.result, RealtimeError):
                        future.set_exception(out.result)
                    else:
                        future.set_result(out.result.session.encode())
            elif isinstance(out, Unclaimed):
                if self.on_error is not None:
                    self.on_error(out.error)
                else:
                    logger.warning("server error: %s", out.error)
            else:
                self._publish(out)

    def _publish(self, event: ServerEvent) -> None:
        if isinstance(event, SessionCreated) and not self._created.done():
            self._created.set_result(None)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("event callback failed")
        for subscription in self._subscriptions:
            subscription.put(event)


class _Connector:
    """What :func:`connect` returns: ``await`` it or use it as ``async with``."""

    def __init__(self, url: str, api_key: str | None, options: dict[str, Any]) -> None:
        self.url = realtime_url(url)
        self.api_key = api_key if api_key is not None else os.environ.get("SPEAKWATCH_API_KEY") or None
        self.options = options
        self.session: RemoteSession | None = None

    def __await__(self) -> Generator[Any, None, RemoteSession]:
        return self._open().__await__()

    async def __aenter__(self) -> RemoteSession:
        self.session = await self._open()
        return self.session

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def _socket(self, params: Mapping[str, str] | None = None) -> ClientConnection:
        """A WebSocket to the server (``params``: extra query parameters, the resume token's)."""
        opts = self.options
        url = self.url
        if params:
            url += ("&" if urlsplit(url).query else "?") + urlencode(dict(params))
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            return await ws_connect(
                url,
                additional_headers=headers,
                open_timeout=opts["open_timeout"],
                max_size=opts["max_message_size"],
                compression=None,  # JPEG frames do not compress; text events are small
                ping_interval=opts["ping_interval"],
                close_timeout=CLOSE_TIMEOUT_S,
                user_agent_header="speakwatch-client",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            code = "invalid_api_key" if status in (401, 403) else "connection_failed"
            body = exc.response.body.decode("utf-8", "replace").strip()[:200] if exc.response.body else ""
            raise RealtimeError(code, f"HTTP {status} from {self.url} {body}".strip()) from None
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise RealtimeError("connection_failed", f"cannot connect to {self.url}: {exc}") from None

    async def _open(self) -> RemoteSession:
        opts = dict(self.options)
        timeout: float = opts.pop("open_timeout")
        ws = await self._socket()
        for socket_option in ("max_message_size", "ping_interval"):
            opts.pop(socket_option)
        update = {k: opts.pop(k) for k in ("instructions", "max_output_tokens", "video") if k in opts}
        session = RemoteSession(ws, **opts, opener=self._socket)
        try:
            async with asyncio.timeout(timeout):
                await session._created
            if any(v is not None for v in update.values()):
                await session.update(**update, timeout=timeout)
        except BaseException as exc:
            await session.close()
            if isinstance(exc, TimeoutError):
                raise RealtimeError("timeout", f"no session.created from {self.url} in {timeout} s") from None
            raise
        return session


def connect(
    url: str,
    api_key: str | None = None,
    *,
    instructions: str | None = None,
    max_output_tokens: int | Literal["inf"] | None = None,
    video: Mapping[str, float | str] | None = None,
    jpeg_quality: int = 80,
    on_error: Callable[[RealtimeError], None] | None = None,
    open_timeout: float = 10.0,
    ping_interval: float | None = 20.0,
    max_message_size: int = 16 * 1024 * 1024,
    reconnect: ReconnectPolicy | None = DEFAULT_RECONNECT,
) -> _Connector:
    """Open a realtime session: ``async with connect(url) as session`` or ``session = await connect(url)``.

    ``url`` is ``ws://host:port/v1/realtime`` (``http://host:port`` works too). ``api_key`` defaults
    to ``$SPEAKWATCH_API_KEY`` and is sent as ``Authorization: Bearer``. ``instructions``,
    ``max_output_tokens`` and ``video`` (max_fps, schedule) go in one ``session.update``
    before the session is handed out. ``on_error`` gets server errors no ``ask`` is waiting for
    (e.g. a rejected frame); without it they are logged. Connection problems raise
    :class:`RealtimeError` (``connection_failed``, ``invalid_api_key``, ``timeout``, or the server's
    own error such as ``session_limit_reached``). ``reconnect`` is how a lost socket is replaced by a
    resumed session (``None``: never; the session then ends with its socket).
    """
    options: dict[str, Any] = {
        "reconnect": reconnect,
        "jpeg_quality": jpeg_quality,
        "on_error": on_error,
        "open_timeout": open_timeout,
        "ping_interval": ping_interval,
        "max_message_size": max_message_size,
    }
    if instructions is not None:
        options["instructions"] = instructions
    if max_output_tokens is not None:
        options["max_output_tokens"] = max_output_tokens
    if video is not None:
        options["video"] = video
    return _Connector(url, api_key, options)


# ---------------------------------------------------------------------------------------------
# Synchronous wrapper
# ---------------------------------------------------------------------------------------------


class SyncResponse:
    """A blocking iterator of answer deltas; ``id``/``status``/``usage`` like :class:`RemoteResponse`."""

    def __init__(self, owner: SyncSession, response: RemoteResponse) -> None:
        self._owner = owner
        self.response = response

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return self._owner._call(self.response.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def read(self) -> str:
        return self._owner._call(self.response.read())

    def cancel(self) -> None:
        self._owner._call(self.response.cancel())

    def __getattr__(self, name: str) -> Any:  # id, status, usage, text, ttft_ms, tokens_per_s, error
        return getattr(self.response, name)


class SyncSession:
    """The remote session for code without asyncio: a private event loop runs in a daemon thread.

    ``ask`` blocks and returns the whole answer; ``stream`` returns an iterator of deltas. Ctrl-C
    while waiting cancels the answer before the ``KeyboardInterrupt`` propagates.
    """

    def __init__(self, url: str, api_key: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="speakwatch-client", daemon=True)
        self._thread.start()
        self.last_response: RemoteResponse | None = None
        try:
            self.session: RemoteSession = self._call(_await(connect(url, api_key, **options)))
        except BaseException:
            self._stop()
            raise

    @property
    def id(self) -> str:
        return self.session.id

    def push_frame(self, frame: Any, timestamp: float | None = None) -> None:
        self._call(self.session.push_frame(frame, timestamp))

    def ask(
        self,
        text: str,
        max_tokens: int | None = None,
        *,
        images: Iterable[Any] = (),
        instructions: str | None = None,
    ) -> str:
        """Ask and wait for the whole answer; the response itself is kept in ``last_response``."""
        stream = self.stream(text, max_tokens, images=images, instructions=instructions)
        try:
            return stream.read()
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self._call(stream.response.cancel(), timeout=5.0)
            raise

    def stream(
        self,
        text: str,
        max_tokens: int | None = None,
        *,
        images: Iterable[Any] = (),
        instructions: str | None = None,
    ) -> SyncResponse:
        """Ask and iterate the answer's deltas as they arrive."""

        async def start() -> RemoteResponse:
            return self.session.ask(text, max_tokens, images=images, instructions=instructions)

        self.last_response = self._call(start())
        return SyncResponse(self, self.last_response)

    def cancel(self) -> None:
        self._call(self.session.cancel())

    def stats(self) -> SessionStats:
        return self.session.stats()

    @property
    def frames_sent(self) -> int:
        return self.session.frames_sent

    def update(self, **fields: Any) -> JSONObject:
        return self._call(self.session.update(**fields))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._thread.is_alive():
                self._call(self.session.close(), timeout=10.0)
        finally:
            self._stop()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(_await(coro), self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self._loop.close()


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def connect_sync(url: str, api_key: str | None = None, **options: Any) -> SyncSession:
    """A blocking :class:`SyncSession` (same options as :func:`connect`); use it as ``with``."""
    return SyncSession(url, api_key, **options)
