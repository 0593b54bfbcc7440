"""The names the runtime, the server and the clients share, defined once.

Importable without torch, vLLM or aiohttp: the remote SDK (``client``) depends on this module
alone, the runtime and the server build on it. Everything that crosses the wire (client and server
events, a session's statistics) is a typed class here; the server's protocol core and the client
core encode and decode through these, so the two ends cannot disagree about a name.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Final, Literal, Self, TypeAlias, TypeGuard, get_args

# -- literals -----------------------------------------------------------------------------------

Schedule = Literal["parallel", "sequential"]
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)

ResponseStatus = Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
FINAL_STATUSES: tuple[ResponseStatus, ...] = ("completed", "cancelled", "incomplete", "failed")

# -- session statistics -------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionStats:
    """One session's numbers, under the same names in the embedded SDK, on the wire and in the remote SDK.

    Frames are counted along the one media path: every frame that reaches one of the session's inputs
    is ``frames_received``; the input's rate cap keeps ``frames_sampled`` of them; every received frame
    is ingested (in the KV cache), dropped, or pending (queued, encoding, sent but not yet in KV).
    ``frames_dropped_by_reason`` holds every drop, at the input (``rate``, ``unchanged``, ``invalid``,
    ``overflow``, ``stale``, ...) and in the session (``perception_backlog``, ``chunk_backlog``).
    """

    session_id: str
    schedule: Schedule
    positions: str
    max_fps: float | None = None
    frames_received: int = 0
    frames_sampled: int = 0
    frames_ingested: int = 0
    frames_dropped_by_reason: Mapping[str, int] = field(default_factory=dict)
    frame_lag_p50_ms: float | None = None  # a frame's arrival at its input until its chunk reached vLLM
    frame_lag_p95_ms: float | None = None
    ingest_fps: float | None = None  # frames ingested per second since the server's previous report
    answering: bool = False
    last_response_status: ResponseStatus | None = None
    ttft_ms: float | None = None  # of the last answer
    tokens_per_s: float | None = None  # of the last answer
    frames_during_answer: int = 0  # of the last answer: frames ingested while it streamed
    session_tokens: int = 0  # tokens of the live vLLM request
    budget_tokens: int = 0
    max_request_tokens: int = 0
    turns: int = 0
    requests_started: int = 0
    rollovers: int = 0
    window_steps: int = 0
    memory_state_bytes: int = 0
    memory_surprise: float | None = None
    memory_update_failures: int = 0  # memory updates that raised (each is logged); 0 when healthy

    @property
    def frames_dropped(self) -> int:
        return sum(self.frames_dropped_by_reason.values())

    @property
    def frames_pending(self) -> int:
        return self.frames_received - self.frames_ingested - self.frames_dropped

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, with the derived ``frames_dropped`` and ``frames_pending``."""
        out = asdict(self)
        out["frames_dropped_by_reason"] = dict(self.frames_dropped_by_reason)
        out["frames_dropped"] = self.frames_dropped
        out["frames_pending"] = self.frames_pending
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SessionStats:
        """The inverse of `to_dict`; unknown keys (the derived ones, a newer server's) are skipped."""
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {k: v for k, v in data.items() if k in known}
        by_reason = data.get("frames_dropped_by_reason")
        values["frames_dropped_by_reason"] = dict(by_reason) if isinstance(by_reason, Mapping) else {}
        return cls(**values)  # type: ignore[arg-type]  # each value as to_dict wrote it


# -- wire events ----------------------------------------------------------------------------------
# Every event of the realtime protocol (OpenAI Realtime GA names, text output, ``input_video.*``
# extensions) as a frozen dataclass. Client events decode strictly: a payload that does not match
# raises `WireError` with the code and field path the server reports. Server events decode
# leniently (missing fields take their defaults); a type this module does not know, or one without
# its required fields, becomes an `UnknownServerEvent`, so a newer server never breaks an older client.
# (The ``openai`` package's realtime models would describe most of these, but ``import openai``
# takes about a second and imports aiohttp, which this module must not.)

JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"
JSONObject: TypeAlias = "dict[str, JSON]"

ErrorType = Literal["invalid_request_error", "server_error"]
ErrorCode = Literal[
    "invalid_json",
    "unknown_event",
    "invalid_value",
    "invalid_image",
    "payload_too_large",
    "response_cancel_not_active",
    "conversation_already_has_active_response",
    "session_limit_reached",
    "engine_unavailable",
    "session_not_resumable",
    "replay_unavailable",
]
SERVER_ERROR_CODES: frozenset[str] = frozenset(
    {"session_limit_reached", "engine_unavailable", "replay_unavailable"}
)
ImageDetail = Literal["auto", "low", "high"]
IMAGE_DETAILS: tuple[ImageDetail, ...] = get_args(ImageDetail)
IMAGE_MIME_TYPES = ("image/jpeg", "image/jpg", "image/png")
ItemStatus = Literal["in_progress", "completed", "incomplete"]
Role = Literal["user", "assistant"]


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET: Final = _Unset.UNSET
"""A field the client event leaves out, told apart from an explicit ``null`` (which resets it)."""
Unset: TypeAlias = Literal[_Unset.UNSET]


