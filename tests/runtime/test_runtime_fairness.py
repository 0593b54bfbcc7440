"""One busy session does not starve another (real vLLM, the built-in watching checkpoint).

Session "busy" floods the engine: a 30 fps camera whose scene changes every frame, and commentary
after commentary at a long ``max_tokens``. Session "calm" shows a red object, asks its colour, then
shows a blue one and asks again. Its frames must still go in and its answers must still name what
it shows, within a bound far above what it takes alone (measured first, in the same test) and far
below a stall. The bound is generous on purpose: it catches starvation, not noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from runtime.training import scenes

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]


def _scene(color: str, shape: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    obj = scenes.random_object(rng, color=color, shape=shape, aspect=4 / 3)
    return scenes.render(obj, 240, 320, rng)


async def _ingested(session, n: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while session.stats().frames_ingested < n:
            await asyncio.sleep(0.02)


async def _calm_round(session, color: str, seed: int, t: float) -> tuple[str, float]:
    """Show ``color``, wait for it to be in KV, ask its colour: the answer and the seconds it all took."""
    started = time.monotonic()
    before = session.stats().frames_ingested
    await session.push_frame(_scene(color, "circle", seed), timestamp=t)
    await _ingested(session, before + 1, timeout=60)
    text = await session.ask("What color is it?", max_tokens=4).read()
    return text, time.monotonic() - started


async def _flood(session, stop: asyncio.Event) -> int:
    """A 30 fps camera with a new scene in every frame, and commentary after commentary."""
    rng = np.random.default_rng(7)
    colors, frames = list(scenes.COLORS), 0

    async def camera() -> None:
        nonlocal frames
        while not stop.is_set():
            color = colors[int(rng.integers(len(colors)))]
            await session.push_frame(
                _scene(color, "square", int(rng.integers(1 << 30))), timestamp=frames / 30
            )
            frames += 1
            await asyncio.sleep(1 / 30)

    feeding = asyncio.create_task(camera())
    answers = 0
    try:
        while not stop.is_set():
            response = session.ask(scenes.COMMENTARY, max_tokens=200)
            async for _ in response:
                if stop.is_set():
                    await session.cancel()
            answers += 1
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
    return answers


async def test_a_flooding_session_does_not_starve_another(runtime) -> None:
    async with runtime.open_session() as calm, runtime.open_session() as busy:
        alone_text, alone_s = await _calm_round(calm, "red", 1, 0.0)
        assert scenes.mentions(alone_text)[:1] == [("red", None)], alone_text
        stop = asyncio.Event()
        flooding = asyncio.create_task(_flood(busy, stop))
        try:
            await _ingested(busy, 3, timeout=60)  # the flood is on before the calm session asks again
            rounds = []
            for i, color in enumerate(("blue", "yellow", "red")):
                rounds.append(await _calm_round(calm, color, 10 + i, 1.0 + i))
        finally:
            stop.set()
            answers = await asyncio.wait_for(flooding, 60)
        busy_stats = busy.stats()
    bound = max(10.0, 15 * alone_s)
    for (text, seconds), color in zip(rounds, ("blue", "yellow", "red"), strict=True):
        assert scenes.mentions(text)[:1] == [(color, None)], f"the calm session must see {color}: {text!r}"
        assert seconds < bound, f"calm round took {seconds:.1f} s under the flood, {alone_s:.2f} s alone"
    assert answers >= 1 and busy_stats.frames_ingested >= 3, (answers, busy_stats)
    # the flood's excess frames are dropped by a counted reason (the rate cap), none lost uncounted
    assert busy_stats.frames_dropped_by_reason.get("rate", 0) > 0, busy_stats
    accounted = busy_stats.frames_ingested + busy_stats.frames_dropped + busy_stats.frames_pending
    assert busy_stats.frames_received == accounted, busy_stats
