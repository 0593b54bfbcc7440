"""Sans-I/O core of the realtime wire protocol (OpenAI Realtime GA events, text output, video extensions).

The core is a pure state machine in the style of h11/websockets: the transport feeds it one client
message at a time (``receive``) and the session runtime reports how a response streams
(``text_delta``, ``response_finished``, ...); every call returns a list of outputs, which are either
``ServerEvent`` (a JSON-ready payload the transport sends) or an ``Action`` (something the app must
do: update the session, add a user message, ingest a frame, start or cancel a generation).
Nothing here touches sockets, asyncio, clocks or image decoders, so every transport (WebSocket,
WebRTC data channel) and the tests share one implementation of validation, ids and event order.

Rules the implementation follows (see design/protocol.md):
- Within one returned list, actions come before server events: the app applies a change before the
  client is told about it.
- A bad client event yields exactly one ``error`` event and changes no state; it never closes the
  session.
- Unknown keys are ignored (forward compatibility with newer clients); known keys with a wrong type
  or value are rejected with ``invalid_value`` and ``param`` naming the field path.
- One response at a time: ``response.create`` while one is active is an error
  (``conversation_already_has_active_response``), not queued.
- ``response.created`` and the opening events of the assistant item are emitted at once, together
  with the ``StartResponse`` action; the app never has to announce that generation started, it only
  reports deltas and the end (``response_finished``), also for failures to start.
"""

from __future__ import annotations

import binascii
import json
import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, TypeAlias

__all__ = [
    "DEFAULT_VIDEO",
    "Action",
    "AddUserMessage",
    "AppendFrame",
    "CancelResponse",
    "Limits",
    "Output",
    "RealtimeProtocol",
    "ServerEvent",
    "SessionConfig",
    "StartResponse",
    "UpdateSession",
    "default_id",
    "error_event",
    "session_limit_reached",
]

ResponseStatus = Literal["completed", "cancelled", "failed", "incomplete"]
IdFactory = Callable[[str], str]

SCHEDULES = ("parallel", "sequential")
IMAGE_MIME_TYPES = ("image/jpeg", "image/jpg", "image/png")
IMAGE_DETAILS = ("auto", "low", "high")
DEFAULT_VIDEO: Mapping[str, Any] = {"max_fps": 2.0, "schedule": "parallel", "window": 16}


# ---------------------------------------------------------------------------------------------
# Values that cross the boundary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Explicit, configurable bounds; a client can never make the server exceed them."""

    max_message_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 1920 * 1080  # checked by the app after decoding (see image_rejected)
    max_image_bytes: int = 6 * 1024 * 1024  # decoded bytes, checked here
    max_instructions_chars: int = 32_000
    max_output_tokens: int = 4096
    max_video_fps: float = 30.0  # upper bound for session.video.max_fps
    max_conversation_items: int = 1000  # items remembered for ids/order; older ones are forgotten


@dataclass(frozen=True)
class SessionConfig:
    """What ``session.update`` can change. ``video`` always holds max_fps, schedule, window, positions.

    ``max_output_tokens=None`` means "as many as the server allows" (``Limits.max_output_tokens``),
    which is also what a client's ``"inf"`` becomes.
    """

    instructions: str | None = None
    max_output_tokens: int | None = None
    video: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_VIDEO))