class WireError(ValueError):
    """A client event that does not match the schema; the server answers it with one ``error``."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.param = param


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _as_object(value: JSON) -> JSONObject:
    """For lenient decoding: an object, or an empty one in its place."""
    return value if isinstance(value, dict) else {}


def _object(value: JSON, param: str, what: str) -> JSONObject:
    if not isinstance(value, dict):
        raise WireError("invalid_value", f"{what} must be an object", param)
    return value


def _optional_str(value: JSON, param: str, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise WireError("invalid_value", f"{what} must be a string", param)
    return value


def _max_output_tokens(value: JSON, param: str) -> int | Literal["inf"] | None:
    """Only the type here: the range depends on the server's limit."""
    if value is None or value == "inf" or is_int(value):
        return value  # type: ignore[return-value]  # narrowed above
    raise WireError("invalid_value", 'max_output_tokens must be an integer or "inf"', param)


def _only_text_output(value: JSON, param: str) -> None:
    if value is not None and value != ["text"]:
        raise WireError("invalid_value", 'only output_modalities ["text"] is supported', param)


def _no_tools(value: JSON, param: str) -> None:
    """Tools would silently never be called, so asking for them is an error rather than ignored."""
    if value not in (None, []):
        raise WireError("invalid_value", "tools are not supported", param)


