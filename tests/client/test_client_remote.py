"""The remote SDK against the real server app (fake runtime by default): frames, answers, cancel,
stats, typed events, errors, auth and the synchronous wrapper."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import av
import numpy as np
import pytest
from client_server import ServerThread, fake_runtime

import client
from client import (
    ErrorEvent,
    Event,
    OutputTextDelta,
    RealtimeError,
    ResponseDone,
    SessionUpdated,
    UnknownEvent,
    VideoStats,
    parse_event,
    realtime_url,
)


def frame(value: int = 0, width: int = 64, height: int = 48) -> np.ndarray:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = value
    rgb[:, : width // 2, 1] = 200
    return rgb


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := check()):
            await asyncio.sleep(0.02)
    return result


def test_realtime_url() -> None:
    assert realtime_url("http://h:8000") == "ws://h:8000/v1/realtime"
    assert realtime_url("https://h/") == "wss://h/v1/realtime"
    assert realtime_url("ws://h:1/v1/realtime?model=x") == "ws://h:1/v1/realtime?model=x"
    assert realtime_url("127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/realtime"
    with pytest.raises(ValueError):
        realtime_url("ftp://h")


async def test_frames_answer_and_stats(fake_server: ServerThread) -> None:
    async with client.connect(fake_server.ws_url, instructions="be brief", video={"max_fps": 30}) as session:
        assert session.id.startswith("sess_") and session.session["instructions"] == "be brief"
        fake = fake_server.run(lambda: next(s for s in fake_server.runtime.sessions if s.id == session.id))
        for i in range(4):
            await session.push_frame(frame(i * 40), timestamp=i * 0.1)
        await session.push_frame(av.VideoFrame.from_ndarray(frame(), format="rgb24"))
        await eventually(lambda: len(fake.frames) == 5)
        assert fake.frames[0][0] == (48, 64, 3)
        assert [round(t, 3) for _, t in fake.frames[:4]] == [0.0, 0.1, 0.2, 0.3]

        response = session.ask("what do you see?", 50)
        deltas = [delta async for delta in response]
        assert "".join(deltas) == response.text == "seen 5 frames, images none, you said: what do you see? "
        assert response.status == "completed" and response.id and response.id.startswith("resp_")
        assert response.usage and response.usage["output_tokens"] == len(deltas)
        assert response.ttft_ms is not None and response.ttft_ms > 0
        assert response.tokens_per_s is not None and response.tokens_per_s > 0
        assert fake.asked[-1].text == "what do you see?" and fake.asked[-1].max_tokens == 50
        assert fake.asked[-1].instructions == "be brief"

        await eventually(lambda: session.stats().frames_ingested == 5)
        stats = session.stats()  # the server's SessionStats, as the embedded session reports them
        assert stats.frames_received == 5 and stats.frames_dropped == 0 and session.frames_sent == 5
        assert stats.frame_lag_p50_ms == 5.0 and stats.frame_lag_p95_ms == 9.0
        assert stats.session_tokens == 320 and stats.positions == "group-decoupled"
        assert stats.session_id == session.id

        updated = await session.update(max_fps=12, schedule="sequential")
        assert updated["video"]["max_fps"] == 12 and updated["video"]["schedule"] == "sequential"
        assert fake.schedule == "sequential"  # max_fps is the server's input cap, not the session's

        text = await session.ask("an image", images=[frame(9, 32, 24)], instructions="terse")
        assert "images 32x24" in text and fake.asked[-1].instructions == "terse"


async def test_cancel_and_one_answer_at_a_time(fake_server: ServerThread) -> None:
    async with client.connect(fake_server.url) as session:
        response = session.ask("talk forever")
        assert response.status == "in_progress" and not response.done
        with pytest.raises(RealtimeError) as busy:
            session.ask("me too")
        assert busy.value.code == "conversation_already_has_active_response"
        seen = []
        async for delta in response:
            seen.append(delta)
            if len(seen) == 3:
                await session.cancel()
        assert response.status == "cancelled" and seen[:3] == ["w0 ", "w1 ", "w2 "]
        assert (response.status_details or {}).get("reason") == "client_cancelled"
        assert await response.wait() == "cancelled" and response.done
        await session.cancel()  # nothing to cancel: a no-op
        assert (await session.ask("still there?")).endswith("you said: still there? ")


async def test_errors_raise_in_the_ask(fake_server: ServerThread) -> None:
    rejected: list[RealtimeError] = []
    async with client.connect(fake_server.url, on_error=rejected.append) as session:
        with pytest.raises(RealtimeError) as error:
            await session.ask("too long", max_tokens=10**6)
        assert error.value.code == "invalid_value" and error.value.param == "response.max_output_tokens"

        broken_jpeg = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 4
        with pytest.raises(RealtimeError) as error:
            await session.ask("look", images=[broken_jpeg])
        assert error.value.code == "invalid_image"

        fake_server.runtime.fail_asks = True
        try:
            with pytest.raises(RealtimeError) as error:
                await session.ask("anyone?")
            assert error.value.code == "engine_unavailable" and "down" in error.value.message
        finally:
            fake_server.runtime.fail_asks = False

        # an error no ask waits for goes to on_error (here: a frame the server cannot decode)
        bad = "data:image/jpeg;base64," + base64.b64encode(broken_jpeg).decode()
        await session.send_event({"type": "input_video.append", "image": bad})
        await eventually(lambda: rejected)
        assert rejected[0].code == "invalid_image" and not session.closed

        assert "you said: fine now" in await session.ask("fine now")
        assert rejected == [rejected[0]]  # the ask errors above went to their asks only

        for bad_frame in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), "pixels"):
            with pytest.raises(ValueError):
                await session.push_frame(bad_frame)
        with pytest.raises(ValueError):
            session.ask("x", max_tokens=0)


async def test_typed_events(fake_server: ServerThread) -> None:
    async with client.connect(fake_server.url) as session:
        events = session.events()
        seen: list[Event] = []
        unsubscribe = session.on_event(seen.append)
        await session.update(video={"max_fps": 30})
        await session.push_frame(frame())
        await session.ask("hi")
        await eventually(lambda: any(isinstance(e, VideoStats) for e in seen))
        unsubscribe()
        await session.close()
        received = [event async for event in events]
    assert [type(e) for e in received] == [type(e) for e in seen]
    kinds = [e.type for e in received]
    assert kinds[0] == "session.updated" and isinstance(received[0], SessionUpdated)
    assert (
        kinds.index("response.created")
        < kinds.index("response.output_text.delta")
        < kinds.index("response.done")
    )
    deltas = [e for e in received if isinstance(e, OutputTextDelta)]
    done = next(e for e in received if isinstance(e, ResponseDone))
    assert "".join(d.delta for d in deltas) == done.response.text and done.response.status == "completed"
    assert all(d.response_id == done.response.id for d in deltas)
    stats = next(e for e in received if isinstance(e, VideoStats))
    assert stats.stats.frames_received == 1 and stats.stats.session_id == session.id

    unknown = parse_event({"type": "rate_limits.updated", "x": 1})
    assert isinstance(unknown, UnknownEvent) and unknown.type == "rate_limits.updated"
    assert unknown.encode() == {"type": "rate_limits.updated", "x": 1}
    error = parse_event({"type": "error", "error": {"code": "invalid_json", "message": "no"}})
    assert isinstance(error, ErrorEvent) and error.error.code == "invalid_json"


async def test_auth_limits_and_server_going_away(server: Any) -> None:
    private = ServerThread(options={"api_key": "s3cret", "max_sessions": 1})
    await asyncio.to_thread(private.start)
    try:
        with pytest.raises(RealtimeError) as error:
            await client.connect(private.url, "wrong")
        assert error.value.code == "invalid_api_key"
        session = await client.connect(private.url, "s3cret")
        with pytest.raises(RealtimeError) as error:
            await client.connect(private.url, "s3cret")
        assert error.value.code == "session_limit_reached"

        response = session.ask("talk forever")
        await anext(response)
        await asyncio.to_thread(private.stop)
        try:  # a shutdown cancels the answer (response.done) and then closes the socket
            async for _ in response:
                pass
            assert response.status == "cancelled"
        except RealtimeError as exc:
            assert exc.code == "connection_closed"
        await eventually(lambda: session.closed)
        assert "server" in (session.close_reason or "")
        with pytest.raises(RealtimeError):
            await session.push_frame(frame())
        await session.close()
    finally:
        if private.thread.is_alive():
            await asyncio.to_thread(private.stop)

    with pytest.raises(RealtimeError) as error:
        await client.connect(private.url, open_timeout=2)
    assert error.value.code == "connection_failed"


async def test_connect_past_the_kv_capacity_raises_with_the_reason() -> None:
    # one 1024-token budget (1040 reserved, in blocks of 16) fits a 1100-token cache, two do not
    full = ServerThread(runtime=fake_runtime.FakeRuntime(kv_capacity_tokens=1100, budget_tokens=1024))
    await asyncio.to_thread(full.start)
    try:
        async with client.connect(full.url) as session:
            with pytest.raises(RealtimeError) as error:
                await client.connect(full.url)
            assert error.value.code == "session_limit_reached"
            assert "capacity 1088 tokens, 1040 reserved by 1 open session" in str(error.value)
            answer = session.ask("still there?")
            assert "".join([delta async for delta in answer]).strip().endswith("still there?")
        await eventually(lambda: not full.runtime.open_sessions)  # closed on the server too
        async with client.connect(full.url) as again:  # the closed session gave its reservation back
            assert again.id.startswith("sess_")
    finally:
        await asyncio.to_thread(full.stop)


def test_sync_session(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEAKWATCH_API_KEY", "ignored-by-an-open-server")
    with client.connect_sync(server_url) as session:
        assert session.id
        session.push_frame(frame())
        text = session.ask("hello")
        assert text.endswith("you said: hello ") and session.last_response is not None
        assert session.last_response.status == "completed"
        stream = session.stream("count forever")
        first = [next(stream) for _ in range(3)]
        stream.cancel()
        rest = list(stream)
        assert first == ["w0 ", "w1 ", "w2 "] and stream.status == "cancelled" and len(rest) < 50
        assert session.frames_sent == 1
    assert session.session.closed
    assert not any(t.name == "speakwatch-client" for t in __import__("threading").enumerate())
    if os.environ.get("SPEAKWATCH_TEST_URL") is None:
        with pytest.raises(RealtimeError) as error:
            client.connect_sync("ws://127.0.0.1:9/v1/realtime", open_timeout=2)
        assert error.value.code == "connection_failed"
