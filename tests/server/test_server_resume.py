"""Sessions that outlive their socket: resume within the grace period with the missed events replayed,
the session closed after it, and nothing left running however often clients vanish (fake runtime)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import psutil
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from fake_runtime import FakeRuntime, eventually
from test_server_webrtc import ClientCall, call

from runtime.server.app import ServerConfig
from streams import EVENTS_LABEL, EventChannel, synthetic_track

pytestmark = pytest.mark.timeout(90)

QUESTION = " ".join(f"word{i}" for i in range(60))  # the fake answer echoes it: ~70 deltas
ANSWER = f"seen 0 frames, images none, you said: {QUESTION} "


def ask_events(text: str) -> list[dict[str, Any]]:
    content = [{"type": "input_text", "text": text}]
    item = {"type": "message", "role": "user", "content": content}
    return [
        {"type": "conversation.item.create", "event_id": "ev_item", "item": item},
        {"type": "response.create", "event_id": "ev_create"},
    ]


async def start_answer(client: Any, text: str, deltas: int = 1) -> list[dict[str, Any]]:
    """Ask, and read until ``deltas`` deltas have come; the events read."""
    for event in ask_events(text):
        await client.send(event)
    events: list[dict[str, Any]] = []
    while sum(e["type"] == "response.output_text.delta" for e in events) < deltas:
        events.append(await client.recv())
    return events


def drop(client: Any) -> None:
    """The network goes away under the client: no close frame."""
    client.ws._conn.transport.abort()  # type: ignore[union-attr]


async def resume(served: Any, token: str, last_event_id: str | None) -> Any:
    """A WebSocket client resuming the session of ``token`` (a `conftest.RealtimeClient`)."""
    params = {"resume": token} | ({"last_event_id": last_event_id} if last_event_id else {})
    return await served.connect(params=params)


async def closed_with(client: Any) -> int | None:
    message = await client.ws.receive(5)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
    return client.ws.close_code


def metric(served: Any, name: str, **labels: str) -> float:
    value = served.server.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_session_created_carries_a_resume_token_the_openai_sdk_still_parses(serve) -> None:
    from openai.types.realtime import RealtimeServerEvent
    from pydantic import TypeAdapter

    served = await serve()
    client = await served.connect()
    created = await client.recv()
    resume = created["session"]["resume"]
    assert resume["token"].startswith("rt_") and resume["grace_s"] == 30.0
    parsed = TypeAdapter(RealtimeServerEvent).validate_python(created)
    assert type(parsed).__name__ == "SessionCreatedEvent"
    # session.updated never shows the token: only the client that opened the session has it
    await client.send({"type": "session.update", "session": {}})
    assert "resume" not in (await client.until("session.updated"))[-1]["session"]


async def test_reconnect_mid_answer_replays_every_missed_event_once_and_in_order(serve) -> None:
    served = await serve(runtime=FakeRuntime(token_delay=0.01))
    client = await served.connect()
    created = await client.recv()
    token, session_id = created["session"]["resume"]["token"], created["session"]["id"]
    before = [created, *await start_answer(client, QUESTION, deltas=5)]
    drop(client)
    (session,) = served.runtime.sessions
    await eventually(lambda: served.server.resumer.detached == [session_id])
    await asyncio.sleep(0.2)  # the answer keeps streaming into the session's log meanwhile
    assert not session.closed and session.active is not None

    again = await resume(served, token, before[-1]["event_id"])
    resumed = await again.recv()
    assert resumed["type"] == "session.resumed" and resumed["session"]["id"] == session_id
    assert resumed["last_event_id"] == before[-1]["event_id"] and resumed["replayed"] > 10
    assert resumed["last_client_event_id"] == "ev_create"  # the last client event the server got
    new_token = resumed["session"]["resume"]["token"]
    assert new_token != token
    after = await again.until("response.done", timeout=10)
    assert len(after) >= resumed["replayed"]

    events = before + after
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    done = events[-1]["response"]
    assert "".join(deltas) == ANSWER and done["status"] == "completed"
    assert done["usage"]["output_tokens"] == len(deltas)  # none lost, none doubled
    assert [e["type"] for e in events[1:4]] == [
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    # the same runtime session goes on: no second one was opened, and it answers the next question
    assert served.runtime.sessions == [session] and not session.closed
    text, done = await again.ask("still you?")
    assert text.strip().endswith("still you?") and done["response"]["status"] == "completed"
    assert metric(served, "speakwatch_session_resumes_total", result="resumed") == 1
    assert metric(served, "speakwatch_replayed_events_total") == resumed["replayed"]
    assert served.server.resumer.detached == []

    # the used token is dead; the new one is the key now
    stale = await resume(served, token, None)
    error = await stale.recv()
    assert error["type"] == "error" and error["error"]["code"] == "session_not_resumable"
    assert await closed_with(stale) == 1008


async def test_after_the_grace_period_the_session_is_closed_and_cannot_be_resumed(serve) -> None:
    served = await serve(ServerConfig(stats_interval=0.2, resume_grace=0.3))
    client = await served.connect()
    created = await client.recv()
    await start_answer(client, "talk forever")
    (session,) = served.runtime.sessions
    drop(client)
    await eventually(lambda: served.server.resumer.detached)
    assert not session.closed
    await eventually(lambda: session.closed and not served.server.connections, timeout=5)
    assert session.active is None and metric(served, "speakwatch_sessions_grace_expired_total") == 1
    assert metric(served, "speakwatch_sessions_detached") == 0

    late = await resume(served, created["session"]["resume"]["token"], created["event_id"])
    error = (await late.recv())["error"]
    assert error["code"] == "session_not_resumable" and error["param"] == "resume"
    assert "0.3 s grace period" in error["message"]
    assert await closed_with(late) == 1008
    assert len(served.runtime.sessions) == 1  # a refused resume opens nothing


async def test_going_away_is_resumable_but_a_normal_close_ends_the_session(serve) -> None:
    served = await serve()
    one = await served.connect()
    token = (await one.recv())["session"]["resume"]["token"]
    await one.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)  # a page reload: come back soon
    await eventually(lambda: served.server.resumer.detached)
    assert not served.runtime.sessions[0].closed
    back = await resume(served, token, None)
    assert (await back.recv())["type"] == "session.resumed"
    await back.close()  # 1000: the client is done
    await eventually(lambda: served.runtime.sessions[0].closed and not served.server.connections)


async def test_a_replay_the_log_no_longer_holds_is_a_clear_error_and_ends_the_session(serve) -> None:
    config = ServerConfig(stats_interval=0.2, replay_max_events=8)
    served = await serve(config, runtime=FakeRuntime(token_delay=0.002))
    client = await served.connect()
    created = await client.recv()
    events = await start_answer(client, QUESTION, deltas=2)
    drop(client)
    (session,) = served.runtime.sessions
    await eventually(lambda: session.active is None, timeout=10)  # the whole answer went to the log
    again = await resume(served, created["session"]["resume"]["token"], events[-1]["event_id"])
    error = (await again.recv())["error"]
    assert error["code"] == "replay_unavailable" and error["type"] == "server_error"
    assert error["param"] == "last_event_id" and "cannot be replayed" in error["message"]
    assert await closed_with(again) == 1008
    await eventually(lambda: session.closed and not served.server.connections)
    assert metric(served, "speakwatch_session_resumes_total", result="replay_unavailable") == 1


async def test_an_unknown_last_event_id_is_refused_and_the_session_waits_on(serve) -> None:
    served = await serve()
    client = await served.connect()
    created = await client.recv()
    token = created["session"]["resume"]["token"]
    drop(client)
    await eventually(lambda: served.server.resumer.detached)
    wrong = await resume(served, token, "event_never_sent")
    error = (await wrong.recv())["error"]
    assert error["code"] == "invalid_value" and error["param"] == "last_event_id"
    assert await closed_with(wrong) == 1008
    right = await resume(served, token, created["event_id"])  # the token was not used up
    resumed = await right.recv()
    assert resumed["type"] == "session.resumed" and resumed["replayed"] == 0


async def test_a_resume_takes_over_a_socket_whose_loss_was_not_noticed(serve) -> None:
    served = await serve()
    old = await served.connect()
    created = await old.recv()
    new = await resume(served, created["session"]["resume"]["token"], created["event_id"])
    assert (await new.recv())["type"] == "session.resumed"
    assert await closed_with(old) == 4000  # taken over: the old client must not resume it back
    text, _ = await new.ask("here now")
    assert text.strip().endswith("here now")
    assert len(served.server.connections) == 1 and not served.server.resumer.detached


async def test_resume_off_closes_on_any_disconnect(serve) -> None:
    served = await serve(ServerConfig(stats_interval=0.2, resume_grace=0))
    client = await served.connect()
    assert "resume" not in (await client.recv())["session"]
    await start_answer(client, "talk forever")
    drop(client)
    await eventually(lambda: served.runtime.sessions[0].closed and not served.server.connections)


async def test_100_disconnects_mid_answer_leave_no_session_or_answer_running(serve) -> None:
    # a detached session keeps its place (and KV) until its grace ends: room for all of them here
    served = await serve(ServerConfig(stats_interval=0.2, resume_grace=0.2, max_sessions=100))
    rss = psutil.Process(os.getpid()).memory_info().rss
    for i in range(100):
        client = await served.connect()
        await client.recv()
        await start_answer(client, "talk forever")
        if i % 2:
            drop(client)  # gone without a word: grace, then closed
        else:
            await client.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
    runtime = served.runtime
    assert len(runtime.sessions) == 100
    await eventually(lambda: not served.server.connections, timeout=10)
    assert all(s.closed and s.active is None for s in runtime.sessions)
    assert runtime.open_sessions == [] and served.server.resumer.detached == []
    assert len(served.server.resumer.registry) == 0
    assert metric(served, "speakwatch_sessions_grace_expired_total") == 100
    assert metric(served, "speakwatch_sessions") == 0
    grown = psutil.Process(os.getpid()).memory_info().rss - rss
    print(f"100 disconnects mid-answer: RSS grew {grown / 2**20:.1f} MiB")
    assert grown < 100 * 2**20


async def test_a_webrtc_call_keeps_feeding_the_session_through_the_grace_period(serve) -> None:
    served = await serve()
    client = await served.connect()
    created = await client.recv()
    rtc = await call(served, created["session"]["id"])
    (session,) = served.runtime.sessions
    try:
        await eventually(lambda: len(session.frames) >= 2, timeout=15)
        drop(client)
        await eventually(lambda: served.server.resumer.detached)
        during = len(session.frames)
        await eventually(lambda: len(session.frames) >= during + 2, timeout=15)  # the camera goes on
        assert len(served.server.calls) == 1
        again = await resume(served, created["session"]["resume"]["token"], created["event_id"])
        assert (await again.recv())["type"] == "session.resumed"
        text, _ = await again.ask("how many?")
        assert int(text.split()[1]) >= during + 2  # the answer sees the frames of the grace period
    finally:
        await rtc.close()


def test_the_grace_period_is_a_serve_option_with_an_environment_fallback(monkeypatch) -> None:
    from runtime import cli

    assert cli.server_config(cli.build_parser().parse_args(["serve"])).resume_grace == 30.0
    args = cli.build_parser().parse_args(["serve", "--resume-grace", "0"])
    assert cli.server_config(args).resume_grace == 0.0
    monkeypatch.setenv("SPEAKWATCH_RESUME_GRACE", "7.5")
    assert cli.server_config(cli.build_parser().parse_args(["serve"])).resume_grace == 7.5
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--resume-grace", "-1"])
    with pytest.raises(ValueError):
        ServerConfig(resume_grace=-1.0)
    with pytest.raises(ValueError):
        ServerConfig(ws_max_output_bytes=0)


async def standalone_call(served: Any, query: str = "") -> tuple[ClientCall | None, int, dict[str, Any]]:
    """A standalone call (video and the oai-events channel), ``query`` appended to its URL: the call,
    the HTTP status and, when refused, the error body."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = synthetic_track(10.0, (96, 64))
    pc.addTrack(track)
    events = EventChannel(pc.createDataChannel(EVENTS_LABEL))
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    url = served.url + "/v1/realtime/calls" + query
    async with served.http.post(url, data=pc.localDescription.sdp, headers=headers) as reply:
        if reply.status != 201:
            body = await reply.json()
            await pc.close()
            await track.aclose()
            return None, reply.status, body
        answer, location = await reply.text(), reply.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return ClientCall(pc, track, events, location), 201, {}


