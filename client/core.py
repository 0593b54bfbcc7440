"""Sans-I/O core of the remote SDK: the client side of the realtime protocol as a pure state machine.

The I/O glue (``client/remote.py``) feeds it every server message (``receive``) and every caller
request (``ask``, ``cancel``, ``update``, ``append_frame``); each call returns the outputs to act on:
events to send (`Send`), answer text for a caller (`Delta`), an answer's end for its caller
(`AnswerEnded`), the server letting go of an answer (`AnswerReleased`), the reply to a request
(`Reply`), an error nobody waits for (`Unclaimed`), and every server event itself, typed (for
subscribers). No sockets, tasks or clocks: times come in as arguments, so every rule is testable.

**Reconnects.** The core remembers the session's resume token (``session.created``, then each
``session.resumed``) and the id of the last server event it took in (``last_event_id``). After an
unexpected disconnect the glue calls `disconnected`, reconnects with `resume_params` while
`should_reconnect` says so (`ReconnectPolicy` paces the tries), and feeds the new socket's events in as
usual: ``session.resumed``, then the events missed, which the server replays exactly once and in
order, so answers in flight continue where they stopped. Only when no resume works does it `close`.

An answer (`Answer`) is tracked by the one id the server gives it in ``response.created``. Before
that it is found by the ids of the two client events that asked for it. Its ``stage`` follows this
table (events in from the server, or calls from the caller); ``status`` is what its caller sees:

============  ==================================  ============  ==================================
stage         on                                  next stage    outputs
============  ==================================  ============  ==================================
preparing     submit, the server is free          sent          Send item, Send response.create
preparing     submit, the previous answer is      queued        (sent when that one is released)
              still held by the server
queued        the previous answer is released     sent          Send item, Send response.create
preparing,    cancel                              released      AnswerEnded (cancelled),
queued                                                          AnswerReleased; nothing is sent
sent          response.created                    created       (the answer takes the server's id)
sent,         error caused by response.create     released      AnswerEnded (failed), AnswerReleased
created
sent,         error caused by the item            (same)        AnswerEnded (failed), Send cancel
created
sent,         cancel (once)                       (same)        Send response.cancel
created
created       response.output_text.delta          created       Delta (unless ended)
created       response.done                       released      AnswerEnded (unless ended),
                                                                AnswerReleased
any           error response_cancel_not_active    released      AnswerReleased
              for its cancel
released      error response_cancel_not_active    released      (nothing: the cancel crossed
              for its cancel                                    response.done)
any           connection closed                   released      AnswerEnded (failed, unless ended),
                                                                AnswerReleased
============  ==================================  ============  ==================================

``status`` becomes final exactly once (`AnswerEnded`) and nothing is delivered for an answer after
it. One answer at a time, like the server: ``ask`` while the latest answer has not ended raises
``conversation_already_has_active_response``; an answer that has ended for its caller but is still
held by the server (a cancel winding down) makes the next one wait in ``queued``.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from runtime.wire import (
    FINAL_STATUSES,
    UNSET,
    ChangeFilterUpdate,
    ClientEvent,
    ConversationItemCreate,
    ErrorEvent,
    ErrorInfo,
    InputImage,
    InputText,
    InputVideoAppend,
    InputVideoStats,
    OutputTextDelta,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseParams,
    ResponseStatus,
    ResumeInfo,
    ServerEvent,
    SessionCreated,
    SessionObject,
    SessionResumed,
    SessionStats,
    SessionUpdate,
    SessionUpdated,
    SessionUpdateFields,
    StatusDetails,
    Usage,
    UserMessage,
    VideoUpdate,
    decode_server_event,
)

__all__ = [
    "Answer",
    "AnswerEnded",
    "AnswerReleased",
    "ClientProtocol",
    "Delta",
    "Output",
    "RealtimeError",
    "ReconnectPolicy",
    "Reply",
    "Send",
    "Unclaimed",
    "session_fields",
]

Stage = Literal["preparing", "queued", "sent", "created", "released"]


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
    def from_info(cls, error: ErrorInfo) -> RealtimeError:
        """From the ``error`` object of an ``error`` event."""
        return cls(error.code, error.message, type=error.type, param=error.param, event_id=error.event_id)

    @classmethod
    def from_details(cls, details: StatusDetails | None) -> RealtimeError:
        """From a failed response's ``status_details``."""
        failure = details.error if details is not None else None
        if failure is None:
            return cls("response_failed", "the response failed", type="server_error")
        return cls(failure.code, failure.message, type=failure.type)


