"""The real server on the real engine (the built-in watching model): WebSocket, WebRTC video, cancel, auth.

Frames are rendered scenes of the model's task; a long answer (to cancel, or to disconnect during)
is the running commentary, which only stops at ``max_output_tokens``; a short one is a task question.
"""

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
from runtime.training import scenes
from runtime.training.scenes import COMMENTARY, QUESTIONS

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


WHAT_COLOR, WHAT_SHAPE, WHAT_SEEN = QUESTIONS


def jpeg_data_url(seed: int, size: tuple[int, int] = (160, 120)) -> str:
    """A rendered scene (one random shape), ``size`` = (width, height), as a JPEG data URL."""
    rng = np.random.default_rng(seed)
    width, height = size
    rgb = scenes.render(scenes.random_object(rng, aspect=width / height), height, width, rng)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
async def served(serve, runtime):
    config = ServerConfig(api_key="secret", own_runtime=False, stats_interval=0.2)
    return await serve(config=config, runtime=runtime)


async def connect(served, key: str = "secret"):
    return await served.connect(headers={"Authorization": f"Bearer {key}"})


async def show(client, seed: int) -> None:
    """One frame into the client's session, waited for until it is in KV (the model answers about it)."""
    seen = max((event.get("frames_ingested", 0) for event in client.stats), default=0)
    await client.send({"type": "input_video.append", "image": jpeg_data_url(seed), "timestamp_ms": 0})
    async with asyncio.timeout(60):
        while not any(event.get("frames_ingested", 0) > seen for event in client.stats):
            await client.recv(timeout=60, stats=True)


async def start_commentary(client, max_output_tokens: int = 200) -> None:
    """Ask for the running commentary and wait for its first delta (it will not end by itself)."""
    content = [{"type": "input_text", "text": COMMENTARY}]
    await client.send(
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": content}}
    )
    await client.until("conversation.item.done", 30)
    await client.send({"type": "response.create", "response": {"max_output_tokens": max_output_tokens}})
    await client.until("response.output_text.delta", timeout=30)


async def test_websocket_session_watches_and_answers(served) -> None:
    client = await connect(served)
    created = await client.recv()
    assert created["type"] == "session.created"
    await client.send({"type": "session.update", "session": {"video": {"max_fps": 10}}})
    await client.until("session.updated", 30)
    for i in range(3):
        await client.send({"type": "input_video.append", "image": jpeg_data_url(i), "timestamp_ms": i * 500})
    text, done = await client.ask(WHAT_SEEN, timeout=60, max_output_tokens=12)
    assert done["response"]["status"] in ("completed", "incomplete")
    assert text.strip()
    assert done["response"]["usage"]["output_tokens"] > 0
    # stats events that arrived during the answer were set aside in client.stats
    async with asyncio.timeout(60):
        while not any(event.get("frames_ingested", 0) >= 3 for event in client.stats):
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
            while not any(event.get("frames_ingested", 0) >= 3 for event in client.stats):
                await client.recv(timeout=60, stats=True)
        text, done = await client.ask(WHAT_SEEN, timeout=60, max_output_tokens=8)
        assert done["response"]["status"] in ("completed", "incomplete") and text
    finally:
        await rtc.close()
        await client.close()


async def test_cancel_and_a_second_session_in_parallel(served) -> None:
    first, second = await connect(served), await connect(served)
    await first.recv()
    await second.recv()
    await show(first, seed=1)
    await show(second, seed=2)
    await start_commentary(first)
    answer_task = asyncio.create_task(second.ask(WHAT_COLOR, timeout=60, max_output_tokens=8))
    await first.send({"type": "response.cancel"})
    events = await first.until("response.done", timeout=30)
    assert events[-1]["response"]["status"] == "cancelled"
    text, done = await answer_task
    assert text and done["response"]["status"] in ("completed", "incomplete")
    again, done = await first.ask(WHAT_SHAPE, timeout=60, max_output_tokens=8)
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
    await show(client, seed=3)
    await start_commentary(client)
    await client.close()
    async with asyncio.timeout(30):
        while runtime.sessions or runtime.engine.output_processor.get_num_unfinished_requests():
            await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as http:
        metrics = await (await http.get(served.url + "/metrics")).text()
    assert "speakwatch_sessions 0.0" in metrics
