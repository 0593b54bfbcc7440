"""The realtime WebSocket endpoint over a real socket, with the fake runtime behind it."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
from fake_runtime import FakeRuntime, eventually, image_url

from runtime.server.app import ServerConfig
from runtime.server.protocol import Limits

pytestmark = pytest.mark.timeout(60)


def user_item(*parts: dict, **extra: object) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": list(parts)},
        **extra,
    }


def text(value: str) -> dict:
    return {"type": "input_text", "text": value}


async def test_happy_path_session_update_text_image_and_answer(serve) -> None:
    served = await serve()
    client = await served.connect()
    created = await client.recv()
    assert created["type"] == "session.created"
    session_id = created["session"]["id"]
    assert created["session"]["model"] == "fake-vlm"
    assert created["session"]["video"]["positions"] == "group-decoupled"
    (session,) = served.runtime.sessions
    assert session.id == session_id

    await client.send(
        {"type": "session.update", "session": {"instructions": "Be brief.", "video": {"max_fps": 4}}}
    )
    updated = await client.recv()
    assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Be brief."
    # the fps cap belongs to the connection's inputs (one sampler each): the session is not told it
    assert session.updates[-1] == {"instructions": "Be brief.", "max_fps": None, "schedule": "parallel"}
    assert served.server.connections[session_id].max_fps == 4.0

    await client.send(
        user_item(
            text("what is this?"), {"type": "input_image", "image_url": image_url(40, 30)}, event_id="e1"
        )
    )
    added = await client.recv()
    assert added["type"] == "conversation.item.added"
    assert added["item"]["content"] == [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "detail": "auto"},
    ]
    assert (await client.recv())["type"] == "conversation.item.done"

    await client.send({"type": "response.create", "response": {"max_output_tokens": 100}})
    events = await client.until("response.done")
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert kinds[-5:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    answer = "".join(e["delta"] for e in deltas)
    assert answer.strip() == "seen 0 frames, images 40x30, you said: what is this?"
    response_id = events[0]["response"]["id"]
    assert {e["response_id"] for e in deltas} == {response_id}
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["id"] == response_id
    assert done["usage"]["output_tokens"] == len(deltas)
    asked = session.asked[-1]
    assert asked.text == "what is this?" and asked.max_tokens == 100 and asked.instructions == "Be brief."
    assert asked.images[0].shape == (30, 40, 3)

    # a second turn on the same socket; response-level instructions win for that response only
    await client.send(user_item(text("and now?")))
    await client.until("conversation.item.done")
    await client.send({"type": "response.create", "response": {"instructions": "Shout."}})
    events = await client.until("response.done")
    assert events[-1]["response"]["status"] == "completed"
    assert session.asked[-1].instructions == "Shout." and session.asked[-1].images == []
    await client.close()
    await eventually(lambda: session.closed)


async def test_cancel_ends_the_answer_with_status_cancelled(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()
    await client.send(user_item(text("talk forever")))
    await client.until("conversation.item.done")
    await client.send({"type": "response.create"})
    await client.until("response.output_text.delta")
    await client.send({"type": "response.cancel"})
    events = await client.until("response.done")
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    session = served.runtime.sessions[0]
    assert session.cancels == 1 and session.active is None
    # the session is still usable
    answer, done = await client.ask("hello")
    assert done["response"]["status"] == "completed" and "hello" in answer


async def test_two_sessions_at_once_are_independent(serve) -> None:
    served = await serve()
    one, two = await served.connect(), await served.connect()
    ids = {(await one.recv())["session"]["id"], (await two.recv())["session"]["id"]}
    assert len(ids) == 2
    (a, _), (b, _) = await asyncio.gather(one.ask("first"), two.ask("second"))
    assert a.strip().endswith("first") and b.strip().endswith("second")
    assert served.server.metrics.sessions._value.get() == 2
    await one.close()
    await two.close()
    await eventually(lambda: not served.server.connections)
    assert served.server.metrics.sessions._value.get() == 0


async def test_api_key_bearer_subprotocol_and_rejection(serve) -> None:
    served = await serve(ServerConfig(api_key="s3cret"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await served.connect()
    assert failed.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await served.connect(headers={"Authorization": "Bearer wrong"})
    assert failed.value.status == 401
    async with served.http.get(served.url + "/v1/models", headers={"Authorization": "Bearer wrong"}) as reply:
        assert reply.status == 401
        body = await reply.json()
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_api_key"

    client = await served.connect(headers={"Authorization": "Bearer s3cret"})
    assert (await client.recv())["type"] == "session.created"
    await client.close()

    # browsers: the key as a subprotocol; the server picks "realtime", never echoes the key
    client = await served.connect(protocols=("realtime", "openai-insecure-api-key.s3cret"))
    assert client.ws.protocol == "realtime"
    assert (await client.recv())["type"] == "session.created"
    await client.close()
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await served.connect(protocols=("realtime", "openai-insecure-api-key.nope"))


async def test_bad_input_gets_errors_and_the_socket_keeps_working(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()

    async def error_for(message: str | dict) -> dict:
        await client.send(message)
        event = await client.recv()
        assert event["type"] == "error", event
        return event["error"]

    assert (await error_for("{not json"))["code"] == "invalid_json"
    error = await error_for({"type": "nonsense.event", "event_id": "evt_1"})
    assert error["code"] == "unknown_event" and error["event_id"] == "evt_1"
    error = await error_for({"type": "session.update", "session": {"max_output_tokens": "many"}})
    assert error["code"] == "invalid_value" and error["param"] == "session.max_output_tokens"
    error = await error_for(user_item({"type": "input_text", "text": 5}))
    assert error["code"] == "invalid_value" and error["param"] == "item.content[0].text"
    broken = "data:image/jpeg;base64,@@not-base64@@"
    error = await error_for(user_item({"type": "input_image", "image_url": broken}))
    assert error["code"] == "invalid_image"
    assert (await error_for({"type": "response.cancel"}))["code"] == "response_cancel_not_active"

    # a message with a valid JPEG signature that PIL cannot decode: rejected after decoding, item removed
    fake_jpeg = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff" + b"\0" * 64).decode()
    await client.send(
        user_item(text("look"), {"type": "input_image", "image_url": fake_jpeg}, event_id="evt_img")
    )
    events = [await client.recv() for _ in range(4)]
    assert [e["type"] for e in events] == [
        "conversation.item.added",
        "conversation.item.done",
        "error",
        "conversation.item.deleted",
    ]
    assert events[2]["error"]["code"] == "invalid_image" and events[2]["error"]["event_id"] == "evt_img"

    # 50 MB: more than the protocol limit, less than the socket limit; answered, not disconnected
    await client.send("x" * (50 * 1024 * 1024))
    event = await client.recv(timeout=20)
    assert event["type"] == "error" and event["error"]["code"] == "payload_too_large"

    answer, done = await client.ask("still there?")
    assert done["response"]["status"] == "completed" and answer.strip().endswith("still there?")
    # the rejected image never reached the session
    assert served.runtime.sessions[0].asked[-1].images == []


async def test_image_pixel_limit_and_second_response_while_active(serve) -> None:
    served = await serve(ServerConfig(limits=Limits(max_image_pixels=100 * 100)))
    client = await served.connect()
    await client.recv()
    await client.send(user_item({"type": "input_image", "image_url": image_url(200, 100, "PNG")}))
    events = await client.until("conversation.item.deleted")
    error = next(e for e in events if e["type"] == "error")["error"]
    assert error["code"] == "invalid_image" and "pixels" in error["message"]

    await client.send(user_item(text("forever please")))
    await client.until("conversation.item.done")
    await client.send({"type": "response.create"})
    await client.until("response.created")
    await client.send({"type": "response.create"})
    events = await client.until("error")
    assert events[-1]["error"]["code"] == "conversation_already_has_active_response"
    await client.send({"type": "response.cancel"})
    assert (await client.until("response.done"))[-1]["response"]["status"] == "cancelled"


async def test_appended_frames_are_rate_capped_and_reported(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()
    # one still picture over and over: the change filter is off, this test is about the rate cap
    video = {"max_fps": 5, "change_filter": {"enabled": False}}
    await client.send({"type": "session.update", "session": {"video": video}})
    await client.until("session.updated")
    frame = image_url(64, 48)
    for i in range(20):  # 20 frames over 1 s of stream time at 20 fps: 5 fps keeps every 4th
        await client.send({"type": "input_video.append", "image": frame, "timestamp_ms": i * 50})
    await client.send({"type": "input_video.append", "image": "data:image/png;base64,AAAA"})
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "invalid_image"
    session = served.runtime.sessions[0]
    await eventually(lambda: len(session.frames) == 5)
    assert session.frames[0] == ((48, 64, 3), 0.0) and session.frames[1][1] == pytest.approx(0.2)
    stats = await client.until("input_video.stats")
    report = stats[-1]
    assert (report["frames_received"], report["frames_sampled"], report["frames_ingested"]) == (20, 5, 5)
    assert report["frames_dropped"] == 15 and report["frames_dropped_by_reason"] == {"rate": 15}
    assert report["positions"] == "group-decoupled" and report["frame_lag_p50_ms"] == 5.0
    # stats stop once frames stop flowing
    count = len(client.stats)
    await asyncio.sleep(0.6)
    await client.send({"type": "response.cancel"})
    await client.until("error")
    assert len(client.stats) == count
    answer, _ = await client.ask("how many?")
    assert answer.startswith("seen 5 frames")
    async with served.http.get(served.url + "/metrics") as reply:
        metrics = await reply.text()
    assert "speakwatch_frames_received_total 20.0" in metrics
    assert 'speakwatch_frames_dropped_total{reason="rate"} 15.0' in metrics
    assert "speakwatch_frames_ingested_total 5.0" in metrics


async def test_session_limit_then_room_again(serve) -> None:
    served = await serve(ServerConfig(max_sessions=1))
    first = await served.connect()
    await first.recv()
    second = await served.connect()
    event = await second.recv()
    assert event["type"] == "error" and event["error"]["code"] == "session_limit_reached"
    assert event["error"]["type"] == "server_error"
    closing = await second.ws.receive(5)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert len(served.runtime.sessions) == 1
    await first.close()
    await eventually(lambda: not served.server.connections)
    third = await served.connect()
    assert (await third.recv())["type"] == "session.created"


async def test_kv_admission_refuses_with_the_numbers_and_metrics_show_them(serve) -> None:
    # 2 sessions of 1024 budget tokens fit a 2500-token cache (each reserves 65 blocks of 16)
    served = await serve(runtime=FakeRuntime(kv_capacity_tokens=2500, budget_tokens=1024))
    first, second = await served.connect(), await served.connect()
    assert (await first.recv())["type"] == (await second.recv())["type"] == "session.created"
    third = await served.connect()
    event = await third.recv()
    assert event["type"] == "error" and event["error"]["code"] == "session_limit_reached"
    assert event["error"]["type"] == "server_error"
    message = event["error"]["message"]
    assert "capacity 2496 tokens, 2080 reserved by 2 open sessions, a new session asks 1040" in message
    closing = await third.ws.receive(5)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert len(served.runtime.sessions) == 2 and len(served.server.connections) == 2
    async with served.http.get(served.url + "/metrics") as reply:
        metrics = await reply.text()
    for line in (
        "speakwatch_sessions 2.0",
        "speakwatch_engine_sessions 2.0",
        "speakwatch_kv_tokens 0.0",
        "speakwatch_kv_tokens_reserved 2080.0",
        "speakwatch_kv_capacity_tokens 2496.0",
        'speakwatch_client_errors_total{code="session_limit_reached"} 1.0',
    ):
        assert line in metrics, line
    # the admitted ones still answer, and a closed session gives its reservation back
    answer, _ = await first.ask("still there?")
    assert answer.strip().endswith("still there?")
    await second.close()
    await eventually(lambda: len(served.server.connections) == 1)
    fourth = await served.connect()
    assert (await fourth.recv())["type"] == "session.created"
    assert served.runtime.stats()["kv_tokens_reserved"] == 2080


async def test_capacity_is_absent_from_metrics_until_known(serve) -> None:
    served = await serve()
    async with served.http.get(served.url + "/metrics") as reply:
        metrics = await reply.text()
    assert "speakwatch_kv_tokens_reserved 0.0" in metrics and "speakwatch_kv_capacity_tokens" not in metrics


async def test_disconnect_mid_answer_cancels_and_closes(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()
    await client.send(user_item(text("go on forever")))
    await client.send({"type": "response.create"})
    await client.until("response.output_text.delta")
    session = served.runtime.sessions[0]
    assert served.server.metrics.sessions._value.get() == 1
    await client.ws.close()
    await eventually(lambda: session.closed and not served.server.connections)
    assert session.active is None and session.cancels >= 1
    assert served.server.metrics.sessions._value.get() == 0
    async with served.http.get(served.url + "/metrics") as reply:
        assert "speakwatch_sessions 0.0" in await reply.text()


async def test_server_shutdown_cancels_answers_and_closes_sessions(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()
    await client.send(user_item(text("forever")))
    await client.send({"type": "response.create"})
    await client.until("response.output_text.delta")
    stopping = asyncio.create_task(served.stop())
    events = await client.until("response.done", timeout=10)
    assert events[-1]["response"]["status"] == "cancelled"
    closing = await client.ws.receive(5)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await stopping
    assert served.runtime.sessions[0].closed and served.runtime.closed


async def test_engine_not_ready_or_failing(serve) -> None:
    runtime = FakeRuntime(hold=True)
    served = await serve(runtime=runtime, wait=False)
    client = await served.connect()
    event = await client.recv()
    assert event["error"]["code"] == "engine_unavailable"
    runtime.gate.set()
    await served.server.wait_ready(5)
    client = await served.connect()
    await client.recv()
    runtime.fail_asks = True
    _, done = await client.ask("anyone?")
    assert done["response"]["status"] == "failed"
    assert any(e["type"] == "error" and e["error"]["code"] == "engine_unavailable" for e in client.seen)
    runtime.fail_asks = False
    _, done = await client.ask("now?")
    assert done["response"]["status"] == "completed"


async def test_model_query_and_binary_messages_are_accepted(serve) -> None:
    served = await serve()
    ws = await served.http.ws_connect(served.ws_url + "?model=gpt-realtime")
    assert json.loads((await ws.receive(5)).data)["type"] == "session.created"
    await ws.send_bytes(json.dumps({"type": "session.update", "session": {}}).encode())
    assert json.loads((await ws.receive(5)).data)["type"] == "session.updated"
    await ws.close()
