"""The remote SDK reconnects by itself: the sans-I/O core's resume state, and the SDK resuming its
session across a connection the server drops, with the answer being iterated going on whole."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from client_server import ServerThread

import client
from client.core import AnswerEnded, ClientProtocol, Delta, ReconnectPolicy, Send
from client.remote import RemoteSession

pytestmark = pytest.mark.timeout(60)

QUESTION = " ".join(f"word{i}" for i in range(60))
ANSWER = f"seen 0 frames, images none, you said: {QUESTION} "


def session_payload(token: str | None = "rt_one") -> dict[str, Any]:
    session: dict[str, Any] = {"id": "sess_1", "model": "m", "video": {"max_fps": 2, "positions": "p"}}
    if token is not None:
        session["resume"] = {"token": token, "grace_s": 30.0}
    return session


def message(event_type: str, event_id: str, **fields: Any) -> str:
    return json.dumps({"type": event_type, "event_id": event_id, **fields})


def delta(event_id: str, response_id: str, text: str) -> str:
    return message(
        "response.output_text.delta", event_id, response_id=response_id, item_id="item_1", delta=text
    )


# -- the core ------------------------------------------------------------------------------------------


def test_the_core_keeps_the_token_and_the_last_event_for_a_resume() -> None:
    core = ClientProtocol()
    assert not core.online and core.resume is None
    with pytest.raises(client.RealtimeError):
        core.resume_params()
    core.receive(message("session.created", "ev1", session=session_payload()), 0.0)
    assert core.online and core.resume is not None and core.resume.grace_s == 30.0
    assert core.resume_params() == {"resume": "rt_one", "last_event_id": "ev1"}
    core.receive(message("input_video.stats", "ev2", session_id="sess_1"), 0.0)
    core.receive("not json", 0.0)  # ignored, and not counted as received
    assert core.last_event_id == "ev2"
    core.disconnected()
    assert not core.online
    resumed = message("session.resumed", "ev_r", session=session_payload("rt_two"), replayed=0)
    core.receive(resumed, 0.0)
    # session.resumed is not replayable: the client's position stays at the last real event
    assert core.resume_params() == {"resume": "rt_two", "last_event_id": "ev2"}
    assert core.reconnects == 1 and core.session_id == "sess_1"


def test_which_close_codes_are_worth_a_resume() -> None:
    core = ClientProtocol()
    assert not core.should_reconnect(None)  # no token: nothing to resume
    core.receive(message("session.created", "ev1", session=session_payload()), 0.0)
    assert [core.should_reconnect(code) for code in (None, 1006, 1008, 1011, 1012)] == [True] * 5
    assert [core.should_reconnect(code) for code in (1000, 1001, 4000)] == [False] * 3
    core.close("done")
    assert not core.should_reconnect(1006)
    without = ClientProtocol()
    without.receive(message("session.created", "ev1", session=session_payload(None)), 0.0)
    assert not without.should_reconnect(1006)


def test_the_reconnect_policy_backs_off_within_the_grace_period() -> None:
    policy = ReconnectPolicy(attempts=6, initial_delay=0.1, max_delay=1.0)
    assert policy.delays() == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.delays(grace_s=1.0) == [0.1, 0.2, 0.4]  # a 4th try would start after the grace
    assert ReconnectPolicy(attempts=3, initial_delay=0.0).delays() == [0.0, 0.01, 0.02]
    assert ReconnectPolicy(initial_delay=5.0, max_delay=5.0).delays(grace_s=1.0) == [5.0]  # one try
    for bad in ({"attempts": 0}, {"initial_delay": -1.0}, {"initial_delay": 3.0, "max_delay": 1.0}):
        with pytest.raises(ValueError):
            ReconnectPolicy(**bad)


def test_an_answer_goes_on_across_a_disconnect_in_the_core() -> None:
    core = ClientProtocol()
    core.receive(message("session.created", "ev1", session=session_payload()), 0.0)
    answer = core.ask("hi")
    assert [type(o) for o in core.submit(answer, [], 0.0)] == [Send, Send]
    core.receive(message("response.created", "ev2", response={"id": "resp_1", "status": "in_progress"}), 0.1)
    out = core.receive(delta("ev3", "resp_1", "a "), 0.2)
    assert [o.text for o in out if isinstance(o, Delta)] == ["a "]
    core.disconnected()
    assert not answer.done and answer.stage == "created"  # not failed: a resume may bring the rest
    core.receive(message("session.resumed", "ev_r", session=session_payload("rt_two"), replayed=2), 0.3)
    out = core.receive(delta("ev4", "resp_1", "b"), 0.3)
    done = message("response.done", "ev5", response={"id": "resp_1", "status": "completed"})
    out += core.receive(done, 0.4)
    assert [o.text for o in out if isinstance(o, Delta)] == ["b"]
    assert any(isinstance(o, AnswerEnded) for o in out)
    assert answer.text == "a b" and answer.status == "completed"


# -- the SDK against the server (fake runtime) ------------------------------------------------------------


def drop(server: ServerThread, session_id: str, *, close_session: bool = False) -> None:
    """The server loses the socket of ``session_id`` (no close frame); optionally its session too."""

    async def lose() -> None:
        conn = server.server.connections[session_id]
        conn.sink.abort()
        if close_session:
            await conn.close()

    server.call(lose(), timeout=10)


def fake_session(server: ServerThread, session_id: str) -> Any:
    return server.run(lambda: [s for s in server.runtime.sessions if s.id == session_id])


async def test_the_sdk_resumes_when_the_server_drops_its_socket_mid_answer(fake_server: ServerThread) -> None:
    async with client.connect(fake_server.ws_url) as session:
        response = session.ask(QUESTION)
        deltas: list[str] = []
        async for piece in response:
            deltas.append(piece)
            if len(deltas) == 5:
                drop(fake_server, session.id)
        assert "".join(deltas) == ANSWER == response.text  # nothing lost, nothing twice
        assert response.status == "completed" and response.usage is not None
        assert response.usage["output_tokens"] == len(deltas)
        assert session.reconnects == 1 and not session.closed
        (same,) = fake_session(fake_server, session.id)  # the same runtime session, still open
        assert not same.closed
        # the resumed session works as before: frames and answers
        await session.push_frame(np.full((48, 64, 3), 90, np.uint8))
        text = await session.ask("again?")
        assert text.strip().endswith("again?")


async def test_while_reconnecting_frames_are_dropped_and_requests_wait(fake_server: ServerThread) -> None:
    slow = ReconnectPolicy(initial_delay=0.5, max_delay=1.0)
    async with client.connect(fake_server.ws_url, reconnect=slow) as session:
        assert isinstance(session, RemoteSession)
        drop(fake_server, session.id)
        async with asyncio.timeout(5):
            while session._core.online:
                await asyncio.sleep(0.01)
        await session.push_frame(np.zeros((48, 64, 3), np.uint8))
        assert session.frames_dropped == 1
        updated = await session.update(instructions="after the gap")  # held, sent once resumed
        assert updated["instructions"] == "after the gap" and session.reconnects == 1
        (fake,) = fake_session(fake_server, session.id)
        assert fake.updates[-1]["instructions"] == "after the gap"


async def test_a_session_the_server_no_longer_has_fails_the_answer_clearly(fake_server: ServerThread) -> None:
    session = await client.connect(fake_server.ws_url, reconnect=ReconnectPolicy(initial_delay=0.05))
    response = session.ask("talk forever")
    async for _ in response:
        drop(fake_server, session.id, close_session=True)
        break
    with pytest.raises(client.RealtimeError) as failed:
        await response.read()
    assert failed.value.code == "connection_closed" and "session_not_resumable" in failed.value.message
    assert session.closed and response.status == "failed" and session.reconnects == 0
    await session.close()


async def test_without_a_reconnect_policy_a_lost_socket_ends_the_session(fake_server: ServerThread) -> None:
    session = await client.connect(fake_server.ws_url, reconnect=None)
    response = session.ask("talk forever")
    async for _ in response:
        drop(fake_server, session.id)
        break
    with pytest.raises(client.RealtimeError) as failed:
        await response.read()
    assert failed.value.code == "connection_closed" and session.closed
    await session.close()


async def test_close_while_waiting_to_reconnect_returns_at_once(fake_server: ServerThread) -> None:
    slow = ReconnectPolicy(initial_delay=5.0, max_delay=5.0)
    session = await client.connect(fake_server.ws_url, reconnect=slow)
    response = session.ask("talk forever")
    async for _ in response:
        break
    drop(fake_server, session.id)
    async with asyncio.timeout(5):
        while session._core.online:
            await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    await session.close()
    assert asyncio.get_running_loop().time() - started < 1.0
    assert session.closed and response.status == "failed" and session.reconnects == 0


def test_the_core_resends_what_the_server_did_not_get() -> None:
    core = ClientProtocol()
    for i in range(1, 5):
        core.sent(f"c{i}", None if i == 2 else f"text{i}")  # c2 is a frame: never sent again
    core.sent(None, "no id: not tracked")
    assert core.resend_after("c1") == ["text3", "text4"]  # c2 (a frame) left out
    assert core.resend_after("c3") == ["text4"]  # c1..c3 acknowledged and forgotten
    assert core.resend_after("c1") is None  # forgotten: nothing can be told
    assert core.resend_after("c4") == []
    fresh = ClientProtocol()
    fresh.sent("a", "A")
    fresh.sent("b", "B")
    assert fresh.resend_after(None) == ["A", "B"]  # the server got none of them


async def test_events_the_server_never_read_are_sent_again_after_a_resume(fake_server: ServerThread) -> None:
    async with client.connect(fake_server.ws_url) as session:
        await session.update(instructions="first")  # one client event the server did get

        def stop_reading() -> None:  # what the client writes from now on never reaches the server
            fake_server.server.connections[session.id].sink.transport.pause_reading()

        fake_server.run(stop_reading)
        response = session.ask("are you there?")
        await asyncio.sleep(0.3)  # written to the socket, unread by the server
        assert response.id is None
        drop(fake_server, session.id)
        text = await asyncio.wait_for(response.read(), 10)  # sent again on the resumed socket
        assert text.strip().endswith("are you there?") and session.reconnects == 1
        (fake,) = fake_session(fake_server, session.id)
        assert [a.text for a in fake.asked] == ["are you there?"]  # asked once: nothing doubled
