"""Remote SDK: the embedded ``Session`` API over the realtime WebSocket of a speakwatch server.

::

    async with client.connect("ws://127.0.0.1:8000/v1/realtime") as session:
        await session.push_frame(rgb)                  # H x W x 3 uint8, sent as JPEG (input_video.append)
        async for delta in session.ask("What do you see?"):
            print(delta, end="")
        print(session.stats())                         # server video stats + client-side TTFT, tokens/s

The wire protocol is the OpenAI Realtime API (GA event names, text output) plus ``input_video.*``
extensions; see design/protocol.md. One reader task turns server JSON into typed :class:`Event`
objects and routes them: answer deltas to the active :class:`RemoteResponse`, errors caused by an
``ask`` into that ask (raised as :class:`RealtimeError`), everything to ``events()`` subscribers.
:class:`SyncSession` (``connect_sync``) runs the same session on a loop in a background thread.
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
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

__all__ = [
    "ConversationItem",
    "ErrorEvent",
    "Event",
    "EventStream",
    "OutputTextDelta",
    "OutputTextDone",
    "RealtimeError",
    "RemoteResponse",
    "RemoteSession",
    "ResponseCreated",
    "ResponseDone",
    "SessionCreated",
    "SessionUpdated",
    "SyncResponse",
    "SyncSession",
    "VideoStats",
    "connect",
    "connect_sync",
    "parse_event",
    "realtime_url",
]

logger = logging.getLogger(__name__)


class RealtimeError(Exception):
    """An ``error`` event from the server (or a failed connection), raised where the caller waits.

    ``code`` is the server's error code (``invalid_value``, ``engine_unavailable``, ...) or one of the
    client's own: ``connection_closed``, ``connection_failed``, ``invalid_api_key``, ``timeout``.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.type = type
        self.param = param
        self.event_id = event_id

    @classmethod
    def from_error(cls, error: dict[str, Any]) -> RealtimeError:
        """From the ``error`` object of an ``error`` event (or of a failed response's details)."""
        return cls(
            str(error.get("code") or "server_error"),
            str(error.get("message") or "unknown error"),
            type=str(error.get("type") or "server_error"),
            param=error.get("param"),
            event_id=error.get("event_id"),
        )


@dataclass(frozen=True)
class Event:
    """Any server event; subclasses add typed fields. ``raw`` is the JSON object as received."""

    type: str
    event_id: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    kinds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        return cls(str(raw.get("type")), raw.get("event_id"), raw)


@dataclass(frozen=True)
class SessionCreated(Event):
    """Always the first event; ``session["id"]`` is what a WebRTC call attaches to."""

    session: dict[str, Any] = field(default_factory=dict)
    kinds: ClassVar[tuple[str, ...]] = ("session.created",)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        return cls(raw["type"], raw.get("event_id"), raw, dict(raw.get("session") or {}))


@dataclass(frozen=True)
class SessionUpdated(SessionCreated):
    kinds: ClassVar[tuple[str, ...]] = ("session.updated",)


@dataclass(frozen=True)
class ConversationItem(Event):
    """``conversation.item.added`` / ``conversation.item.done`` (user turns and the answer item)."""

    item: dict[str, Any] = field(default_factory=dict)
    previous_item_id: str | None = None
    kinds: ClassVar[tuple[str, ...]] = ("conversation.item.added", "conversation.item.done")

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        return cls(
            raw["type"], raw.get("event_id"), raw, dict(raw.get("item") or {}), raw.get("previous_item_id")
        )


@dataclass(frozen=True)
class ResponseCreated(Event):
    response_id: str = ""
    kinds: ClassVar[tuple[str, ...]] = ("response.created",)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        return cls(raw["type"], raw.get("event_id"), raw, str((raw.get("response") or {}).get("id", "")))


@dataclass(frozen=True)
class OutputTextDelta(Event):
    response_id: str = ""
    item_id: str = ""
    delta: str = ""
    kinds: ClassVar[tuple[str, ...]] = ("response.output_text.delta",)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        return cls(
            raw["type"],
            raw.get("event_id"),
            raw,
            str(raw.get("response_id", "")),
            str(raw.get("item_id", "")),
            str(raw.get("delta", "")),
        )


