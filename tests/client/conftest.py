"""Fixtures for client tests: ``server`` / ``server_url`` (a real server, fake runtime by default; see
client_server.py for pointing them at a real engine or an external server), ``fake_server``, ``artifacts``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_server import ARTIFACTS, ExternalServer, ServerThread


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread | ExternalServer]:
    """The server every client test talks to (shared by the whole session: starting one costs time)."""
    external = os.environ.get("SPEAKWATCH_TEST_URL")
    if external:
        yield ExternalServer(external.rstrip("/"))
        return
    thread = ServerThread().start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="session")
def server_url(server: ServerThread | ExternalServer) -> str:
    """Base URL of the test server, ``http://127.0.0.1:PORT``."""
    return server.url


@pytest.fixture
def fake_server(server: ServerThread | ExternalServer) -> ServerThread:
    """The server, for tests that inspect the fake runtime's sessions; skips on a real engine."""
    if not isinstance(server, ServerThread) or not server.fake:
        pytest.skip("needs the fake runtime (looks at what its sessions received)")
    return server


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where tests leave files for people to look at (git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
