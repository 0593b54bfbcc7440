"""The turn scheduler without an engine: every transition of its tables, the chunks it plans (the
trainer's layout, token for token), cancels and failures, and random interleavings of events.
Then the `Session` glue around it, on a stub runtime (a scripted engine, a stub vision tower).

The scheduler is pure, so a chat format over a character tokenizer and visual chunks without
embeddings are all it needs: nothing before the glue tests starts vLLM, torch or an event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runtime import layout
from runtime.chat import ChatFormat
from runtime.layout import Piece
from runtime.memory import MemoryConfig
from runtime.perception import VisualChunk
from runtime.rollover import SessionMemory
from runtime.scheduler import (
    ATTACHED_IMAGE,
    AnswerState,
    Cancel,
    Close,
    Configure,
    EmitDelta,
    EndResponse,
    EngineLost,
    EngineRestored,
    Event,
    Failure,
    FramesReady,
    FramesSettled,
    ImagesEncoded,
    ImagesFailed,
    MemoryRead,
    PausePerception,
    Plan,
    QuestionAsked,
    ReadMemory,
    Remember,
    ResumePerception,
    SchedulerConfig,
    SchedulerError,
    SendChunk,
    StopRequest,
    TurnOutput,
    TurnScheduler,
    TurnState,
)
from runtime.wire import FINAL_STATUSES
from streams.change import ChangeFilterSettings


class CharTokenizer:
    """One id per character (1000 + code point): enough to lay a chat out."""

    def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(ids=[1000 + ord(c) for c in text])


IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = 1, 2, 3, 4, 5
CHAT = ChatFormat(
    tokenizer=CharTokenizer(),
    im_start=IM_START,
    im_end=IM_END,
    vision_start=VISION_START,
    vision_end=VISION_END,
    image_pad=IMAGE_PAD,
    newline=(1000 + ord("\n"),),
    assistant_header=(IM_START, *[1000 + ord(c) for c in "assistant\n"]),
)
K = 3
SYSTEM = "Watch."


def frame(index: int, at: float = 0.0) -> VisualChunk:
    """A camera step of 4 visual tokens (grid 1x4x4 before the 2x2 merge)."""
    return VisualChunk(None, (1, 4, 4), 2, (at,), (at,), (index,), at)


def image() -> VisualChunk:
    return VisualChunk(None, (1, 4, 4), 2, (0.0,), (0.0,), ATTACHED_IMAGE, 0.0)


def make(
    *,
    budget: int = 10_000,
    ready_chunks: int = 16,
    max_chunks: int = 4,
    window: int = 8,
    dialogue: int = 4,
    instructions: str | None = None,
    schedule: str = "parallel",
) -> TurnScheduler:
    memory = SessionMemory(MemoryConfig(enabled=False), 8, 2, window=window, dialogue=dialogue)
    config = SchedulerConfig(
        turn_tokens=K, budget_tokens=budget, ready_chunks=ready_chunks, max_chunks_per_turn=max_chunks
    )
    return TurnScheduler(CHAT, config, memory, instructions=instructions, schedule=schedule)  # type: ignore[arg-type]


def ask(s: TurnScheduler, rid: str = "r1", text: str = "What?", max_tokens: int = 6, **kw) -> list[Plan]:
    return s.handle(QuestionAsked(rid, text, max_tokens, kw.pop("frames_before", 0), **kw))


def out(s: TurnScheduler, *tokens: int, finished: bool = False, at: float = 1.0) -> list[Plan]:
    return s.handle(TurnOutput(tuple(tokens), "".join(f"<{t}>" for t in tokens), finished, at))


def sent(plans: Sequence[Plan]) -> SendChunk:
    chunks = [p for p in plans if isinstance(p, SendChunk)]
    assert len(chunks) == 1, plans
    return chunks[0]


def ended(plans: Sequence[Plan]) -> EndResponse:
    ends = [p for p in plans if isinstance(p, EndResponse)]
    assert len(ends) == 1, plans
    return ends[0]


def kinds(plans: Sequence[Plan]) -> list[type]:
    return [type(p) for p in plans]


# -- states to start from -------------------------------------------------------------------------


def idle() -> TurnScheduler:
    return make()


def live() -> TurnScheduler:
    """Idle, with a live request (one idle frame went in)."""
    s = make()
    s.handle(FramesReady((frame(0),)))
    s.next_turn()
    out(s, 77)
    return s


def encoding() -> TurnScheduler:
    s = live()
    ask(s, encoding_images=True)
    return s


def queued() -> TurnScheduler:
    s = live()
    ask(s)
    return s


def waiting_for_frames() -> TurnScheduler:
    s = live()
    ask(s, frames_before=2)  # frame 1 was pushed before the question and is still encoding
    return s


def backlogged() -> TurnScheduler:
    s = live()
    s.handle(FramesReady(tuple(frame(i) for i in range(1, 7))))
    ask(s)
    return s


def in_flight() -> TurnScheduler:
    """The question chunk was sent; no output yet."""
    s = queued()
    s.next_turn()
    return s


def between_turns() -> TurnScheduler:
    """The first answer turn (K tokens, no <|im_end|>) is over; the next is not sent."""
    s = in_flight()
    out(s, 11, 12, 13)
    return s


def last_turn_in_flight() -> TurnScheduler:
    """The second answer turn is in flight and reaches max_tokens (6) at its end."""
    s = between_turns()
    s.next_turn()
    return s


def cancelled_in_flight() -> TurnScheduler:
    s = in_flight()
    s.handle(Cancel())
    return s


def over_budget() -> TurnScheduler:
    s = between_turns()
    s.config = replace(s.config, budget_tokens=s.request_tokens + 2)
    return s


def rolling_over() -> TurnScheduler:
    """A rollover is planned (frame 1 goes in with the answer's next turn) and waits for the memory."""
    s = over_budget()
    s.handle(FramesReady((frame(1),)))
    assert kinds(s.next_turn()) == [ReadMemory]
    s.config = replace(s.config, budget_tokens=200)
    return s


def rolling_over_too_small() -> TurnScheduler:
    s = rolling_over()
    s.config = replace(s.config, budget_tokens=5)
    return s


def failed() -> TurnScheduler:
    s = in_flight()
    s.handle(Failure("engine died"))
    s.handle(FramesReady((frame(1),)))
    return s


def closed() -> TurnScheduler:
    s = live()
    s.handle(Close())
    return s


def down() -> TurnScheduler:
    """The engine died while an answer's first turn was in flight."""
    s = in_flight()
    s.handle(EngineLost("killed by SIGKILL"))
    return s


# -- every transition of the tables ---------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    row: str
    start: Callable[[], TurnScheduler]
    act: Callable[[TurnScheduler], list[Plan]]
    answer: AnswerState
    turn: TurnState
    plans: list[type]
    status: str | None = None


A, T = AnswerState, TurnState
# what a turn that fails with an answer in it plans, and the answer's status
ENDS_FAILED = ([StopRequest, ResumePerception, EndResponse], "failed")
TRANSITIONS = [
    Transition("NONE QuestionAsked", live, ask, A.QUEUED, T.IDLE, []),
    Transition(
        "NONE QuestionAsked with images",
        live,
        lambda s: ask(s, encoding_images=True),
        A.ENCODING,
        T.IDLE,
        [],
    ),
    Transition("NONE Cancel", live, lambda s: s.handle(Cancel()), A.NONE, T.IDLE, []),
    Transition(
        "ENCODING ImagesEncoded",
        encoding,
        lambda s: s.handle(ImagesEncoded("r1", (image(),))),
        A.QUEUED,
        T.IDLE,
        [],
    ),
    Transition(
        "ENCODING ImagesFailed",
        encoding,
        lambda s: s.handle(ImagesFailed("r1", "broken")),
        A.NONE,
        T.IDLE,
        [ResumePerception, EndResponse],
        "failed",
    ),
    Transition(
        "ENCODING Cancel",
        encoding,
        lambda s: s.handle(Cancel()),
        A.NONE,
        T.IDLE,
        [ResumePerception, EndResponse],
        "cancelled",
    ),
    Transition(
        "QUEUED next_turn: frames before it not settled",
        waiting_for_frames,
        lambda s: s.next_turn(),
        A.QUEUED,
        T.IDLE,
        [],
    ),
    Transition(
        "QUEUED next_turn: frames before it settled",
        waiting_for_frames,
        lambda s: [*s.handle(FramesSettled(2)), *s.next_turn()],
        A.STREAMING,
        T.IN_FLIGHT,
        [SendChunk],
    ),
    Transition(
        "QUEUED next_turn: more ready chunks than one turn",
        backlogged,
        lambda s: s.next_turn(),
        A.QUEUED,
        T.IN_FLIGHT,
        [SendChunk],
    ),
    Transition("QUEUED next_turn", queued, lambda s: s.next_turn(), A.STREAMING, T.IN_FLIGHT, [SendChunk]),
    Transition(
        "QUEUED Cancel",
        queued,
        lambda s: s.handle(Cancel()),
        A.NONE,
        T.IDLE,
        [ResumePerception, EndResponse],
        "cancelled",
    ),
    Transition(
        "STREAMING next_turn between turns",
        between_turns,
        lambda s: s.next_turn(),
        A.STREAMING,
        T.IN_FLIGHT,
        [SendChunk],
    ),
    Transition(
        "STREAMING TurnOutput with tokens",
        in_flight,
        lambda s: out(s, 11),
        A.STREAMING,
        T.IN_FLIGHT,
        [EmitDelta],
    ),
    Transition(
        "STREAMING turn ends with <|im_end|>",
        in_flight,
        lambda s: out(s, 11, IM_END),
        A.NONE,
        T.IDLE,
        [EmitDelta, ResumePerception, EndResponse],
        "completed",
    ),
    Transition(
        "STREAMING turn ends at max_tokens",
        last_turn_in_flight,
        lambda s: out(s, 14, 15, 16),
        A.NONE,
        T.IDLE,
        [EmitDelta, ResumePerception, EndResponse],
        "incomplete",
    ),
    Transition(
        "STREAMING turn ends after a cancel",
        cancelled_in_flight,
        lambda s: out(s, 11, 12, 13),
        A.NONE,
        T.IDLE,
        [EmitDelta, ResumePerception, EndResponse],
        "cancelled",
    ),
    Transition(
        "STREAMING Cancel while a turn is in flight",
        in_flight,
        lambda s: s.handle(Cancel()),
        A.STREAMING,
        T.IN_FLIGHT,
        [],
    ),
    Transition(
        "STREAMING Cancel between turns",
        between_turns,
        lambda s: s.handle(Cancel()),
        A.NONE,
        T.IDLE,
        [ResumePerception, EndResponse],
        "cancelled",
    ),
    Transition(
        "ENCODING Failure",
        encoding,
        lambda s: s.handle(Failure("x")),
        A.NONE,
        T.IDLE,
        *ENDS_FAILED,
    ),
    Transition(
        "QUEUED Failure",
        queued,
        lambda s: s.handle(Failure("x")),
        A.NONE,
        T.IDLE,
        *ENDS_FAILED,
    ),
    Transition(
        "STREAMING Failure",
        in_flight,
        lambda s: s.handle(Failure("x")),
        A.NONE,
        T.IDLE,
        *ENDS_FAILED,
    ),
    Transition(
        "STREAMING Close",
        in_flight,
        lambda s: s.handle(Close()),
        A.NONE,
        T.CLOSED,
        [ResumePerception, EndResponse, StopRequest],
        "cancelled",
    ),
    Transition(
        "QUEUED Close",
        queued,
        lambda s: s.handle(Close()),
        A.NONE,
        T.CLOSED,
        [ResumePerception, EndResponse, StopRequest],
        "cancelled",
    ),
    # the turn table
    Transition("IDLE next_turn: nothing to send", live, lambda s: s.next_turn(), A.NONE, T.IDLE, []),
    Transition(
        "IDLE next_turn: a first request",
        lambda: make(),
        lambda s: [*s.handle(FramesReady((frame(0),))), *s.next_turn()],
        A.NONE,
        T.IN_FLIGHT,
        [SendChunk],
    ),
    Transition(
        "IDLE next_turn: a chunk that fits",
        live,
        lambda s: [*s.handle(FramesReady((frame(1),))), *s.next_turn()],
        A.NONE,
        T.IN_FLIGHT,
        [SendChunk],
    ),
    Transition(
        "IDLE next_turn: over budget",
        over_budget,
        lambda s: s.next_turn(),
        A.STREAMING,
        T.MEMORY,
        [ReadMemory],
    ),
    Transition(
        "IDLE next_turn: no live request after a failure",
        failed,
        lambda s: s.next_turn(),
        A.NONE,
        T.MEMORY,
        [ReadMemory],
    ),
    Transition(
        "MEMORY MemoryRead",
        rolling_over,
        lambda s: s.handle(MemoryRead(None)),
        A.STREAMING,
        T.IN_FLIGHT,
        [SendChunk],
    ),
    Transition(
        "MEMORY MemoryRead: budget too small",
        rolling_over_too_small,
        lambda s: s.handle(MemoryRead(None)),
        A.NONE,
        T.IDLE,
        *ENDS_FAILED,
    ),
    Transition(
        "IN_FLIGHT TurnOutput, the turn goes on",
        in_flight,
        lambda s: out(s, 11, 12),
        A.STREAMING,
        T.IN_FLIGHT,
        [EmitDelta],
    ),
    Transition(
        "IN_FLIGHT TurnOutput finished",
        live,
        lambda s: [*s.handle(FramesReady((frame(1),))), *s.next_turn(), *out(s, 9, finished=True)],
        A.NONE,
        T.IDLE,
        [SendChunk, Remember],
    ),
    Transition(
        "MEMORY Failure",
        rolling_over,
        lambda s: s.handle(Failure("x")),
        A.NONE,
        T.IDLE,
        *ENDS_FAILED,
    ),
    Transition("IDLE Close", live, lambda s: s.handle(Close()), A.NONE, T.CLOSED, [StopRequest]),
    # the engine died, and came back
    Transition(
        "STREAMING EngineLost",
        in_flight,
        lambda s: s.handle(EngineLost("x")),
        A.NONE,
        T.DOWN,
        *ENDS_FAILED,
    ),
    Transition(
        "QUEUED EngineLost",
        queued,
        lambda s: s.handle(EngineLost("x")),
        A.NONE,
        T.DOWN,
        *ENDS_FAILED,
    ),
    Transition(
        "MEMORY EngineLost",
        rolling_over,
        lambda s: s.handle(EngineLost("x")),
        A.NONE,
        T.DOWN,
        *ENDS_FAILED,
    ),
    Transition("IDLE EngineLost", live, lambda s: s.handle(EngineLost("x")), A.NONE, T.DOWN, [StopRequest]),
    Transition(
        "IDLE EngineLost, no request yet", idle, lambda s: s.handle(EngineLost("x")), A.NONE, T.DOWN, []
    ),
    Transition(
        "DOWN FramesReady",
        down,
        lambda s: s.handle(FramesReady(tuple(frame(i) for i in range(1, 7)))),
        A.NONE,
        T.DOWN,
        [],
    ),
    Transition("DOWN QuestionAsked", down, lambda s: ask(s, "r2"), A.QUEUED, T.DOWN, []),
    Transition("DOWN EngineRestored", down, lambda s: s.handle(EngineRestored()), A.NONE, T.IDLE, []),
    Transition("DOWN Close", down, lambda s: s.handle(Close()), A.NONE, T.CLOSED, []),
    Transition("IDLE Close, no request yet", idle, lambda s: s.handle(Close()), A.NONE, T.CLOSED, []),
]


@pytest.mark.parametrize("transition", TRANSITIONS, ids=[t.row for t in TRANSITIONS])
def test_transition(transition: Transition) -> None:
    s = transition.start()
    plans = transition.act(s)
    assert kinds(plans) == transition.plans
    assert (s.answer_state, s.turn_state) == (transition.answer, transition.turn)
    if transition.status is not None:
        assert ended(plans).status == transition.status


NOT_ALLOWED: list[tuple[str, Callable[[], TurnScheduler], Callable[[TurnScheduler], object]]] = [
    ("TurnOutput while IDLE", live, lambda s: out(s, 1)),
    ("MemoryRead while IDLE", live, lambda s: s.handle(MemoryRead(None))),
    ("MemoryRead while IN_FLIGHT", in_flight, lambda s: s.handle(MemoryRead(None))),
    ("TurnOutput while MEMORY", rolling_over, lambda s: out(s, 1)),
    ("next_turn while IN_FLIGHT", in_flight, lambda s: s.next_turn()),
    ("next_turn while MEMORY", rolling_over, lambda s: s.next_turn()),
    ("QuestionAsked while QUEUED", queued, lambda s: ask(s, "r2")),
    ("QuestionAsked while STREAMING", in_flight, lambda s: ask(s, "r2")),
    ("QuestionAsked while ENCODING", encoding, lambda s: ask(s, "r2")),
    ("ImagesEncoded for an answer already QUEUED", queued, lambda s: s.handle(ImagesEncoded("r1", ()))),
    ("FramesReady after Close", closed, lambda s: s.handle(FramesReady(()))),
    ("Cancel after Close", closed, lambda s: s.handle(Cancel())),
    ("Close after Close", closed, lambda s: s.handle(Close())),
    ("next_turn after Close", closed, lambda s: s.next_turn()),
    ("next_turn while DOWN", down, lambda s: s.next_turn()),
    ("TurnOutput while DOWN", down, lambda s: out(s, 1)),
    ("Failure while DOWN", down, lambda s: s.handle(Failure("x"))),
    ("EngineLost while DOWN", down, lambda s: s.handle(EngineLost("again"))),
    ("EngineRestored while IDLE", live, lambda s: s.handle(EngineRestored())),
    ("EngineRestored while IN_FLIGHT", in_flight, lambda s: s.handle(EngineRestored())),
    ("EngineLost after Close", closed, lambda s: s.handle(EngineLost("x"))),
    ("not an event", live, lambda s: s.handle("frames")),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("name,start,act", NOT_ALLOWED, ids=[n for n, _, _ in NOT_ALLOWED])
def test_events_outside_the_table_raise(name: str, start, act) -> None:
    s = start()
    before = (s.answer_state, s.turn_state)
    with pytest.raises(SchedulerError):
        act(s)
    assert (s.answer_state, s.turn_state) == before


# -- the chunks it plans are the trainer's layout -------------------------------------------------


class KVCache:
    """What vLLM holds for a request, built from the plans as the engine would."""

    def __init__(self, s: TurnScheduler) -> None:
        self.s = s
        self.pieces: list[Piece] = []
        self.chunks: list[SendChunk] = []

    def next_turn(self, memory: VisualChunk | None = None) -> SendChunk:
        plans = self.s.next_turn()
        if plans and isinstance(plans[0], ReadMemory):
            plans = self.s.handle(MemoryRead(memory))
        chunk = sent(plans)
        if chunk.new_request is not None:
            self.pieces = []
        self.pieces += chunk.pieces
        self.chunks.append(chunk)
        return chunk

    def turn(self, *tokens: int) -> list[Plan]:
        """The model samples ``tokens`` in one turn; all but the last reach KV."""
        plans = out(self.s, *tokens)
        assert self.s.turn_state is TurnState.IDLE, "the turn must be over"
        self.pieces += tokens[:-1]
        return plans


def test_a_served_session_lays_out_what_the_trainer_builds() -> None:
    """The train/serve parity script (tests/training/test_train_serve_parity.py), chunk by chunk."""
    s = make(instructions=SYSTEM)
    kv = KVCache(s)
    builder = layout.StreamBuilder(CHAT)
    builder.system(SYSTEM)
    red, blue = frame(0, 0.0), frame(1, 0.5)

    s.handle(FramesReady((red,)))
    chunk = kv.next_turn()
    assert (chunk.kind, chunk.max_tokens, chunk.new_request) == ("frames", 1, "first")
    assert chunk.prefix == tuple(layout.system_turn(CHAT, SYSTEM))
    kv.turn(99)  # the idle frame's sample is ignored
    builder.idle_frames([red])

    ask(s, text="Comment.", max_tokens=8)
    builder.ask("Comment.")
    chunk = kv.next_turn()
    assert chunk.body == tuple(layout.question_chunk(CHAT, "Comment."))
    assert chunk.max_tokens == K
    kv.turn(11, 12, 13)
    builder.answer_turn([11, 12, 13])
    s.handle(FramesReady((blue,)))  # arrives mid-answer: inserted before the re-fed token
    chunk = kv.next_turn()
    assert chunk.body == tuple(layout.answer_chunk(CHAT, [blue], 13))
    kv.turn(14, 15, 16)
    builder.answer_turn([14, 15, 16], frames=[blue])
    chunk = kv.next_turn()
    assert chunk.max_tokens == 2, "the last turn asks for what is left of max_tokens"
    plans = kv.turn(17, 18)
    builder.answer_turn([17, 18])
    assert ended(plans).status == "incomplete"
    builder.end_answer()

    ask(s, "r2", text="What do you see?", max_tokens=8)
    builder.ask("What do you see?")
    chunk = kv.next_turn()
    assert chunk.prefix == tuple(layout.closing(CHAT, 18)), "the cut answer's last token is re-fed"
    plans = kv.turn(21, IM_END)
    builder.answer_turn([21, IM_END])
    assert ended(plans).status == "completed"
    s.handle(FramesReady((frame(2),)))
    chunk = kv.next_turn()
    assert chunk.prefix == tuple(layout.closing(CHAT, None)), "the sampled <|im_end|> is re-fed"
    builder.flush()
    builder.idle_frames([frame(2)])

    assert kv.pieces == builder.pieces
    assert s.request_tokens == layout.token_length(kv.pieces)
    assert s.counters.frames_ingested == 2  # frame 2's chunk has no output yet
    assert [e.question for e in s.memory.dialogue] == ["Comment.", "What do you see?"]


def test_a_question_sees_the_frames_pushed_before_it_and_images_go_in_its_user_turn() -> None:
    s = make()
    kv = KVCache(s)
    ask(s, frames_before=2, encoding_images=True)
    assert s.next_turn() == [], "nothing to send while the images encode"
    s.handle(ImagesEncoded("r1", (image(),)))
    assert s.frames_awaited == 2
    assert s.next_turn() == [], "frames 0 and 1 are still with perception"
    s.handle(FramesReady((frame(0), frame(1))))
    s.handle(FramesSettled(2))
    chunk = kv.next_turn()
    assert chunk.body == tuple(
        layout.question_chunk(CHAT, "What?", frames=[frame(0), frame(1)], images=[image()])
    )
    out(s, 11)
    assert s.counters.frames_ingested == 2, "the attached image is not a camera frame"
    assert len(s.memory.window) == 2


def test_a_settled_observation_holds_for_one_decision() -> None:
    s = live()
    s.handle(FramesReady(tuple(frame(i) for i in range(1, 7))))
    ask(s, frames_before=9)  # frames 7 and 8 are with perception
    assert s.next_turn() == []
    s.handle(FramesSettled(9))
    assert sent(s.next_turn()).kind == "frames", "the backlog before the question goes first"
    out(s, 1)
    assert s.next_turn() == [], "perception must be asked again"
    s.handle(FramesSettled(9))
    assert sent(s.next_turn()).kind == "answer"


def test_backlog_beyond_ready_chunks_drops_the_oldest_and_counts_them() -> None:
    s = make(ready_chunks=2)
    s.handle(FramesReady(tuple(frame(i) for i in range(5))))
    assert s.counters.frames_dropped_backlog == 3
    assert s.pending_frames == 2
    assert sent(s.next_turn()).body == tuple(layout.frames_chunk(CHAT, [frame(3), frame(4)]))


def test_sequential_holds_frames_until_the_answer_ends() -> None:
    s = make(schedule="sequential")
    kv = KVCache(s)
    ask(s)
    plans = s.next_turn()
    assert PausePerception in kinds(plans)
    kv.pieces += sent(plans).pieces
    kv.turn(11, 12, 13)
    s.handle(FramesReady((frame(0),)))
    assert kv.next_turn().body == (13,), "no frames inside the answer"
    plans = kv.turn(14, IM_END)
    assert ResumePerception in kinds(plans)
    assert kv.next_turn().body == tuple(layout.frames_chunk(CHAT, [frame(0)]))


def test_frames_during_an_answer_count_from_its_first_token() -> None:
    s = in_flight()
    s.handle(FramesReady((frame(1, at=0.5),)))
    out(s, 11, 12, 13, at=2.0)
    s.next_turn()
    out(s, 14, IM_END, at=2.5)
    plans = s.handle(Close())
    assert s.counters.frames_ingested == 2
    assert list(s.counters.lags_ms)[-1] == pytest.approx(2000.0)
    assert not [p for p in plans if isinstance(p, EndResponse)], "the answer had ended"


def test_frames_during_is_reported_at_the_end() -> None:
    s = in_flight()
    out(s, 11, 12, 13)
    s.handle(FramesReady((frame(1),)))
    s.next_turn()
    plans = out(s, 14, IM_END)
    assert ended(plans).frames_during == 1


def test_window_evictions_go_to_the_memory_numerics() -> None:
    s = make(window=2)
    remembered: list[Remember] = []
    for i in range(4):
        s.handle(FramesReady((frame(i),)))
        s.next_turn()
        remembered += [p for p in out(s, 9) if isinstance(p, Remember)]
    assert [r.chunk.indices for r in remembered] == [(0,), (1,), (2,), (3,)]
    assert [[c.indices for c in r.evicted] for r in remembered] == [[], [], [(0,)], [(1,)]]
    assert [c.indices for c in s.memory.window] == [(2,), (3,)]


def test_instructions_changed_open_the_next_chunk() -> None:
    s = live()
    s.handle(Configure(instructions="Be brief."))
    s.handle(Configure(instructions="Be brief."))  # unchanged: nothing new
    s.handle(FramesReady((frame(1),)))
    assert sent(s.next_turn()).prefix == tuple(layout.system_turn(CHAT, "Be brief."))
    with pytest.raises(ValueError):
        s.handle(Configure(schedule="later"))  # type: ignore[arg-type]


# -- rollovers ----------------------------------------------------------------------------------


def test_a_rollover_keeps_system_memory_window_dialogue_and_the_answer_in_flight() -> None:
    s = make(instructions=SYSTEM, window=2)
    kv = KVCache(s)
    for i in range(3):
        s.handle(FramesReady((frame(i),)))
        kv.next_turn()
        kv.turn(9)
    ask(s, text="Q1", max_tokens=2)
    kv.next_turn()
    kv.turn(31, IM_END)
    ask(s, "r2", text="Q2", max_tokens=8)
    kv.next_turn()
    kv.turn(11, 12, 13)
    s.handle(FramesReady((frame(3),)))
    s.config = replace(s.config, budget_tokens=s.request_tokens)  # the next turn does not fit
    assert kinds(s.next_turn()) == [ReadMemory]
    s.config = replace(s.config, budget_tokens=500)
    memory_item = VisualChunk(None, (1, 4, 4), 2, (), (), (), 0.0)
    chunk = sent(s.handle(MemoryRead(memory_item)))
    assert chunk.new_request == "rollover"
    expected_prefix = [
        *layout.system_turn(CHAT, SYSTEM),
        *layout.frames_chunk(CHAT, [memory_item]),
        *layout.frames_chunk(CHAT, [frame(1), frame(2)]),  # the window (frame 0 left it)
        *layout.dialogue_turn(CHAT, "Q1", [31]),
        *CHAT.turn("user", "Q2"),
        *CHAT.assistant_header,
        11,
        12,  # the answer in flight, classified as output; 13 is re-fed after the new frame
    ]
    assert list(chunk.prefix) == expected_prefix
    assert chunk.body == tuple(layout.answer_chunk(CHAT, [frame(3)], 13))
    assert s.request_tokens == layout.token_length(chunk.pieces)
    assert s.counters.rollovers == 1 and s.counters.requests_started == 2


def test_a_rollover_drops_dialogue_first_then_window_steps() -> None:
    s = make(window=3, dialogue=4)
    kv = KVCache(s)
    for i in range(3):
        s.handle(FramesReady((frame(i),)))
        kv.next_turn()
        kv.turn(9)
    for n in range(2):
        ask(s, f"q{n}", text=f"Q{n}", max_tokens=2)
        kv.next_turn()
        kv.turn(31, IM_END)
    s.handle(FramesReady((frame(3),)))
    body = layout.frames_chunk(CHAT, [frame(3)])
    window = layout.frames_chunk(CHAT, [frame(0), frame(1), frame(2)])
    one_exchange = layout.dialogue_turn(CHAT, "Q1", [31])
    # room for the window and the newest exchange, not both exchanges
    s.config = replace(s.config, budget_tokens=layout.token_length([*window, *one_exchange, *body]) + 1)
    assert kinds(s.next_turn()) == [ReadMemory]
    chunk = sent(s.handle(MemoryRead(None)))
    assert list(chunk.prefix) == [*window, *one_exchange]
    # a budget that only fits one window step: every exchange goes, then the oldest steps
    s2 = make(window=3, dialogue=4)
    kv2 = KVCache(s2)
    for i in range(3):
        s2.handle(FramesReady((frame(i),)))
        kv2.next_turn()
        kv2.turn(9)
    ask(s2, text="Q", max_tokens=2)
    kv2.next_turn()
    kv2.turn(31, IM_END)
    s2.handle(FramesReady((frame(3),)))
    step = layout.frames_chunk(CHAT, [frame(2)])
    s2.config = replace(s2.config, budget_tokens=layout.token_length([*step, *body]) + 1)
    assert kinds(s2.next_turn()) == [ReadMemory]
    assert list(sent(s2.handle(MemoryRead(None))).prefix) == step


def test_a_budget_too_small_for_the_prefix_fails_the_answer_and_counts_its_frames() -> None:
    s = rolling_over_too_small()
    plans = s.handle(MemoryRead(None))
    assert ended(plans).status == "failed" and "too small" in (ended(plans).error or "")
    assert s.counters.frames_dropped_failed == 1, "frame 1 was in the chunk that never went"
    assert s.pending_frames == 0


# -- cancels, close, failures -------------------------------------------------------------------


def test_cancel_of_a_queued_question_sends_nothing() -> None:
    s = waiting_for_frames()
    assert ended(s.handle(Cancel())).status == "cancelled"
    s.handle(FramesSettled(2))
    assert s.next_turn() == []
    assert s.counters.turns == 1, "only the idle frame went in"


def test_cancel_while_an_image_encodes_ends_at_once_and_the_late_images_are_ignored() -> None:
    s = encoding()
    end = ended(s.handle(Cancel()))
    assert (end.status, end.input_tokens) == ("cancelled", 0)
    assert s.handle(ImagesEncoded("r1", (image(),))) == []
    assert s.handle(ImagesFailed("r1", "late")) == []
    assert s.next_turn() == []
    ask(s, "r2")
    assert sent(s.next_turn()).kind == "answer", "the session answers the next question"


def test_cancel_at_a_turn_boundary_closes_the_answer_in_the_next_chunk() -> None:
    s = between_turns()
    plans = s.handle(Cancel())
    assert ended(plans).status == "cancelled"
    assert [e.answer_ids for e in s.memory.dialogue] == [(11, 12, 13)]
    s.handle(FramesReady((frame(1),)))
    chunk = sent(s.next_turn())
    assert chunk.prefix == tuple(layout.closing(CHAT, 13)), "the pending token is re-fed, then <|im_end|>"
    assert chunk.body == tuple(layout.frames_chunk(CHAT, [frame(1)]))


def test_cancel_mid_turn_hides_the_rest_of_the_turn_and_ends_it_cancelled() -> None:
    s = in_flight()
    out(s, 11)
    s.handle(Cancel())
    plans = out(s, 12, 13)
    deltas = [p for p in plans if isinstance(p, EmitDelta)]
    assert [d.text for d in deltas] == [""] and deltas[0].token_ids == (12, 13), "counted, not shown"
    assert ended(plans).status == "cancelled"
    s.handle(FramesReady((frame(1),)))
    assert sent(s.next_turn()).prefix == tuple(layout.closing(CHAT, 13))


def test_close_mid_turn_cancels_the_answer_and_stops_the_request() -> None:
    s = in_flight()
    plans = s.handle(Close())
    assert ended(plans).status == "cancelled"
    assert StopRequest in kinds(plans)
    for event in (TurnOutput((1,), "", True, 0.0), FramesReady(()), Failure("late")):
        with pytest.raises(SchedulerError):
            s.handle(event)


def test_a_failure_mid_stream_fails_the_answer_and_the_session_goes_on() -> None:
    s = make(instructions=SYSTEM)
    kv = KVCache(s)
    s.handle(FramesReady((frame(0),)))
    kv.next_turn()
    kv.turn(9)
    ask(s, max_tokens=8)
    kv.next_turn()
    kv.turn(11, 12, 13)
    s.handle(FramesReady((frame(1),)))
    kv.next_turn()
    plans = s.handle(Failure("vLLM request ended unexpectedly"))
    assert kinds(plans) == [StopRequest, ResumePerception, EndResponse]
    assert ended(plans).status == "failed"
    assert s.counters.frames_dropped_failed == 1, "frame 1 never reached KV"
    assert s.request_tokens == 0
    # the next chunk opens a fresh request with what the session keeps
    ask(s, "r2", max_tokens=4)
    chunk = kv.next_turn()
    assert chunk.new_request == "restart"
    assert list(chunk.prefix) == [*layout.system_turn(CHAT, SYSTEM), *layout.frames_chunk(CHAT, [frame(0)])]
    assert chunk.body == tuple(layout.question_chunk(CHAT, "What?"))
    plans = kv.turn(21, IM_END)
    assert ended(plans).status == "completed"
    assert s.request_tokens == layout.token_length(kv.pieces)


def test_an_engine_death_loses_only_the_answer_in_flight_and_the_next_request_carries_the_session() -> None:
    s = make(instructions=SYSTEM, max_chunks=2)
    kv = KVCache(s)
    s.handle(FramesReady((frame(0),)))
    kv.next_turn()
    kv.turn(9)
    ask(s, max_tokens=8)
    kv.next_turn()
    kv.turn(11, IM_END)  # one exchange in the dialogue
    ask(s, "r2", max_tokens=8)
    kv.next_turn()
    kv.turn(21, 22, 23)
    s.handle(FramesReady((frame(1),)))
    kv.next_turn()  # frame 1 is sent with the answer's next turn: then the engine dies
    plans = s.handle(EngineLost("the engine core process EngineCore (pid 7) killed by SIGKILL"))
    assert kinds(plans) == [StopRequest, ResumePerception, EndResponse]
    assert ended(plans).status == "failed" and "SIGKILL" in (ended(plans).error or "")
    assert s.turn_state is TurnState.DOWN and s.request_tokens == 0
    assert (s.counters.frames_dropped_engine, s.counters.frames_dropped_failed) == (1, 0)
    # frames keep coming while it is down: the newest turn's worth waits, the rest is counted
    s.handle(FramesReady(tuple(frame(i) for i in range(2, 7))))
    assert s.counters.frames_dropped_engine == 1 + 3 and s.pending_frames == 2
    with pytest.raises(SchedulerError):
        s.next_turn()
    assert s.handle(EngineRestored()) == [] and s.turn_state is TurnState.IDLE
    ask(s, "r3", "Now?", max_tokens=4)
    chunk = kv.next_turn()
    assert chunk.new_request == "restart"
    # what a rollover carries: system, the window, the finished exchange (not the lost answer)
    carried = [
        *layout.system_turn(CHAT, SYSTEM),
        *layout.frames_chunk(CHAT, [frame(0)]),
        *layout.dialogue_turn(CHAT, "What?", (11,)),
    ]
    assert list(chunk.prefix) == carried
    assert chunk.body == tuple(layout.question_chunk(CHAT, "Now?", frames=[frame(5), frame(6)]))
    assert ended(kv.turn(31, IM_END)).status == "completed"
    assert s.counters.frames_ingested == 1 + 2 and s.pending_frames == 0
    assert s.counters.requests_started == 2 and s.counters.rollovers == 0


# -- random interleavings -------------------------------------------------------------------------

BUDGET = 160
MAX_TOKENS = 8


class RandomSession(RuleBasedStateMachine):
    """Any order of frames, questions, cancels, turn outputs, failures and configuration changes."""

    def __init__(self) -> None:
        super().__init__()
        self.s = make(budget=BUDGET, ready_chunks=3, max_chunks=2, window=2, dialogue=1, instructions="Hi")
        self.frames_fed = 0
        self.next_index = 0
        self.asked: list[str] = []
        self.ended: dict[str, str] = {}
        self.cancel_asked: set[str] = set()
        self.kv: list[Piece] | None = None
        self.received: list[int] = []
        self.turn_limit = 0

    def apply(self, plans: list[Plan]) -> None:
        for plan in plans:
            if isinstance(plan, SendChunk):
                if plan.new_request is not None:
                    self.kv = []
                assert self.kv is not None, "a chunk for a request that is not open"
                self.kv += plan.pieces
                self.received = []
                self.turn_limit = plan.max_tokens
                assert 1 <= plan.max_tokens <= K
            elif isinstance(plan, StopRequest):
                self.kv = None
            elif isinstance(plan, EmitDelta):
                assert plan.response_id in self.asked and plan.response_id not in self.ended, (
                    "delta after the end"
                )
                if plan.response_id in self.cancel_asked:
                    assert plan.text == "", "text shown after a cancel"
            elif isinstance(plan, EndResponse):
                assert plan.response_id not in self.ended, "two statuses for one response"
                assert plan.status in FINAL_STATUSES
                self.ended[plan.response_id] = plan.status

    def handle(self, event: Event) -> None:
        self.apply(self.s.handle(event))

    @property
    def open(self) -> bool:
        return self.s.turn_state is not TurnState.CLOSED

    @precondition(lambda self: self.open)
    @rule(n=st.integers(0, 3))
    def frames_ready(self, n: int) -> None:
        chunks = tuple(frame(self.next_index + i) for i in range(n))
        self.next_index += n
        self.frames_fed += n
        self.handle(FramesReady(chunks))

    @precondition(lambda self: self.open)
    @rule()
    def perception_settles(self) -> None:
        self.handle(FramesSettled(self.next_index))

    @precondition(lambda self: self.open and self.s.answer_state is AnswerState.NONE)
    @rule(max_tokens=st.integers(1, MAX_TOKENS), images=st.integers(0, 3), pushed_before=st.integers(0, 3))
    def question(self, max_tokens: int, images: int, pushed_before: int) -> None:
        images, pushed_before = images == 0, pushed_before == 0  # mostly plain questions
        rid = f"r{len(self.asked)}"
        self.asked.append(rid)
        before = self.next_index + (1 if pushed_before else 0)  # one frame still with perception
        self.handle(QuestionAsked(rid, "Q?", max_tokens, before, encoding_images=images))

    @precondition(lambda self: self.open and self.asked)
    @rule(ok=st.booleans())
    def images_done(self, ok: bool) -> None:
        rid = self.asked[-1]
        if self.s.answer_state is not AnswerState.ENCODING and rid == self.s.response_id:
            return  # the glue never reports images of an answer that does not wait for them
        self.handle(ImagesEncoded(rid, (image(),)) if ok else ImagesFailed(rid, "broken"))

    @precondition(lambda self: self.open)
    @rule(now=st.integers(0, 3))
    def cancel(self, now: int) -> None:
        if now:
            return  # a cancel is a rare event: let answers run most of the time
        if self.s.response_id is not None:
            self.cancel_asked.add(self.s.response_id)
        self.handle(Cancel())

    @precondition(lambda self: self.open and self.s.turn_state is TurnState.IDLE)
    @rule()
    def next_turn(self) -> None:
        self.apply(self.s.next_turn())

    @precondition(lambda self: self.open and self.s.turn_state is TurnState.IDLE)
    @rule(tokens=st.lists(st.sampled_from([11, 12, 13, 14, 15, 16, IM_END]), min_size=K, max_size=K))
    def whole_turn(self, tokens: list[int]) -> None:
        """The next turn and all of its output at once (so that long answers and rollovers happen)."""
        self.apply(self.s.next_turn())
        if self.s.turn_state is TurnState.MEMORY:
            self.memory_read(with_memory=True)
        while self.s.turn_state is TurnState.IN_FLIGHT:
            self.turn_output(tokens, finished=False)

    @precondition(lambda self: self.s.turn_state is TurnState.MEMORY)
    @rule(with_memory=st.booleans())
    def memory_read(self, with_memory: bool) -> None:
        item = VisualChunk(None, (1, 4, 4), 2, (), (), (), 0.0) if with_memory else None
        self.handle(MemoryRead(item))

    @precondition(lambda self: self.s.turn_state is TurnState.IN_FLIGHT)
    @rule(
        tokens=st.lists(st.sampled_from([11, 12, 13, IM_END]), min_size=0, max_size=K), finished=st.booleans()
    )
    def turn_output(self, tokens: list[int], finished: bool) -> None:
        # vLLM stops a turn at <|im_end|> or max_tokens: an output never runs past either
        room = self.turn_limit - len(self.received)
        tokens = tokens[:room]
        if IM_END in tokens:
            tokens = tokens[: tokens.index(IM_END) + 1]
        self.received += tokens
        self.handle(TurnOutput(tuple(tokens), "x" * len(tokens), finished, 1.0))
        if self.s.turn_state is not TurnState.IN_FLIGHT and self.kv is not None:
            self.kv += self.received[:-1]

    @precondition(lambda self: self.open and self.s.turn_state is not TurnState.DOWN)
    @rule(now=st.integers(0, 9))
    def failure(self, now: int) -> None:
        if not now:
            self.handle(Failure("boom"))

    @precondition(lambda self: self.open and self.s.turn_state is not TurnState.DOWN)
    @rule(now=st.integers(0, 19))
    def engine_lost(self, now: int) -> None:
        if not now:
            self.handle(EngineLost("killed"))

    @precondition(lambda self: self.s.turn_state is TurnState.DOWN)
    @rule()
    def engine_restored(self) -> None:
        self.handle(EngineRestored())

    @precondition(lambda self: self.open)
    @rule(schedule=st.sampled_from(["parallel", "sequential"]))
    def configure(self, schedule: str) -> None:
        self.handle(Configure(schedule=schedule))  # type: ignore[arg-type]

    @precondition(lambda self: self.open)
    @rule(now=st.integers(0, 19))
    def close(self, now: int) -> None:
        if not now:
            self.handle(Close())

    @precondition(lambda self: not self.open)
    @rule()
    def nothing_after_close(self) -> None:
        with pytest.raises(SchedulerError):
            self.s.handle(FramesReady((frame(self.next_index),)))

    @invariant()
    def every_frame_is_counted(self) -> None:
        c = self.s.counters
        if self.open:
            dropped = c.frames_dropped_backlog + c.frames_dropped_failed + c.frames_dropped_engine
            assert self.frames_fed == c.frames_ingested + dropped + self.s.pending_frames

    @invariant()
    def requests_stay_within_the_budget(self) -> None:
        assert self.s.counters.max_request_tokens <= BUDGET

    @invariant()
    def the_request_holds_what_was_sent(self) -> None:
        if self.kv is not None and self.s.turn_state is TurnState.IDLE:
            assert self.s.request_tokens == layout.token_length(self.kv)

    @invariant()
    def answers_end_once_and_only_the_current_one_is_open(self) -> None:
        unended = [rid for rid in self.asked if rid not in self.ended]
        assert unended == ([] if self.s.response_id is None else [self.s.response_id])

    def teardown(self) -> None:
        if self.open:
            self.handle(Close())
        assert sorted(self.ended) == sorted(self.asked), "every response ends with exactly one status"


TestRandomSession = RandomSession.TestCase
TestRandomSession.settings = settings(
    max_examples=150, stateful_step_count=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- the session glue on a stub runtime (a scripted engine, a stub vision tower) --------------------


class ScriptedEngine:
    """`StreamingEngine` that samples ``answer`` tokens in order, then filler, and can fail a chunk."""

    FILLER = 50

    def __init__(self, answer: Sequence[int] = (), pace: float = 0.0) -> None:
        self.answer = list(answer)
        self.pace = pace  # seconds per sampled token
        self.chunks: list[tuple[str, SimpleNamespace]] = []
        self.aborted: list[str] = []
        self.fail_chunk: int | None = None  # the index of a chunk whose turn raises

    async def generate(self, chunks, params, *, request_id: str):
        import asyncio

        async for chunk in chunks:
            self.chunks.append((request_id, chunk))
            if self.fail_chunk == len(self.chunks) - 1:
                raise RuntimeError("engine died")
            for _ in range(chunk.sampling_params.max_tokens):
                token = self.answer.pop(0) if self.answer else self.FILLER
                completion = SimpleNamespace(token_ids=[token], text=f"t{token} ", finish_reason=None)
                yield SimpleNamespace(outputs=[completion])
                await asyncio.sleep(self.pace)
                if token == IM_END:
                    break

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class StubEncoder:
    merge = 2
    temporal_patch = 2

    def encode(self, groups):
        import torch

        return [(torch.zeros(4, 8), (1, 4, 4)) for _ in groups]


class StubRuntime:
    positions = "group-decoupled"
    budget_tokens = 10_000

    def __init__(self, engine: ScriptedEngine, executor, budget_tokens: int = 10_000) -> None:
        from runtime.runtime import RuntimeSettings

        self.budget_tokens = budget_tokens
        self.settings = RuntimeSettings(
            turn_tokens=K, max_output_tokens=64, max_fps=1000.0, memory=MemoryConfig(enabled=False)
        )
        self.info = SimpleNamespace(chat=CHAT, hidden_size=8)
        self.encoder = StubEncoder()
        self.executor = executor
        self.engine = engine

    def sampling_params(self, max_tokens: int) -> SimpleNamespace:
        return SimpleNamespace(max_tokens=max_tokens)

    def _forget(self, session) -> None:
        pass


@pytest.fixture
def stub_session(monkeypatch):
    """A `Session` factory on a `ScriptedEngine`; chunks reach it as (prompt, sampling_params)."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.request import StreamingRequest
    from runtime.session import Session

    def send(self, prompt: dict, params: SimpleNamespace) -> None:  # StreamingInput without vLLM
        self._inputs.put_nowait(SimpleNamespace(prompt=prompt, sampling_params=params))

    monkeypatch.setattr(StreamingRequest, "send", send)
    executor = ThreadPoolExecutor(1)

    def open_session(engine: ScriptedEngine, budget_tokens: int = 10_000, **kw) -> Session:
        return Session(StubRuntime(engine, executor, budget_tokens), **kw)  # type: ignore[arg-type]

    yield open_session
    executor.shutdown(wait=True)


async def settle(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    import asyncio

    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


PIXELS = np.zeros((8, 8, 3), np.uint8)


async def test_the_session_streams_an_answer_with_the_frames_pushed_before_it(stub_session) -> None:
    engine = ScriptedEngine([11, 12, 13, 14, IM_END])
    session = stub_session(engine, instructions=SYSTEM)
    await session.push_frame(PIXELS, timestamp=0.0)
    response = session.ask("What?", max_tokens=8)  # the frame is still with perception: it waits
    deltas = [delta async for delta in response]
    assert deltas == ["t11 ", "t12 ", "t13 ", "t14 ", "t2 "] and response.status == "completed"
    assert response.usage == {"input_tokens": response.usage["input_tokens"], "output_tokens": 4}
    assert response.token_ids == [11, 12, 13, 14]
    first = engine.chunks[0][1].prompt["prompt_token_ids"]
    assert first[: len(layout.system_turn(CHAT, SYSTEM))] == layout.system_turn(CHAT, SYSTEM)
    assert first.count(IMAGE_PAD) == 1, "the frame pushed before the question is in its chunk"
    stats = session.stats()
    assert (stats.frames_ingested, stats.turns, stats.last_response_status) == (1, 2, "completed")
    await session.close()
    assert engine.aborted == [f"{session.id}-0"], "close frees the request"


async def test_a_failing_memory_update_is_counted_and_logged(stub_session, caplog) -> None:
    session = stub_session(ScriptedEngine())

    def broken(chunk) -> None:
        raise ValueError("bad embeddings")

    session.memory.observe = broken
    await session.push_frame(PIXELS, timestamp=0.0)
    await settle(lambda: session.stats().memory_update_failures == 1)
    assert "memory update failed" in caplog.text
    await session.close()


async def test_a_failure_mid_stream_fails_the_answer_and_the_next_one_is_served(stub_session) -> None:
    engine = ScriptedEngine()
    engine.fail_chunk = 1  # the answer's second turn
    session = stub_session(engine)
    response = session.ask("What?", max_tokens=8)
    with pytest.raises(RuntimeError, match="response failed"):
        await response.read()
    assert response.status == "failed"
    assert engine.aborted == [f"{session.id}-0"]
    engine.answer = [21, IM_END]
    follow_up = session.ask("And now?", max_tokens=8)
    assert await follow_up.read() == "t21 t2 " and follow_up.status == "completed"
    assert engine.chunks[-1][0] == f"{session.id}-1", "a fresh request"
    await session.close()


async def test_cancel_and_close_mid_answer(stub_session) -> None:
    engine = ScriptedEngine(pace=0.01)  # 60 tokens take longer than the test needs
    session = stub_session(engine)
    response = session.ask("Comment.", max_tokens=60)
    async for _ in response:
        await session.cancel()
    assert response.status == "cancelled" and response.usage["output_tokens"] < 60
    second = session.ask("Comment.", max_tokens=60)
    await settle(lambda: second.usage["output_tokens"] > 0)
    await session.close()
    assert second.status == "cancelled"
    assert engine.aborted == [f"{session.id}-0"]
    with pytest.raises(Exception, match="closed"):
        session.ask("More?")


async def test_the_session_rolls_over_to_a_new_request_and_aborts_the_old(stub_session) -> None:
    engine = ScriptedEngine()
    # the same frame twelve times: the change filter is off, this test is about the rollover
    off = ChangeFilterSettings(enabled=False)
    session = stub_session(engine, budget_tokens=60, instructions=SYSTEM, change_filter=off)
    for i in range(12):  # each idle frame chunk: 6 tokens
        await session.push_frame(PIXELS, timestamp=float(i))
        await settle(lambda n=i + 1: session.stats().frames_ingested == n)
    engine.answer = [11, 12, 13, 14, 15, IM_END]
    assert await session.ask("What?", max_tokens=8).read() == "t11 t12 t13 t14 t15 t2 "
    stats = session.stats()
    assert stats.rollovers >= 2 and stats.requests_started == stats.rollovers + 1
    assert stats.max_request_tokens <= 60 and stats.session_tokens <= 60
    assert engine.aborted == [f"{session.id}-{n}" for n in range(stats.rollovers)]
    rolled = next(chunk for rid, chunk in engine.chunks if rid == f"{session.id}-1")
    system = layout.system_turn(CHAT, SYSTEM)
    assert rolled.prompt["prompt_token_ids"][: len(system)] == system, (
        "a new request opens with the system turn"
    )
    await session.close()


async def test_a_question_with_an_image_and_a_cancel_while_one_encodes(stub_session) -> None:
    engine = ScriptedEngine([11, IM_END])
    session = stub_session(engine)
    response = session.ask("What is this?", max_tokens=8, images=[PIXELS])
    assert await response.read() == "t11 t2 "
    assert engine.chunks[0][1].prompt["prompt_token_ids"].count(IMAGE_PAD) == 1
    assert session.stats().frames_ingested == 0, "an attached image is not a camera frame"
    cancelled = session.ask("And this?", images=[PIXELS])
    await session.cancel()  # before the image is encoded: nothing reaches the model
    assert cancelled.status == "cancelled" and cancelled.usage["output_tokens"] == 0
    await asyncio.sleep(0.05)
    assert len(engine.chunks) == 1, "only the first question (answered in one turn) was sent"
    await session.close()
