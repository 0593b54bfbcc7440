"""Bounded output per connection: a WebSocket client that never reads while its session streams is
closed (1008, logged and counted) once its send buffer is full, the server's buffered bytes never pass
the bound, and the session waits in its grace period like after any other lost socket."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from dataclasses import replace
from typing import Any

import pytest
from fake_runtime import FakeRuntime, eventually

from runtime.server.app import WS_WRITER_LIMIT, ServerConfig
from runtime.server.protocol import Limits
from runtime.server.transport import SLOW_CLIENT_REASON

pytestmark = pytest.mark.timeout(60)

BOUND = 256 * 1024
LONG = 10**6  # max_output_tokens: answers long enough to fill any buffer


def streaming(**config: Any) -> tuple[ServerConfig, FakeRuntime]:
    """A server whose answers stream as fast as the loop goes, as long as they like."""
    runtime = FakeRuntime(token_delay=0.0)
    runtime.settings = replace(runtime.settings, max_output_tokens=LONG)
    limits = Limits(max_output_tokens=LONG)
    return ServerConfig(stats_interval=0.2, ws_max_output_bytes=BOUND, limits=limits, **config), runtime


class RawClient:
    """A WebSocket client on a bare socket with a tiny receive buffer, that reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, served: Any) -> RawClient:
        host, port = served.url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /v1/realtime HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, event: dict[str, Any]) -> None:
        payload = json.dumps(event).encode()
        mask = os.urandom(4)
        if len(payload) < 126:
            header = bytes([0x81, 0x80 | len(payload)])
        elif len(payload) < 65536:
            header = b"\x81\xfe" + struct.pack("!H", len(payload))
        else:
            header = b"\x81\xff" + struct.pack("!Q", len(payload))
        self.writer.write(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload)."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    async def drain_to_end(self, timeout: float = 20.0) -> tuple[int, int | None, bytes]:
        """Read every frame until the connection ends: (frames, close code or None, close reason)."""
        frames, code, reason = 0, None, b""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    opcode, payload = await self.frame()
                    frames += 1
                    if opcode == 0x8:
                        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                        reason = payload[2:]
                        break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # aborted: what was in flight is gone
        return frames, code, reason


async def test_a_client_that_never_reads_is_closed_and_the_server_holds_at_most_the_bound(serve) -> None:
    config, runtime = streaming(replay_max_bytes=2 * 1024 * 1024)
    served = await serve(config, runtime=runtime)
    raw = await RawClient.connect(served)
    opcode, payload = await raw.frame()
    created = json.loads(payload)
    assert opcode == 0x1 and created["type"] == "session.created"
    conn = served.server.connections[created["session"]["id"]]
    sink = conn.sink
    raw.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "talk forever"}]}})  # fmt: skip
    raw.send({"type": "response.create"})

    peak = 0

    async def watch() -> None:  # what the server holds for this socket, sampled while it streams
        nonlocal peak
        while True:
            peak = max(peak, sink.buffered_bytes)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        await eventually(lambda: sink.overflowed, timeout=30)
        await eventually(lambda: conn.sink is None, timeout=10)  # the socket is gone: grace
    finally:
        watcher.cancel()
    frames = 0
    frames, code, reason = await raw.drain_to_end()
    raw.writer.close()

    # the socket buffer: past asyncio's 64 KiB high-water mark aiohttp writes up to WS_WRITER_LIMIT more
    # before it waits for the peer (plus the frame that crossed it)
    slack = 64 * 1024 + WS_WRITER_LIMIT + 4096
    print(f"never-reading client: peak held {peak} bytes (bound {BOUND} + socket {slack}), close {code}")
    assert 0 < peak <= BOUND + slack and BOUND < sink.peak_buffered_bytes <= BOUND + slack
    assert sink.buffered_bytes == 0
    assert code in (1008, None) and (code is None or reason == SLOW_CLIENT_REASON.encode())
    closed = served.server.metrics.registry.get_sample_value(
        "speakwatch_websocket_closed_by_server_total", {"reason": "slow_client"}
    )
    assert closed == 1
    # the session lives on in its grace period, its answer streaming into the bounded log
    (session,) = served.runtime.sessions
    assert not session.closed and session.active is not None
    assert served.server.resumer.detached == [conn.id]
    await asyncio.sleep(0.3)
    assert conn.log is not None and conn.log.bytes <= 2 * 1024 * 1024 and conn.log.dropped > 0
    assert frames > 0


async def test_a_slow_client_closed_for_its_buffer_resumes_with_nothing_lost(serve) -> None:
    words = " ".join(f"w{i}" for i in range(40_000))  # ~40 000 deltas: about 7 MB of events
    config, runtime = streaming(replay_max_bytes=16 * 1024 * 1024, replay_max_events=100_000)
    served = await serve(config, runtime=runtime)
    raw = await RawClient.connect(served)
    created = json.loads((await raw.frame())[1])
    conn = served.server.connections[created["session"]["id"]]
    raw.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": words}]}})  # fmt: skip
    raw.send({"type": "response.create"})
    sink = conn.sink
    await eventually(lambda: sink.overflowed, timeout=30)
    # read what did arrive before the close, then resume from the last event read
    got: list[dict[str, Any]] = [created]
    try:
        async with asyncio.timeout(20):
            while True:
                opcode, payload = await raw.frame()
                if opcode != 0x1:
                    break
                got.append(json.loads(payload))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    raw.writer.close()
    await eventually(lambda: served.server.resumer.detached, timeout=10)
    # the answer streams on into the log; once it is all there the resume replays it from the log alone
    # (live, this test's client on the same loop and CPU reads slower than the fake engine writes)
    (session,) = served.runtime.sessions
    await eventually(lambda: session.active is None, timeout=30)
    params = {"resume": created["session"]["resume"]["token"], "last_event_id": got[-1]["event_id"]}
    client = await served.connect(params=params)
    assert (await client.recv())["type"] == "session.resumed"
    rest = await client.until("response.done", timeout=30)
    events = got + rest
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == f"seen 0 frames, images none, you said: {words} "
    assert events[-1]["response"]["usage"]["output_tokens"] == len(deltas)
