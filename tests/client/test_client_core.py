"""The sans-I/O client core, without sockets: every transition of an answer's stage table, requests,
errors, closing, the numbers, and (against the server's own protocol core) random interleavings."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from client.core import (
    Answer,
    AnswerEnded,
    AnswerReleased,
    ClientProtocol,
    Delta,
    Output,
    RealtimeError,
    Reply,
    Send,
    Unclaimed,
    session_fields,
)
from runtime.server.protocol import RealtimeProtocol, StartResponse
from runtime.wire import (
    UNSET,
    ConversationItemCreate,
    ErrorEvent,
    ErrorInfo,
    InputImage,
    InputText,
    InputVideoStats,
    MessageItem,
    OutputText,
    OutputTextDelta,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseFailure,
    ResponseObject,
    ResponseParams,
    ServerEvent,
    SessionCreated,
    SessionObject,
    SessionStats,
    SessionUpdated,
    StatusDetails,
    UnknownServerEvent,
    Usage,
    UserMessage,
    VideoConfig,
    VideoUpdate,
)

JPEG_URL = "data:image/jpeg;base64,/9j/4AAQ"
SESSION = SessionObject("sess_1", "m", None, 256, VideoConfig(2.0, "parallel", "group-decoupled"))


def make(created: bool = True) -> ClientProtocol:
    counter = itertools.count(1)
    core = ClientProtocol(new_event_id=lambda: f"c{next(counter)}")
    if created:
        core.receive(SessionCreated(event_id="s0", session=SESSION).to_json(), 0.0)
    return core


def feed(core: ClientProtocol, event: ServerEvent, now: float = 0.0) -> list[Output]:
    """What the core makes of one server event, without the event itself (always the last output)."""
    out = core.receive(event.to_json(), now)
    assert out[-1] == event or isinstance(out[-1], UnknownServerEvent)
    return out[:-1]


def sent(out: list[Output]) -> list:
    return [o.event for o in out if isinstance(o, Send)]


def response(rid: str, status: str = "in_progress", text: str = "", **extra) -> ResponseObject:
    output = (MessageItem("item_a", "assistant", "completed", (OutputText(text),)),) if text else ()
    return ResponseObject(rid, status, "conv_1", 256, output=output, **extra)  # type: ignore[arg-type]


def created(rid: str = "resp_1") -> ResponseCreated:
    return ResponseCreated(event_id="e", response=response(rid))


def delta(text: str, rid: str = "resp_1") -> OutputTextDelta:
    return OutputTextDelta(event_id="e", response_id=rid, item_id="item_a", delta=text)


def done(rid: str = "resp_1", status: str = "completed", **extra) -> ResponseDone:
    return ResponseDone(event_id="e", response=response(rid, status, **extra))


def error(code: str, cause: str | None = None, kind: str = "invalid_request_error") -> ErrorEvent:
    return ErrorEvent(event_id="e", error=ErrorInfo(code, f"{code}!", kind, None, cause))  # type: ignore[arg-type]


def sent_answer(core: ClientProtocol, text: str = "hi", now: float = 1.0, **ask) -> Answer:
    answer = core.ask(text, **ask)
    assert len(sent(core.submit(answer, [], now))) == 2
    return answer


def created_answer(core: ClientProtocol, rid: str = "resp_1") -> Answer:
    answer = sent_answer(core)
    assert feed(core, created(rid)) == []
    return answer


# ---------------------------------------------------------------------------------------------
# Session events
# ---------------------------------------------------------------------------------------------


def test_session_created_is_kept_and_every_event_comes_out_typed_last():
    core = make(created=False)
    assert core.session is None and core.session_id == ""
    event = SessionCreated(event_id="s0", session=SESSION)
    assert core.receive(event.to_json(), 0.0) == [event]
    assert core.session == SESSION and core.session_id == "sess_1"
    (unknown,) = core.receive('{"type": "rate_limits.updated", "rate_limits": []}', 0.0)
    assert isinstance(unknown, UnknownServerEvent) and unknown.type == "rate_limits.updated"
    assert unknown.encode() == {"type": "rate_limits.updated", "rate_limits": []}


@pytest.mark.parametrize("message", ["not json", "[1]", "null", b"\xff"])
def test_messages_that_are_not_json_objects_are_ignored(message):
    assert make().receive(message, 0.0) == []


def test_a_malformed_known_event_becomes_unknown_instead_of_raising():
    out = make().receive('{"type": "input_video.stats", "frames_received": 1}', 0.0)
    assert isinstance(out[0], UnknownServerEvent) and out[0].type == "input_video.stats"


# ---------------------------------------------------------------------------------------------
# Asking: preparing -> sent -> created -> released
# ---------------------------------------------------------------------------------------------


def test_ask_then_submit_sends_the_user_turn_and_response_create():
    core = make()
    answer = core.ask("what now?", 20, instructions="be brief")
    assert answer.stage == "preparing" and answer.status == "in_progress" and answer.id is None
    out = core.submit(answer, [JPEG_URL], 5.0)
    assert sent(out) == [
        ConversationItemCreate(
            event_id="c1", item=UserMessage((InputText("what now?"), InputImage(JPEG_URL)))
        ),
        ResponseCreate(event_id="c2", response=ResponseParams("be brief", 20)),
    ]
    assert answer.stage == "sent" and answer.sent_at == 5.0
    assert core.submit(answer, [], 6.0) == []  # submitted once


def test_the_answer_takes_the_server_id_and_streams_to_the_end():
    core = make()
    answer = sent_answer(core, now=1.0)
    assert feed(core, created("resp_9")) == [] and answer.id == "resp_9" and answer.stage == "created"
    assert feed(core, delta("A ", "resp_9"), 1.5) == [Delta(answer, "A ")]
    assert feed(core, delta("B", "resp_9"), 2.0) == [Delta(answer, "B")]
    assert feed(core, delta("", "resp_9"), 2.0) == []
    assert feed(core, delta("x", "resp_other")) == []
    usage = Usage(10, 3)
    out = feed(core, done("resp_9", usage=usage, text="A B"), 2.5)
    assert out == [AnswerEnded(answer), AnswerReleased(answer)]
    assert (answer.status, answer.text, answer.usage, answer.error) == ("completed", "A B", usage, None)
    assert answer.ttft_ms == 500.0 and answer.tokens_per_s == 4.0  # 2 tokens after the first in 0.5 s
    assert answer.stage == "released" and answer.done
    assert feed(core, delta("late", "resp_9")) == [] and feed(core, done("resp_9")) == []


def test_one_answer_at_a_time():
    core = make()
    answer = core.ask("first")
    with pytest.raises(RealtimeError) as busy:
        core.ask("second")
    assert busy.value.code == "conversation_already_has_active_response"
    core.cancel(answer)
    assert core.ask("second").question == "second"


@pytest.mark.parametrize(("text", "max_tokens"), [(5, None), ("x", 0), ("x", -1), ("x", True), ("x", 1.5)])
def test_ask_checks_its_arguments(text, max_tokens):
    core = make()
    with pytest.raises(ValueError):
        core.ask(text, max_tokens)
    assert core.latest is None


@pytest.mark.parametrize("status", ["cancelled", "incomplete"])
def test_other_endings_are_not_errors(status):
    core = make()
    answer = created_answer(core)
    details = StatusDetails(status, "client_cancelled" if status == "cancelled" else "max_output_tokens")
    feed(core, done(status=status, status_details=details))
    assert (answer.status, answer.status_details, answer.error) == (status, details, None)


# ---------------------------------------------------------------------------------------------
# Cancelling in every stage
# ---------------------------------------------------------------------------------------------


def test_cancel_while_preparing_never_sends_anything():
    core = make()
    answer = core.ask("hi")
    out = core.cancel(answer)
    assert out == [AnswerEnded(answer), AnswerReleased(answer)]
    assert answer.status == "cancelled" and answer.status_details == StatusDetails(
        "cancelled", "client_cancelled"
    )
    assert core.submit(answer, [], 1.0) == []  # the images finished encoding after the cancel
    assert core.cancel(answer) == []


def test_cancel_before_response_created_cancels_the_active_response():
    core = make()
    answer = sent_answer(core)
    assert sent(core.cancel(answer)) == [ResponseCancel(event_id="c3", response_id=None)]
    assert core.cancel(answer) == []  # asked once
    feed(core, created())
    out = feed(core, done(status="cancelled", status_details=StatusDetails("cancelled", "client_cancelled")))
    assert out == [AnswerEnded(answer), AnswerReleased(answer)] and answer.status == "cancelled"


def test_cancel_names_the_response_once_created():
    core = make()
    answer = created_answer(core, "resp_4")
    assert sent(core.cancel(answer)) == [ResponseCancel(event_id="c3", response_id="resp_4")]


def test_cancel_not_active_releases_the_answer():
    core = make()
    answer = created_answer(core)
    core.cancel(answer)
    assert feed(core, error("response_cancel_not_active", "c3")) == [AnswerReleased(answer)]
    assert answer.stage == "released"


def test_cancel_not_active_after_the_answer_was_released_is_nobodys_error():
    """The cancel crossed response.done on the wire: the late refusal must not reach on_error."""
    core = make()
    answer = created_answer(core)
    core.cancel(answer)
    feed(core, done())
    assert answer.stage == "released"
    assert feed(core, error("response_cancel_not_active", "c3")) == [] and core.last_error is None
    assert feed(core, error("response_cancel_not_active", "someone-else")) != []


def test_other_errors_for_a_cancel_are_ignored():
    core = make()
    answer = created_answer(core)
    core.cancel(answer)
    assert feed(core, error("invalid_value", "c3")) == [] and answer.stage == "created"


def test_an_ask_waits_while_the_server_still_holds_the_previous_answer():
    core = make()
    first = created_answer(core)
    feed(core, error("invalid_image", first.item_event_id))  # ended for the caller, cancel sent
    assert first.done and first.stage == "created"
    second = core.ask("next")
    assert core.submit(second, [], 2.0) == [] and second.stage == "queued"
    out = feed(core, done(status="cancelled"), 3.0)
    assert out[0] == AnswerReleased(first)
    assert [type(e) for e in sent(out)] == [ConversationItemCreate, ResponseCreate]
    assert second.stage == "sent" and second.sent_at == 3.0
    assert first.status == "failed"  # the late response.done does not change the caller's ending


def test_cancel_while_queued_never_sends_it():
    core = make()
    first = created_answer(core)
    feed(core, error("invalid_image", first.item_event_id))  # ended for the caller, still held
    second = core.ask("next")
    core.submit(second, [], 2.0)
    assert core.cancel(second) == [AnswerEnded(second), AnswerReleased(second)]
    assert sent(feed(core, done(status="cancelled"))) == []


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_an_error_for_response_create_fails_the_answer_and_releases_it():
    core = make()
    answer = sent_answer(core)
    out = feed(core, error("invalid_value", answer.create_event_id))
    assert out == [AnswerEnded(answer), AnswerReleased(answer)]
    assert answer.status == "failed" and answer.error is not None and answer.error.code == "invalid_value"
    assert core.last_error is None  # taken by the ask


def test_an_error_for_the_user_turn_fails_the_answer_and_cancels_its_response():
    core = make()
    answer = sent_answer(core)
    out = feed(core, error("invalid_image", answer.item_event_id))
    assert out[0] == AnswerEnded(answer) and sent(out) == [ResponseCancel(event_id="c3")]
    assert answer.error is not None and answer.error.code == "invalid_image"
    feed(core, created())
    assert feed(core, delta("no")) == []  # ended: nothing more for its caller
    assert feed(core, done(status="cancelled")) == [AnswerReleased(answer)]


def test_an_engine_failure_is_raised_when_the_response_fails():
    core = make()
    answer = created_answer(core)
    assert feed(core, error("engine_unavailable", kind="server_error")) == []
    details = StatusDetails("failed", error=ResponseFailure("vLLM died"))
    out = feed(core, done(status="failed", status_details=details))
    assert out == [AnswerEnded(answer), AnswerReleased(answer)]
    assert answer.error is not None and answer.error.message == "engine_unavailable!"


def test_a_failed_response_without_an_error_event_raises_its_details():
    core = make()
    answer = created_answer(core)
    feed(core, done(status="failed", status_details=StatusDetails("failed", error=ResponseFailure("gone"))))
    assert answer.error is not None and (answer.error.code, answer.error.message) == (
        "engine_unavailable",
        "gone",
    )
    other = created_answer(core, "resp_2")
    feed(core, done("resp_2", status="failed"))
    assert other.error is not None and other.error.code == "response_failed"


def test_errors_nobody_waits_for_are_unclaimed():
    core = make()
    out = feed(core, error("invalid_image", "c_frame"))
    assert len(out) == 1 and isinstance(out[0], Unclaimed) and out[0].error.code == "invalid_image"
    assert core.last_error is out[0].error
    assert isinstance(feed(core, error("engine_unavailable", kind="server_error"))[0], Unclaimed)  # idle


def test_an_error_before_session_created_is_only_remembered():
    core = make(created=False)
    assert feed(core, error("session_limit_reached", kind="server_error")) == []
    assert core.last_error is not None and core.last_error.code == "session_limit_reached"


# ---------------------------------------------------------------------------------------------
# Requests, frames, closing, numbers
# ---------------------------------------------------------------------------------------------


def test_session_update_is_answered_in_order():
    core = make()
    first = core.update(session_fields(instructions="a"))
    second = core.update(
        session_fields(max_output_tokens="inf", video={"max_fps": 4, "schedule": "sequential"})
    )
    assert first.encode() == {
        "type": "session.update",
        "event_id": "c1",
        "session": {"type": "realtime", "instructions": "a"},
    }
    assert second.session.video == VideoUpdate(4, "sequential")
    updated = SessionUpdated(event_id="e", session=SESSION)
    assert feed(core, updated) == [Reply("c1", updated)]
    out = feed(core, error("invalid_value", "c2"))
    assert isinstance(out[0], Reply) and out[0].event_id == "c2" and isinstance(out[0].result, RealtimeError)
    assert feed(core, updated) == []  # nobody waits any more
    third = core.update(session_fields())
    assert third.session.instructions is UNSET and third.session.video is None
    core.forget("c3")
    assert feed(core, updated) == []


def test_frames_are_counted_and_timestamped_in_milliseconds():
    core = make()
    event = core.append_frame(JPEG_URL, 1.25)
    assert event.encode() == {
        "type": "input_video.append",
        "event_id": "c1",
        "image": JPEG_URL,
        "timestamp_ms": 1250.0,
    }
    assert core.append_frame(JPEG_URL, None).timestamp_ms is None
    assert core.frames_sent == 2


def test_close_fails_every_waiting_caller_and_refuses_new_requests():
    core = make()
    request = core.update(session_fields(instructions="x"))
    answer = created_answer(core)
    out = core.close("closed by the server (code 1001)")
    assert isinstance(out[0], Reply) and out[0].event_id == request.event_id
    assert isinstance(out[0].result, RealtimeError) and out[0].result.code == "connection_closed"
    assert out[1:] == [AnswerEnded(answer), AnswerReleased(answer)]
    assert answer.error is not None and answer.error.code == "connection_closed"
    assert "code 1001" in answer.error.message
    assert core.close("again") == [] and core.close_reason == "closed by the server (code 1001)"
    for call in (lambda: core.ask("x"), lambda: core.append_frame(JPEG_URL, None), core.check_open):
        with pytest.raises(RealtimeError) as closed:
            call()
        assert closed.value.code == "connection_closed"
    assert core.cancel(answer) == []
    assert core.receive(SessionUpdated(event_id="e", session=SESSION).to_json(), 0.0) == []


def test_close_while_preparing_and_queued():
    core = make()
    first = created_answer(core)
    feed(core, error("invalid_image", first.item_event_id))
    second = core.ask("queued")
    core.submit(second, [], 1.0)
    out = core.close("closed by the client")
    assert AnswerEnded(second) in out and AnswerReleased(second) in out and AnswerReleased(first) in out
    assert sent(out) == []


def test_stats_are_the_servers_session_stats():
    core = make()
    before = core.stats()
    assert isinstance(before, SessionStats) and before.session_id == "sess_1"
    assert before.frames_received == 0 and core.frames_sent == 0
    server = SessionStats("sess_1", "parallel", "group-decoupled", frames_received=7, ttft_ms=40.0)
    feed(core, InputVideoStats(event_id="e", stats=server))
    assert core.stats() == server, "the same names and values as the embedded Session.stats()"
    answer = created_answer(core)
    feed(core, delta("a"), 1.1)
    feed(core, done(usage=Usage(5, 1)))
    assert core.stats() == server, "the client's own timings stay on the answer"
    assert answer.ttft_ms is not None


# ---------------------------------------------------------------------------------------------
# Against the server's protocol core: the same wire schema at both ends
# ---------------------------------------------------------------------------------------------


class Loopback:
    """A client core wired to a server protocol core; the "engine" streams when the test says so."""

    def __init__(self) -> None:
        counter = itertools.count()
        self.server = RealtimeProtocol(
            "sess_1", model="m", positions="p", id_factory=lambda prefix: f"{prefix}_{next(counter)}"
        )
        self.client = ClientProtocol()
        self.generating: str | None = None  # the response id the engine is producing
        self.now = 0.0
        self.outputs: list[Output] = []
        self.deliver(self.server.start())

    def deliver(self, server_outputs: list) -> None:
        """Server outputs to the client (the engine starts on StartResponse), client sends to the server."""
        for out in server_outputs:
            if isinstance(out, StartResponse):
                self.generating = out.response_id
            elif isinstance(out, ServerEvent):
                self.apply(self.client.receive(out.to_json(), self.now))

    def apply(self, client_outputs: list[Output]) -> None:
        self.outputs += client_outputs
        for out in client_outputs:
            if isinstance(out, Send):
                self.deliver(self.server.receive(out.event.to_json()))

    def tick(self) -> None:
        self.now += 0.01


def test_loopback_one_answer_then_a_cancelled_one():
    loop = Loopback()
    assert loop.client.session_id == "sess_1"
    answer = loop.client.ask("hello", 8)
    loop.apply(loop.client.submit(answer, [], loop.now))
    rid = loop.generating
    assert rid is not None and answer.id == rid  # the id of response.created, end to end
    for word in ("one ", "two"):
        loop.tick()
        loop.deliver(loop.server.text_delta(rid, word))
    loop.deliver(loop.server.response_finished(rid, "completed", {"input_tokens": 4, "output_tokens": 2}))
    assert (answer.status, answer.text, answer.usage) == ("completed", "one two", Usage(4, 2, *_details(2)))

    second = loop.client.ask("more")
    loop.apply(loop.client.submit(second, [], loop.now))
    loop.deliver(loop.server.text_delta(loop.generating, "x"))
    loop.apply(loop.client.cancel(second))
    loop.deliver(loop.server.text_delta(loop.generating, "hidden"))  # after the cancel: never shown
    loop.deliver(loop.server.response_finished(loop.generating, "cancelled", {}))
    assert (second.status, second.text, second.stage) == ("cancelled", "x", "released")


def _details(output_tokens: int) -> tuple[dict[str, int], dict[str, int]]:
    return (
        {"text_tokens": 0, "image_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
        {"text_tokens": output_tokens, "audio_tokens": 0},
    )


class Interleavings(RuleBasedStateMachine):
    """Random asks, cancels, engine output and engine endings: every answer ends exactly once for its
    caller, is released exactly once after that, and gets no text after its end."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = Loopback()
        self.answers: list[Answer] = []

    @rule(images=st.integers(0, 1))
    def ask(self, images: int) -> None:
        try:
            answer = self.loop.client.ask("q")
        except RealtimeError as exc:
            assert exc.code in ("conversation_already_has_active_response", "connection_closed")
            return
        self.answers.append(answer)
        self.loop.apply(self.loop.client.submit(answer, [JPEG_URL] * images, self.loop.now))

    @precondition(lambda self: self.answers)
    @rule()
    def cancel(self) -> None:
        self.loop.apply(self.loop.client.cancel(self.answers[-1]))

    @precondition(lambda self: self.loop.generating is not None)
    @rule(text=st.sampled_from(["a", "b "]))
    def engine_delta(self, text: str) -> None:
        self.loop.tick()
        self.loop.deliver(self.loop.server.text_delta(self.loop.generating, text))

    @precondition(lambda self: self.loop.generating is not None)
    @rule(
        status=st.sampled_from(["completed", "cancelled", "incomplete", "failed"]), engine_error=st.booleans()
    )
    def engine_end(self, status: str, engine_error: bool) -> None:
        rid, self.loop.generating = self.loop.generating, None
        if status == "failed" and engine_error:
            self.loop.deliver(self.loop.server.engine_error("boom"))
        self.loop.deliver(self.loop.server.response_finished(rid, status, {"output_tokens": 1}))  # type: ignore[arg-type]

    @precondition(lambda self: self.answers and self.answers[-1].stage in ("sent", "created"))
    @rule()
    def image_rejected(self) -> None:
        """The server could not decode the latest answer's image (it says so after the fact)."""
        self.loop.deliver(self.loop.server.image_rejected(self.answers[-1].item_event_id, "bad image"))

    @precondition(lambda self: any(a.id for a in self.answers))
    @rule(data=st.data())
    def late_delta(self, data: st.DataObject) -> None:
        """A delta for any answer the server ever created, whatever its state (a misbehaving server)."""
        answer = data.draw(st.sampled_from([a for a in self.answers if a.id]))
        event = OutputTextDelta(event_id="e", response_id=answer.id or "", item_id="i", delta="late")
        self.loop.apply(self.loop.client.receive(event.to_json(), self.loop.now))

    @rule()
    def close(self) -> None:
        if not self.loop.client.closed and len(self.answers) > 3:
            self.loop.apply(self.loop.client.close("closed by the client"))

    @invariant()
    def each_answer_ends_once_then_is_released_once_and_is_silent_after_its_end(self) -> None:
        for answer in self.answers:
            history = [o for o in self.loop.outputs if getattr(o, "answer", None) is answer]
            ended = [i for i, o in enumerate(history) if isinstance(o, AnswerEnded)]
            released = [i for i, o in enumerate(history) if isinstance(o, AnswerReleased)]
            assert len(ended) <= 1 and len(released) <= 1
            assert answer.done == bool(ended)
            if released:
                assert ended and ended[0] < released[0]
            if ended:
                assert not any(isinstance(o, Delta) for o in history[ended[0] :])
            deltas = "".join(o.text for o in history if isinstance(o, Delta))
            assert deltas == answer.text
        if self.loop.client.closed:
            assert all(a.stage == "released" for a in self.answers)

    @invariant()
    def the_server_is_never_asked_for_a_second_answer_at_once(self) -> None:
        assert not any(isinstance(o, Unclaimed) for o in self.loop.outputs)
        assert all(
            a.error is None or a.error.code != "conversation_already_has_active_response"
            for a in self.answers
        )

    def teardown(self) -> None:
        # Let the engine finish what it is doing (a queued answer is sent on each release): then
        # every answer has ended and been released.
        while self.loop.generating is not None and not self.loop.client.closed:
            self.engine_end("completed", False)
        assert all(a.done and a.stage == "released" for a in self.answers)


