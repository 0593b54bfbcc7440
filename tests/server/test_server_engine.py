"""The real server on the real engine (tiny model): WebSocket, WebRTC video, cancel, auth."""

from __future__ import annotations

import asyncio
import base64
import io

import aiohttp
import numpy as np
import pytest
from PIL import Image
from test_server_webrtc import call

from runtime.server.app import ServerConfig

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def jpeg_data_url(seed: int, size: tuple[int, int] = (160, 120)) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
async def served(serve, runtime):
    config = ServerConfig(api_key="secret", own_runtime=False, stats_interval=0.2)
    return await serve(config=config, runtime=runtime)


async def connect(served, key: str = "secret"):
    return await served.connect(headers={"Authorization": f"Bearer {key}"})


async def test_websocket_session_watches_and_answers(served) -> None:
    client = await connect(served)
    created = await client.recv()
    assert created["type"] == "session.created"
    await client.send({"type": "session.update", "session": {"video": {"max_fps": 10}}})
    await client.until("session.updated", 30)
    for i in range(3):
        await client.send({"type": "input_video.append", "image": jpeg_data_url(i), "timestamp_ms": i * 500})
    text, done = await client.ask("What do you see?", timeout=60, max_output_tokens=12)
    assert done["response"]["status"] in ("completed", "incomplete")
    assert text.strip()
    assert done["response"]["usage"]["output_tokens"] > 0
    # stats events that arrived during the answer were set aside in client.stats
    async with asyncio.timeout(60):
        while not any(event.get("ingested", 0) >= 3 for event in client.stats):
            await client.recv(timeout=60, stats=True)
    await client.close()


async def test_webrtc_video_attached_to_a_websocket_session_is_ingested(served) -> None:
    client = await connect(served)
    session_id = (await client.recv())["session"]["id"]
    await client.send({"type": "session.update", "session": {"video": {"max_fps": 4}}})
    await client.until("session.updated", 30)
    served.http.headers["Authorization"] = "Bearer secret"
    rtc = await call(served, session_id, rate=10)
    try:
        async with asyncio.timeout(60):
            while not any(event.get("ingested", 0) >= 3 for event in client.stats):
                await client.recv(timeout=60, stats=True)
        text, done = await client.ask("Describe the video.", timeout=60, max_output_tokens=8)
        assert done["response"]["status"] in ("completed", "incomplete") and text
    finally:
        await rtc.close()
        await client.close()


async def test_cancel_and_a_second_session_in_parallel(served) -> None:
    first, second = await connect(served), await connect(served)
    await first.recv()
    await second.recv()
    await first.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Go on."}],
            },
        }
    )
    await first.until("conversation.item.done", 30)
    await first.send({"type": "response.create", "response": {"max_output_tokens": 200}})
    await first.until("response.output_text.delta", timeout=30)
    answer_task = asyncio.create_task(second.ask("Quick one?", timeout=60, max_output_tokens=6))
    await first.send({"type": "response.cancel"})
    events = await first.until("response.done", timeout=30)
    assert events[-1]["response"]["status"] == "cancelled"
    text, done = await answer_task
    assert text and done["response"]["status"] in ("completed", "incomplete")
    again, done = await first.ask("After cancel?", timeout=60, max_output_tokens=4)
    assert again and done["response"]["status"] in ("completed", "incomplete")
    await first.close()
    await second.close()


async def test_wrong_api_key_is_refused(served) -> None:
    async with aiohttp.ClientSession() as http:
        reply = await http.get(served.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert reply.status == 401
        assert (await reply.json())["error"]["code"] == "invalid_api_key"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(served.ws_url, headers={"Authorization": "Bearer wrong"})
        assert refused.value.status == 401


async def test_disconnect_frees_the_session(served, runtime) -> None:
    client = await connect(served)
    await client.recv()
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Long."}]},
        }
    )
    await client.until("conversation.item.done", 30)
    await client.send({"type": "response.create", "response": {"max_output_tokens": 200}})
    await client.until("response.output_text.delta", timeout=30)
    await client.close()
    async with asyncio.timeout(30):
        while runtime.sessions or runtime.engine.output_processor.get_num_unfinished_requests():
            await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as http:
        metrics = await (await http.get(served.url + "/metrics")).text()
    assert "speakwatch_sessions 0.0" in metrics