async def channel_events(rtc: ClientCall, until: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Events of the call's channel up to the first ``until`` (``input_video.stats`` left out)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not events or events[-1]["type"] != until:
            event = await rtc.events.recv()
            if event["type"] != "input_video.stats":
                events.append(event)
    return events


async def test_a_standalone_call_lost_mid_answer_is_resumed_by_a_new_call(serve) -> None:
    served = await serve(runtime=FakeRuntime(token_delay=0.02))
    first, status, _ = await standalone_call(served)
    assert first is not None and status == 201
    created = (await channel_events(first, "session.created"))[-1]
    token = created["session"]["resume"]["token"]
    for event in ask_events(QUESTION):
        first.events.send(event)
    before = await channel_events(first, "response.output_text.delta")
    while sum(e["type"] == "response.output_text.delta" for e in before) < 5:
        before += await channel_events(first, "response.output_text.delta")
    await first.close()  # the peer goes away without a hang-up: the session waits
    (session,) = served.runtime.sessions
    await eventually(lambda: served.server.resumer.detached and not served.server.calls)
    assert not session.closed

    second, status, _ = await standalone_call(
        served, f"?resume={token}&last_event_id={before[-1]['event_id']}"
    )
    assert second is not None and status == 201
    try:
        after = await channel_events(second, "response.done", timeout=20)
        assert after[0]["type"] == "session.resumed" and after[0]["replayed"] >= 1
        events = [created, *before, *after[1:]]
        ids = [e["event_id"] for e in events]
        assert len(ids) == len(set(ids))
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert "".join(deltas) == ANSWER and events[-1]["response"]["usage"]["output_tokens"] == len(deltas)
        assert served.runtime.sessions == [session] and not served.server.resumer.detached
        await eventually(lambda: len(session.frames) >= 2, timeout=15)  # the new call's video feeds it
        # a hang-up (DELETE) ends the session at once
        async with served.http.delete(served.url + second.location) as reply:
            assert reply.status == 204
        await eventually(lambda: session.closed and not served.server.connections)
    finally:
        await second.close()


async def test_a_call_that_cannot_resume_is_refused_before_its_offer_is_taken(serve) -> None:
    served = await serve()
    none, status, body = await standalone_call(served, "?resume=rt_nothing")
    assert none is None and status == 404 and body["error"]["code"] == "session_not_resumable"
    client = await served.connect()
    created = await client.recv()
    token = created["session"]["resume"]["token"]
    _, status, body = await standalone_call(served, f"?resume={token}&session_id={created['session']['id']}")
    assert status == 400 and body["error"]["param"] == "resume"
    _, status, body = await standalone_call(served, f"?resume={token}&last_event_id=never")
    assert status == 400 and body["error"]["param"] == "last_event_id"
    assert len(served.runtime.sessions) == 1 and not served.server.calls


async def test_a_session_resumes_while_the_engine_is_unavailable(serve) -> None:
    served = await serve()
    client = await served.connect()
    created = await client.recv()
    drop(client)
    await eventually(lambda: served.server.resumer.detached)
    served.runtime.ready = False  # the engine died and is being rebuilt: sessions carry on
    try:
        fresh = await served.connect()
        assert (await fresh.recv())["error"]["code"] == "engine_unavailable"  # no new session
        again = await resume(served, created["session"]["resume"]["token"], created["event_id"])
        assert (await again.recv())["type"] == "session.resumed"  # but the old one comes back
    finally:
        served.runtime.ready = True