def image_data_url(data: bytes) -> str:
    """JPEG or PNG file bytes as the ``data:`` URL the protocol carries images in."""
    if data.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    else:
        raise ValueError("image bytes must be a JPEG or PNG file")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def decode_image_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The file bytes of ``data:image/jpeg|png;base64,...``: mime, base64, size and signature checked."""
    head, sep, data = url.partition(",")
    if not sep or head[:5].lower() != "data:":
        raise WireError("invalid_image", "expected a data URL (data:image/jpeg;base64,...)", param)
    mime, *params = head[5:].split(";")
    if mime.strip().lower() not in IMAGE_MIME_TYPES:
        raise WireError(
            "invalid_image", f"unsupported image type {mime!r}: use image/jpeg or image/png", param
        )
    if not params or params[-1].strip().lower() != "base64":
        raise WireError("invalid_image", "the data URL must be base64-encoded", param)
    if len(data) > (max_bytes + 2) // 3 * 4:  # reject before decoding: base64 turns 3 bytes into 4
        raise WireError("invalid_image", f"image larger than {max_bytes} bytes", param)
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise WireError("invalid_image", f"invalid base64: {exc}", param) from None
    if len(raw) > max_bytes:
        raise WireError("invalid_image", f"image larger than {max_bytes} bytes", param)
    if not (raw.startswith(b"\xff\xd8\xff") or raw.startswith(b"\x89PNG\r\n\x1a\n")):
        raise WireError("invalid_image", "the data is not a JPEG or PNG image", param)
    return raw


# -- content parts and items


@dataclass(frozen=True)
class InputText:
    text: str

    def encode(self) -> JSONObject:
        return {"type": "input_text", "text": self.text}


@dataclass(frozen=True)
class InputImage:
    """``image_url`` is a data URL; None where the server echoes the part (it never sends the data back)."""

    image_url: str | None = None
    detail: ImageDetail = "auto"

    def encode(self) -> JSONObject:
        out: JSONObject = {"type": "input_image", "detail": self.detail}
        if self.image_url is not None:
            out["image_url"] = self.image_url
        return out


@dataclass(frozen=True)
class OutputText:
    text: str

    def encode(self) -> JSONObject:
        return {"type": "output_text", "text": self.text}


ContentPart: TypeAlias = InputText | InputImage | OutputText


def _decode_part(payload: JSON) -> ContentPart:
    part = _as_object(payload)
    kind, text = part.get("type"), part.get("text")
    if kind == "input_image":
        url, detail = part.get("image_url"), part.get("detail")
        return InputImage(
            url if isinstance(url, str) else None, detail if detail in IMAGE_DETAILS else "auto"
        )  # type: ignore[arg-type]
    text = text if isinstance(text, str) else ""
    return InputText(text) if kind == "input_text" else OutputText(text)


@dataclass(frozen=True)
class MessageItem:
    """A conversation item: a user turn or an answer (``realtime.item`` of type ``message``)."""

    id: str
    role: Role
    status: ItemStatus
    content: tuple[ContentPart, ...] = ()

    @property
    def text(self) -> str:
        """The answer text of an assistant item."""
        return "".join(part.text for part in self.content if isinstance(part, OutputText))

    def encode(self) -> JSONObject:
        return {
            "id": self.id,
            "type": "message",
            "object": "realtime.item",
            "status": self.status,
            "role": self.role,
            "content": [part.encode() for part in self.content],
        }

    @classmethod
    def decode(cls, payload: JSON) -> MessageItem:
        item = _as_object(payload)
        content = item.get("content")
        return cls(
            str(item.get("id") or ""),
            "user" if item.get("role") == "user" else "assistant",
            item["status"] if item.get("status") in get_args(ItemStatus) else "completed",  # type: ignore[arg-type]
            tuple(_decode_part(p) for p in content) if isinstance(content, list) else (),
        )


# -- the session and response objects


@dataclass(frozen=True)
class ChangeFilterConfig:
    """``video.change_filter`` as the session shows it: frames showing nothing new since the last one
    that went in are dropped (``unchanged``), one still goes in every ``keepalive_s`` seconds.

    The ranges are checked where the settings are applied (``streams.change.ChangeFilterSettings``);
    this module only carries them.
    """

    enabled: bool
    threshold: float
    keepalive_s: float

    def encode(self) -> JSONObject:
        return {"enabled": self.enabled, "threshold": self.threshold, "keepalive_s": self.keepalive_s}

    @classmethod
    def decode(cls, payload: JSON) -> ChangeFilterConfig | None:
        """Lenient: None unless the block and all three values are there (an older server has none)."""
        block = _as_object(payload)
        enabled, threshold, keepalive = block.get("enabled"), block.get("threshold"), block.get("keepalive_s")
        if isinstance(enabled, bool) and is_number(threshold) and is_number(keepalive):
            return cls(enabled, float(threshold), float(keepalive))
        return None


@dataclass(frozen=True)
class VideoConfig:
    """The session's ``video`` block (our extension); ``positions`` is the server's, read-only."""

    max_fps: float
    schedule: Schedule
    positions: str
    change_filter: ChangeFilterConfig | None = None  # None: a server without the filter

    def encode(self) -> JSONObject:
        out: JSONObject = {"max_fps": self.max_fps, "schedule": self.schedule, "positions": self.positions}
        if self.change_filter is not None:
            out["change_filter"] = self.change_filter.encode()
        return out


@dataclass(frozen=True)
class ResumeInfo:
    """The session's ``resume`` block (our extension, in ``session.created`` and ``session.resumed``):
    reconnect with ``?resume=TOKEN&last_event_id=...`` within ``grace_s`` seconds of a disconnect."""

    token: str
    grace_s: float

    def encode(self) -> JSONObject:
        return {"token": self.token, "grace_s": self.grace_s}

    @classmethod
    def decode(cls, payload: JSON) -> ResumeInfo | None:
        block = _as_object(payload)
        token, grace = block.get("token"), block.get("grace_s")
        if not isinstance(token, str) or not token:
            return None
        return cls(token, float(grace) if is_number(grace) else 0.0)


@dataclass(frozen=True)
class SessionObject:
    """A ``realtime.session`` as ``session.created`` / ``session.updated`` show it."""

    id: str
    model: str
    instructions: str | None
    max_output_tokens: int
    video: VideoConfig
    resume: ResumeInfo | None = None  # only in session.created / session.resumed, for its client alone

    def encode(self) -> JSONObject:
        out = self._encode()
        if self.resume is not None:
            out["resume"] = self.resume.encode()
        return out

    def _encode(self) -> JSONObject:
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": ["text"],
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "tools": [],
            "tool_choice": "auto",
            "video": self.video.encode(),
        }

    @classmethod
    def decode(cls, payload: JSON) -> SessionObject:
        session = _as_object(payload)
        video = _as_object(session.get("video"))
        fps, tokens, instructions = (
            video.get("max_fps"),
            session.get("max_output_tokens"),
            session.get("instructions"),
        )
        return cls(
            str(session.get("id") or ""),
            str(session.get("model") or ""),
            instructions if isinstance(instructions, str) else None,
            tokens if is_int(tokens) else 0,
            VideoConfig(
                float(fps) if is_number(fps) else 0.0,
                video["schedule"] if video.get("schedule") in SCHEDULES else "parallel",  # type: ignore[arg-type]
                str(video.get("positions") or ""),
                ChangeFilterConfig.decode(video.get("change_filter")),
            ),
            ResumeInfo.decode(session.get("resume")),
        )


@dataclass(frozen=True)
class Usage:
    """Tokens of one response, in the OpenAI shape."""

    input_tokens: int = 0
    output_tokens: int = 0
    input_token_details: Mapping[str, int] = field(default_factory=dict)
    output_token_details: Mapping[str, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def encode(self) -> JSONObject:
        return {
            "total_tokens": self.total_tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "input_token_details": dict(self.input_token_details),
            "output_token_details": dict(self.output_token_details),
        }

    @classmethod
    def decode(cls, payload: JSON) -> Usage:
        usage = _as_object(payload)

        def counts(value: JSON) -> dict[str, int]:
            return {k: v for k, v in value.items() if is_int(v)} if isinstance(value, dict) else {}

        inputs, outputs = usage.get("input_tokens"), usage.get("output_tokens")
        return cls(
            inputs if is_int(inputs) else 0,
            outputs if is_int(outputs) else 0,
            counts(usage.get("input_token_details")),
            counts(usage.get("output_token_details")),
        )


@dataclass(frozen=True)
class ResponseFailure:
    """Why a response ``failed`` (``status_details.error``)."""

    message: str
    code: str = "engine_unavailable"
    type: ErrorType = "server_error"

    def encode(self) -> JSONObject:
        return {"type": self.type, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class StatusDetails:
    """Why a response ended other than ``completed``: a ``reason``, or for ``failed`` an ``error``."""

    type: Literal["cancelled", "incomplete", "failed"]
    reason: str | None = None
    error: ResponseFailure | None = None

    def encode(self) -> JSONObject:
        if self.error is not None:
            return {"type": self.type, "error": self.error.encode()}
        return {"type": self.type, "reason": self.reason}

    @classmethod
    def decode(cls, payload: JSON) -> StatusDetails | None:
        if not isinstance(payload, dict) or payload.get("type") not in ("cancelled", "incomplete", "failed"):
            return None
        reason, error = payload.get("reason"), payload.get("error")
        failure = None
        if isinstance(error, dict):
            failure = ResponseFailure(
                str(error.get("message") or "failed"),
                str(error.get("code") or "server_error"),
                "invalid_request_error" if error.get("type") == "invalid_request_error" else "server_error",
            )
        return cls(payload["type"], reason if isinstance(reason, str) else None, failure)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResponseObject:
    """A ``realtime.response``: in ``response.created`` (``in_progress``, no output) and ``response.done``."""

    id: str
    status: ResponseStatus
    conversation_id: str
    max_output_tokens: int
    status_details: StatusDetails | None = None
    output: tuple[MessageItem, ...] = ()
    metadata: JSONObject | None = None
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The answer text, from the response's output item."""
        return "".join(item.text for item in self.output)

    def encode(self) -> JSONObject:
        return {
            "id": self.id,
            "object": "realtime.response",
            "status": self.status,
            "status_details": None if self.status_details is None else self.status_details.encode(),
            "output": [item.encode() for item in self.output],
            "conversation_id": self.conversation_id,
            "output_modalities": ["text"],
            "max_output_tokens": self.max_output_tokens,
            "metadata": copy.deepcopy(self.metadata),
            "usage": None if self.usage is None else self.usage.encode(),
        }

    @classmethod
    def decode(cls, payload: JSON) -> ResponseObject:
        response = _as_object(payload)
        status, tokens, output = (
            response.get("status"),
            response.get("max_output_tokens"),
            response.get("output"),
        )
        metadata, usage = response.get("metadata"), response.get("usage")
        return cls(
            str(response.get("id") or ""),
            status if status in get_args(ResponseStatus) else "failed",  # type: ignore[arg-type]
            str(response.get("conversation_id") or ""),
            tokens if is_int(tokens) else 0,
            StatusDetails.decode(response.get("status_details")),
            tuple(MessageItem.decode(item) for item in output) if isinstance(output, list) else (),
            metadata if isinstance(metadata, dict) else None,
            Usage.decode(usage) if isinstance(usage, dict) else None,
        )


