"""Resume and lost sockets on the real engine (the built-in watching model): a reconnect mid-answer
replays it whole, and 100 sockets lost mid-answer leave no session and no engine request behind."""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest
from test_server_engine import show, start_commentary
from test_server_resume import drop, resume

from runtime.server.app import ServerConfig

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

LOST = 100  # sockets dropped mid-answer (the figure)


def unfinished(runtime) -> int:
    """Requests vLLM's front end still tracks (each is running or waiting in the engine core)."""
    return runtime.engine.output_processor.get_num_unfinished_requests()


async def test_resume_mid_answer_and_20_lost_sockets_leave_nothing_running(serve, runtime) -> None:
    # max_sessions: the lost sessions keep their places until their grace period ends
    config = ServerConfig(own_runtime=False, stats_interval=0.2, resume_grace=1.0, max_sessions=LOST + 4)
    served = await serve(config=config, runtime=runtime)

    # a reconnect mid-answer: the answer goes on, nothing lost or doubled
    client = await served.connect()
    created = await client.recv()
    await show(client, seed=5)
    await start_commentary(client, max_output_tokens=48)
    before = list(client.seen)
    drop(client)
    await asyncio.sleep(0.3)  # deltas keep going into the session's log
    again = await resume(served, created["session"]["resume"]["token"], before[-1]["event_id"])
    resumed = await again.recv(timeout=30)
    assert resumed["type"] == "session.resumed"
    rest = await again.until("response.done", timeout=120)
    events = before + rest
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    done = rest[-1]["response"]
    # the whole text, once: the server's own record of the answer (a delta can hold several tokens)
    assert "".join(deltas) == done["output"][0]["content"][0]["text"]
    assert 5 < len(deltas) <= done["usage"]["output_tokens"]
    await again.close()  # 1000: closed at once

    # LOST sockets lost mid-answer: after the grace period, no session and no engine request is left
    process = psutil.Process(os.getpid())
    rss_before = process.memory_info().rss
    started = time.monotonic()
    for _ in range(LOST):
        client = await served.connect()
        await client.recv(timeout=30)
        await start_commentary(client, max_output_tokens=200)
        drop(client)
    async with asyncio.timeout(180):
        while runtime.sessions or unfinished(runtime) or served.server.connections:
            await asyncio.sleep(0.1)
    elapsed = time.monotonic() - started
    rss_after = process.memory_info().rss
    print(
        f"{LOST} lost sockets: all closed {elapsed:.1f} s after the first; engine requests left "
        f"{unfinished(runtime)}; RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    registry = served.server.metrics.registry
    assert registry.get_sample_value("speakwatch_sessions_grace_expired_total") == LOST
    assert rss_after - rss_before < 200 * 2**20
