"""Clients against the real server on the real engine (the built-in watching model).

The server runs on the test loop beside the shared runtime; blocking browser calls go to a thread
so the loop keeps serving while Chromium talks to it.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from PIL import Image
from test_client_web import browser, write_y4m  # noqa: F401  (fixture)

import client
from client.remote import _jpeg_data_url
from runtime.server.app import SERVER, ServerConfig, create_app
from runtime.training import scenes

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


SHOWN = ("green", "triangle")  # what the fake camera of the page test shows


@pytest.fixture
def camera(tmp_path: Path) -> Path:
    """The page test's fake camera: a green triangle on a noisy grey background."""
    rng = np.random.default_rng(5)
    obj = scenes.random_object(rng, color=SHOWN[0], shape=SHOWN[1], aspect=4 / 3)
    return write_y4m(tmp_path / "scene.y4m", frame=lambda i: scenes.render(obj, 240, 320, rng))


@pytest.fixture
async def real_server(runtime):
    app = create_app(runtime, ServerConfig(own_runtime=False, stats_interval=0.3))
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await app[SERVER].wait_ready(10)
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def scripted_frames(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rendered scenes of a random clip (the shape drifts and changes), each with the frame the server
    will see after the client's JPEG round trip (so both paths match)."""
    clip = scenes.random_clip(np.random.default_rng(11), n, height=120, width=160, change_p=0.5)
    frames = []
    for rgb in clip.frames():
        url = _jpeg_data_url(rgb, 80)
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        frames.append((rgb, decoded))
    return frames


async def run_conversation(
    session: Any, frames: list[tuple[np.ndarray, np.ndarray]], remote: bool
) -> list[str]:
    answers = []
    for turn, question in enumerate([scenes.QUESTIONS[2], scenes.QUESTIONS[0]]):
        for i, (original, decoded) in enumerate(frames[turn * 2 : turn * 2 + 2]):
            await session.push_frame(original if remote else decoded, timestamp=10.0 * turn + i)
        deadline = asyncio.get_running_loop().time() + 30
        while session.stats().frames_ingested < 2 * (turn + 1):
            assert asyncio.get_running_loop().time() < deadline, session.stats()
            await asyncio.sleep(0.1)
        answers.append("".join([delta async for delta in session.ask(question, max_tokens=10)]))
    return answers


async def test_embedded_and_remote_sessions_answer_the_same(runtime, real_server: str) -> None:
    frames = scripted_frames(4)
    async with runtime.open_session() as embedded:
        local = await run_conversation(embedded, frames, remote=False)
    async with client.connect(real_server) as remote:
        await remote.update(max_fps=2.0)
        over_the_wire = await run_conversation(remote, frames, remote=True)
        assert remote.stats().frames_ingested == 4
    assert all(answer.strip() for answer in local)
    assert over_the_wire == local


@pytest.mark.browser
async def test_page_on_the_real_engine(browser: Any, runtime, real_server: str, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    artifacts = Path(__file__).resolve().parents[2] / "artifacts"
    artifacts.mkdir(exist_ok=True)

    def attr(css: str, name: str) -> str | None:
        return browser.find_element(By.CSS_SELECTOR, css).get_attribute(name)

    async def wait_for(check, timeout: float, what: str) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            result = await asyncio.to_thread(check)
            if result:
                return result
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    await asyncio.to_thread(browser.get, real_server + "/")
    try:
        await wait_for(lambda: attr("#status", "data-state") == "connected", 60, "the page to connect")
        await wait_for(lambda: len(runtime.sessions) >= 1, 10, "a session on the engine")
        session = next(iter(runtime.sessions.values()))
        await wait_for(lambda: session.stats().frames_ingested >= 2, 60, "camera frames in the engine")
        await wait_for(
            lambda: int(attr("#stats-frames", "data-value") or 0) > 0, 30, "frame stats on the page"
        )

        def ask() -> None:
            browser.find_element(By.CSS_SELECTOR, "#question").send_keys(scenes.QUESTIONS[2])
            browser.find_element(By.CSS_SELECTOR, "#send").click()

        await asyncio.to_thread(ask)

        def status() -> str | None:
            answer = browser.find_element(By.CSS_SELECTOR, "#answer")
            return answer.find_element(By.XPATH, "..").get_attribute("data-status")

        await wait_for(lambda: status() in ("completed", "incomplete"), 90, "the streamed answer")
        answer = await asyncio.to_thread(lambda: browser.find_element(By.CSS_SELECTOR, "#answer").text)
        said = scenes.mentions(answer)
        assert said and said[0] == SHOWN, f"the page's answer must name the {SHOWN}: {answer!r}"
        assert session.stats().last_response_status in ("completed", "incomplete")
    finally:
        await asyncio.to_thread(browser.save_screenshot, str(artifacts / "client_web_engine.png"))