@dataclass(frozen=True)
class ErrorInfo:
    """The ``error`` object of an ``error`` event; ``event_id`` names the client event that caused it."""

    code: str
    message: str
    type: ErrorType = "invalid_request_error"
    param: str | None = None
    event_id: str | None = None
    retry_after_s: int | None = None  # engine_unavailable while the engine restarts: when to retry

    @classmethod
    def of(
        cls,
        code: str,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        retry_after_s: int | None = None,
    ) -> ErrorInfo:
        """``type`` follows from the code: ``server_error`` for server-side causes."""
        kind: ErrorType = "server_error" if code in SERVER_ERROR_CODES else "invalid_request_error"
        return cls(code, message, kind, param, event_id, retry_after_s)

    def encode(self) -> JSONObject:
        encoded: JSONObject = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "event_id": self.event_id,
        }
        if self.retry_after_s is not None:
            encoded["retry_after_s"] = self.retry_after_s
        return encoded


# -- server events


@dataclass(frozen=True, kw_only=True)
class ServerEvent:
    """A server event; ``TYPE`` is its wire name, ``event_id`` the server's unique id for it."""

    TYPE: ClassVar[str] = ""
    event_id: str

    @property
    def type(self) -> str:
        return self.TYPE

    def encode(self) -> JSONObject:
        return {"type": self.type, "event_id": self.event_id, **self._body()}

    def to_json(self) -> str:
        return json.dumps(self.encode(), ensure_ascii=False, separators=(",", ":"))

    def _body(self) -> JSONObject:
        return {}


@dataclass(frozen=True, kw_only=True)
class UnknownServerEvent(ServerEvent):
    """A server event this module has no class for, or a malformed one; ``payload`` as received."""

    name: str
    payload: JSONObject = field(default_factory=dict, repr=False)

    @property
    def type(self) -> str:
        return self.name

    def encode(self) -> JSONObject:
        return copy.deepcopy(self.payload)


@dataclass(frozen=True, kw_only=True)
class SessionEvent(ServerEvent):
    session: SessionObject

    def _body(self) -> JSONObject:
        return {"session": self.session.encode()}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        return cls(event_id=_event_id(payload), session=SessionObject.decode(payload.get("session")))


@dataclass(frozen=True, kw_only=True)
class SessionCreated(SessionEvent):
    """Always the first event; ``session.id`` is what a WebRTC call attaches to."""

    TYPE: ClassVar[str] = "session.created"


@dataclass(frozen=True, kw_only=True)
class SessionUpdated(SessionEvent):
    TYPE: ClassVar[str] = "session.updated"