@dataclass(frozen=True)
class OutputTextDone(Event):
    response_id: str = ""
    item_id: str = ""
    text: str = ""
    kinds: ClassVar[tuple[str, ...]] = ("response.output_text.done",)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        return cls(
            raw["type"],
            raw.get("event_id"),
            raw,
            str(raw.get("response_id", "")),
            str(raw.get("item_id", "")),
            str(raw.get("text", "")),
        )


@dataclass(frozen=True)
class ResponseDone(Event):
    """The end of a response: ``status`` is completed, cancelled, failed or incomplete."""

    response_id: str = ""
    status: str = ""
    status_details: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    kinds: ClassVar[tuple[str, ...]] = ("response.done",)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        response = raw.get("response") or {}
        return cls(
            raw["type"],
            raw.get("event_id"),
            raw,
            str(response.get("id", "")),
            str(response.get("status", "")),
            response.get("status_details"),
            response.get("usage"),
        )

    @property
    def text(self) -> str:
        """The answer text, from the response's output item."""
        parts = []
        for item in (self.raw.get("response") or {}).get("output") or []:
            for part in item.get("content") or []:
                if part.get("type") in ("output_text", "text"):
                    parts.append(part.get("text") or "")
        return "".join(parts)


@dataclass(frozen=True)
class ErrorEvent(Event):
    """An ``error`` event; ``client_event_id`` names the client event that caused it, if any."""

    code: str = ""
    message: str = ""
    error_type: str = ""
    param: str | None = None
    client_event_id: str | None = None
    kinds: ClassVar[tuple[str, ...]] = ("error",)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        error = raw.get("error") or {}
        return cls(
            raw["type"],
            raw.get("event_id"),
            raw,
            str(error.get("code") or ""),
            str(error.get("message") or ""),
            str(error.get("type") or ""),
            error.get("param"),
            error.get("event_id"),
        )

    def exception(self) -> RealtimeError:
        return RealtimeError.from_error(self.raw.get("error") or {})


@dataclass(frozen=True)
class VideoStats(Event):
    """``input_video.stats``: the server's view of this session's video (extra keys stay in ``raw``)."""

    received: int = 0
    sampled: int = 0
    ingested: int = 0
    dropped: int = 0
    frame_lag_ms: float | None = None
    fps: float = 0.0
    positions: str | None = None
    rollovers: int = 0
    kinds: ClassVar[tuple[str, ...]] = ("input_video.stats",)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Event:
        return cls(
            raw["type"],
            raw.get("event_id"),
            raw,
            int(raw.get("received") or 0),
            int(raw.get("sampled") or 0),
            int(raw.get("ingested") or 0),
            int(raw.get("dropped") or 0),
            raw.get("frame_lag_ms"),
            float(raw.get("fps") or 0.0),
            raw.get("positions"),
            int(raw.get("rollovers") or 0),
        )

    def stats(self) -> dict[str, Any]:
        """The counters under the embedded SDK's key names (``frames_received``, ...), extras as sent."""
        renamed = {
            "received": "frames_received",
            "sampled": "frames_sampled",
            "ingested": "frames_ingested",
            "dropped": "frames_dropped",
            "frame_lag_ms": "frame_lag_p50_ms",
            "dropped_by_reason": "frames_dropped_by_reason",
        }
        return {renamed.get(k, k): v for k, v in self.raw.items() if k not in ("type", "event_id")}


_CLASSES: dict[str, type[Event]] = {
    kind: cls
    for cls in (
        SessionCreated,
        SessionUpdated,
        ConversationItem,
        ResponseCreated,
        OutputTextDelta,
        OutputTextDone,
        ResponseDone,
        ErrorEvent,
        VideoStats,
    )
    for kind in cls.kinds
}


def parse_event(raw: dict[str, Any]) -> Event:
    """The typed event for one server JSON object; unknown or malformed ones become a plain ``Event``."""
    cls = _CLASSES.get(str(raw.get("type")), Event)
    try:
        return cls.parse(raw)
    except (TypeError, ValueError, AttributeError):
        return Event.parse(raw)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")
_DONE = object()  # end of a response's delta queue


