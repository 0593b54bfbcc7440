"""Sans-I/O core of the realtime wire protocol (OpenAI Realtime GA events, text output, video extensions).

The core is a pure state machine in the style of h11/websockets: the transport feeds it one client
message at a time (``receive``) and the session runtime reports how a response streams
(``text_delta``, ``response_finished``, ...); every call returns a list of outputs, which are either
a `ServerEvent` (a typed event of `runtime.wire`, which the transport encodes and sends) or an
``Action`` (something the app must do: update the session, add a user message, ingest a frame,
start or cancel a generation). The events' shapes and their decoding live in `runtime.wire`, shared
with the client; this module adds what needs the session's state and the server's limits.
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

import json
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias

from runtime.wire import (
    FINAL_STATUSES,
    JSON,
    UNSET,
    ChangeFilterConfig,
    ChangeFilterUpdate,
    ContentPartAdded,
    ContentPartDone,
    ConversationItemAdded,
    ConversationItemCreate,
    ConversationItemDeleted,
    ConversationItemDone,
    ErrorEvent,
    ErrorInfo,
    InputImage,
    InputText,
    InputVideoAppend,
    InputVideoStats,
    JSONObject,
    MessageItem,
    OutputItemAdded,
    OutputItemDone,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseFailure,
    ResponseObject,
    ResponseStatus,
    ResumeInfo,
    Schedule,
    ServerEvent,
    SessionCreated,
    SessionObject,
    SessionResumed,
    SessionStats,
    SessionUpdate,
    SessionUpdated,
    StatusDetails,
    Usage,
    VideoConfig,
    VideoUpdate,
    WireError,
    decode_client_event,
    decode_image_data_url,
    is_int,
)
from streams.change import ChangeFilterSettings

__all__ = [
    "DEFAULT_VIDEO",
    "Action",
    "AddUserMessage",
    "AppendFrame",
    "CancelResponse",
    "ErrorEvent",
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

IdFactory = Callable[[str], str]
VideoSettings: TypeAlias = dict[str, float | str]  # max_fps, schedule and (once started) positions
DEFAULT_VIDEO: Mapping[str, float | str] = {"max_fps": 2.0, "schedule": "parallel"}


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
    """What ``session.update`` can change. ``video`` always holds max_fps, schedule and positions;
    ``change_filter`` is the wire's ``video.change_filter``, applied to every input of the connection.

    ``max_output_tokens=None`` means "as many as the server allows" (``Limits.max_output_tokens``),
    which is also what a client's ``"inf"`` becomes.
    """

    instructions: str | None = None
    max_output_tokens: int | None = None
    video: VideoSettings = field(default_factory=lambda: dict(DEFAULT_VIDEO))
    change_filter: ChangeFilterSettings = field(default_factory=ChangeFilterSettings)


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
    max_output_tokens: int


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


def error_event(
    code: str,
    message: str,
    *,
    param: str | None = None,
    client_event_id: str | None = None,
    event_id: str | None = None,
    retry_after_s: int | None = None,
) -> ErrorEvent:
    """Build an ``error`` event; ``type`` is ``server_error`` for server-side causes."""
    return ErrorEvent(
        event_id=event_id or default_id("event"),
        error=ErrorInfo.of(code, message, param, client_event_id, retry_after_s),
    )


def session_limit_reached(message: str = "the server has no room for another session") -> ErrorEvent:
    """The error a transport sends before closing a connection it cannot serve (no core exists yet)."""
    return error_event("session_limit_reached", message)


# ---------------------------------------------------------------------------------------------
# Checks that need the server's limits (the schema's own checks are in runtime.wire)
# ---------------------------------------------------------------------------------------------


def _check_instructions(value: str | None, param: str, limits: Limits) -> None:
    if value is not None and len(value) > limits.max_instructions_chars:
        raise WireError(
            "invalid_value", f"instructions longer than {limits.max_instructions_chars} characters", param
        )


def _check_max_output_tokens(value: int | Literal["inf"] | None, param: str, limits: Limits) -> None:
    if is_int(value) and not 1 <= value <= limits.max_output_tokens:
        raise WireError(
            "invalid_value",
            f'max_output_tokens must be an integer from 1 to {limits.max_output_tokens} or "inf"',
            param,
        )


def _merge_video(
    update: VideoUpdate, current: VideoSettings, positions: str, limits: Limits
) -> VideoSettings:
    video = dict(current)
    if update.max_fps is not None:
        if not 0 < update.max_fps <= limits.max_video_fps:
            raise WireError(
                "invalid_value",
                f"max_fps must be a number in (0, {limits.max_video_fps}]",
                "session.video.max_fps",
            )
        video["max_fps"] = update.max_fps
    if update.schedule is not None:
        video["schedule"] = update.schedule
    if update.positions is not None and update.positions != positions:
        raise WireError(
            "invalid_value",
            f"positions is fixed by the server ({positions!r}) and cannot be changed per session",
            "session.video.positions",
        )
    return video


def _merge_change_filter(update: ChangeFilterUpdate, current: ChangeFilterSettings) -> ChangeFilterSettings:
    """The settings with the update's values, each checked by `ChangeFilterSettings` (one place for
    the ranges); a bad one is ``invalid_value`` naming its field."""
    settings = current
    for name, value in update.changes().items():
        try:
            settings = settings.updated({name: value})
        except ValueError as exc:
            raise WireError("invalid_value", str(exc), f"session.video.change_filter.{name}") from None
    return settings


def _usage(report: Mapping[str, JSON]) -> Usage:
    """OpenAI usage from what the engine reports (input_tokens, output_tokens, details...)."""

    def count(value: JSON) -> int:
        return int(value) if isinstance(value, int | float) else 0

    def details(value: JSON) -> dict[str, int]:
        return {k: count(v) for k, v in value.items()} if isinstance(value, dict) else {}

    input_tokens, output_tokens = count(report.get("input_tokens")), count(report.get("output_tokens"))
    return Usage(
        input_tokens,
        output_tokens,
        {"text_tokens": 0, "image_tokens": 0, "audio_tokens": 0, "cached_tokens": 0}
        | details(report.get("input_token_details")),
        {"text_tokens": output_tokens, "audio_tokens": 0} | details(report.get("output_token_details")),
    )


# ---------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------


@dataclass
class _Response:
    id: str
    item_id: str
    max_output_tokens: int
    metadata: JSONObject | None
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
        self._items: deque[MessageItem] = deque(maxlen=limits.max_conversation_items)
        self._response: _Response | None = None
        self._usage = {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0}
        self._started = False
        self.last_client_event_id: str | None = None  # of the last client message received

    # -- read-only state -----------------------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        return replace(self._config, video=dict(self._config.video))

    @property
    def active_response_id(self) -> str | None:
        return self._response.id if self._response else None

    @property
    def items(self) -> tuple[MessageItem, ...]:
        """The remembered conversation items, oldest first."""
        return tuple(self._items)

    @property
    def usage(self) -> dict[str, int]:
        """Token totals over all finished responses of this session."""
        return dict(self._usage)

    # -- session start ---------------------------------------------------------------------------

    def start(self, resume: ResumeInfo | None = None) -> list[Output]:
        """The first event of every session: ``session.created`` (with the session's resume token,
        if it can be resumed)."""
        if self._started:
            raise RuntimeError("start() was already called")
        self._started = True
        session = replace(self._session_object(), resume=resume)
        return [SessionCreated(event_id=self._new_id("event"), session=session)]

    def resumed(self, resume: ResumeInfo, replayed: int, last_event_id: str | None) -> SessionResumed:
        """The first event on a socket that resumed this session (the ``replayed`` missed events
        follow it); not part of the session's own event stream, so the transport does not log it. It
        names the last client event received, so the client can resend what was lost on the way."""
        session = replace(self._session_object(), resume=resume)
        return SessionResumed(
            event_id=self._new_id("event"),
            session=session,
            replayed=replayed,
            last_event_id=last_event_id,
            last_client_event_id=self.last_client_event_id,
        )

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
            payload = json.loads(message)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return [self._error("invalid_json", "the message is not valid JSON")]
        if not isinstance(payload, dict):
            return [self._error("invalid_json", "the message must be a JSON object")]
        client_event_id = payload.get("event_id")
        if client_event_id is not None and not isinstance(client_event_id, str):
            return [self._error("invalid_value", "event_id must be a string", param="event_id")]
        if client_event_id is not None:
            self.last_client_event_id = client_event_id
        try:
            match decode_client_event(payload):
                case SessionUpdate() as event:
                    return self._on_session_update(event)
                case ConversationItemCreate() as event:
                    return self._on_item_create(event)
                case ResponseCreate() as event:
                    return self._on_response_create(event)
                case ResponseCancel() as event:
                    return self._on_response_cancel(event)
                case InputVideoAppend() as event:
                    return self._on_video_append(event)
                case event:
                    raise AssertionError(f"no handler for {event.type}")
        except WireError as exc:
            return [self._error(exc.code, exc.message, param=exc.param, client_event_id=client_event_id)]

    def _on_session_update(self, event: SessionUpdate) -> list[Output]:
        fields, config, defaults = event.session, self._config, self._defaults
        instructions, max_tokens, video = config.instructions, config.max_output_tokens, config.video
        change_filter = config.change_filter
        # null restores the server default; "inf" means up to the server limit (stored as None).
        if fields.instructions is not UNSET:
            _check_instructions(fields.instructions, "session.instructions", self.limits)
            instructions = defaults.instructions if fields.instructions is None else fields.instructions
        if fields.max_output_tokens is not UNSET:
            tokens = fields.max_output_tokens
            _check_max_output_tokens(tokens, "session.max_output_tokens", self.limits)
            max_tokens = defaults.max_output_tokens if tokens is None else None if tokens == "inf" else tokens
        if fields.video is not None:
            video = _merge_video(fields.video, config.video, self.positions, self.limits)
            if fields.video.change_filter is not None:
                change_filter = _merge_change_filter(fields.video.change_filter, change_filter)
        self._config = SessionConfig(instructions, max_tokens, dict(video), change_filter)
        return [
            UpdateSession(self.config),
            SessionUpdated(event_id=self._new_id("event"), session=self._session_object()),
        ]

    def _on_item_create(self, event: ConversationItemCreate) -> list[Output]:
        previous = event.previous_item_id
        last_id = self._items[-1].id if self._items else None
        if previous is not None and previous != last_id and not (previous == "root" and last_id is None):
            raise WireError(
                "invalid_value",
                "items can only be appended: previous_item_id must be the last item's id",
                "previous_item_id",
            )
        message = event.item
        if message.id is not None and any(existing.id == message.id for existing in self._items):
            raise WireError("invalid_value", f"an item with id {message.id!r} already exists", "item.id")
        texts: list[str] = []
        images: list[bytes] = []
        echoed: list[InputText | InputImage] = []
        for index, part in enumerate(message.content):
            if isinstance(part, InputText):
                texts.append(part.text)
                echoed.append(part)
            else:
                assert part.image_url is not None  # the schema requires it in a client event
                where = f"item.content[{index}].image_url"
                images.append(decode_image_data_url(part.image_url, where, self.limits.max_image_bytes))
                # The image data is not echoed back (megabytes per event); the part says it was there.
                echoed.append(InputImage(detail=part.detail))
        stored = MessageItem(message.id or self._new_id("item"), "user", "completed", tuple(echoed))
        self._items.append(stored)
        return [
            AddUserMessage(stored.id, "\n".join(texts), tuple(images), event.event_id),
            ConversationItemAdded(event_id=self._new_id("event"), previous_item_id=last_id, item=stored),
            ConversationItemDone(event_id=self._new_id("event"), previous_item_id=last_id, item=stored),
        ]

    def _on_response_create(self, event: ResponseCreate) -> list[Output]:
        params = event.response
        if self._response is not None:
            raise WireError(
                "conversation_already_has_active_response",
                f"response {self._response.id} is still in progress; cancel it or wait for response.done",
            )
        _check_instructions(params.instructions, "response.instructions", self.limits)
        _check_max_output_tokens(params.max_output_tokens, "response.max_output_tokens", self.limits)
        instructions = params.instructions if params.instructions is not None else self._config.instructions
        if params.max_output_tokens == "inf":
            max_tokens = self.limits.max_output_tokens
        elif params.max_output_tokens is not None:
            max_tokens = params.max_output_tokens
        else:  # absent or null: the session's value
            max_tokens = self._config.max_output_tokens or self.limits.max_output_tokens
        response = _Response(self._new_id("resp"), self._new_id("item"), max_tokens, params.metadata)
        self._response = response
        previous_id = self._items[-1].id if self._items else None
        item = MessageItem(response.item_id, "assistant", "in_progress")
        self._items.append(item)
        return [
            StartResponse(response.id, instructions, max_tokens),
            ResponseCreated(
                event_id=self._new_id("event"), response=self._response_object(response, "in_progress")
            ),
            OutputItemAdded(event_id=self._new_id("event"), response_id=response.id, item=item),
            ConversationItemAdded(event_id=self._new_id("event"), previous_item_id=previous_id, item=item),
            ContentPartAdded(
                event_id=self._new_id("event"), response_id=response.id, item_id=response.item_id
            ),
        ]

    def _on_response_cancel(self, event: ResponseCancel) -> list[Output]:
        response = self._response
        if response is None or (event.response_id is not None and event.response_id != response.id):
            raise WireError("response_cancel_not_active", "there is no active response to cancel")
        if response.cancelling:
            return []  # already asked; response.done (cancelled) follows
        response.cancelling = True
        return [CancelResponse(response.id)]

    def _on_video_append(self, event: InputVideoAppend) -> list[Output]:
        image = decode_image_data_url(event.image, "image", self.limits.max_image_bytes)
        return [AppendFrame(image, event.timestamp_ms, event.event_id)]

    # -- calls from the app ----------------------------------------------------------------------

    def text_delta(self, response_id: str, delta: str) -> list[Output]:
        """Answer text as it is generated; ignored for a response that is not active or is being
        cancelled (the client asked to stop, so nothing more is shown)."""
        response = self._response
        if response is None or response.id != response_id or response.cancelling or not delta:
            return []
        response.text.append(delta)
        return [
            OutputTextDelta(
                event_id=self._new_id("event"), response_id=response.id, item_id=response.item_id, delta=delta
            )
        ]

    def response_finished(
        self,
        response_id: str,
        status: ResponseStatus,
        usage: Mapping[str, JSON],
        reason: str | None = None,
    ) -> list[Output]:
        """Close the active response: the closing events of its item, then ``response.done``.

        ``reason`` goes into ``status_details`` (cancelled: default "client_cancelled"; incomplete:
        default "max_output_tokens"; failed: the error message). Unknown ids are ignored.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"unknown response status {status!r}")
        response = self._response
        if response is None or response.id != response_id:
            return []
        self._response = None
        text = "".join(response.text)
        item_status = "completed" if status == "completed" else "incomplete"
        item = MessageItem(response.item_id, "assistant", item_status, (OutputText(text),))
        previous_id = None
        for index, stored in enumerate(self._items):
            if stored.id == response.item_id:
                previous_id = self._items[index - 1].id if index else None
                self._items[index] = item
                break
        report = _usage(usage)
        self._usage["total_tokens"] += report.total_tokens
        self._usage["input_tokens"] += report.input_tokens
        self._usage["output_tokens"] += report.output_tokens
        done = self._response_object(response, status, (item,), reason=reason, usage=report)
        ids = {"response_id": response.id, "item_id": response.item_id}
        return [
            OutputTextDone(event_id=self._new_id("event"), **ids, text=text),
            ContentPartDone(event_id=self._new_id("event"), **ids, text=text),
            OutputItemDone(event_id=self._new_id("event"), response_id=response.id, item=item),
            ConversationItemDone(event_id=self._new_id("event"), previous_item_id=previous_id, item=item),
            ResponseDone(event_id=self._new_id("event"), response=done),
        ]

    def video_stats(self, stats: SessionStats) -> list[Output]:
        """``input_video.stats``: the session's numbers as the app measured them."""
        return [InputVideoStats(event_id=self._new_id("event"), stats=stats)]

    def image_rejected(
        self, event_id: str | None, message: str, *, item_id: str | None = None
    ) -> list[Output]:
        """An image of ``event_id`` failed to decode or is too large (pixels): ``error`` invalid_image.

        Pass the ``AddUserMessage.item_id`` for a conversation item: the item is taken back out of the
        conversation and ``conversation.item.deleted`` follows the error, so the bad event leaves no
        trace. For ``input_video.append`` frames leave ``item_id`` None.
        """
        out: list[Output] = [self._error("invalid_image", message, client_event_id=event_id)]
        for stored in self._items:
            if item_id is not None and stored.id == item_id and stored.role == "user":
                self._items.remove(stored)
                out.append(ConversationItemDeleted(event_id=self._new_id("event"), item_id=item_id))
                break
        return out

    def engine_error(
        self, message: str, event_id: str | None = None, *, retry_after_s: int | None = None
    ) -> list[Output]:
        """The engine cannot serve (crashed, restarting, overloaded); ``retry_after_s`` while it
        restarts. Only the error event: an active response is still ended by the app with
        ``response_finished(..., "failed", ...)``."""
        error = error_event(
            "engine_unavailable",
            message,
            client_event_id=event_id,
            event_id=self._new_id("event"),
            retry_after_s=retry_after_s,
        )
        return [error]

    session_limit_reached = staticmethod(session_limit_reached)

    # -- building events ---------------------------------------------------------------------------

    def _error(
        self, code: str, message: str, *, param: str | None = None, client_event_id: str | None = None
    ) -> ErrorEvent:
        return error_event(
            code, message, param=param, client_event_id=client_event_id, event_id=self._new_id("event")
        )

    def _session_object(self) -> SessionObject:
        config = self._config
        schedule: Schedule = "sequential" if config.video["schedule"] == "sequential" else "parallel"
        change = config.change_filter
        return SessionObject(
            self.session_id,
            self.model,
            config.instructions,
            config.max_output_tokens or self.limits.max_output_tokens,
            VideoConfig(
                float(config.video["max_fps"]),
                schedule,
                self.positions,
                ChangeFilterConfig(change.enabled, change.threshold, change.keepalive_s),
            ),
        )

    def _response_object(
        self,
        response: _Response,
        status: ResponseStatus,
        output: tuple[MessageItem, ...] = (),
        *,
        reason: str | None = None,
        usage: Usage | None = None,
    ) -> ResponseObject:
        details: StatusDetails | None = None
        if status == "cancelled":
            details = StatusDetails("cancelled", reason or "client_cancelled")
        elif status == "incomplete":
            details = StatusDetails("incomplete", reason or "max_output_tokens")
        elif status == "failed":
            details = StatusDetails("failed", error=ResponseFailure(reason or "failed"))
        return ResponseObject(
            response.id,
            status,
            self._conversation_id,
            response.max_output_tokens,
            details,
            output,
            response.metadata,
            usage,
        )


def _too_large(message: str | bytes, limit: int) -> bool:
    """Size in UTF-8 bytes, without encoding when the length alone decides."""
    if isinstance(message, bytes | bytearray | memoryview):
        return len(message) > limit
    if len(message) > limit:
        return True
    if len(message) * 4 <= limit:
        return False
    return len(message.encode("utf-8", "surrogatepass")) > limit