@dataclass(frozen=True, kw_only=True)
class SessionResumed(SessionEvent):
    """(extension) The first event on a socket that resumed a session: ``session.resume`` holds the
    new token; then the ``replayed`` events the client missed after ``last_event_id`` follow, in order.
    Not itself replayable: a client's ``last_event_id`` never names it."""

    TYPE: ClassVar[str] = "session.resumed"
    replayed: int = 0
    last_event_id: str | None = None
    # the last client event (with an event_id) the server received: the client resends what came after
    last_client_event_id: str | None = None

    def _body(self) -> JSONObject:
        return {
            **super()._body(),
            "replayed": self.replayed,
            "last_event_id": self.last_event_id,
            "last_client_event_id": self.last_client_event_id,
        }

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        replayed, last = payload.get("replayed"), payload.get("last_event_id")
        last_client = payload.get("last_client_event_id")
        return cls(
            event_id=_event_id(payload),
            session=SessionObject.decode(payload.get("session")),
            replayed=replayed if is_int(replayed) else 0,
            last_event_id=last if isinstance(last, str) else None,
            last_client_event_id=last_client if isinstance(last_client, str) else None,
        )


@dataclass(frozen=True, kw_only=True)
class ConversationItemEvent(ServerEvent):
    """``conversation.item.added`` / ``.done``: a user turn, or the answer's item opening and closing."""

    previous_item_id: str | None
    item: MessageItem

    def _body(self) -> JSONObject:
        return {"previous_item_id": self.previous_item_id, "item": self.item.encode()}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        previous = payload.get("previous_item_id")
        return cls(
            event_id=_event_id(payload),
            previous_item_id=previous if isinstance(previous, str) else None,
            item=MessageItem.decode(payload.get("item")),
        )


@dataclass(frozen=True, kw_only=True)
class ConversationItemAdded(ConversationItemEvent):
    TYPE: ClassVar[str] = "conversation.item.added"


@dataclass(frozen=True, kw_only=True)
class ConversationItemDone(ConversationItemEvent):
    TYPE: ClassVar[str] = "conversation.item.done"


@dataclass(frozen=True, kw_only=True)
class ConversationItemDeleted(ServerEvent):
    """A user item taken back out (its image could not be used)."""

    TYPE: ClassVar[str] = "conversation.item.deleted"
    item_id: str

    def _body(self) -> JSONObject:
        return {"item_id": self.item_id}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        return cls(event_id=_event_id(payload), item_id=str(payload.get("item_id") or ""))


@dataclass(frozen=True, kw_only=True)
class ResponseEvent(ServerEvent):
    response: ResponseObject

    @property
    def response_id(self) -> str:
        return self.response.id

    def _body(self) -> JSONObject:
        return {"response": self.response.encode()}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        return cls(event_id=_event_id(payload), response=ResponseObject.decode(payload.get("response")))


@dataclass(frozen=True, kw_only=True)
class ResponseCreated(ResponseEvent):
    TYPE: ClassVar[str] = "response.created"


@dataclass(frozen=True, kw_only=True)
class ResponseDone(ResponseEvent):
    """The end of a response; ``response.status`` is completed, cancelled, incomplete or failed."""

    TYPE: ClassVar[str] = "response.done"


@dataclass(frozen=True, kw_only=True)
class OutputItemEvent(ServerEvent):
    response_id: str
    item: MessageItem
    output_index: int = 0

    def _body(self) -> JSONObject:
        return {
            "response_id": self.response_id,
            "output_index": self.output_index,
            "item": self.item.encode(),
        }

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        index = payload.get("output_index")
        return cls(
            event_id=_event_id(payload),
            response_id=str(payload.get("response_id") or ""),
            item=MessageItem.decode(payload.get("item")),
            output_index=index if is_int(index) else 0,
        )


@dataclass(frozen=True, kw_only=True)
class OutputItemAdded(OutputItemEvent):
    TYPE: ClassVar[str] = "response.output_item.added"


@dataclass(frozen=True, kw_only=True)
class OutputItemDone(OutputItemEvent):
    TYPE: ClassVar[str] = "response.output_item.done"


@dataclass(frozen=True, kw_only=True)
class _TextEvent(ServerEvent):
    """The events that address one text part of one response's item."""

    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0

    def _body(self) -> JSONObject:
        return {
            "response_id": self.response_id,
            "item_id": self.item_id,
            "output_index": self.output_index,
            "content_index": self.content_index,
            **self._text(),
        }

    def _text(self) -> JSONObject:
        return {}

    @classmethod
    def _text_fields(cls, payload: JSONObject) -> dict[str, str]:
        return {}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        output_index, content_index = payload.get("output_index"), payload.get("content_index")
        return cls(
            event_id=_event_id(payload),
            response_id=str(payload.get("response_id") or ""),
            item_id=str(payload.get("item_id") or ""),
            output_index=output_index if is_int(output_index) else 0,
            content_index=content_index if is_int(content_index) else 0,
            **cls._text_fields(payload),
        )


@dataclass(frozen=True, kw_only=True)
class ContentPartEvent(_TextEvent):
    """``response.content_part.added`` (empty text) / ``.done`` (the whole text)."""

    text: str = ""

    def _text(self) -> JSONObject:
        return {"part": {"type": "text", "text": self.text}}

    @classmethod
    def _text_fields(cls, payload: JSONObject) -> dict[str, str]:
        part = payload.get("part")
        text = part.get("text") if isinstance(part, dict) else None
        return {"text": text if isinstance(text, str) else ""}


@dataclass(frozen=True, kw_only=True)
class ContentPartAdded(ContentPartEvent):
    TYPE: ClassVar[str] = "response.content_part.added"