def realtime_url(url: str) -> str:
    """``ws(s)://`` URL of the realtime endpoint; ``http(s)://host:port`` alone means ``/v1/realtime``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use ws://, wss://, http:// or https://")
    path = parts.path if parts.path not in ("", "/") else "/v1/realtime"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


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
    """An ``ask`` image checked at once: a data URL (from a data URL, JPEG/PNG bytes) or an RGB array
    (from an array, a PIL image or a frame) that still has to be encoded, off the loop."""
    if isinstance(image, str):
        if not image.startswith("data:"):
            raise ValueError("image strings must be data URLs (data:image/jpeg;base64,...)")
        return image
    if isinstance(image, bytes | bytearray):
        raw = bytes(image)
        if raw.startswith(b"\xff\xd8\xff"):
            mime = "image/jpeg"
        elif raw.startswith(b"\x89PNG\r\n\x1a\n"):
            mime = "image/png"
        else:
            raise ValueError("image bytes must be a JPEG or PNG file")
        return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return _rgb(image)


def _new_event_id() -> str:
    return f"event_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


class RemoteResponse:
    """One answer: ``async for delta in response``; ``id``, ``status``, ``usage`` are set by the end.

    The iteration ends at ``response.done``: normally for completed, cancelled and incomplete answers,
    with :class:`RealtimeError` for failed ones and for errors the server reports for this ask.
    """

    def __init__(
        self, session: RemoteSession, item_event_id: str, create_event_id: str, max_tokens: int | None
    ) -> None:
        self.id: str | None = None  # the server's response id, from response.created
        self.max_tokens = max_tokens
        self.status: str = "in_progress"
        self.status_details: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.error: RealtimeError | None = None
        self._server_error: RealtimeError | None = None
        self.ttft_ms: float | None = None
        self.tokens_per_s: float | None = None
        self._session = session
        self._item_event_id = item_event_id  # conversation.item.create: an error means no user turn
        self._create_event_id = create_event_id  # response.create: an error means no response at all
        self._parts: list[str] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sent_at: float | None = None
        self._first_at: float | None = None
        self._last_at: float | None = None
        self._finished = False  # the caller has seen (or will see) the end
        self._ended = asyncio.Event()
        self._server_done = asyncio.Event()  # the server holds no active response for this ask any more
        self._send_task: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        """The answer text received so far."""
        return "".join(self._parts)

    @property
    def done(self) -> bool:
        return self._finished

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _DONE:
            self._queue.put_nowait(_DONE)  # iterating again ends again
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
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
        """Stop this answer and wait for its end (status ``cancelled``); no-op once it has ended."""
        await self._session._cancel(self)

    # -- fed by the session ------------------------------------------------------------------------

    def _delta(self, delta: str) -> None:
        if self._finished:
            return
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
            if self._sent_at is not None:
                self.ttft_ms = (now - self._sent_at) * 1000.0
        self._last_at = now
        self._parts.append(delta)
        self._queue.put_nowait(delta)

    def _done(self, event: ResponseDone) -> None:
        self._server_done.set()
        if self._finished:
            return
        self.id = self.id or event.response_id
        self.status = event.status
        self.status_details = event.status_details
        self.usage = event.usage
        tokens = int((event.usage or {}).get("output_tokens") or len(self._parts))
        if self._first_at is not None and self._last_at is not None and tokens > 1:
            elapsed = self._last_at - self._first_at
            self.tokens_per_s = (tokens - 1) / elapsed if elapsed > 0 else None
        if event.status == "failed":
            error = (event.status_details or {}).get("error") or {}
            self.error = self._server_error or RealtimeError.from_error({"code": "response_failed", **error})
        self._end()

    def _fail(self, error: RealtimeError) -> None:
        if self._finished:
            return
        self.status = "failed"
        self.error = error
        self._end()

    def _end(self) -> None:
        self._finished = True
        self._ended.set()
        self._queue.put_nowait(_DONE)


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------


class EventStream:
    """What ``session.events()`` returns: a bounded queue of events; the oldest are dropped when full."""

    def __init__(self, session: RemoteSession, size: int) -> None:
        self._session = session
        self._queue: deque[Event | None] = deque(maxlen=size)
        self._wake = asyncio.Event()
        self.dropped = 0

    def put(self, event: Event | None) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
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


class RemoteSession:
    """A realtime session on a server, with the same methods as the embedded ``Session``.

    Make one with :func:`connect`. ``id`` is the server's session id (``session.created``), the id a
    WebRTC call attaches its video to (``POST /v1/realtime/calls?session_id=``).
    """

    def __init__(
        self,
        ws: ClientConnection,
        *,
        jpeg_quality: int = 80,
        on_error: Callable[[RealtimeError], None] | None = None,
    ) -> None:
        self.id: str = ""
        self.session: dict[str, Any] = {}
        self.jpeg_quality = jpeg_quality
        self.on_error = on_error
        self.last_error: RealtimeError | None = None
        self._ws = ws
        self._created: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        self._waiters: dict[str, asyncio.Future[Event]] = {}  # client event id -> its reply
        self._active: RemoteResponse | None = None  # the latest ask
        self._inflight: RemoteResponse | None = None  # the ask whose response the server is running
        self._last: RemoteResponse | None = None
        self._cancels: dict[str, RemoteResponse] = {}  # response.cancel event id -> its ask
        self._tasks: set[asyncio.Task[None]] = set()
        self._video: VideoStats | None = None
        self._frames_sent = 0
        self._callbacks: list[Callable[[Event], None]] = []
        self._subscriptions: set[EventStream] = set()
        self._closed = False
        self.close_reason: str | None = None
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
        url = await asyncio.to_thread(_jpeg_data_url, rgb, self.jpeg_quality)
        event: dict[str, Any] = {"type": "input_video.append", "event_id": _new_event_id(), "image": url}
        if timestamp is not None:
            event["timestamp_ms"] = timestamp * 1000.0
        await self._send(event)
        self._frames_sent += 1

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
        if self._closed:
            raise RealtimeError("connection_closed", f"the session is closed ({self.close_reason})")
        if self._active is not None and not self._active.done:
            raise RealtimeError(
                "conversation_already_has_active_response",
                "an answer is still streaming: cancel it or wait for its end",
            )
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        content: list[Any] = [{"type": "input_text", "text": text}, *(_image_part(i) for i in images)]
        params: dict[str, Any] = {}
        if max_tokens is not None:
            params["max_output_tokens"] = max_tokens
        if instructions is not None:
            params["instructions"] = instructions
        item = {"type": "conversation.item.create", "event_id": _new_event_id()}
        item["item"] = {"type": "message", "role": "user", "content": content}
        create = {"type": "response.create", "event_id": _new_event_id(), "response": params}
        previous = self._active
        response = RemoteResponse(self, item["event_id"], create["event_id"], max_tokens)
        self._active = self._last = response
        response._send_task = asyncio.create_task(self._send_ask(response, previous, item, create))
        return response

    async def cancel(self) -> None:
        """Stop the answer in progress and wait for its end (status ``cancelled``); no-op when idle."""
        if self._active is not None:
            await self._cancel(self._active)

    def stats(self) -> dict[str, Any]:
        """The latest ``input_video.stats`` (as ``frames_received``, ``frames_ingested``,
        ``frame_lag_p50_ms``, ...) plus ``frames_sent`` and the last answer's client-side ``ttft_ms``,
        ``tokens_per_s`` and ``output_tokens`` (the server's own are ``server_ttft_ms``, ...)."""
        out: dict[str, Any] = self._video.stats() if self._video is not None else {}
        for key in ("ttft_ms", "tokens_per_s"):  # the server's own measurement, kept under another name
            if key in out:
                out[f"server_{key}"] = out.pop(key)
        last = self._last
        out["session_id"] = self.id
        out["frames_sent"] = self._frames_sent
        out["ttft_ms"] = last.ttft_ms if last is not None else None
        out["tokens_per_s"] = last.tokens_per_s if last is not None else None
        out["output_tokens"] = (last.usage or {}).get("output_tokens") if last is not None else None
        return out

    async def close(self) -> None:
        """Close the connection; the server aborts the session's generation and frees its memory."""
        if not self._closed:
            self._closed = True
            self.close_reason = self.close_reason or "closed by the client"
            await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> RemoteSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- beyond the embedded API -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def video_stats(self) -> VideoStats | None:
        """The latest ``input_video.stats`` event, typed."""
        return self._video

    async def update(
        self,
        *,
        instructions: str | None = None,
        max_fps: float | None = None,
        schedule: str | None = None,
        max_output_tokens: int | str | None = None,
        video: dict[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """``session.update`` with the given fields (``max_fps``/``schedule`` go into ``video``, as in the
        embedded ``Session.update``); returns the session from ``session.updated``."""
        session: dict[str, Any] = {"type": "realtime"}
        if instructions is not None:
            session["instructions"] = instructions
        if max_output_tokens is not None:
            session["max_output_tokens"] = max_output_tokens
        video = dict(video or {})
        if max_fps is not None:
            video["max_fps"] = max_fps
        if schedule is not None:
            video["schedule"] = schedule
        if video:
            session["video"] = video
        event = await self._request({"type": "session.update", "session": session}, timeout)
        assert isinstance(event, SessionUpdated)
        return event.session

    def events(self, buffer: int = 1024) -> EventStream:
        """Every server event from now on, typed: ``async for event in session.events()``.

        Ends when the connection closes. A consumer that falls ``buffer`` events behind loses the oldest.
        """
        subscription = EventStream(self, buffer)
        if self._closed and self._reader.done():
            subscription.put(None)
        else:
            self._subscriptions.add(subscription)
        return subscription

    def on_event(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every server event (on the loop); returns an unsubscribe function."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    async def send_event(self, event: dict[str, Any]) -> None:
        """Send any client event as is (for protocol features this SDK does not wrap)."""
        await self._send(event)

    # -- internals -------------------------------------------------------------------------------

    async def _send(self, event: dict[str, Any]) -> None:
        if self._closed:
            raise RealtimeError("connection_closed", f"the session is closed ({self.close_reason})")
        try:
            await self._ws.send(json.dumps(event, separators=(",", ":")))
        except ConnectionClosed as exc:
            raise RealtimeError("connection_closed", f"the server closed the connection ({exc})") from None

    async def _request(self, event: dict[str, Any], timeout: float) -> Event:
        """Send an event and wait for its reply (``session.updated``) or its ``error``."""
        event_id = event.setdefault("event_id", _new_event_id())
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters[event_id] = future
        try:
            await self._send(event)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RealtimeError("timeout", f"no reply to {event['type']} within {timeout} s") from None
        finally:
            self._waiters.pop(event_id, None)

    async def _send_ask(
        self,
        response: RemoteResponse,
        previous: RemoteResponse | None,
        item: dict[str, Any],
        create: dict[str, Any],
    ) -> None:
        try:
            if previous is not None:  # ended for the caller; wait until the server has let it go too
                await previous._server_done.wait()
            content = item["item"]["content"]
            for index, part in enumerate(content):  # images: encoded here, off the loop
                if isinstance(part, np.ndarray):
                    part = await asyncio.to_thread(_jpeg_data_url, part, self.jpeg_quality)
                if isinstance(part, str):
                    content[index] = {"type": "input_image", "image_url": part}
            response._sent_at = time.monotonic()
            self._inflight = response
            await self._send(item)
            await self._send(create)
        except RealtimeError as exc:
            response._fail(exc)
            self._release(response)

    async def _cancel(self, response: RemoteResponse) -> None:
        if response._send_task is not None:
            await response._send_task
        if response._server_done.is_set():
            return
        event: dict[str, Any] = {"type": "response.cancel", "event_id": _new_event_id()}
        if response.id is not None:
            event["response_id"] = response.id
        self._cancels[event["event_id"]] = response
        with contextlib.suppress(RealtimeError):  # closed: the server has aborted it already
            await self._send(event)
        await response._server_done.wait()  # response.done, an error, or the connection's end

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                try:
                    raw = json.loads(message)
                except ValueError:
                    logger.warning("ignoring a server message that is not JSON")
                    continue
                if isinstance(raw, dict):
                    self._dispatch(parse_event(raw))
        except ConnectionClosed:
            pass
        finally:
            self._on_closed()

    def _on_closed(self) -> None:
        code, why = self._ws.close_code, self._ws.close_reason
        reason = f"code {code} {why or ''}".strip() if code is not None else "connection lost"
        if not self._closed:
            self._closed = True
            self.close_reason = f"closed by the server ({reason})"
        error = RealtimeError("connection_closed", f"the session is closed ({self.close_reason})")
        if not self._created.done():
            self._created.set_exception(self.last_error or error)
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        for response in (self._active, self._inflight):
            if response is not None:
                response._fail(error)
                self._release(response)
        for subscription in self._subscriptions:
            subscription.put(None)
        self._subscriptions.clear()

    def _release(self, response: RemoteResponse) -> None:
        """The server holds no response for this ask any more: the next ask may go."""
        response._server_done.set()
        if self._inflight is response:
            self._inflight = None

    def _dispatch(self, event: Event) -> None:
        active = self._inflight
        if isinstance(event, SessionCreated) and not isinstance(event, SessionUpdated):
            self.id = str(event.session.get("id", ""))
            self.session = event.session
            if not self._created.done():
                self._created.set_result(event)
        elif isinstance(event, SessionUpdated):
            self.session = event.session
            self._reply(event)
        elif isinstance(event, ResponseCreated):
            if active is not None and active.id is None:
                active.id = event.response_id
        elif isinstance(event, OutputTextDelta):
            if active is not None and active.id in (None, event.response_id):
                active._delta(event.delta)
        elif isinstance(event, ResponseDone):
            if active is not None and active.id in (None, event.response_id):
                active._done(event)
                self._release(active)
        elif isinstance(event, VideoStats):
            self._video = event
        elif isinstance(event, ErrorEvent):
            self._on_error(event, active)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("event callback failed")
        for subscription in self._subscriptions:
            subscription.put(event)

    def _reply(self, event: Event) -> None:
        """Resolve the oldest ``_request`` waiter (replies come in order)."""
        for future in self._waiters.values():
            if not future.done():
                future.set_result(event)
                return

    def _on_error(self, event: ErrorEvent, active: RemoteResponse | None) -> None:
        error = event.exception()
        cause = event.client_event_id
        if cause is not None and cause in self._waiters:
            if not self._waiters[cause].done():
                self._waiters[cause].set_exception(error)
            return
        if cause is not None and cause in self._cancels:
            cancelled = self._cancels.pop(cause)
            if event.code == "response_cancel_not_active":
                self._release(cancelled)  # nothing left to cancel: the server holds no response
            return
        if active is not None and cause in (active._item_event_id, active._create_event_id):
            active._fail(error)
            if cause == active._create_event_id:
                self._release(active)  # the response was never created
            else:  # the user turn was rejected: stop the answer the response.create has started
                task = asyncio.get_running_loop().create_task(self._cancel(active))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        self.last_error = error
        if not self._created.done():  # e.g. session_limit_reached before the connection closes
            return
        if cause is None and active is not None and event.error_type == "server_error":
            # The engine failed the answer the server is running; response.done (failed) follows and
            # raises it in the ask, unless the caller has already had an error for that ask.
            if not active.done:
                active._server_error = error
            return
        if self.on_error is not None:
            self.on_error(error)
        else:
            logger.warning("server error: %s", error)


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

    async def _open(self) -> RemoteSession:
        opts = dict(self.options)
        timeout: float = opts.pop("open_timeout")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            ws = await ws_connect(
                self.url,
                additional_headers=headers,
                open_timeout=timeout,
                max_size=opts.pop("max_message_size"),
                compression=None,  # JPEG frames do not compress; text events are small
                ping_interval=opts.pop("ping_interval"),
                user_agent_header="speakwatch-client",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            code = "invalid_api_key" if status in (401, 403) else "connection_failed"
            body = exc.response.body.decode("utf-8", "replace").strip()[:200] if exc.response.body else ""
            raise RealtimeError(code, f"HTTP {status} from {self.url} {body}".strip()) from None
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise RealtimeError("connection_failed", f"cannot connect to {self.url}: {exc}") from None
        update = {k: opts.pop(k) for k in ("instructions", "max_output_tokens", "video") if k in opts}
        session = RemoteSession(ws, **opts)
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
    max_output_tokens: int | str | None = None,
    video: dict[str, Any] | None = None,
    jpeg_quality: int = 80,
    on_error: Callable[[RealtimeError], None] | None = None,
    open_timeout: float = 10.0,
    ping_interval: float | None = 20.0,
    max_message_size: int = 16 * 1024 * 1024,
) -> _Connector:
    """Open a realtime session: ``async with connect(url) as session`` or ``session = await connect(url)``.

    ``url`` is ``ws://host:port/v1/realtime`` (``http://host:port`` works too). ``api_key`` defaults
    to ``$SPEAKWATCH_API_KEY`` and is sent as ``Authorization: Bearer``. ``instructions``,
    ``max_output_tokens`` and ``video`` (max_fps, schedule, window, ...) go in one ``session.update``
    before the session is handed out. ``on_error`` gets server errors no ``ask`` is waiting for
    (e.g. a rejected frame); without it they are logged. Connection problems raise
    :class:`RealtimeError` (``connection_failed``, ``invalid_api_key``, ``timeout``, or the server's
    own error such as ``session_limit_reached``).
    """
    options: dict[str, Any] = {
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

    def stats(self) -> dict[str, Any]:
        return self.session.stats()

    def update(self, **fields: Any) -> dict[str, Any]:
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