@dataclass(eq=False)
class Answer:
    """One answer as the client tracks it; ``id`` is the server's, from ``response.created``."""

    item_event_id: str  # conversation.item.create: an error for it means no user turn
    create_event_id: str  # response.create: an error for it means no response at all
    question: str
    params: ResponseParams
    id: str | None = None
    stage: Stage = "preparing"
    status: ResponseStatus = "in_progress"
    status_details: StatusDetails | None = None
    usage: Usage | None = None
    error: RealtimeError | None = None
    parts: list[str] = field(default_factory=list)
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    cancel_event_id: str | None = None
    server_error: RealtimeError | None = None  # an engine failure, raised when response.done (failed) comes
    sent_at: float | None = None
    first_at: float | None = None
    last_at: float | None = None
    prepared: tuple[ClientEvent, ...] = ()  # its two events, built by submit, not sent yet

    @property
    def max_tokens(self) -> int | None:
        tokens = self.params.max_output_tokens
        return tokens if isinstance(tokens, int) else None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def done(self) -> bool:
        """Ended for its caller (the server may still be winding it down)."""
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class Send:
    """Send this client event now (in order with the others)."""

    event: ClientEvent


@dataclass(frozen=True)
class Delta:
    answer: Answer
    text: str


@dataclass(frozen=True)
class AnswerEnded:
    """``answer.status`` is final: end its caller's iteration (raising ``answer.error`` if set)."""

    answer: Answer


@dataclass(frozen=True)
class AnswerReleased:
    """The server holds nothing for this answer any more: a cancel waiting for it may return."""

    answer: Answer


@dataclass(frozen=True)
class Reply:
    """The answer to a request (``session.update``): ``session.updated``, or the error it caused."""

    event_id: str
    result: SessionUpdated | RealtimeError


@dataclass(frozen=True)
class Unclaimed:
    """A server error no caller waits for (a rejected frame, say): for ``on_error`` or the log."""

    error: RealtimeError


Output: TypeAlias = Send | Delta | AnswerEnded | AnswerReleased | Reply | Unclaimed | ServerEvent


def default_event_id() -> str:
    return f"event_{uuid.uuid4().hex[:24]}"