@dataclass(frozen=True, kw_only=True)
class ContentPartDone(ContentPartEvent):
    TYPE: ClassVar[str] = "response.content_part.done"


@dataclass(frozen=True, kw_only=True)
class OutputTextDelta(_TextEvent):
    TYPE: ClassVar[str] = "response.output_text.delta"
    delta: str

    def _text(self) -> JSONObject:
        return {"delta": self.delta}

    @classmethod
    def _text_fields(cls, payload: JSONObject) -> dict[str, str]:
        delta = payload.get("delta")
        return {"delta": delta if isinstance(delta, str) else ""}


@dataclass(frozen=True, kw_only=True)
class OutputTextDone(_TextEvent):
    TYPE: ClassVar[str] = "response.output_text.done"
    text: str

    def _text(self) -> JSONObject:
        return {"text": self.text}

    @classmethod
    def _text_fields(cls, payload: JSONObject) -> dict[str, str]:
        text = payload.get("text")
        return {"text": text if isinstance(text, str) else ""}


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(ServerEvent):
    TYPE: ClassVar[str] = "error"
    error: ErrorInfo

    def _body(self) -> JSONObject:
        return {"error": self.error.encode()}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        error = _as_object(payload.get("error"))
        param, cause, retry = error.get("param"), error.get("event_id"), error.get("retry_after_s")
        return cls(
            event_id=_event_id(payload),
            error=ErrorInfo(
                str(error.get("code") or "server_error"),
                str(error.get("message") or "unknown error"),
                "invalid_request_error" if error.get("type") == "invalid_request_error" else "server_error",
                param if isinstance(param, str) else None,
                cause if isinstance(cause, str) else None,
                retry if isinstance(retry, int) and not isinstance(retry, bool) else None,
            ),
        )


@dataclass(frozen=True, kw_only=True)
class InputVideoStats(ServerEvent):
    """``input_video.stats`` (extension): the session's `SessionStats`, its fields at the top level."""

    TYPE: ClassVar[str] = "input_video.stats"
    stats: SessionStats

    def _body(self) -> JSONObject:
        return self.stats.to_dict()  # type: ignore[return-value]  # JSON values only

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        return cls(event_id=_event_id(payload), stats=SessionStats.from_dict(payload))


def _event_id(payload: Mapping[str, JSON]) -> str:
    event_id = payload.get("event_id")
    return event_id if isinstance(event_id, str) else ""


SERVER_EVENTS: Mapping[str, type[ServerEvent]] = {
    cls.TYPE: cls
    for cls in (
        SessionCreated,
        SessionUpdated,
        SessionResumed,
        ConversationItemAdded,
        ConversationItemDone,
        ConversationItemDeleted,
        ResponseCreated,
        OutputItemAdded,
        ContentPartAdded,
        OutputTextDelta,
        OutputTextDone,
        ContentPartDone,
        OutputItemDone,
        ResponseDone,
        ErrorEvent,
        InputVideoStats,
    )
}


def decode_server_event(payload: JSONObject) -> ServerEvent:
    """The typed event for one server JSON object; unknown types become `UnknownServerEvent`."""
    cls = SERVER_EVENTS.get(str(payload.get("type")))
    if cls is not None:
        with contextlib.suppress(TypeError, ValueError):  # a required field missing or of the wrong type
            return cls.decode(payload)  # type: ignore[attr-defined, no-any-return]  # all in the table have one
    return UnknownServerEvent(event_id=_event_id(payload), name=str(payload.get("type")), payload=payload)  # type: ignore[attr-defined, no-any-return]  # every class in the table has one


# -- client events


@dataclass(frozen=True, kw_only=True)
class ClientEvent:
    """A client event; ``event_id`` (optional) comes back in ``error.event_id`` of an error it causes."""

    TYPE: ClassVar[str] = ""
    event_id: str | None = None

    @property
    def type(self) -> str:
        return self.TYPE

    def encode(self) -> JSONObject:
        out: JSONObject = {"type": self.type}
        if self.event_id is not None:
            out["event_id"] = self.event_id
        return {**out, **self._body()}

    def to_json(self) -> str:
        return json.dumps(self.encode(), ensure_ascii=False, separators=(",", ":"))

    def _body(self) -> JSONObject:
        return {}


@dataclass(frozen=True)
class ChangeFilterUpdate:
    """The ``video.change_filter`` block of ``session.update``; None leaves a setting as it is.

    Types are checked here, ranges where the settings are applied (the server's protocol core).
    """

    enabled: bool | None = None
    threshold: float | None = None
    keepalive_s: float | None = None

    def changes(self) -> dict[str, bool | float]:
        """The settings this update gives, by name."""
        values = {"enabled": self.enabled, "threshold": self.threshold, "keepalive_s": self.keepalive_s}
        return {k: v for k, v in values.items() if v is not None}

    def encode(self) -> JSONObject:
        return dict(self.changes())

    @classmethod
    def decode(cls, payload: JSON) -> ChangeFilterUpdate:
        param = "session.video.change_filter"
        block = _object(payload, param, "change_filter")
        enabled = block.get("enabled")
        if "enabled" in block and not isinstance(enabled, bool):
            message = "change_filter.enabled must be true or false"
            raise WireError("invalid_value", message, f"{param}.enabled")
        numbers: dict[str, float | None] = {}
        for name in ("threshold", "keepalive_s"):
            value = block.get(name)
            if name in block and not is_number(value):
                raise WireError("invalid_value", f"change_filter.{name} must be a number", f"{param}.{name}")
            numbers[name] = float(value) if is_number(value) else None
        flag = enabled if isinstance(enabled, bool) else None
        return cls(flag, numbers["threshold"], numbers["keepalive_s"])


