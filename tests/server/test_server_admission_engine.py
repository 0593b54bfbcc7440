"""Admission by KV on a real engine: a cache sized for two sessions' budgets admits two, refuses the third
with the numbers (over WebSocket and in the embedded SDK), and the two admitted ones roll over past their
budgets and still answer: nothing preempted, nothing stalled.

The engine gets a KV cache of 18 blocks (about 2300 tokens, 3.5 MB at float32 for the built-in tiny
model) and sessions a 768-token budget (3/4 of max_model_len 1024), so each reserves 7 blocks.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from test_server_engine import show

from runtime import ChangeFilterSettings, Runtime
from runtime.admission import session_blocks, sessions_that_fit
from runtime.engine import kv_bytes_per_token
from runtime.errors import SessionLimitReached
from runtime.memory import MemoryConfig
from runtime.server.app import ServerConfig
from runtime.training import scenes
from runtime.training.builtin import watching_model
from runtime.training.scenes import QUESTIONS

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

BLOCKS = 18  # one is vLLM's null block: 17 usable, two sessions of 7
BLOCK_SIZE = 128  # vLLM's CPU block


def kv_cache_gb(model: str | None) -> float:
    """GiB of KV for `BLOCKS` blocks of this checkpoint's float32 keys and values."""
    return BLOCKS * BLOCK_SIZE * kv_bytes_per_token(model or watching_model(), "float32") / 2**30


@pytest.fixture(scope="module")
async def small(test_model):
    rt = Runtime(
        test_model,
        engine_options={"dtype": "float32", "max_model_len": 1024, "kv_cache_gb": kv_cache_gb(test_model)},
        max_fps=1000.0,
        window_steps=2,
        dialogue_turns=1,
        memory=MemoryConfig(slot_grid=(2, 2), titans_rank=32),
        change_filter=ChangeFilterSettings(enabled=False),  # every pushed frame goes in
    )
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


def test_the_engine_reports_a_cache_for_two_budgets(small) -> None:
    capacity = small.kv_capacity
    assert capacity is not None
    assert small.budget_tokens == 768
    assert sessions_that_fit(capacity, small.budget_tokens) == 2, capacity


async def roll_over(session, seed: int, frames: int = 100) -> None:
    """Push ``frames`` small frames (16 visual tokens each), enough to pass the budget at least once."""
    clip = scenes.random_clip(np.random.default_rng(seed), frames, height=112, width=112)
    for i in range(frames):
        await session.push_frame(clip.frame(i), timestamp=i * 0.5)
        while session.stats().frames_pending > 1:
            await asyncio.sleep(0.005)
    async with asyncio.timeout(60):
        while session.stats().frames_pending:
            await asyncio.sleep(0.02)


async def test_two_admitted_sessions_roll_over_and_answer_the_third_is_refused(small) -> None:
    rt = small
    a, b = rt.open_session(), rt.open_session()
    try:
        with pytest.raises(SessionLimitReached) as refused:
            rt.open_session()
        reserved = 2 * session_blocks(rt.budget_tokens, rt.kv_capacity.block_size) * rt.kv_capacity.block_size
        assert f"capacity {rt.kv_capacity.tokens} tokens, {reserved} reserved by 2" in str(refused.value)
        assert len(rt.sessions) == 2
        async with asyncio.timeout(300):  # a preempted or stalled request would hang here
            await asyncio.gather(roll_over(a, 1), roll_over(b, 2))
            for session in (a, b):
                assert session.stats().rollovers >= 1, session.stats()
                assert session.stats().max_request_tokens <= rt.budget_tokens
            answers = await asyncio.gather(*(s.ask(QUESTIONS[0], max_tokens=16).read() for s in (a, b)))
        assert all(text.strip() for text in answers), answers
        stats = rt.stats()
        assert (
            stats["kv_tokens_reserved"] == reserved and stats["kv_capacity_tokens"] == rt.kv_capacity.tokens
        )
        assert 0 < stats["kv_tokens"] <= 2 * rt.budget_tokens  # type: ignore[operator]
    finally:
        await a.close()
    c = rt.open_session()  # a's reservation is free again
    await asyncio.gather(b.close(), c.close())
    assert rt.stats()["kv_tokens_reserved"] == 0


async def test_the_websocket_past_capacity_gets_the_error_and_the_admitted_ones_answer(serve, small) -> None:
    served = await serve(config=ServerConfig(own_runtime=False, stats_interval=0.2), runtime=small)
    first, second = await served.connect(), await served.connect()
    assert (await first.recv())["type"] == (await second.recv())["type"] == "session.created"
    third = await served.connect()
    event = await third.recv()
    assert event["type"] == "error" and event["error"]["code"] == "session_limit_reached"
    assert f"capacity {small.kv_capacity.tokens} tokens" in event["error"]["message"]
    closing = await third.ws.receive(5)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    for seed, client in enumerate((first, second)):
        await show(client, seed)
        answer, done = await client.ask(QUESTIONS[2], timeout=60, max_output_tokens=16)
        assert done["response"]["status"] in ("completed", "incomplete") and answer.strip()
    async with served.http.get(served.url + "/metrics") as reply:
        metrics = await reply.text()
    per_session = (
        session_blocks(small.budget_tokens, small.kv_capacity.block_size) * small.kv_capacity.block_size
    )
    assert f"speakwatch_kv_capacity_tokens {float(small.kv_capacity.tokens)}" in metrics
    assert f"speakwatch_kv_tokens_reserved {float(2 * per_session)}" in metrics
    assert "speakwatch_engine_sessions 2.0" in metrics
    await first.close()
    await second.close()
    async with asyncio.timeout(10):
        while small.sessions:
            await asyncio.sleep(0.05)
