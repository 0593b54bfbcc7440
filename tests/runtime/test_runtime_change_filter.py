"""The scene-change filter on the real engine, with the built-in watching model.

A still camera (the same scene, fresh sensor noise in every frame) costs the engine its first frame
and a keep-alive every ``keepalive_s`` of wall time, the rest counted as ``unchanged``; an object a
tenth of the frame large that changes colour or moves always goes in, and the model then names
what it sees now, not the picture it had before.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from runtime.training import scenes
from runtime.training.scenes import SceneObject

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]

HEIGHT, WIDTH = 240, 320
FPS = 2.0
KEEPALIVE_S = 1.5
STILL_FRAMES = 8  # 4 s of a still camera at 2 fps: the first frame and 1-2 keep-alives go in
SENSOR_NOISE = 2  # levels of fresh noise per pixel and frame, as a camera adds to a still scene


def picture(obj: SceneObject) -> np.ndarray:
    """``obj`` on the same background every time (the background is drawn first from the seed)."""
    return scenes.render(obj, HEIGHT, WIDTH, np.random.default_rng(7), background="noise")


def with_noise(rgb: np.ndarray, k: int) -> np.ndarray:
    noise = np.random.default_rng([7, k]).integers(-SENSOR_NOISE, SENSOR_NOISE + 1, size=rgb.shape)
    return np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)


async def settled(session, received: int) -> None:
    async with asyncio.timeout(60):
        while (stats := session.stats()).frames_received < received or stats.frames_pending:
            await asyncio.sleep(0.02)


async def test_a_still_camera_sends_keepalives_and_a_tenth_of_the_frame_changing_gets_through(
    runtime,
) -> None:
    red = SceneObject("square", "red", cx=0.3, cy=0.5, area=0.10)
    still = picture(red)
    settings = replace(runtime.settings.change_filter, enabled=True, keepalive_s=KEEPALIVE_S)
    async with runtime.open_session(change_filter=settings) as session:
        started = time.monotonic()
        kept = []
        for k in range(STILL_FRAMES):  # in real time: the keep-alive is measured in wall time
            await asyncio.sleep(max(0.0, started + k / FPS - time.monotonic()))
            kept.append(await session.push_frame(with_noise(still, k), timestamp=k / FPS))
        await settled(session, STILL_FRAMES)
        stats = session.stats()
        assert kept[0] and sum(kept) == stats.frames_ingested, (kept, stats)
        # the first frame, then one whenever KEEPALIVE_S passed since the last one went in
        assert 2 <= stats.frames_ingested <= 1 + int((STILL_FRAMES - 1) / FPS / KEEPALIVE_S), kept
        assert stats.frames_dropped_by_reason == {"unchanged": STILL_FRAMES - stats.frames_ingested}, stats
        assert "red" in await session.ask("What color is it?", max_tokens=4).read()

        blue = replace(red, color="blue")  # a tenth of the frame changes colour, nothing else
        assert await session.push_frame(with_noise(picture(blue), STILL_FRAMES), timestamp=STILL_FRAMES / FPS)
        moved = replace(blue, cx=0.45)  # the same object, moved by about half its width
        assert await session.push_frame(with_noise(picture(moved), STILL_FRAMES + 1), timestamp=4.5)
        await settled(session, STILL_FRAMES + 2)
        after = session.stats()
        assert after.frames_ingested == stats.frames_ingested + 2, after
        said = scenes.mentions(await session.ask("What color is it?", max_tokens=4).read())
        assert said and said[0][0] == "blue", said