FINAL_CLOSE_CODES = frozenset({1000, 1001, 4000})
"""Server close codes after which a resume cannot work: a normal close, a shutdown (1001), another
connection resuming the session (4000). Anything else (no close frame, 1006, 1008 for a full send
buffer, 1011, ...) is worth a resume."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """How the remote SDK reconnects after an unexpected disconnect: up to ``attempts`` tries, the first
    after ``initial_delay`` seconds, each wait doubling up to ``max_delay``; never past the session's
    grace period (the server's ``resume.grace_s``)."""

    attempts: int = 8
    initial_delay: float = 0.1
    max_delay: float = 2.0
    open_timeout: float = 5.0  # per try: the socket and its first event (session.resumed)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError("attempts must be >= 1 and 0 <= initial_delay <= max_delay")

    def delays(self, grace_s: float | None = None) -> list[float]:
        """The wait before each try; cut where the total would pass ``grace_s``."""
        out: list[float] = []
        delay, total = self.initial_delay, 0.0
        for _ in range(self.attempts):
            if grace_s is not None and out and total + delay > grace_s:
                break
            out.append(delay)
            total += delay
            delay = min(self.max_delay, max(delay * 2, 0.01))
        return out


class ClientProtocol:
    """One remote session's client state: the session, the answers, the requests waiting for a reply."""

    def __init__(self, new_event_id: Callable[[], str] = default_event_id) -> None:
        self._new_event_id = new_event_id
        self.session: SessionObject | None = None  # from session.created / session.updated
        self.video: InputVideoStats | None = None  # the latest input_video.stats
        self.last_error: RealtimeError | None = None  # the latest error no ask or request took
        self.closed = False
        self.close_reason: str | None = None
        self.frames_sent = 0
        self.resume: ResumeInfo | None = None  # the token that resumes this session, and its grace
        self.last_event_id: str | None = None  # the last server event taken in (what a resume names)
        self.online = False  # a socket carries the session (False while reconnecting)
        self.reconnects = 0  # resumes that worked
        # client events sent, (event_id, text or None for a frame): what a resume may have to resend
        self._sent: deque[tuple[str, str | None]] = deque(maxlen=256)
        self.latest: Answer | None = None  # the latest ask
        self._held: Answer | None = None  # the answer whose events the server has and not yet ended
        self._queued: Answer | None = None  # sent once the held one is released
        self._cancels_sent: deque[str] = deque(maxlen=64)  # recent response.cancel event ids
        self._uncreated: deque[Answer] = deque()  # sent, waiting for response.created (in order)
        self._by_id: dict[str, Answer] = {}
        self._requests: dict[str, None] = {}  # session.update event ids waiting for a reply, in order

    @property
    def session_id(self) -> str:
        return self.session.id if self.session is not None else ""

    # -- caller requests -------------------------------------------------------------------------

    def ask(self, text: str, max_tokens: int | None = None, *, instructions: str | None = None) -> Answer:
        """Register an answer (``preparing``); its images are given to `submit` once encoded."""
        self._check_open()
        if self.latest is not None and not self.latest.done:
            raise RealtimeError(
                "conversation_already_has_active_response",
                "an answer is still streaming: cancel it or wait for its end",
            )
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        params = ResponseParams(instructions=instructions, max_output_tokens=max_tokens)
        answer = Answer(self._new_event_id(), self._new_event_id(), text, params)
        self.latest = answer
        return answer

    def submit(self, answer: Answer, image_urls: Sequence[str], now: float) -> list[Output]:
        """The answer's images are ready (data URLs): send it, or queue it behind the held answer."""
        if answer.stage != "preparing":
            return []  # cancelled (or the connection closed) while its images were encoded
        content = (InputText(answer.question), *(InputImage(url) for url in image_urls))
        answer.prepared = (
            ConversationItemCreate(event_id=answer.item_event_id, item=UserMessage(content)),
            ResponseCreate(event_id=answer.create_event_id, response=answer.params),
        )
        if self._held is not None:
            answer.stage = "queued"
            self._queued = answer
            return []
        return self._send_answer(answer, now)

    def cancel(self, answer: Answer) -> list[Output]:
        """Stop an answer: locally if the server never saw it, else one ``response.cancel``."""
        if answer.stage in ("preparing", "queued"):
            if self._queued is answer:
                self._queued = None
            out = self._end(answer, "cancelled", details=StatusDetails("cancelled", "client_cancelled"))
            return out + self._release(answer, now=None)
        if answer.stage == "released" or answer.cancel_event_id is not None or self.closed:
            return []
        answer.cancel_event_id = self._new_event_id()
        self._cancels_sent.append(answer.cancel_event_id)
        return [Send(ResponseCancel(event_id=answer.cancel_event_id, response_id=answer.id))]

    def update(self, fields: SessionUpdateFields) -> SessionUpdate:
        """A ``session.update`` whose reply (`Reply` with its event id) the caller waits for."""
        self._check_open()
        event = SessionUpdate(event_id=self._new_event_id(), session=fields)
        assert event.event_id is not None
        self._requests[event.event_id] = None
        return event

    def forget(self, event_id: str) -> None:
        """The caller stopped waiting for this request (a timeout): a late reply is not routed to it."""
        self._requests.pop(event_id, None)

    def append_frame(self, image_url: str, timestamp: float | None) -> InputVideoAppend:
        """One video frame (a data URL); ``timestamp`` in seconds becomes ``timestamp_ms``."""
        self._check_open()
        self.frames_sent += 1
        return InputVideoAppend(
            event_id=self._new_event_id(),
            image=image_url,
            timestamp_ms=None if timestamp is None else timestamp * 1000.0,
        )

    def disconnected(self) -> None:
        """The socket is gone, not (yet) the session: answers and requests stay as they are until a
        resume brings the missed events, or `close` ends them."""
        self.online = False

    def should_reconnect(self, close_code: int | None) -> bool:
        """Whether a socket that closed with ``close_code`` (None: no close frame) is worth a resume."""
        return not self.closed and self.resume is not None and close_code not in FINAL_CLOSE_CODES

    def resume_params(self) -> dict[str, str]:
        """The query parameters of the reconnect: the token, and the last event this client has."""
        if self.resume is None:
            raise RealtimeError("connection_closed", "the server gave this session no resume token")
        params = {"resume": self.resume.token}
        if self.last_event_id is not None:
            params["last_event_id"] = self.last_event_id
        return params

    def sent(self, event_id: str | None, text: str | None) -> None:
        """A client event went out on the socket; ``text`` None: not worth sending again (a frame)."""
        if event_id is not None:
            self._sent.append((event_id, text))

    def resend_after(self, last_client_event_id: str | None) -> list[str] | None:
        """What to send again on a resumed socket: the events sent after the last one the server got
        (``session.resumed``'s ``last_client_event_id``; None: it got none), frames left out. None when
        that event is no longer among those remembered (then nothing can be told, nothing is resent)."""
        ids = [event_id for event_id, _ in self._sent]
        if last_client_event_id is None:
            start = 0
        elif last_client_event_id in ids:
            start = len(ids) - ids[::-1].index(last_client_event_id)
        else:
            return None
        for _ in range(start):  # the server has these: forget them
            self._sent.popleft()
        return [text for _, text in self._sent if text is not None]

    def check_open(self) -> None:
        """Raise ``connection_closed`` once the connection is gone (for events sent as they are)."""
        self._check_open()

    def close(self, reason: str) -> list[Output]:
        """The connection is gone (the first reason given is kept): every waiting caller is told."""
        if not self.closed:
            self.closed = True
            self.close_reason = reason
        error = RealtimeError("connection_closed", f"the session is closed ({self.close_reason})")
        out: list[Output] = [Reply(event_id, error) for event_id in self._requests]
        self._requests.clear()
        for answer in (self.latest, self._held, self._queued, *self._uncreated, *self._by_id.values()):
            if answer is not None and answer.stage != "released":
                out += self._end(answer, "failed", error=error)
                out += self._release(answer, now=None)
        return out

    # -- server events -----------------------------------------------------------------------------

    def receive(self, message: str | bytes, now: float) -> list[Output]:
        """One server message: what it changes, then the typed event itself (not JSON, or once the
        connection is closed: nothing)."""
        if self.closed:
            return []
        try:
            payload = json.loads(message)
        except ValueError:
            return []
        if not isinstance(payload, dict):
            return []
        event = decode_server_event(payload)
        if event.event_id and not isinstance(event, SessionResumed):  # that one is not replayable
            self.last_event_id = event.event_id
        return [*self._handle(event, now), event]

    def _handle(self, event: ServerEvent, now: float) -> list[Output]:
        if isinstance(event, SessionCreated):
            self.session = event.session
            self.resume = event.session.resume
            self.online = True
        elif isinstance(event, SessionResumed):
            self.session = event.session
            self.resume = event.session.resume or self.resume
            self.reconnects += 1  # (``online`` again is the glue's call: once what waited has gone out)
        elif isinstance(event, SessionUpdated):
            self.session = event.session
            if self._requests:
                event_id = next(iter(self._requests))  # replies come in order
                del self._requests[event_id]
                return [Reply(event_id, event)]
        elif isinstance(event, ResponseCreated):
            if self._uncreated:
                answer = self._uncreated.popleft()
                answer.id = event.response.id
                answer.stage = "created"
                self._by_id[answer.id] = answer
        elif isinstance(event, OutputTextDelta):
            answer = self._by_id.get(event.response_id)
            if answer is not None and not answer.done and event.delta:
                return [self._delta(answer, event.delta, now)]
        elif isinstance(event, ResponseDone):
            answer = self._by_id.get(event.response.id)
            if answer is not None:
                return self._response_done(answer, event, now)
        elif isinstance(event, InputVideoStats):
            self.video = event
        elif isinstance(event, ErrorEvent):
            return self._error(event, now)
        return []

    def _delta(self, answer: Answer, text: str, now: float) -> Delta:
        if answer.first_at is None:
            answer.first_at = now
            if answer.sent_at is not None:
                answer.ttft_ms = (now - answer.sent_at) * 1000.0
        answer.last_at = now
        answer.parts.append(text)
        return Delta(answer, text)

    def _response_done(self, answer: Answer, event: ResponseDone, now: float) -> list[Output]:
        response = event.response
        out: list[Output] = []
        if not answer.done:
            tokens = (response.usage.output_tokens if response.usage else 0) or len(answer.parts)
            if answer.first_at is not None and answer.last_at is not None and tokens > 1:
                elapsed = answer.last_at - answer.first_at
                answer.tokens_per_s = (tokens - 1) / elapsed if elapsed > 0 else None
            error = None
            if response.status == "failed":
                error = answer.server_error or RealtimeError.from_details(response.status_details)
            out += self._end(answer, response.status, details=response.status_details, error=error)
            answer.usage = response.usage
        return out + self._release(answer, now)

    def _error(self, event: ErrorEvent, now: float) -> list[Output]:
        error = RealtimeError.from_info(event.error)
        cause = event.error.event_id
        if cause is not None and cause in self._requests:
            del self._requests[cause]
            return [Reply(cause, error)]
        for answer in self._answers():
            if cause is not None and cause == answer.cancel_event_id:
                if event.error.code == "response_cancel_not_active":
                    return self._release(answer, now)  # nothing left to cancel
                return []
            if cause is not None and cause == answer.create_event_id:
                return self._end(answer, "failed", error=error) + self._release(answer, now)
            if cause is not None and cause == answer.item_event_id:
                # The user turn was rejected: stop the answer the response.create has started.
                return self._end(answer, "failed", error=error) + self.cancel(answer)
        if cause in self._cancels_sent and event.error.code == "response_cancel_not_active":
            return []  # our cancel crossed the answer's end (already released): nothing went wrong
        self.last_error = error
        if self.session is None:  # e.g. session_limit_reached before the connection closes
            return []
        held = self._held
        if cause is None and held is not None and event.error.type == "server_error":
            # The engine failed the answer being served; response.done (failed) follows and raises it.
            if not held.done:
                held.server_error = error
            return []
        return [Unclaimed(error)]

    # -- answers ----------------------------------------------------------------------------------------

    def _answers(self) -> list[Answer]:
        """Answers the server may still send something about."""
        return [a for a in (self._held, *self._uncreated, *self._by_id.values()) if a is not None]

    def _send_answer(self, answer: Answer, now: float | None) -> list[Output]:
        answer.stage = "sent"
        answer.sent_at = now
        self._held = answer
        self._uncreated.append(answer)
        events, answer.prepared = answer.prepared, ()
        return [Send(event) for event in events]

    def _end(
        self,
        answer: Answer,
        status: ResponseStatus,
        *,
        details: StatusDetails | None = None,
        error: RealtimeError | None = None,
    ) -> list[Output]:
        if answer.done:
            return []
        answer.status = status
        answer.status_details = details
        answer.error = error
        return [AnswerEnded(answer)]

    def _release(self, answer: Answer, now: float | None) -> list[Output]:
        if answer.stage == "released":
            return []
        answer.stage = "released"
        if answer in self._uncreated:
            self._uncreated.remove(answer)
        if answer.id is not None:
            self._by_id.pop(answer.id, None)
        out: list[Output] = [AnswerReleased(answer)]
        if self._held is answer:
            self._held = None
            queued, self._queued = self._queued, None
            if queued is not None and not self.closed:
                out += self._send_answer(queued, now)
        return out

    # -- numbers -------------------------------------------------------------------------------------

    def stats(self) -> SessionStats:
        """The server's latest `SessionStats` for this session (``input_video.stats``), under the same
        names the embedded SDK's ``Session.stats()`` uses; before the first report, its zeros.

        The client's own numbers live where they belong: ``frames_sent`` on this core (and the
        session), each answer's client-side ``ttft_ms`` / ``tokens_per_s`` on its response.
        """
        if self.video is not None:
            return self.video.stats
        video = self.session.video if self.session is not None else None
        return SessionStats(
            session_id=self.session_id,
            schedule=video.schedule if video is not None else "parallel",
            positions=video.positions if video is not None else "",
            max_fps=video.max_fps if video is not None else None,
        )

    def _check_open(self) -> None:
        if self.closed:
            raise RealtimeError("connection_closed", f"the session is closed ({self.close_reason})")


def session_fields(
    *,
    instructions: str | None = None,
    max_output_tokens: int | Literal["inf"] | None = None,
    max_fps: float | None = None,
    schedule: str | None = None,
    change_filter: Mapping[str, bool | float] | None = None,
    video: Mapping[str, object] | None = None,
) -> SessionUpdateFields:
    """A ``session.update``'s fields from the SDK's keyword arguments; None leaves a setting as it is
    (``max_fps``, ``schedule`` and ``change_filter`` go into ``video``, as in the embedded
    ``Session.update``).

    Values are not checked here: the server checks them against its limits and answers an error.
    A ``video`` key the protocol does not have raises ValueError (it would be ignored otherwise).
    """
    merged = dict(video or {})
    unknown = sorted(set(merged) - VIDEO_KEYS)
    if unknown:
        raise ValueError(f"unknown video setting(s) {unknown}; the video block has {sorted(VIDEO_KEYS)}")
    fps = max_fps if max_fps is not None else merged.get("max_fps")
    wanted = schedule if schedule is not None else merged.get("schedule")
    positions = merged.get("positions")
    block = change_filter if change_filter is not None else merged.get("change_filter")
    video_update = None
    if fps is not None or wanted is not None or positions is not None or block is not None:
        video_update = VideoUpdate(
            max_fps=fps if isinstance(fps, float | int) else None,
            schedule=wanted,  # type: ignore[arg-type]  # an unknown schedule is the server's to reject
            positions=positions if isinstance(positions, str) else None,
            change_filter=None if block is None else _change_filter(block),
        )
    return SessionUpdateFields(
        instructions=UNSET if instructions is None else instructions,
        max_output_tokens=UNSET if max_output_tokens is None else max_output_tokens,
        video=video_update,
    )


VIDEO_KEYS = frozenset({"max_fps", "schedule", "positions", "change_filter"})


def _change_filter(block: object) -> ChangeFilterUpdate:
    """The ``change_filter`` settings, typed as the wire has them (the server checks the ranges)."""
    if not isinstance(block, Mapping):
        raise ValueError("change_filter must be a mapping of enabled / threshold / keepalive_s")
    unknown = sorted(set(block) - {"enabled", "threshold", "keepalive_s"})
    if unknown:
        raise ValueError(
            f"unknown change_filter setting(s) {unknown}; expected enabled, threshold, keepalive_s"
        )
    return ChangeFilterUpdate.decode(dict(block))
