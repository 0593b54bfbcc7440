"""The real engine killed mid-answer, through the real server: the engine-core process gets SIGKILL
while the running commentary streams. The answer ends ``engine_unavailable``, ``/health`` is 503
within a second and 200 again once the runtime has rebuilt the engine, new sessions and questions are
refused with a retry hint meanwhile, frames keep being counted, and the open session answers its next
question on the new engine.

It starts (and kills) its own engine, so it never disturbs the shared one. The measured times are
printed (run with ``-s``) and recorded as test properties.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
import weakref

import pytest
from test_server_engine import WHAT_COLOR, jpeg_data_url, show, start_commentary

from runtime import Runtime
from runtime.engine import engine_pids
from runtime.server.app import ServerConfig

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
async def mortal(test_model):
    rt = Runtime(
        test_model,
        engine_options={"dtype": "float32", "max_model_len": 4096, "kv_cache_gb": 1.0},
        restart_backoff_s=0.5,
    )
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


def drop_captured_tracebacks() -> None:
    """pytest's log capture keeps every record, and a record's exception keeps the frames it went
    through: vLLM logs the EngineDeadError that every request of the dead engine raised, and those
    frames hold the engine. (A server's log handlers format a record and let it go.)"""
    for handler in logging.getLogger().handlers:
        for record in getattr(handler, "records", ()):
            record.exc_info = None


async def status_of(served, path: str = "/health") -> int:
    async with served.http.get(served.url + path) as reply:
        return reply.status


async def stats_until(client, done, timeout: float = 30.0) -> dict:
    """The session's latest ``input_video.stats`` once ``done(stats)`` holds (it may hold already:
    stats are set aside while other events are awaited)."""
    async with asyncio.timeout(timeout):
        while not (client.stats and done(client.stats[-1])):
            await client.recv(timeout=timeout, stats=True)
    return client.stats[-1]


async def test_the_engine_core_killed_mid_answer_is_seen_restarted_and_survived(
    serve, mortal, record_property
) -> None:
    served = await serve(config=ServerConfig(own_runtime=False, stats_interval=0.2), runtime=mortal)
    client = await served.connect()
    assert (await client.recv())["type"] == "session.created"
    await show(client, seed=1)
    ingested_before = max(event["frames_ingested"] for event in client.stats)
    await start_commentary(client, max_output_tokens=200)
    (pid,) = engine_pids(mortal.engine)
    dead_engine = weakref.ref(mortal.engine)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    while await status_of(served) != 503:
        assert time.monotonic() - killed < 5, "/health still 200 five seconds after the engine died"
        await asyncio.sleep(0.02)
    to_503 = time.monotonic() - killed
    assert to_503 < 1.0, f"/health turned 503 {to_503:.2f} s after the engine died"

    events = await client.until("response.done", timeout=30)
    done = events[-1]["response"]
    assert done["status"] == "failed", done
    assert done["status_details"]["error"]["code"] == "engine_unavailable", done

    # while it is down: a new session and a new question are refused at once, with a hint
    other = await served.connect()
    refused = await other.recv()
    assert refused["error"]["code"] == "engine_unavailable" and refused["error"]["retry_after_s"] >= 1
    await client.send({"type": "response.create", "response": {"max_output_tokens": 8}})
    events = await client.until("response.done", timeout=10)
    error = next(e["error"] for e in events if e["type"] == "error")
    assert error["code"] == "engine_unavailable" and error["retry_after_s"] >= 1, error
    # frames keep coming and are counted
    for seed in range(2, 5):
        image = jpeg_data_url(seed)
        await client.send({"type": "input_video.append", "image": image, "timestamp_ms": seed * 2000})
    await stats_until(client, lambda stats: stats["frames_received"] >= 4, timeout=10)
    assert mortal.engine_health.state == "restarting"

    while await status_of(served) != 200:
        assert time.monotonic() - killed < 600, "the engine did not come back"
        await asyncio.sleep(0.1)
    restarted = time.monotonic() - killed
    health = mortal.engine_health
    assert (health.restarts, health.failures) == (1, 1) and health.state == "up"
    assert "SIGKILL" in (health.last_failure or ""), health

    text, done = await client.ask(WHAT_COLOR, timeout=120, max_output_tokens=8)
    assert done["response"]["status"] in ("completed", "incomplete") and text.strip(), done
    stats = await stats_until(
        client, lambda stats: stats["frames_ingested"] > ingested_before and stats["frames_pending"] == 0
    )
    assert stats["frames_received"] >= 4, stats  # the three sent while it was down are counted

    drop_captured_tracebacks()
    gc.collect()
    assert dead_engine() is None, "the dead engine is freed, not kept beside the new one"
    async with served.http.get(served.url + "/metrics") as reply:
        metrics = await reply.text()
    assert "speakwatch_engine_restarts_total 1.0" in metrics and "speakwatch_engine_up 1.0" in metrics

    record_property("death_to_503_s", round(to_503, 3))
    record_property("death_to_200_s", round(restarted, 1))
    record_property("restart_s", health.last_restart_s)
    print(
        f"\nengine fault: /health 503 {to_503 * 1000:.0f} ms after SIGKILL; 200 again after "
        f"{restarted:.1f} s (supervisor: {health.last_restart_s:.1f} s death to up); "
        f"frames {stats['frames_received']} received, {stats['frames_ingested']} ingested, "
        f"dropped {stats['frames_dropped_by_reason']}"
    )
    await client.close()
    await other.close()
