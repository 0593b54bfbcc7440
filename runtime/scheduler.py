"""The turn scheduler: one answer's lifecycle decided in one place, with no I/O (h11-style).

`TurnScheduler` is a pure state machine. The session glue (runtime/session.py) feeds it *events*
(frames ready, a question, a cancel, the output of the turn in flight, a failure, ...) and carries
out the *plans* it returns (send this chunk, emit this delta, end this response with this status,
stop the request, pause perception, ...). Nothing here awaits, reads a clock, touches torch or
vLLM: times come in with the events, so every decision can be tested without an engine.

vLLM appends streamed chunks to one request between *turns* (a turn ends at ``<|im_end|>`` or
max_tokens) and drops the last sampled token of every turn (it has no KV yet). So an answer is
decoded in turns of K tokens; between turns the next chunk holds, under ``parallel``, the visual
items that became ready meanwhile, then the re-fed last answer token: one forward pass ingests the
frames and decodes the next token. Under ``sequential`` frames wait until the answer is over. An
idle session ingests frames as they come (frame-only chunks whose one sampled token is ignored).
Every chunk body is built by `runtime.layout`, the functions the trainer lays its samples out with.

Two machines run side by side: the *answer* (at most one per session) and the *turn* (the chunk
vLLM is working on). ``-`` means the state does not change.

Answer      event                                          next        plans
----------  ---------------------------------------------  ----------  ------------------------------
NONE        QuestionAsked (no images)                      QUEUED
NONE        QuestionAsked (images to encode)               ENCODING
NONE        Cancel                                         -           (nothing to cancel)
ENCODING    ImagesEncoded                                  QUEUED
ENCODING    ImagesFailed                                   NONE        EndResponse(failed)
ENCODING    Cancel                                         NONE        EndResponse(cancelled)
QUEUED      next_turn: frames before it not settled        -           (waits)
QUEUED      next_turn: more ready chunks than one turn     -           SendChunk(frames)
QUEUED      next_turn                                      STREAMING   SendChunk(answer: the question)
QUEUED      Cancel                                         NONE        EndResponse(cancelled)
STREAMING   next_turn (between turns)                      -           SendChunk(answer: frames, token)
STREAMING   TurnOutput with tokens                         -           EmitDelta
STREAMING   turn ends with <|im_end|>                      NONE        EndResponse(completed)
STREAMING   turn ends at the answer's max_tokens           NONE        EndResponse(incomplete)
STREAMING   turn ends after a cancel                       NONE        EndResponse(cancelled)
STREAMING   Cancel while a turn is in flight               -           (no more text; the turn ends it)
STREAMING   Cancel between turns                           NONE        EndResponse(cancelled)
any         Failure                                        NONE        EndResponse(failed)
any         EngineLost                                     NONE        EndResponse(failed)
any         Close                                          NONE        EndResponse(cancelled)

Turn        event                                          next        plans
----------  ---------------------------------------------  ----------  ------------------------------
IDLE        next_turn: nothing to send                     -
IDLE        next_turn: a chunk that fits the live request  IN_FLIGHT   SendChunk
IDLE        next_turn: over budget, or no live request     MEMORY      ReadMemory
            after a failure
MEMORY      MemoryRead                                     IN_FLIGHT   SendChunk(new request, prefix)
MEMORY      MemoryRead: budget too small for the prefix    IDLE        as Failure
IN_FLIGHT   TurnOutput (the turn goes on)                  -           (the first: Remember per frame)
IN_FLIGHT   TurnOutput (<|im_end|>, max_tokens, finished)  IDLE
any         Failure                                        IDLE        StopRequest
any         EngineLost (the engine died; frames sent and   DOWN        StopRequest
            not yet in KV are dropped, counted)
DOWN        FramesReady                                    -           (the newest max_chunks_per_turn
                                                                       kept, older ones dropped)
DOWN        EngineRestored                                 IDLE        (the next chunk opens a
                                                                       "restart" request)
any         Close                                          CLOSED      StopRequest

While DOWN nothing is sent (`next_turn` is not allowed) and the request is gone: the next chunk after
EngineRestored opens a new request with the rollover prefix (system, memory, window, dialogue), so a
session loses at most the answer in flight. Failure, EngineLost and TurnOutput are not allowed while
DOWN; a question is (the glue refuses questions while the engine is down: one asked as it comes back
waits in QUEUED). FramesReady, FramesSettled, Configure and Cancel are allowed in every state but
CLOSED; nothing is allowed once CLOSED. Any other event outside the table raises `SchedulerError`.
An answer chunk sent under ``sequential`` comes with PausePerception; every EndResponse with
ResumePerception.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from runtime import layout
from runtime.chat import ChatFormat
from runtime.layout import Piece
from runtime.perception import VisualChunk
from runtime.rollover import SessionMemory
from runtime.wire import SCHEDULES, ResponseStatus, Schedule

TurnKind = Literal["frames", "answer"]
RequestStart = Literal["first", "rollover", "restart"]
ATTACHED_IMAGE = (-1,)  # the frame indices of an image attached to a question (not a camera frame)


class SchedulerError(RuntimeError):
    """An event the scheduler does not accept in its current state (a bug in the glue)."""


class AnswerState(enum.Enum):
    NONE = "none"
    ENCODING = "encoding"  # its attached images are being encoded
    QUEUED = "queued"  # waits for the frames pushed before it, the backlog, or the turn in flight
    STREAMING = "streaming"  # its question chunk was sent: answer turns run


class TurnState(enum.Enum):
    IDLE = "idle"  # nothing in vLLM: `next_turn` may send
    MEMORY = "memory"  # a new request is planned and waits for the memory's visual item
    IN_FLIGHT = "in_flight"  # a chunk was sent; its outputs are expected
    DOWN = "down"  # the engine died: nothing is sent until it is back (EngineRestored)
    CLOSED = "closed"


@dataclass(frozen=True)
class SchedulerConfig:
    turn_tokens: int  # K: answer tokens per turn
    budget_tokens: int  # tokens a live request may hold before it rolls over
    ready_chunks: int  # encoded chunks waiting for the model before the oldest are dropped
    max_chunks_per_turn: int


@dataclass
class TurnCounters:
    """What the scheduler counts: frames that reached KV or were dropped here, turns, requests."""

    frames_ingested: int = 0
    frames_dropped_backlog: int = 0  # more encoded chunks waiting than ``ready_chunks``
    frames_dropped_failed: int = 0  # in a chunk whose turn failed before it reached KV
    frames_dropped_engine: int = 0  # lost with a dead engine, or beyond the newest kept while it was down
    turns: int = 0
    requests_started: int = 0
    rollovers: int = 0
    max_request_tokens: int = 0
    lags_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))


# -- events in ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FramesReady:
    """Perception encoded these chunks (empty: it dropped frames, which may unblock a question)."""

    chunks: tuple[VisualChunk, ...]


@dataclass(frozen=True)
class FramesSettled:
    """Every frame with an index below ``before`` is encoded or dropped; holds for one `next_turn`."""

    before: int


@dataclass(frozen=True)
class QuestionAsked:
    response_id: str
    text: str
    max_tokens: int
    frames_before: int  # frames pushed before the question (indices below this): it sees them
    instructions: str | None = None
    encoding_images: bool = False  # images attached: `ImagesEncoded` or `ImagesFailed` follows


@dataclass(frozen=True)
class ImagesEncoded:
    response_id: str
    images: tuple[VisualChunk, ...]


@dataclass(frozen=True)
class ImagesFailed:
    response_id: str
    error: str


@dataclass(frozen=True)
class Cancel:
    """Stop the current answer (a no-op when there is none)."""


@dataclass(frozen=True)
class MemoryRead:
    """The slot memory as one visual item (None while empty), for the prefix of a new request."""

    chunk: VisualChunk | None


@dataclass(frozen=True)
class TurnOutput:
    """One output of the request for the turn in flight: new token ids and their text."""

    token_ids: tuple[int, ...]
    text: str
    finished: bool  # vLLM gave a finish reason
    at: float  # monotonic time it arrived


@dataclass(frozen=True)
class Configure:
    instructions: str | None = None
    schedule: Schedule | None = None


@dataclass(frozen=True)
class Failure:
    """Driving the request failed (vLLM ended it, the engine died, a chunk could not be rendered)."""

    error: str


@dataclass(frozen=True)
class EngineLost:
    """The engine died (the runtime saw it, or the request raised vLLM's EngineDeadError)."""

    error: str


@dataclass(frozen=True)
class EngineRestored:
    """A new engine is up: the next chunk opens a fresh request carrying the session's state."""


@dataclass(frozen=True)
class Close:
    pass


Event = (
    FramesReady
    | FramesSettled
    | QuestionAsked
    | ImagesEncoded
    | ImagesFailed
    | Cancel
    | MemoryRead
    | TurnOutput
    | Configure
    | Failure
    | EngineLost
    | EngineRestored
    | Close
)


# -- plans out ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendChunk:
    """Append this chunk to the request; open a new one first when ``new_request`` says why."""

    kind: TurnKind
    prefix: tuple[Piece, ...]  # what opens it: carried pieces, or a new request's rollover prefix
    body: tuple[Piece, ...]
    max_tokens: int
    new_request: RequestStart | None = None  # "rollover": the live request is replaced (aborted)

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """The chunk in KV order."""
        return (*self.prefix, *self.body)


@dataclass(frozen=True)
class ReadMemory:
    """Read the slot memory's visual item (numerics: off the loop) and feed it back as `MemoryRead`."""


@dataclass(frozen=True)
class EmitDelta:
    """Answer tokens came: count them; show ``text`` (empty once a cancel was asked for)."""

    response_id: str
    text: str
    token_ids: tuple[int, ...]
    at: float


@dataclass(frozen=True)
class EndResponse:
    response_id: str
    status: ResponseStatus
    error: str | None
    input_tokens: int
    frames_during: int  # camera frames that reached KV after the first answer token


@dataclass(frozen=True)
class StopRequest:
    """Abort the live request and free its KV."""


@dataclass(frozen=True)
class PausePerception:
    pass


@dataclass(frozen=True)
class ResumePerception:
    pass


@dataclass(frozen=True)
class Remember:
    """A camera step reached KV: run the memory's numerics on it and on the steps it evicted."""

    chunk: VisualChunk
    evicted: tuple[VisualChunk, ...]


Plan = (
    SendChunk
    | ReadMemory
    | EmitDelta
    | EndResponse
    | StopRequest
    | PausePerception
    | ResumePerception
    | Remember
)


# -- the state machine ------------------------------------------------------------------------------


@dataclass
class _Answer:
    response_id: str
    question: str
    max_tokens: int
    frames_before: int
    instructions: str | None
    state: AnswerState
    images: tuple[VisualChunk, ...] = ()
    cancel_requested: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # what the user saw (no <|im_end|>)
    first_token_at: float | None = None
    frames_during: int = 0


@dataclass
class _Turn:
    """The chunk in vLLM (or about to be, while the memory is read) and what came back for it."""

    kind: TurnKind
    body: list[Piece]
    max_tokens: int
    start: RequestStart | None = None
    received: int = 0
    last_token: int | None = None
    stopped: bool = False
    ingested: bool = False

    @property
    def chunks(self) -> list[VisualChunk]:
        return [p for p in self.body if isinstance(p, VisualChunk)]

    @property
    def frame_count(self) -> int:
        return sum(len(c.indices) for c in self.chunks if c.indices != ATTACHED_IMAGE)


_OPEN = frozenset(TurnState) - {TurnState.CLOSED}
_UP = _OPEN - {TurnState.DOWN}
_ANY_ANSWER = frozenset(AnswerState)
# event -> (turn states, answer states) it is allowed in
_ALLOWED: dict[type, tuple[frozenset[TurnState], frozenset[AnswerState]]] = {
    FramesReady: (_OPEN, _ANY_ANSWER),
    FramesSettled: (_OPEN, _ANY_ANSWER),
    QuestionAsked: (_OPEN, frozenset({AnswerState.NONE})),
    ImagesEncoded: (_OPEN, _ANY_ANSWER),  # one for an answer that already ended is ignored
    ImagesFailed: (_OPEN, _ANY_ANSWER),
    Cancel: (_OPEN, _ANY_ANSWER),
    Configure: (_OPEN, _ANY_ANSWER),
    MemoryRead: (frozenset({TurnState.MEMORY}), _ANY_ANSWER),
    TurnOutput: (frozenset({TurnState.IN_FLIGHT}), _ANY_ANSWER),
    Failure: (_UP, _ANY_ANSWER),
    EngineLost: (_UP, _ANY_ANSWER),
    EngineRestored: (frozenset({TurnState.DOWN}), _ANY_ANSWER),
    Close: (_OPEN, _ANY_ANSWER),
}


class TurnScheduler:
    """Decides what a session sends to its vLLM request, and when an answer ends (see the tables)."""

    def __init__(
        self,
        chat: ChatFormat,
        config: SchedulerConfig,
        memory: SessionMemory,
        *,
        instructions: str | None = None,
        schedule: Schedule = "parallel",
        counters: TurnCounters | None = None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.chat = chat
        self.config = config
        self.memory = memory  # its window and dialogue are kept here; the numerics run in the glue
        self.instructions = instructions
        self.schedule: Schedule = schedule
        self.counters = counters if counters is not None else TurnCounters()
        self.request_tokens = 0  # KV tokens the live request holds
        self.turn_state = TurnState.IDLE
        self._answer: _Answer | None = None
        self._turn: _Turn | None = None
        self._ready: deque[VisualChunk] = deque()
        # pieces that must open the next chunk (the system turn, the end of the previous answer)
        self._carry: list[Piece] = layout.system_turn(chat, instructions) if instructions else []
        self._pending_token: int | None = None  # an answer's last sampled token, re-fed next turn
        self._request_live = False
        self._restart = False  # the request failed: the next one opens with the rollover prefix
        self._settled_before = 0

    # -- what the glue reads --------------------------------------------------------------------
    @property
    def answer_state(self) -> AnswerState:
        return AnswerState.NONE if self._answer is None else self._answer.state

    @property
    def response_id(self) -> str | None:
        return None if self._answer is None else self._answer.response_id

    @property
    def awaiting_output(self) -> bool:
        return self.turn_state is TurnState.IN_FLIGHT

    @property
    def frames_awaited(self) -> int | None:
        """The frame index a queued question waits for perception to settle below, if any."""
        answer = self._answer
        if answer is None or answer.state is not AnswerState.QUEUED or answer.frames_before == 0:
            return None
        return answer.frames_before

    @property
    def pending_frames(self) -> int:
        """Camera frames handed in that are neither in KV nor dropped: ready, or sent without output."""
        ready = sum(len(c.indices) for c in self._ready)
        turn = self._turn
        return ready + (turn.frame_count if turn is not None and not turn.ingested else 0)

    # -- events -----------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Plan]:
        allowed = _ALLOWED.get(type(event))
        if allowed is None:
            raise SchedulerError(f"not a scheduler event: {event!r}")
        self._check(type(event).__name__, *allowed)
        match event:
            case FramesReady():
                return self._frames_ready(event)
            case FramesSettled():
                self._settled_before = max(self._settled_before, event.before)
                return []
            case QuestionAsked():
                state = AnswerState.ENCODING if event.encoding_images else AnswerState.QUEUED
                self._answer = _Answer(
                    event.response_id,
                    event.text,
                    event.max_tokens,
                    event.frames_before,
                    event.instructions,
                    state,
                )
                return []
            case ImagesEncoded():
                answer = self._answer_for(event.response_id)
                if answer is None:
                    return []  # cancelled (or failed) while its images encoded
                answer.images = event.images
                answer.state = AnswerState.QUEUED
                return []
            case ImagesFailed():
                if self._answer_for(event.response_id) is None:
                    return []
                return self._end("failed", event.error)
            case Cancel():
                return self._cancel()
            case Configure():
                return self._configure(event)
            case MemoryRead():
                return self._memory_read(event.chunk)
            case TurnOutput():
                return self._turn_output(event)
            case Failure():
                return self._fail(event.error)
            case EngineLost():
                return self._lose_engine(event.error)
            case EngineRestored():
                self.turn_state = TurnState.IDLE
                return []
            case Close():
                plans = self._end("cancelled") if self._answer is not None else []
                if self._request_live:
                    plans.append(StopRequest())
                self._request_live = False
                self._turn = None
                self.turn_state = TurnState.CLOSED
                return plans
        raise AssertionError("unreachable")  # every event type of _ALLOWED has a case

    def next_turn(self) -> list[Plan]:
        """The next chunk to send, if any: `SendChunk`, or `ReadMemory` when a new request needs it."""
        self._check("next_turn", frozenset({TurnState.IDLE}), _ANY_ANSWER)
        chosen = self._choose()
        self._settled_before = 0  # a settled observation holds for one decision
        if chosen is None:
            return []
        kind, body, max_tokens = chosen
        if not self._request_live:
            start: RequestStart | None = "restart" if self._restart else "first"
        elif (
            self.request_tokens + layout.token_length([*self._carry, *body]) + max_tokens
            > self.config.budget_tokens
        ):
            start = "rollover"
        else:
            start = None
        self._turn = _Turn(kind, body, max_tokens, start)
        if start in ("rollover", "restart"):
            self.turn_state = TurnState.MEMORY
            return [ReadMemory()]
        return self._send(self._carry)

    # -- decisions ----------------------------------------------------------------------------------
    def _check(self, what: str, turns: frozenset[TurnState], answers: frozenset[AnswerState]) -> None:
        if self.turn_state not in turns or self.answer_state not in answers:
            raise SchedulerError(
                f"{what} is not allowed while the turn is {self.turn_state.name} "
                f"and the answer {self.answer_state.name}"
            )

    def _answer_for(self, response_id: str) -> _Answer | None:
        """The current answer if it is ``response_id`` and waits for its images."""
        answer = self._answer
        if answer is None or answer.response_id != response_id:
            return None
        if answer.state is not AnswerState.ENCODING:
            raise SchedulerError(f"images of {response_id} arrived while its answer is {answer.state.name}")
        return answer

    def _frames_ready(self, event: FramesReady) -> list[Plan]:
        self._ready.extend(event.chunks)
        while len(self._ready) > self.config.ready_chunks:
            dropped = self._ready.popleft()
            self.counters.frames_dropped_backlog += len(dropped.indices)
        if self.turn_state is TurnState.DOWN:
            self._keep_newest()
        return []

    def _keep_newest(self) -> None:
        """While the engine is down, only the newest chunks (one turn's worth) wait for it: the model
        sees the current view when it is back, and the rest are counted as lost with the engine."""
        while len(self._ready) > self.config.max_chunks_per_turn:
            dropped = self._ready.popleft()
            self.counters.frames_dropped_engine += len(dropped.indices)

    def _take_ready(self) -> list[VisualChunk]:
        taken: list[VisualChunk] = []
        while self._ready and len(taken) < self.config.max_chunks_per_turn:
            taken.append(self._ready.popleft())
        return taken

    def _choose(self) -> tuple[TurnKind, list[Piece], int] | None:
        """The next chunk body (kind, pieces in KV order, max_tokens); the carry is not part of it."""
        answer = self._answer
        turn_tokens = self.config.turn_tokens
        if answer is not None and answer.state is AnswerState.STREAMING:
            assert self._pending_token is not None, "an answer between turns has a token to re-feed"
            visual = self._take_ready() if self.schedule == "parallel" else []
            remaining = answer.max_tokens - answer.output_tokens
            body = layout.answer_chunk(self.chat, visual, self._pending_token)
            return "answer", body, min(turn_tokens, remaining)
        if answer is not None and answer.state is AnswerState.QUEUED:
            if answer.frames_before and self._settled_before < answer.frames_before:
                # a question sees the frames pushed before it (as the trainer lays samples out),
                # under both schedules; later frames do not hold it up
                return None
            if len(self._ready) > self.config.max_chunks_per_turn:
                # frames that came before the question go in first
                return "frames", layout.frames_chunk(self.chat, self._take_ready()), 1
            body = layout.question_chunk(
                self.chat,
                answer.question,
                frames=self._take_ready(),
                images=answer.images,
                instructions=answer.instructions,
            )
            answer.state = AnswerState.STREAMING
            answer.input_tokens = layout.token_length(body)
            return "answer", body, min(turn_tokens, answer.max_tokens)
        if self._ready and answer is None:
            return "frames", layout.frames_chunk(self.chat, self._take_ready()), 1
        return None

    def _send(self, prefix: Sequence[Piece]) -> list[Plan]:
        turn = self._turn
        assert turn is not None
        chunk = SendChunk(turn.kind, tuple(prefix), tuple(turn.body), turn.max_tokens, turn.start)
        if turn.start is not None:
            self._request_live = True
            self._restart = False
            self.request_tokens = 0
            self.counters.requests_started += 1
            if turn.start == "rollover":
                self.counters.rollovers += 1
        self._carry = []
        self._pending_token = None
        self.request_tokens += layout.token_length(chunk.pieces)
        self.counters.max_request_tokens = max(
            self.counters.max_request_tokens, self.request_tokens + turn.max_tokens
        )
        self.counters.turns += 1
        self.turn_state = TurnState.IN_FLIGHT
        plans: list[Plan] = [chunk]
        if turn.kind == "answer" and self.schedule == "sequential":
            plans.append(PausePerception())
        return plans

    def _memory_read(self, memory_chunk: VisualChunk | None) -> list[Plan]:
        turn = self._turn
        assert turn is not None
        try:
            prefix = self._rollover_prefix(turn, memory_chunk, strict=turn.start == "rollover")
        except BudgetTooSmall as exc:
            return self._fail(str(exc))
        return self._send(prefix)

    def _rollover_prefix(self, turn: _Turn, memory_chunk: VisualChunk | None, *, strict: bool) -> list[Piece]:
        """[system][memory][window][dialogue][the answer in flight], trimmed to fit the budget.

        Dialogue exchanges go first (oldest first), then window steps. A restart after a failure
        (``strict=False``) sends what is left even when it does not fit, as a first request does.
        """
        chat = self.chat
        head: list[Piece] = layout.system_turn(chat, self.instructions) if self.instructions else []
        if memory_chunk is not None:
            head += layout.frames_chunk(chat, [memory_chunk])
        tail: list[Piece] = []
        answer = self._answer
        if answer is not None and self._pending_token is not None:  # an answer in flight continues
            tail = [
                *chat.turn("user", answer.question),
                *chat.assistant_header,
                *answer.token_ids[:-1],
            ]
        window = list(self.memory.window)
        exchanges = list(self.memory.dialogue)
        budget = self.config.budget_tokens

        def build() -> list[Piece]:
            pieces = [*head, *layout.frames_chunk(chat, window)]
            for exchange in exchanges:
                pieces += layout.dialogue_turn(chat, exchange.question, exchange.answer_ids)
            return pieces + tail

        def total() -> int:
            return layout.token_length(pieces) + layout.token_length(turn.body) + turn.max_tokens

        pieces = build()
        while exchanges and total() > budget:
            exchanges.pop(0)
            pieces = build()
        while window and total() > budget:
            window.pop(0)
            pieces = build()
        if strict and total() > budget:
            raise BudgetTooSmall(
                f"session budget of {budget} tokens is too small for the system prompt, memory and this turn"
            )
        return pieces

    def _turn_output(self, event: TurnOutput) -> list[Plan]:
        turn = self._turn
        assert turn is not None
        answer = self._answer if turn.kind == "answer" else None
        plans: list[Plan] = []
        if not turn.ingested:  # the chunk is in KV once its first output comes
            turn.ingested = True
            plans += self._ingest(turn, answer, event.at)
        new_ids = list(event.token_ids)
        turn.received += len(new_ids)
        if new_ids:
            turn.last_token = new_ids[-1]
        if answer is not None and new_ids:
            if answer.first_token_at is None:
                answer.first_token_at = event.at
            im_end = self.chat.im_end
            stop = im_end in new_ids
            counted = new_ids[: new_ids.index(im_end)] if stop else new_ids
            answer.output_tokens += len(counted)
            answer.token_ids.extend(counted)
            text = "" if answer.cancel_requested else event.text
            plans.append(EmitDelta(answer.response_id, text, tuple(counted), event.at))
            turn.stopped = turn.stopped or stop
        if not (turn.stopped or turn.received >= turn.max_tokens or event.finished):
            return plans
        # every sampled token but the last is in KV now
        self.request_tokens += max(0, turn.received - 1)
        self._turn = None
        self.turn_state = TurnState.IDLE
        if answer is not None:
            plans += self._after_answer_turn(answer, turn)
        return plans

    def _ingest(self, turn: _Turn, answer: _Answer | None, at: float) -> list[Plan]:
        plans: list[Plan] = []
        for chunk in turn.chunks:
            if chunk.indices == ATTACHED_IMAGE:
                continue
            self.counters.frames_ingested += len(chunk.indices)
            for arrival in chunk.arrivals:
                self.counters.lags_ms.append((at - arrival) * 1000)
            if answer is not None and answer.first_token_at is not None:
                answer.frames_during += len(chunk.indices)
            evicted = self.memory.add_step(chunk)
            plans.append(Remember(chunk, tuple(evicted)))
        return plans

    def _after_answer_turn(self, answer: _Answer, turn: _Turn) -> list[Plan]:
        cancelled = answer.cancel_requested
        if turn.stopped:  # the sampled <|im_end|> has no KV: re-feed it
            last, status = None, "cancelled" if cancelled else "completed"
        elif turn.last_token is None:  # vLLM finished the turn without a token: close the answer
            last, status = None, "cancelled" if cancelled else "incomplete"
        elif cancelled or answer.output_tokens >= answer.max_tokens:
            last, status = turn.last_token, "cancelled" if cancelled else "incomplete"
        else:
            self._pending_token = turn.last_token  # the answer goes on
            return []
        self.memory.add_exchange(answer.question, answer.token_ids)
        return self._close_answer(last, status)

    def _close_answer(self, last_token: int | None, status: ResponseStatus) -> list[Plan]:
        """End the answer; what closes its assistant turn opens the next chunk."""
        self._carry = [*layout.closing(self.chat, last_token), *self._carry]
        return self._end(status)

    def _cancel(self) -> list[Plan]:
        answer = self._answer
        if answer is None:
            return []
        if answer.state is not AnswerState.STREAMING:
            return self._end("cancelled")  # nothing of it reached the model
        answer.cancel_requested = True
        if self.turn_state is not TurnState.IDLE:
            return []  # the turn in flight (or being prepared) ends it
        pending = self._pending_token
        assert pending is not None
        self._pending_token = None
        self.memory.add_exchange(answer.question, answer.token_ids)
        return self._close_answer(pending, "cancelled")

    def _configure(self, event: Configure) -> list[Plan]:
        plans: list[Plan] = []
        if event.schedule is not None:
            if event.schedule not in SCHEDULES:
                raise ValueError(f"schedule must be one of {SCHEDULES}, got {event.schedule!r}")
            self.schedule = event.schedule
            if event.schedule == "parallel":
                plans.append(ResumePerception())
        if event.instructions is not None and event.instructions != self.instructions:
            self.instructions = event.instructions
            self._carry.extend(layout.system_turn(self.chat, event.instructions))
        return plans

    def _fail(self, error: str) -> list[Plan]:
        """The request is lost: end the answer ``failed``; the next chunk opens a fresh request."""
        turn = self._turn
        if turn is not None and not turn.ingested:
            self.counters.frames_dropped_failed += turn.frame_count
        self._turn = None
        self.turn_state = TurnState.IDLE
        self._pending_token = None
        plans: list[Plan] = []
        if self._request_live:
            plans.append(StopRequest())
            self._request_live = False
            self._restart = True
            self.request_tokens = 0
        if self._answer is not None:
            plans += self._end("failed", error)
        return plans

    def _lose_engine(self, error: str) -> list[Plan]:
        """The engine died: as a failure (the answer in flight ends ``failed``, the request is gone),
        then DOWN until `EngineRestored`; what a rollover carries stays for the next request."""
        turn = self._turn
        if turn is not None and not turn.ingested:
            self.counters.frames_dropped_engine += turn.frame_count
            self._turn = None
        plans = self._fail(error)
        self.turn_state = TurnState.DOWN
        self._keep_newest()
        return plans

    def _end(self, status: ResponseStatus, error: str | None = None) -> list[Plan]:
        answer = self._answer
        assert answer is not None
        self._answer = None
        return [
            ResumePerception(),
            EndResponse(answer.response_id, status, error, answer.input_tokens, answer.frames_during),
        ]


class BudgetTooSmall(RuntimeError):
    """The rollover prefix and the turn do not fit the session budget even with nothing carried."""


__all__ = [
    "AnswerState",
    "Cancel",
    "Close",
    "Configure",
    "EmitDelta",
    "EndResponse",
    "EngineLost",
    "EngineRestored",
    "Event",
    "Failure",
    "FramesReady",
    "FramesSettled",
    "ImagesEncoded",
    "ImagesFailed",
    "MemoryRead",
    "PausePerception",
    "Plan",
    "QuestionAsked",
    "ReadMemory",
    "Remember",
    "RequestStart",
    "ResumePerception",
    "SchedulerConfig",
    "SchedulerError",
    "SendChunk",
    "StopRequest",
    "TurnCounters",
    "TurnOutput",
    "TurnScheduler",
    "TurnState",
]
