"""The locked front door on the real engine (the built-in watching model): cross-origin browsers
refused, the same-origin page's client secret opens a session that answers with the minted
defaults, expired and reused secrets refused. Prints the figures (mint and handshake latency)."""

from __future__ import annotations

import time

import aiohttp
import pytest
from test_server_engine import WHAT_COLOR, show

from runtime.server.app import ServerConfig

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

KEY = {"Authorization": "Bearer secret"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_front_door_on_the_real_engine(serve, runtime) -> None:
    clock = Clock()
    config = ServerConfig(api_key="secret", own_runtime=False, stats_interval=0.2, clock=clock)
    served = await serve(config=config, runtime=runtime)
    mint_url = served.url + "/v1/realtime/client_secrets"
    open_before = len(runtime.sessions)

    # a page of another site: WebSocket and HTTP refused, even with the key; no session opened
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.connect(origin="http://evil.example", headers=KEY)
    assert refused.value.status == 403
    async with served.http.post(mint_url, json={}, headers={"Origin": "http://evil.example", **KEY}) as reply:
        assert reply.status == 403 and (await reply.json())["error"]["code"] == "origin_not_allowed"
    assert len(runtime.sessions) == open_before

    # the same-origin page: mint with the key, open with the secret (subprotocol, as a browser does)
    body = {
        "expires_after": {"anchor": "created_at", "seconds": 60},
        "session": {"instructions": "Answer in one word.", "max_output_tokens": 8},
    }
    started = time.perf_counter()
    async with served.http.post(mint_url, json=body, headers={"Origin": served.url, **KEY}) as reply:
        assert reply.status == 200
        value = (await reply.json())["value"]
    mint_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    client = await served.connect(
        origin=served.url, protocols=("realtime", f"openai-insecure-api-key.{value}")
    )
    created = await client.recv(timeout=30)
    open_ms = (time.perf_counter() - started) * 1000
    assert created["session"]["instructions"] == "Answer in one word."
    assert created["session"]["max_output_tokens"] == 8
    await show(client, seed=3)
    text, done = await client.ask(WHAT_COLOR, timeout=60)
    assert text.strip() and done["response"]["max_output_tokens"] == 8
    assert done["response"]["status"] in ("completed", "incomplete")

    # reused: 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.connect(origin=served.url, protocols=(f"openai-insecure-api-key.{value}",))
    assert refused.value.status == 401
    # expired: 401, without waiting (the server's clock is the test's)
    async with served.http.post(mint_url, json={"expires_after": {"seconds": 10}}, headers=KEY) as reply:
        late = (await reply.json())["value"]
    clock.now += 10
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.connect(headers={"Authorization": f"Bearer {late}"})
    assert refused.value.status == 401
    await client.close()
    print(f"\nfront door: mint {mint_ms:.1f} ms, secret handshake to session.created {open_ms:.1f} ms, "
          f"answer {text.strip()!r}")  # fmt: skip