@dataclass(frozen=True)
class VideoUpdate:
    """The ``video`` block of ``session.update``; None leaves a setting as it is."""

    max_fps: float | None = None
    schedule: Schedule | None = None
    positions: str | None = None
    change_filter: ChangeFilterUpdate | None = None

    def encode(self) -> JSONObject:
        values: JSONObject = {"max_fps": self.max_fps, "schedule": self.schedule, "positions": self.positions}
        if self.change_filter is not None:
            values["change_filter"] = self.change_filter.encode()
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def decode(cls, payload: JSON) -> VideoUpdate:
        video = _object(payload, "session.video", "video")
        fps = video.get("max_fps")
        if "max_fps" in video and not is_number(fps):
            raise WireError("invalid_value", "max_fps must be a number", "session.video.max_fps")
        schedule = video.get("schedule")
        if "schedule" in video and schedule not in SCHEDULES:
            raise WireError(
                "invalid_value", 'schedule must be "parallel" or "sequential"', "session.video.schedule"
            )
        positions = video.get("positions")
        if "positions" in video and not isinstance(positions, str):
            raise WireError("invalid_value", "positions must be a string", "session.video.positions")
        change_filter = None
        if "change_filter" in video:
            change_filter = ChangeFilterUpdate.decode(video["change_filter"])
        return cls(float(fps) if is_number(fps) else None, schedule, positions, change_filter)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SessionUpdateFields:
    """What one ``session.update`` changes; `UNSET` leaves a field, None resets it to the server's value."""

    instructions: str | Unset | None = UNSET
    max_output_tokens: int | Literal["inf"] | Unset | None = UNSET
    video: VideoUpdate | None = None

    def encode(self) -> JSONObject:
        out: JSONObject = {"type": "realtime"}
        if self.instructions is not UNSET:
            out["instructions"] = self.instructions
        if self.max_output_tokens is not UNSET:
            out["max_output_tokens"] = self.max_output_tokens
        if self.video is not None:
            out["video"] = self.video.encode()
        return out

    @classmethod
    def decode(cls, payload: JSON) -> SessionUpdateFields:
        session = _object(payload, "session", "session")
        if "type" in session and session["type"] != "realtime":
            raise WireError("invalid_value", 'only session type "realtime" is supported', "session.type")
        _only_text_output(session.get("output_modalities"), "session.output_modalities")
        _no_tools(session.get("tools"), "session.tools")
        instructions: str | Unset | None = UNSET
        if "instructions" in session:
            instructions = _optional_str(session["instructions"], "session.instructions", "instructions")
        tokens: int | Literal["inf"] | Unset | None = UNSET
        if "max_output_tokens" in session:
            tokens = _max_output_tokens(session["max_output_tokens"], "session.max_output_tokens")
        video = VideoUpdate.decode(session["video"]) if "video" in session else None
        return cls(instructions, tokens, video)


@dataclass(frozen=True, kw_only=True)
class SessionUpdate(ClientEvent):
    TYPE: ClassVar[str] = "session.update"
    session: SessionUpdateFields = SessionUpdateFields()

    def _body(self) -> JSONObject:
        return {"session": self.session.encode()}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        return cls(
            event_id=_client_event_id(payload), session=SessionUpdateFields.decode(payload.get("session"))
        )


@dataclass(frozen=True)
class UserMessage:
    """The item of ``conversation.item.create``: a user turn of texts and images."""

    content: tuple[InputText | InputImage, ...]
    id: str | None = None

    def encode(self) -> JSONObject:
        out: JSONObject = {"type": "message", "role": "user", "content": [p.encode() for p in self.content]}
        if self.id is not None:
            out["id"] = self.id
        return out

    @classmethod
    def decode(cls, payload: JSON) -> UserMessage:
        item = _object(payload, "item", "item")
        if item.get("type", "message") != "message":
            raise WireError("invalid_value", 'only items of type "message" are supported', "item.type")
        if item.get("role") != "user":
            raise WireError("invalid_value", 'only messages with role "user" can be created', "item.role")
        item_id = item.get("id")
        if item_id is not None and (not isinstance(item_id, str) or not item_id):
            raise WireError("invalid_value", "item.id must be a non-empty string", "item.id")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise WireError("invalid_value", "item.content must be a non-empty list", "item.content")
        return cls(
            tuple(_decode_input_part(part, f"item.content[{i}]") for i, part in enumerate(content)), item_id
        )