@dataclass(frozen=True)
class ServerEvent:
    """One server event, ready for ``json.dumps``; wrapped so transports can tell it from actions."""

    payload: dict[str, Any]

    @property
    def type(self) -> str:
        return self.payload["type"]

    def to_json(self) -> str:
        return json.dumps(self.payload, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class UpdateSession:
    """Apply this (complete, merged) session configuration from now on."""

    config: SessionConfig


@dataclass(frozen=True)
class AddUserMessage:
    """Append a user turn. ``images`` are the decoded bytes of the data URLs (JPEG or PNG signature
    checked, not decoded): decode them off the event loop; on failure call
    ``image_rejected(event_id, message, item_id=item_id)``."""

    item_id: str
    text: str
    images: tuple[bytes, ...]
    event_id: str | None


@dataclass(frozen=True)
class AppendFrame:
    """One frame of the session's live video (``input_video.append``); no event acknowledges it."""

    image: bytes
    timestamp_ms: float | None
    event_id: str | None


@dataclass(frozen=True)
class StartResponse:
    """Generate an answer. Both fields are already resolved (response override, else session value,
    else server default), so ``max_output_tokens`` is always an int within the limit."""

    response_id: str
    instructions: str | None
    max_output_tokens: int | None


@dataclass(frozen=True)
class CancelResponse:
    """Abort the generation; the app then calls ``response_finished(response_id, "cancelled", ...)``."""

    response_id: str


Action: TypeAlias = UpdateSession | AddUserMessage | AppendFrame | StartResponse | CancelResponse
Output: TypeAlias = ServerEvent | Action


# ---------------------------------------------------------------------------------------------
# Ids and errors
# ---------------------------------------------------------------------------------------------


def default_id(prefix: str) -> str:
    """OpenAI-looking unique ids (``event_…``, ``item_…``, ``resp_…``); 96 random bits."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class _Invalid(Exception):
    """A client event failed validation; becomes one ``error`` event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


_SERVER_ERROR_CODES = frozenset({"session_limit_reached", "engine_unavailable"})


def error_event(
    code: str,
    message: str,
    *,
    param: str | None = None,
    client_event_id: str | None = None,
    event_id: str | None = None,
) -> ServerEvent:
    """Build an ``error`` event; ``type`` is ``server_error`` for server-side causes."""
    kind = "server_error" if code in _SERVER_ERROR_CODES else "invalid_request_error"
    return ServerEvent(
        {
            "type": "error",
            "event_id": event_id or default_id("event"),
            "error": {
                "type": kind,
                "code": code,
                "message": message,
                "param": param,
                "event_id": client_event_id,
            },
        }
    )


def session_limit_reached(message: str = "the server has no room for another session") -> ServerEvent:
    """The error a transport sends before closing a connection it cannot serve (no core exists yet)."""
    return error_event("session_limit_reached", message)


# ---------------------------------------------------------------------------------------------
# Validation helpers (pure; raise _Invalid)
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _decode_data_url(url: Any, param: str, limits: Limits) -> bytes:
    """``data:image/jpeg|png;base64,...`` to bytes; checks mime, base64, size and the file signature."""
    if not isinstance(url, str):
        raise _Invalid("invalid_value", "expected a data URL string", param)
    head, sep, data = url.partition(",")
    if not sep or head[:5].lower() != "data:":
        raise _Invalid("invalid_image", "expected a data URL (data:image/jpeg;base64,...)", param)
    mime, *params = head[5:].split(";")
    if mime.strip().lower() not in IMAGE_MIME_TYPES:
        raise _Invalid(
            "invalid_image", f"unsupported image type {mime!r}: use image/jpeg or image/png", param
        )
    if not params or params[-1].strip().lower() != "base64":
        raise _Invalid("invalid_image", "the data URL must be base64-encoded", param)
    # Reject before decoding: base64 expands 3 bytes to 4 characters.
    if len(data) > (limits.max_image_bytes + 2) // 3 * 4:
        raise _Invalid("invalid_image", f"image larger than {limits.max_image_bytes} bytes", param)
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise _Invalid("invalid_image", f"invalid base64: {exc}", param) from None
    if len(raw) > limits.max_image_bytes:
        raise _Invalid("invalid_image", f"image larger than {limits.max_image_bytes} bytes", param)
    if not (raw.startswith(b"\xff\xd8\xff") or raw.startswith(b"\x89PNG\r\n\x1a\n")):
        raise _Invalid("invalid_image", "the data is not a JPEG or PNG image", param)
    return raw


def _check_instructions(value: Any, param: str, limits: Limits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("invalid_value", "instructions must be a string", param)
    if len(value) > limits.max_instructions_chars:
        raise _Invalid(
            "invalid_value", f"instructions longer than {limits.max_instructions_chars} characters", param
        )
    return value


def _check_max_output_tokens(value: Any, param: str, limits: Limits) -> int | None:
    """An int in 1..limit, or ``"inf"`` (= the server limit, stored as None)."""
    if value is None or value == "inf":
        return None
    if not _is_int(value) or not 1 <= value <= limits.max_output_tokens:
        raise _Invalid(
            "invalid_value",
            f'max_output_tokens must be an integer from 1 to {limits.max_output_tokens} or "inf"',
            param,
        )
    return value


def _check_output_modalities(value: Any, param: str) -> None:
    if value is not None and value != ["text"]:
        raise _Invalid("invalid_value", 'only output_modalities ["text"] is supported', param)


def _check_no_tools(value: Any, param: str) -> None:
    """Tools would silently never be called, so asking for them is an error rather than ignored."""
    if value not in (None, []):
        raise _Invalid("invalid_value", "tools are not supported", param)


def _check_video(value: Any, current: Mapping[str, Any], positions: str, limits: Limits) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid("invalid_value", "video must be an object", "session.video")
    video = dict(current)
    if "max_fps" in value:
        fps = value["max_fps"]
        if not _is_number(fps) or not 0 < fps <= limits.max_video_fps:
            raise _Invalid(
                "invalid_value",
                f"max_fps must be a number in (0, {limits.max_video_fps}]",
                "session.video.max_fps",
            )
        video["max_fps"] = float(fps)
    if "schedule" in value:
        if value["schedule"] not in SCHEDULES:
            raise _Invalid(
                "invalid_value", 'schedule must be "parallel" or "sequential"', "session.video.schedule"
            )
        video["schedule"] = value["schedule"]
    if "window" in value:
        window = value["window"]
        if not _is_int(window) or window < 1:
            raise _Invalid("invalid_value", "window must be a positive integer", "session.video.window")
        video["window"] = window
    if "positions" in value and value["positions"] != positions:
        raise _Invalid(
            "invalid_value",
            f"positions is fixed by the server ({positions!r}) and cannot be changed per session",
            "session.video.positions",
        )
    return video


def _usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI usage object from what the engine reports (input_tokens, output_tokens, details...)."""
    input_tokens = int(usage.get("input_tokens", 0))
    output_tokens = int(usage.get("output_tokens", 0))
    input_details = {"text_tokens": 0, "image_tokens": 0, "audio_tokens": 0, "cached_tokens": 0}
    input_details.update(usage.get("input_token_details") or {})
    output_details = {"text_tokens": output_tokens, "audio_tokens": 0}
    output_details.update(usage.get("output_token_details") or {})
    return {
        "total_tokens": int(usage.get("total_tokens", input_tokens + output_tokens)),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": input_details,
        "output_token_details": output_details,
    }


# ---------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------


@dataclass
class _Response:
    id: str
    item_id: str
    max_output_tokens: int
    metadata: dict[str, Any] | None
    text: list[str] = field(default_factory=list)
    cancelling: bool = False


class RealtimeProtocol:
    """One realtime session's protocol state: configuration, conversation items, the active response.

    Call ``start()`` once, then ``receive()`` per client message; report the generation with
    ``text_delta`` / ``response_finished`` and the rest with ``video_stats``, ``image_rejected`` and
    ``engine_error``. Every method returns the outputs to act on, in order.
    """

    def __init__(
        self,
        session_id: str,
        *,
        model: str,
        positions: str,
        limits: Limits = Limits(),
        defaults: SessionConfig = SessionConfig(),
        id_factory: IdFactory | None = None,
    ) -> None:
        self.session_id = session_id
        self.model = model
        self.positions = positions
        self.limits = limits
        self._new_id: IdFactory = id_factory or default_id
        video = {**DEFAULT_VIDEO, **defaults.video, "positions": positions}
        self._config = replace(defaults, video=video)
        self._defaults = self._config
        self._conversation_id = self._new_id("conv")
        self._items: deque[dict[str, Any]] = deque(maxlen=limits.max_conversation_items)
        self._response: _Response | None = None
        self._usage = {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0}
        self._started = False

    # -- read-only state -----------------------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        return replace(self._config, video=dict(self._config.video))

    @property
    def active_response_id(self) -> str | None:
        return self._response.id if self._response else None

    @property
    def items(self) -> tuple[dict[str, Any], ...]:
        """The remembered conversation items, oldest first (copies)."""
        return tuple(_copy_item(item) for item in self._items)

    @property
    def usage(self) -> dict[str, int]:
        """Token totals over all finished responses of this session."""
        return dict(self._usage)

    # -- session start ---------------------------------------------------------------------------

    def start(self) -> list[Output]:
        """The first event of every session: ``session.created``."""
        if self._started:
            raise RuntimeError("start() was already called")
        self._started = True
        return [self._event("session.created", session=self._session_object())]

    # -- client messages -------------------------------------------------------------------------

    def receive(self, message: str | bytes) -> list[Output]:
        """Handle one client message (a WebSocket text/binary frame or data-channel message)."""
        if not self._started:
            raise RuntimeError("call start() before receive()")
        if _too_large(message, self.limits.max_message_bytes):
            return [
                self._error("payload_too_large", f"message larger than {self.limits.max_message_bytes} bytes")
            ]
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return [self._error("invalid_json", "the message is not valid JSON")]
        if not isinstance(event, dict):
            return [self._error("invalid_json", "the message must be a JSON object")]
        client_event_id = event.get("event_id")
        if client_event_id is not None and not isinstance(client_event_id, str):
            return [self._error("invalid_value", "event_id must be a string", param="event_id")]
        kind = event.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            what = f"unsupported event type {kind!r}" if isinstance(kind, str) else "missing event type"
            return [self._error("unknown_event", what, param="type", client_event_id=client_event_id)]
        try:
            return handler(self, event, client_event_id)
        except _Invalid as exc:
            return [self._error(exc.code, exc.message, param=exc.param, client_event_id=client_event_id)]

    def _on_session_update(self, event: dict[str, Any], client_event_id: str | None) -> list[Output]:
        session = event.get("session")
        if not isinstance(session, dict):
            raise _Invalid("invalid_value", "session must be an object", "session")
        if "type" in session and session["type"] != "realtime":
            raise _Invalid("invalid_value", 'only session type "realtime" is supported', "session.type")
        _check_output_modalities(session.get("output_modalities"), "session.output_modalities")
        _check_no_tools(session.get("tools"), "session.tools")
        changes: dict[str, Any] = {}
        # null restores the server default; "inf" means up to the server limit (stored as None).
        if "instructions" in session:
            instructions = _check_instructions(session["instructions"], "session.instructions", self.limits)
            changes["instructions"] = self._defaults.instructions if instructions is None else instructions
        if "max_output_tokens" in session:
            max_tokens = session["max_output_tokens"]
            checked = _check_max_output_tokens(max_tokens, "session.max_output_tokens", self.limits)
            changes["max_output_tokens"] = self._defaults.max_output_tokens if max_tokens is None else checked
        if "video" in session:
            changes["video"] = _check_video(session["video"], self._config.video, self.positions, self.limits)
        self._config = replace(self._config, **changes)
        return [UpdateSession(self.config), self._event("session.updated", session=self._session_object())]

    def _on_item_create(self, event: dict[str, Any], client_event_id: str | None) -> list[Output]:
        previous = event.get("previous_item_id")
        last_id = self._items[-1]["id"] if self._items else None
        if previous is not None and previous != last_id and not (previous == "root" and last_id is None):
            raise _Invalid(
                "invalid_value",
                "items can only be appended: previous_item_id must be the last item's id",
                "previous_item_id",
            )
        item = event.get("item")
        if not isinstance(item, dict):
            raise _Invalid("invalid_value", "item must be an object", "item")
        if item.get("type", "message") != "message":
            raise _Invalid("invalid_value", 'only items of type "message" are supported', "item.type")
        if item.get("role") != "user":
            raise _Invalid("invalid_value", 'only messages with role "user" can be created', "item.role")
        item_id = item.get("id")
        if item_id is None:
            pass  # generated once the event has passed validation
        elif not isinstance(item_id, str) or not item_id:
            raise _Invalid("invalid_value", "item.id must be a non-empty string", "item.id")
        elif any(existing["id"] == item_id for existing in self._items):
            raise _Invalid("invalid_value", f"an item with id {item_id!r} already exists", "item.id")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise _Invalid("invalid_value", "item.content must be a non-empty list", "item.content")
        texts: list[str] = []
        images: list[bytes] = []
        echoed: list[dict[str, Any]] = []
        for index, part in enumerate(content):
            where = f"item.content[{index}]"
            if not isinstance(part, dict):
                raise _Invalid("invalid_value", "a content part must be an object", where)
            part_type = part.get("type")
            if part_type == "input_text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _Invalid("invalid_value", "text must be a string", f"{where}.text")
                texts.append(text)
                echoed.append({"type": "input_text", "text": text})
            elif part_type == "input_image":
                detail = part.get("detail", "auto")
                if detail not in IMAGE_DETAILS:
                    raise _Invalid(
                        "invalid_value", 'detail must be "auto", "low" or "high"', f"{where}.detail"
                    )
                images.append(_decode_data_url(part.get("image_url"), f"{where}.image_url", self.limits))
                # The image data is not echoed back (megabytes per event); the part says it was there.
                echoed.append({"type": "input_image", "detail": detail})
            else:
                raise _Invalid(
                    "invalid_value", "content parts must be input_text or input_image", f"{where}.type"
                )
        stored = {
            "id": item_id or self._new_id("item"),
            "type": "message",
            "object": "realtime.item",
            "status": "completed",
            "role": "user",
            "content": echoed,
        }
        self._items.append(stored)
        action = AddUserMessage(stored["id"], "\n".join(texts), tuple(images), client_event_id)
        return [
            action,
            self._event("conversation.item.added", previous_item_id=last_id, item=_copy_item(stored)),
            self._event("conversation.item.done", previous_item_id=last_id, item=_copy_item(stored)),
        ]

    def _on_response_create(self, event: dict[str, Any], client_event_id: str | None) -> list[Output]:
        params = event.get("response")
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            raise _Invalid("invalid_value", "response must be an object", "response")
        if self._response is not None:
            raise _Invalid(
                "conversation_already_has_active_response",
                f"response {self._response.id} is still in progress; cancel it or wait for response.done",
            )
        _check_output_modalities(params.get("output_modalities"), "response.output_modalities")
        if params.get("conversation", "auto") != "auto":
            raise _Invalid(
                "invalid_value",
                'only responses in the default conversation ("auto")',
                "response.conversation",
            )
        _check_no_tools(params.get("tools"), "response.tools")
        if params.get("input") is not None:
            raise _Invalid("invalid_value", "custom response input is not supported", "response.input")
        instructions = _check_instructions(params.get("instructions"), "response.instructions", self.limits)
        max_tokens = _check_max_output_tokens(
            params.get("max_output_tokens"), "response.max_output_tokens", self.limits
        )
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise _Invalid("invalid_value", "metadata must be an object", "response.metadata")
        if instructions is None:
            instructions = self._config.instructions
        if max_tokens is None and params.get("max_output_tokens") != "inf":
            max_tokens = self._config.max_output_tokens  # absent or null: the session's value
        if max_tokens is None:
            max_tokens = self.limits.max_output_tokens
        response = _Response(self._new_id("resp"), self._new_id("item"), max_tokens, metadata)
        self._response = response
        previous_id = self._items[-1]["id"] if self._items else None
        item = {
            "id": response.item_id,
            "type": "message",
            "object": "realtime.item",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._items.append(item)
        ids = {"response_id": response.id, "item_id": response.item_id, "output_index": 0}
        return [
            StartResponse(response.id, instructions, max_tokens),
            self._event("response.created", response=self._response_object(response, "in_progress", [])),
            self._event(
                "response.output_item.added", response_id=response.id, output_index=0, item=dict(item)
            ),
            self._event("conversation.item.added", previous_item_id=previous_id, item=_copy_item(item)),
            self._event(
                "response.content_part.added", **ids, content_index=0, part={"type": "text", "text": ""}
            ),
        ]

    def _on_response_cancel(self, event: dict[str, Any], client_event_id: str | None) -> list[Output]:
        wanted = event.get("response_id")
        if wanted is not None and not isinstance(wanted, str):
            raise _Invalid("invalid_value", "response_id must be a string", "response_id")
        response = self._response
        if response is None or (wanted is not None and wanted != response.id):
            raise _Invalid("response_cancel_not_active", "there is no active response to cancel")
        if response.cancelling:
            return []  # already asked; response.done (cancelled) follows
        response.cancelling = True
        return [CancelResponse(response.id)]

    def _on_video_append(self, event: dict[str, Any], client_event_id: str | None) -> list[Output]:
        image = _decode_data_url(event.get("image"), "image", self.limits)
        timestamp = event.get("timestamp_ms")
        if timestamp is not None and (not _is_number(timestamp) or timestamp < 0):
            raise _Invalid("invalid_value", "timestamp_ms must be a non-negative number", "timestamp_ms")
        return [AppendFrame(image, None if timestamp is None else float(timestamp), client_event_id)]

    _handlers: ClassVar[dict[str, Callable[[RealtimeProtocol, dict[str, Any], str | None], list[Output]]]] = {
        "session.update": _on_session_update,
        "conversation.item.create": _on_item_create,
        "response.create": _on_response_create,
        "response.cancel": _on_response_cancel,
        "input_video.append": _on_video_append,
    }

    # -- calls from the app ----------------------------------------------------------------------

    def text_delta(self, response_id: str, delta: str) -> list[Output]:
        """Answer text as it is generated; ignored for a response that is not active or is being
        cancelled (the client asked to stop, so nothing more is shown)."""
        response = self._response
        if response is None or response.id != response_id or response.cancelling or not delta:
            return []
        response.text.append(delta)
        return [
            self._event(
                "response.output_text.delta",
                response_id=response.id,
                item_id=response.item_id,
                output_index=0,
                content_index=0,
                delta=delta,
            )
        ]

    def response_finished(
        self,
        response_id: str,
        status: ResponseStatus,
        usage: Mapping[str, Any],
        reason: str | None = None,
    ) -> list[Output]:
        """Close the active response: the closing events of its item, then ``response.done``.

        ``reason`` goes into ``status_details`` (cancelled: default "client_cancelled"; incomplete:
        default "max_output_tokens"; failed: the error message). Unknown ids are ignored.
        """
        if status not in ("completed", "cancelled", "failed", "incomplete"):
            raise ValueError(f"unknown response status {status!r}")
        response = self._response
        if response is None or response.id != response_id:
            return []
        self._response = None
        text = "".join(response.text)
        item_status = "completed" if status == "completed" else "incomplete"
        part = {"type": "text", "text": text}
        item = {
            "id": response.item_id,
            "type": "message",
            "object": "realtime.item",
            "status": item_status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text}],
        }
        previous_id = None
        for index, stored in enumerate(self._items):
            if stored["id"] == response.item_id:
                previous_id = self._items[index - 1]["id"] if index else None
                self._items[index] = item
                break
        report = _usage(usage)
        for key in self._usage:
            self._usage[key] += report[key]
        ids = {"response_id": response.id, "item_id": response.item_id, "output_index": 0}
        done = self._response_object(response, status, [_copy_item(item)], reason=reason, usage=report)
        return [
            self._event("response.output_text.done", **ids, content_index=0, text=text),
            self._event("response.content_part.done", **ids, content_index=0, part=part),
            self._event(
                "response.output_item.done", response_id=response.id, output_index=0, item=_copy_item(item)
            ),
            self._event("conversation.item.done", previous_item_id=previous_id, item=_copy_item(item)),
            self._event("response.done", response=done),
        ]

    def video_stats(self, stats: Mapping[str, Any]) -> list[Output]:
        """``input_video.stats``: canonical counters (missing ones 0) plus any extra keys the app adds."""
        payload: dict[str, Any] = {
            "received": 0,
            "sampled": 0,
            "ingested": 0,
            "dropped": 0,
            "frame_lag_ms": None,
            "fps": 0.0,
            "positions": self.positions,
            "rollovers": 0,
        }
        payload.update({k: v for k, v in stats.items() if k not in ("type", "event_id")})
        return [self._event("input_video.stats", **payload)]

    def image_rejected(
        self, event_id: str | None, message: str, *, item_id: str | None = None
    ) -> list[Output]:
        """An image of ``event_id`` failed to decode or is too large (pixels): ``error`` invalid_image.

        Pass the ``AddUserMessage.item_id`` for a conversation item: the item is taken back out of the
        conversation and ``conversation.item.deleted`` follows the error, so the bad event leaves no
        trace. For ``input_video.append`` frames leave ``item_id`` None.
        """
        out: list[Output] = [self._error("invalid_image", message, client_event_id=event_id)]
        if item_id is not None:
            for stored in self._items:
                if stored["id"] == item_id and stored["role"] == "user":
                    self._items.remove(stored)
                    out.append(self._event("conversation.item.deleted", item_id=item_id))
                    break
        return out

    def engine_error(self, message: str, event_id: str | None = None) -> list[Output]:
        """The engine cannot serve (crashed, overloaded). Only the error event: an active response is
        still ended by the app with ``response_finished(..., "failed", ...)``."""
        return [self._error("engine_unavailable", message, client_event_id=event_id)]

    session_limit_reached = staticmethod(session_limit_reached)

    # -- building events ---------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> ServerEvent:
        return ServerEvent({"type": kind, "event_id": self._new_id("event"), **fields})

    def _error(
        self, code: str, message: str, *, param: str | None = None, client_event_id: str | None = None
    ) -> ServerEvent:
        return error_event(
            code, message, param=param, client_event_id=client_event_id, event_id=self._new_id("event")
        )

    def _session_object(self) -> dict[str, Any]:
        config = self._config
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": self.model,
            "output_modalities": ["text"],
            "instructions": config.instructions,
            "max_output_tokens": config.max_output_tokens or self.limits.max_output_tokens,
            "tools": [],
            "tool_choice": "auto",
            "video": dict(config.video),
        }

    def _response_object(
        self,
        response: _Response,
        status: str,
        output: list[dict[str, Any]],
        *,
        reason: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        details: dict[str, Any] | None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": reason or "client_cancelled"}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": reason or "max_output_tokens"}
        elif status == "failed":
            details = {
                "type": "failed",
                "error": {
                    "type": "server_error",
                    "code": "engine_unavailable",
                    "message": reason or "failed",
                },
            }
        else:
            details = None
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self._conversation_id,
            "output_modalities": ["text"],
            "max_output_tokens": response.max_output_tokens,
            "metadata": response.metadata,
            "usage": usage,
        }


def _copy_item(item: dict[str, Any]) -> dict[str, Any]:
    """Items are handed out in events; never share the core's own dicts with the transport."""
    return {**item, "content": [dict(part) for part in item["content"]]}


def _too_large(message: str | bytes, limit: int) -> bool:
    """Size in UTF-8 bytes, without encoding when the length alone decides."""
    if isinstance(message, bytes | bytearray | memoryview):
        return len(message) > limit
    if len(message) > limit:
        return True
    if len(message) * 4 <= limit:
        return False
    return len(message.encode("utf-8", "surrogatepass")) > limit
