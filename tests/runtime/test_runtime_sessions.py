"""Sessions on a real vLLM engine: perception runs in parallel with generation.

The shared runtime serves the built-in watching model: frames are rendered scenes (one coloured
shape), a long answer is the running commentary (it only stops at ``max_tokens`` or a cancel) and an
answer that completes is one of the task's questions.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from runtime.errors import ResponseActive
from runtime.training import scenes
from runtime.training.scenes import COMMENTARY, QUESTIONS

pytestmark = pytest.mark.engine

WHAT_COLOR, WHAT_SHAPE, WHAT_SEEN = QUESTIONS


def frames(n: int, seed: int = 0, size: tuple[int, int] = (120, 160), **obj: str) -> list[np.ndarray]:
    """``n`` frames of one object drifting across a scene (``obj``: fix its ``shape`` / ``color``)."""
    rng = np.random.default_rng(seed)
    height, width = size
    thing = scenes.random_object(rng, aspect=width / height, **obj)
    shown = []
    for _ in range(n):
        shown.append(scenes.render(thing, height, width, rng))
        thing = scenes.step_object(thing, rng, aspect=width / height)
    return shown


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def show(session, shown: list[np.ndarray], start: float = 0.0) -> None:
    """Push frames (0.5 s apart, under the fps cap) and wait until they are all in KV."""
    base = session.stats().frames_ingested
    for i, frame in enumerate(shown):
        await session.push_frame(frame, timestamp=start + 0.5 * i)
    await wait_until(lambda: session.stats().frames_ingested == base + len(shown))


async def answer_while_pushing(session, pushed: list[np.ndarray], max_tokens: int = 96):
    """Start a commentary on one frame, push frames once the first delta arrives, and record
    ingestion during the answer (the commentary never ends by itself, so it runs past them)."""
    await show(session, frames(1, seed=5))
    base = session.stats().frames_ingested
    response = session.ask(COMMENTARY, max_tokens=max_tokens)
    ingested_while_answering = 0
    pushed_all = False
    async for _ in response:
        if not pushed_all:
            for i, frame in enumerate(pushed):
                await session.push_frame(frame, timestamp=1000.0 + i)
            pushed_all = True
        ingested_while_answering = session.stats().frames_ingested - base
    return response, ingested_while_answering


async def test_parallel_ingests_frames_during_the_answer(runtime) -> None:
    async with runtime.open_session(schedule="parallel") as session:
        response, during = await answer_while_pushing(session, frames(3))
        assert response.status in ("completed", "incomplete")
        assert response.usage["output_tokens"] > runtime.settings.turn_tokens, "answer too short to test"
        assert during == 3, "parallel: frames pushed during the answer must be in KV before it ends"
        assert session.stats().frames_during_answer == 3


async def test_sequential_holds_frames_until_the_answer_ends(runtime) -> None:
    async with runtime.open_session(schedule="sequential") as session:
        base = session.stats().frames_ingested
        response, during = await answer_while_pushing(session, frames(3))
        assert response.usage["output_tokens"] > runtime.settings.turn_tokens
        assert during == 0, "sequential: frames must wait for the answer to end"
        await wait_until(lambda: session.stats().frames_ingested == base + 1 + 3)


async def test_idle_session_ingests_frames_and_answers(runtime) -> None:
    async with runtime.open_session(instructions="You watch a camera.") as session:
        await show(session, frames(2, seed=1))
        stats = session.stats()
        assert stats.frame_lag_p95_ms is not None and stats.frame_lag_p95_ms > 0
        text = await session.ask(WHAT_SEEN, max_tokens=12).read()
        assert text.strip()
        stats = session.stats()
        assert stats.ttft_ms is not None and stats.ttft_ms > 0
        assert stats.tokens_per_s is not None and stats.tokens_per_s > 0
        assert stats.session_tokens > 12


async def test_cancel_mid_answer_stops_decoding_and_session_continues(runtime) -> None:
    async with runtime.open_session() as session:
        await show(session, frames(1, seed=6))
        response = session.ask(COMMENTARY, max_tokens=200)
        async for _ in response:
            await session.cancel()
        assert response.status == "cancelled"
        assert response.usage["output_tokens"] < 200
        tokens_after_cancel = session.stats().session_tokens
        await asyncio.sleep(0.5)
        assert session.stats().session_tokens == tokens_after_cancel, "nothing decodes after cancel"
        follow_up = session.ask(WHAT_COLOR, max_tokens=8)
        assert (await follow_up.read()) and follow_up.status in ("completed", "incomplete")
    assert runtime.engine.output_processor.get_num_unfinished_requests() == 0, "close must free the request"


async def test_second_question_while_answering_is_rejected(runtime) -> None:
    async with runtime.open_session() as session:
        await show(session, frames(1, seed=7))
        first = session.ask(COMMENTARY, max_tokens=30)
        with pytest.raises(ResponseActive):
            session.ask(WHAT_SHAPE)
        await first.read()
        assert await session.ask(WHAT_COLOR, max_tokens=8).read()


async def test_bad_frames_raise_and_the_session_keeps_working(runtime) -> None:
    async with runtime.open_session() as session:
        bad = [
            np.zeros((10, 10), dtype=np.uint8),
            np.zeros((10, 10, 3), dtype=np.float32),
            np.zeros((10, 10, 4), dtype=np.uint8),
            "not a frame",
        ]
        for frame in bad:
            with pytest.raises(ValueError):
                await session.push_frame(frame)
        assert session.stats().frames_dropped_by_reason == {"invalid": len(bad)}
        await session.push_frame(frames(1)[0])
        await wait_until(lambda: session.stats().frames_ingested == 1)
        assert await session.ask(WHAT_SHAPE, max_tokens=8).read()


async def test_two_concurrent_sessions_stay_independent(runtime) -> None:
    async def run(seed: int, color: str, shape: str) -> tuple[str, dict]:
        async with runtime.open_session() as session:
            await show(session, frames(2, seed=seed, color=color, shape=shape))
            text = await session.ask(WHAT_SEEN, max_tokens=16).read()
            return text, session.stats()

    a, b = (1, "red", "square"), (2, "blue", "circle")  # different scenes: different answers
    (text_a, stats_a), (text_b, stats_b) = await asyncio.gather(run(*a), run(*b))
    alone_a, _ = await run(*a)
    assert text_a == alone_a, "a session's answer must not depend on another session running beside it"
    assert text_a != text_b
    assert stats_a.frames_ingested == stats_b.frames_ingested == 2
    assert stats_a.session_id != stats_b.session_id


async def test_frames_above_the_fps_cap_are_dropped_and_counted(runtime) -> None:
    async with runtime.open_session(max_fps=2.0) as session:
        for i, frame in enumerate(frames(6, seed=3)):
            await session.push_frame(frame, timestamp=i * 0.1)  # 10 fps offered
        await wait_until(lambda: session.stats().frames_ingested == 2)
        await asyncio.sleep(0.3)
        stats = session.stats()
        assert stats.frames_received == 6
        assert stats.frames_dropped_by_reason["rate"] == 4  # kept: t=0.0 and t=0.5
        assert stats.frames_ingested + stats.frames_dropped == 6


async def test_question_with_an_image(runtime) -> None:
    async with runtime.open_session() as session:
        response = session.ask(WHAT_SEEN, max_tokens=8, images=frames(1, seed=4))
        assert await response.read()
        assert response.usage["input_tokens"] > 10