TestInterleavings = Interleavings.TestCase
TestInterleavings.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)


def test_the_sdk_events_match_what_json_looks_like():
    core = make()
    answer = core.ask("hi", 3)
    events = sent(core.submit(answer, [JPEG_URL], 0.0))
    assert [json.loads(e.to_json()) for e in events] == [
        {
            "type": "conversation.item.create",
            "event_id": "c1",
            "item": {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "hi"},
                    {"type": "input_image", "detail": "auto", "image_url": JPEG_URL},
                ],
            },
        },
        {"type": "response.create", "event_id": "c2", "response": {"max_output_tokens": 3}},
    ]


def test_the_core_and_the_wire_schema_import_without_the_heavy_stack():
    """What ``client`` needs from ``runtime`` must stay light: no torch, vLLM, aiohttp or openai."""
    code = """
import importlib.util, sys
import runtime.wire
spec = importlib.util.spec_from_file_location("client_core", "client/core.py")  # without client/__init__
sys.modules["client_core"] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(sorted(m for m in ("torch", "vllm", "aiohttp", "openai", "numpy") if m in sys.modules))
"""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_session_fields_carry_the_change_filter_and_refuse_unknown_video_keys():
    fields = session_fields(max_fps=4, change_filter={"enabled": False})
    assert fields.video is not None and fields.video.max_fps == 4
    change = fields.video.change_filter
    assert change is not None and change.changes() == {"enabled": False}
    assert session_fields(video={"change_filter": {"threshold": 9}}).video.change_filter.changes() == {
        "threshold": 9.0
    }
    with pytest.raises(ValueError, match="window"):
        session_fields(video={"window": 4})  # not a setting: raising beats ignoring it silently
    with pytest.raises(ValueError, match="threshhold"):
        session_fields(change_filter={"threshhold": 3})
    with pytest.raises(ValueError, match="enabled"):
        session_fields(change_filter={"enabled": "no"})
