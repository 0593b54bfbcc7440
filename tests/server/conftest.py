"""Fixtures for server tests: the app on a real 127.0.0.1 socket with a fake runtime, and a WS client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_runtime import FakeRuntime

from runtime.server.app import SERVER, RealtimeServer, ServerConfig, create_app


@dataclass
class Served:
    """One running app: its base URL, the fake runtime behind it and an HTTP session to talk to it."""

    url: str
    app: web.Application
    runtime: FakeRuntime
    runner: web.AppRunner
    http: aiohttp.ClientSession
    stopped: bool = False

    @property
    def server(self) -> RealtimeServer:
        return self.app[SERVER]

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/realtime"

    async def connect(self, **kwargs: Any) -> RealtimeClient:
        """A WebSocket client; ``params={"resume": TOKEN, ...}`` to resume a session."""
        ws = await self.http.ws_connect(self.ws_url, max_msg_size=0, **kwargs)
        return RealtimeClient(ws)

    async def stop(self) -> None:
        """Shut the server down the way the CLI does (sessions closed, runtime closed)."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


class RealtimeClient:
    """A thin test client: send events, read them by type (``input_video.stats`` only when asked)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.stats: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any] | str) -> None:
        await self.ws.send_str(event if isinstance(event, str) else json.dumps(event))

    async def recv(self, timeout: float = 5.0, *, stats: bool = False) -> dict[str, Any]:
        while True:
            message = await self.ws.receive(timeout)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"socket ended: {message.type} {message.data!r} {message.extra!r}")
            event = json.loads(message.data)
            if event["type"] == "input_video.stats":
                self.stats.append(event)
                if not stats:
                    continue
            self.seen.append(event)
            return event

    async def until(self, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every event up to and including the first of type ``kind``."""
        events = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv(timeout, stats=kind == "input_video.stats")
                events.append(event)
                if event["type"] == kind:
                    return events

    async def ask(self, text: str, timeout: float = 5.0, **response: Any) -> tuple[str, dict[str, Any]]:
        """One user message and one response; the answer text and the ``response.done`` event."""
        content = [{"type": "input_text", "text": text}]
        await self.send(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": content},
            }
        )
        await self.until("conversation.item.done", timeout)
        await self.send({"type": "response.create", "response": response})
        events = await self.until("response.done", timeout)
        text_out = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        return text_out, events[-1]

    async def close(self) -> None:
        await self.ws.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """``await serve(config=..., runtime=..., wait=True)`` runs an app on 127.0.0.1:0; stopped at teardown."""
    running: list[Served] = []

    async def start(
        config: ServerConfig | None = None, runtime: FakeRuntime | None = None, wait: bool = True
    ) -> Served:
        runtime = runtime or FakeRuntime()
        app = create_app(runtime, config or ServerConfig(stats_interval=0.2))
        runner = web.AppRunner(app, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        served = Served(f"http://{host}:{port}", app, runtime, runner, aiohttp.ClientSession())
        running.append(served)
        if wait:
            await app[SERVER].wait_ready(5)
        return served

    yield start
    for served in running:
        await served.http.close()
        await served.stop()
    # nothing the server started outlives it
    deadline = asyncio.get_running_loop().time() + 3.0
    while leftover := [t for t in asyncio.all_tasks() if not t.done() and t.get_name().startswith(OURS)]:
        assert asyncio.get_running_loop().time() < deadline, f"tasks left running: {leftover}"
        await asyncio.sleep(0.05)


OURS = ("stats ", "response ", "call ", "close ", "WebSocketSink", "speakwatch runtime start")
