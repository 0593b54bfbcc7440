"""A real speakwatch server on 127.0.0.1 in a background thread, for the client tests (see conftest.py).

The server runs on its own event loop in its own thread, so blocking tests (the sync SDK, the pty chat,
Selenium) and async tests alike talk to it over real sockets. By default it serves the fake runtime
from tests/server (fast, deterministic answers that count frames); set ``SPEAKWATCH_TEST_RUNTIME=engine``
to serve the real runtime on the built-in watching model instead, or ``SPEAKWATCH_TEST_URL=http://HOST:PORT``
to test a server that is already running. Tests that look inside the fake runtime skip themselves
when ``server.runtime`` is not a fake one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SERVER_TESTS = str(Path(__file__).resolve().parent.parent / "server")
if SERVER_TESTS not in sys.path:
    sys.path.insert(0, SERVER_TESTS)  # fake_runtime lives with the server tests

import fake_runtime  # noqa: E402

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


def build_runtime() -> Any:
    """The runtime the test server serves: the fake one, or the real one on the built-in watching model."""
    if os.environ.get("SPEAKWATCH_TEST_RUNTIME", "fake") == "engine":
        from runtime.runtime import Runtime

        return Runtime()
    return fake_runtime.FakeRuntime(token_delay=0.01)


@dataclass
class ServerThread:
    """A speakwatch app served on 127.0.0.1:0 by an event loop in a daemon thread."""

    runtime: Any = None
    options: dict[str, Any] | None = None  # ServerConfig fields (the defaults suit tests)
    url: str = ""  # http://127.0.0.1:PORT
    ready_timeout: float = 120.0

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._runner: Any = None

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/v1/realtime"

    @property
    def fake(self) -> bool:
        return isinstance(self.runtime, fake_runtime.FakeRuntime)

    @property
    def server(self) -> Any:
        """The app's `RealtimeServer` (touch it only on the server's loop: ``run``/``call``)."""
        from runtime.server.app import SERVER

        return self._runner.app[SERVER]

    def start(self) -> ServerThread:
        self.thread.start()
        self.call(self._start())
        return self

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout if timeout is not None else self.ready_timeout)

    def run(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the server's loop (to read runtime state without races)."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper(), timeout=10)

    async def _start(self) -> None:
        from aiohttp import web

        from runtime.server.app import SERVER, ServerConfig, create_app

        if self.runtime is None:
            self.runtime = build_runtime()
        options = {"stats_interval": 0.2, "max_fps": 30.0, **(self.options or {})}
        app = create_app(self.runtime, ServerConfig(**options))
        self._runner = web.AppRunner(app, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        if not await app[SERVER].wait_ready(self.ready_timeout):
            raise RuntimeError(f"the test server's runtime did not start: {app[SERVER].startup_error}")

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class ExternalServer:
    """A server started elsewhere (``SPEAKWATCH_TEST_URL``): nothing to look inside."""

    url: str
    runtime: Any = None
    fake: bool = False

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/realtime"
