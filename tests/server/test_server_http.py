"""The plain HTTP endpoints: health during and after the engine load, metrics, models, static files."""

from __future__ import annotations

import pytest
from fake_runtime import FakeRuntime

from runtime.server.app import ServerConfig

pytestmark = pytest.mark.timeout(60)


async def test_health_is_503_while_loading_then_200(serve) -> None:
    runtime = FakeRuntime(hold=True)
    served = await serve(runtime=runtime, wait=False)
    async with served.http.get(served.url + "/health") as reply:
        assert reply.status == 503
        body = await reply.json()
    assert body["status"] == "starting" and runtime.started
    runtime.gate.set()
    assert await served.server.wait_ready(5)
    async with served.http.get(served.url + "/health") as reply:
        assert reply.status == 200
        body = await reply.json()
    assert body["status"] == "ok" and body["model"] == "fake-vlm" and body["positions"] == "group-decoupled"
    assert body["sessions"] == 0 and body["max_sessions"] == 16
    await served.stop()
    assert runtime.closed


async def test_positions_are_the_checkpoints_own_once_started(serve) -> None:
    """``Runtime(positions=None)`` learns its scheme at start; the server must report that one."""
    runtime = FakeRuntime(trained_positions="sequential", hold=True)
    assert runtime.positions is None and runtime.settings.turn_tokens is None
    served = await serve(runtime=runtime, wait=False)
    runtime.gate.set()
    assert await served.server.wait_ready(5)
    assert runtime.positions == "sequential" and runtime.settings.turn_tokens == 3
    async with served.http.get(served.url + "/health") as reply:
        assert (await reply.json())["positions"] == "sequential"
    client = await served.connect()
    created = await client.recv()
    assert created["session"]["video"]["positions"] == "sequential"
    await client.close()


async def test_health_reports_a_failed_start(serve) -> None:
    served = await serve(runtime=FakeRuntime(fail_start=True), wait=False)
    assert not await served.server.wait_ready(5)
    async with served.http.get(served.url + "/health") as reply:
        assert reply.status == 503
        body = await reply.json()
    assert body["status"] == "error" and "no weights here" in body["error"]
    async with served.http.post(served.url + "/v1/realtime/calls", data="v=0\r\n") as reply:
        assert reply.status == 503
        assert (await reply.json())["error"]["code"] == "engine_unavailable"


async def test_metrics_exposes_every_family(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()
    await client.ask("hi")
    async with served.http.get(served.url + "/metrics") as reply:
        assert reply.status == 200 and reply.content_type == "text/plain"
        text = await reply.text()
    for name in (
        "speakwatch_sessions 1.0",
        "speakwatch_frames_received_total",
        "speakwatch_frames_sampled_total",
        "speakwatch_frames_ingested_total",
        "speakwatch_frames_dropped_total",
        "speakwatch_frame_lag_seconds_bucket",
        "speakwatch_ttft_seconds_count 1.0",
        "speakwatch_tokens_per_second_count 1.0",
        "speakwatch_rollovers_total",
        "speakwatch_kv_tokens 0.0",
        "speakwatch_engine_ready 1.0",
        "speakwatch_engine_sessions 1.0",
        'speakwatch_responses_total{status="completed"} 1.0',
        "speakwatch_output_tokens_total",
    ):
        assert name in text, name


async def test_models_list_shape_and_auth(serve) -> None:
    served = await serve(ServerConfig(api_key="k"))
    async with served.http.get(served.url + "/v1/models") as reply:
        assert reply.status == 401
        error = (await reply.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    async with served.http.get(served.url + "/v1/models", headers={"Authorization": "Bearer k"}) as reply:
        assert reply.status == 200
        body = await reply.json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert model["id"] == "fake-vlm" and model["object"] == "model" and model["owned_by"] == "speakwatch"
    assert isinstance(model["created"], int)
    # no key needed outside /v1
    async with served.http.get(served.url + "/health") as reply:
        assert reply.status == 200


async def test_static_files_and_clean_404(serve, tmp_path) -> None:
    (tmp_path / "index.html").write_text("<h1>speakwatch</h1>")
    (tmp_path / "app.js").write_text("console.log(1)")
    served = await serve(ServerConfig(static_dir=tmp_path / "web-missing"))
    async with served.http.get(served.url + "/") as reply:
        assert reply.status == 404
    served = await serve(ServerConfig(static_dir=tmp_path))
    async with served.http.get(served.url + "/") as reply:
        assert reply.status == 200 and "speakwatch" in await reply.text()
        assert reply.content_type == "text/html"
    async with served.http.get(served.url + "/app.js") as reply:
        assert reply.status == 200
    async with served.http.get(served.url + "/nope.css") as reply:
        assert reply.status == 404
    async with served.http.get(served.url + "/..%2F..%2Fetc%2Fpasswd") as reply:
        assert reply.status == 404


async def test_the_live_camera_page_is_served_by_default(serve) -> None:
    """The page ships with the server (runtime/server/web/, package data): no client package involved."""
    served = await serve()
    for path, kind in (("/", "text/html"), ("/app.js", "javascript"), ("/style.css", "text/css")):
        async with served.http.get(served.url + path) as reply:
            assert reply.status == 200 and kind in reply.content_type, path
    async with served.http.get(served.url + "/") as reply:
        page = await reply.text()
    assert "app.js" in page and "style.css" in page


async def test_realtime_without_upgrade_and_bad_calls(serve) -> None:
    served = await serve()
    async with served.http.get(served.url + "/v1/realtime") as reply:
        assert reply.status == 426
    async with served.http.post(served.url + "/v1/realtime/calls", data="hello") as reply:
        assert reply.status == 400
        assert (await reply.json())["error"]["code"] == "invalid_value"
    url = served.url + "/v1/realtime/calls?session_id=sess_nope"
    async with served.http.post(url, data="v=0\r\n", headers={"Content-Type": "application/sdp"}) as reply:
        assert reply.status == 404
    async with served.http.delete(served.url + "/v1/realtime/calls/rtc_nope") as reply:
        assert reply.status == 404