def _decode_input_part(payload: JSON, where: str) -> InputText | InputImage:
    part = _object(payload, where, "a content part")
    kind = part.get("type")
    if kind == "input_text":
        text = part.get("text")
        if not isinstance(text, str):
            raise WireError("invalid_value", "text must be a string", f"{where}.text")
        return InputText(text)
    if kind == "input_image":
        detail = part.get("detail", "auto")
        if detail not in IMAGE_DETAILS:
            raise WireError("invalid_value", 'detail must be "auto", "low" or "high"', f"{where}.detail")
        url = part.get("image_url")
        if not isinstance(url, str):
            raise WireError("invalid_value", "image_url must be a data URL string", f"{where}.image_url")
        return InputImage(url, detail)  # type: ignore[arg-type]  # one of IMAGE_DETAILS
    raise WireError("invalid_value", "content parts must be input_text or input_image", f"{where}.type")


@dataclass(frozen=True, kw_only=True)
class ConversationItemCreate(ClientEvent):
    """A user turn; ``previous_item_id`` (optional) must be the last item's id, or ``"root"`` while empty."""

    TYPE: ClassVar[str] = "conversation.item.create"
    item: UserMessage
    previous_item_id: str | None = None

    def _body(self) -> JSONObject:
        out: JSONObject = {"item": self.item.encode()}
        if self.previous_item_id is not None:
            out["previous_item_id"] = self.previous_item_id
        return out

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        previous = _optional_str(payload.get("previous_item_id"), "previous_item_id", "previous_item_id")
        return cls(
            event_id=_client_event_id(payload),
            item=UserMessage.decode(payload.get("item")),
            previous_item_id=previous,
        )


@dataclass(frozen=True)
class ResponseParams:
    """The ``response`` of ``response.create``: overrides for this response only (None: the session's)."""

    instructions: str | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    metadata: JSONObject | None = None

    def encode(self) -> JSONObject:
        values: JSONObject = {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": copy.deepcopy(self.metadata),
        }
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def decode(cls, payload: JSON) -> ResponseParams:
        if payload is None:
            return cls()
        params = _object(payload, "response", "response")
        _only_text_output(params.get("output_modalities"), "response.output_modalities")
        if params.get("conversation", "auto") != "auto":
            raise WireError(
                "invalid_value",
                'only responses in the default conversation ("auto")',
                "response.conversation",
            )
        _no_tools(params.get("tools"), "response.tools")
        if params.get("input") is not None:
            raise WireError("invalid_value", "custom response input is not supported", "response.input")
        instructions = _optional_str(params.get("instructions"), "response.instructions", "instructions")
        tokens = _max_output_tokens(params.get("max_output_tokens"), "response.max_output_tokens")
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise WireError("invalid_value", "metadata must be an object", "response.metadata")
        return cls(instructions, tokens, metadata)


@dataclass(frozen=True, kw_only=True)
class ResponseCreate(ClientEvent):
    TYPE: ClassVar[str] = "response.create"
    response: ResponseParams = ResponseParams()

    def _body(self) -> JSONObject:
        return {"response": self.response.encode()}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        return cls(
            event_id=_client_event_id(payload), response=ResponseParams.decode(payload.get("response"))
        )


@dataclass(frozen=True, kw_only=True)
class ResponseCancel(ClientEvent):
    """Cancel the active response (``response_id``, if given, must be its id)."""

    TYPE: ClassVar[str] = "response.cancel"
    response_id: str | None = None

    def _body(self) -> JSONObject:
        return {} if self.response_id is None else {"response_id": self.response_id}

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        wanted = _optional_str(payload.get("response_id"), "response_id", "response_id")
        return cls(event_id=_client_event_id(payload), response_id=wanted)


@dataclass(frozen=True, kw_only=True)
class InputVideoAppend(ClientEvent):
    """One frame of the session's live video (extension); ``timestamp_ms`` is its stream time."""

    TYPE: ClassVar[str] = "input_video.append"
    image: str
    timestamp_ms: float | None = None

    def _body(self) -> JSONObject:
        out: JSONObject = {"image": self.image}
        if self.timestamp_ms is not None:
            out["timestamp_ms"] = self.timestamp_ms
        return out

    @classmethod
    def decode(cls, payload: JSONObject) -> Self:
        image = payload.get("image")
        if not isinstance(image, str):
            raise WireError("invalid_value", "expected a data URL string", "image")
        timestamp = payload.get("timestamp_ms")
        if timestamp is not None and (not is_number(timestamp) or timestamp < 0):
            raise WireError("invalid_value", "timestamp_ms must be a non-negative number", "timestamp_ms")
        return cls(
            event_id=_client_event_id(payload),
            image=image,
            timestamp_ms=None if timestamp is None else float(timestamp),
        )


def _client_event_id(payload: JSONObject) -> str | None:
    return _optional_str(payload.get("event_id"), "event_id", "event_id")


CLIENT_EVENTS: Mapping[str, type[ClientEvent]] = {
    cls.TYPE: cls
    for cls in (SessionUpdate, ConversationItemCreate, ResponseCreate, ResponseCancel, InputVideoAppend)
}


def decode_client_event(payload: JSONObject) -> ClientEvent:
    """The typed client event of one JSON object; `WireError` says what does not match."""
    kind = payload.get("type")
    cls = CLIENT_EVENTS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        what = f"unsupported event type {kind!r}" if isinstance(kind, str) else "missing event type"
        raise WireError("unknown_event", what, "type")
    return cls.decode(payload)  # type: ignore[attr-defined, no-any-return]  # every class in the table has one
