"""Bounded sessions on a real vLLM engine: hundreds of rollovers, within budget, nothing leaked.

The built-in watching model watches a long rendered clip (one shape drifting, now and then changing)
and comments on it / answers the task's questions across the rollovers.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from runtime import Runtime
from runtime.memory import MemoryConfig
from runtime.training import scenes

pytestmark = pytest.mark.engine

BUDGET = 160
# asked every 150 frames: the commentary runs to max_tokens (rolling over mid-answer), questions complete
ASKED = (scenes.COMMENTARY, *scenes.QUESTIONS)


@pytest.fixture(scope="module")
async def small_runtime(test_model):
    """A runtime whose sessions roll over every few frames (tiny budget, tiny frames); the checkpoint's K."""
    rt = Runtime(
        test_model,
        engine_options={"dtype": "float32", "max_model_len": 1024, "kv_cache_gb": 1.0},
        budget_tokens=BUDGET,
        window_steps=2,
        dialogue_turns=1,
        max_fps=1000.0,
        memory=MemoryConfig(slot_grid=(2, 2), titans_rank=32),
    )
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


async def test_hundreds_of_rollovers_stay_within_budget_and_keep_answering(small_runtime) -> None:
    rt = small_runtime
    engine = rt.engine
    clip = scenes.random_clip(np.random.default_rng(0), 900, height=112, width=112)  # 16 visual tokens
    async with rt.open_session(instructions="You watch a camera.") as session:
        seen_memory_bytes = set()
        for i in range(900):
            await session.push_frame(clip.frame(i), timestamp=i * 0.5)
            while session.stats()["frames_pending"] > 1:  # accelerated, but without backlog drops
                await asyncio.sleep(0.005)
            if i % 150 == 149:  # a question now and then, answered across rollovers
                text = await session.ask(ASKED[(i // 150) % len(ASKED)], max_tokens=24).read()
                assert text.strip()
                seen_memory_bytes.add(session.stats()["memory_state_bytes"])
            if i % 10 == 0:
                await asyncio.sleep(0.02)
                assert engine.output_processor.get_num_unfinished_requests() <= 1
        deadline = asyncio.get_running_loop().time() + 60
        while session.stats()["frames_pending"] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        stats = session.stats()
        assert stats["rollovers"] >= 100, str(stats)
        assert stats["max_request_tokens"] <= BUDGET, str(stats)
        assert stats["session_tokens"] <= BUDGET
        assert stats["frames_ingested"] >= 850, str(stats)
        assert len(seen_memory_bytes) == 1, "memory state must not grow with the stream"
        assert stats["memory_surprise"] is not None
        final = await session.ask(scenes.QUESTIONS[2], max_tokens=30).read()
        assert final.strip()
    assert engine.output_processor.get_num_unfinished_requests() == 0
