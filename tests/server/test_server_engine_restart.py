"""The server while the engine is dead, on the fake runtime: ``/health`` flips to 503 and back,
new sessions and questions get ``engine_unavailable`` with a retry hint (never a hang), ``/metrics``
counts deaths and restarts, and ``speakwatch serve`` exits 70 once the engine cannot come back."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from fake_runtime import FakeRuntime, eventually
from prometheus_client.parser import text_string_to_metric_families

import runtime
from runtime import cli
from runtime.health import EXIT_ENGINE_FAILED
from runtime.server.protocol import error_event
from runtime.wire import ErrorEvent

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def metrics(served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with served.http.get(served.url + "/metrics") as reply:
        return samples(await reply.text())


async def test_health_is_503_with_a_hint_while_the_engine_restarts_and_200_after(serve) -> None:
    served = await serve()
    async with served.http.get(served.url + "/health") as reply:
        assert reply.status == 200 and (await reply.json())["engine"]["state"] == "up"
    served.runtime.lose_engine("the engine core process EngineCore (pid 7) killed by SIGKILL", 4)
    async with served.http.get(served.url + "/health") as reply:
        body = await reply.json()
        assert reply.status == 503 and reply.headers["Retry-After"] == "4"
    assert body["status"] == "restarting" and "SIGKILL" in body["error"]
    assert body["engine"]["failures"] == 1 and body["engine"]["retry_after_s"] == 4
    served.runtime.restore_engine()
    async with served.http.get(served.url + "/health") as reply:
        body = await reply.json()
        assert reply.status == 200 and "Retry-After" not in reply.headers
    assert body["status"] == "ok" and body["engine"]["restarts"] == 1


async def test_a_failed_engine_is_503_without_a_hint(serve) -> None:
    served = await serve()
    served.runtime.fail_engine("restart attempt 3 failed: RuntimeError: no memory")
    async with served.http.get(served.url + "/health") as reply:
        body = await reply.json()
        assert reply.status == 503 and "Retry-After" not in reply.headers
    assert body["status"] == "failed" and "could not be restarted" in body["error"]


async def test_new_sessions_and_calls_are_refused_with_the_hint(serve) -> None:
    served = await serve()
    served.runtime.lose_engine(retry_after_s=5)
    client = await served.connect()
    event = await client.recv()
    assert event["type"] == "error" and event["error"]["code"] == "engine_unavailable"
    assert event["error"]["type"] == "server_error" and event["error"]["retry_after_s"] == 5
    message = await client.ws.receive(5)
    assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1013
    assert served.runtime.sessions == [], "no session was opened on the dead engine"
    offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n"
    async with served.http.post(served.url + "/v1/realtime/calls", data=offer) as reply:
        assert reply.status == 503 and reply.headers["Retry-After"] == "5"
        assert (await reply.json())["error"]["code"] == "engine_unavailable"
    async with served.http.post(served.url + "/v1/realtime/client_secrets", json={}) as reply:
        assert reply.status == 503 and reply.headers["Retry-After"] == "5"


async def test_a_question_on_an_open_session_gets_the_hint_and_the_session_goes_on(serve) -> None:
    served = await serve()
    client = await served.connect()
    assert (await client.recv())["type"] == "session.created"
    served.runtime.lose_engine(retry_after_s=2)
    served.runtime.fail_asks = True  # what a Session does while its runtime's engine is down
    await client.send({"type": "response.create"})
    events = await client.until("response.done", 5)
    error = next(e for e in events if e["type"] == "error")
    assert error["error"]["code"] == "engine_unavailable" and error["error"]["retry_after_s"] == 2
    assert events[-1]["response"]["status"] == "failed"
    served.runtime.fail_asks = False
    served.runtime.restore_engine()
    text, done = await client.ask("Are you back?", timeout=5)
    assert done["response"]["status"] == "completed" and "Are you back?" in text


async def test_metrics_count_deaths_and_restarts(serve) -> None:
    served = await serve()
    seen = await metrics(served)
    assert seen[("speakwatch_engine_up", ())] == 1.0
    assert seen[("speakwatch_engine_state", (("state", "up"),))] == 1.0
    assert seen[("speakwatch_engine_restarts_total", ())] == 0.0
    served.runtime.lose_engine("killed by SIGKILL")
    seen = await metrics(served)
    assert seen[("speakwatch_engine_up", ())] == 0.0 and seen[("speakwatch_engine_ready", ())] == 0.0
    assert seen[("speakwatch_engine_state", (("state", "restarting"),))] == 1.0
    assert seen[("speakwatch_engine_failures_total", ())] == 1.0
    assert seen[("speakwatch_engine_last_failure_info", (("reason", "killed by SIGKILL"),))] == 1.0
    served.runtime.restore_engine()
    seen = await metrics(served)
    assert seen[("speakwatch_engine_up", ())] == 1.0
    assert seen[("speakwatch_engine_restarts_total", ())] == 1.0
    assert seen[("speakwatch_engine_restart_attempts_total", ())] == 1.0
    assert seen[("speakwatch_engine_last_restart_seconds", ())] == 2.5


async def test_serve_exits_70_when_the_engine_cannot_be_restarted(monkeypatch) -> None:
    fake = FakeRuntime()
    monkeypatch.setattr(runtime, "Runtime", lambda model, **kwargs: fake, raising=False)
    said: list[str] = []
    monkeypatch.setattr(cli, "_say", said.append)
    serving = asyncio.create_task(cli.serve(cli.build_parser().parse_args(["serve", "--port", "0"])))
    await eventually(lambda: any(m.startswith("ready") for m in said))
    fake.fail_engine("restart attempt 3 failed: RuntimeError: no memory")
    assert await asyncio.wait_for(serving, 10) == EXIT_ENGINE_FAILED == 70
    assert any("could not be restarted" in m and "exiting with status 70" in m for m in said), said
    assert fake.closed and said[-1] == "stopped"


def test_restart_options_reach_the_runtime(monkeypatch) -> None:
    parse = cli.build_parser().parse_args
    kwargs = cli.runtime_kwargs(parse(["serve"]))
    assert (kwargs["restart_attempts"], kwargs["restart_backoff_s"]) == (3, 1.0)
    kwargs = cli.runtime_kwargs(parse(["serve", "--restart-attempts", "5", "--restart-backoff", "0.5"]))
    assert (kwargs["restart_attempts"], kwargs["restart_backoff_s"]) == (5, 0.5)
    monkeypatch.setenv("SPEAKWATCH_RESTART_ATTEMPTS", "2")  # read when the parser is built
    assert cli.runtime_kwargs(cli.build_parser().parse_args(["serve"]))["restart_attempts"] == 2
    built = runtime.Runtime(**cli.runtime_kwargs(parse(["serve", "--restart-backoff", "0.5"])))
    assert built.settings.restart_policy.delays() == (0.5, 1.0, 2.0)
    built.executor.shutdown()
    with pytest.raises(SystemExit):
        parse(["serve", "--restart-attempts", "0"])


def test_the_retry_hint_crosses_the_wire_only_when_there_is_one() -> None:
    hinted = error_event("engine_unavailable", "restarting", retry_after_s=7).encode()
    assert hinted["error"]["retry_after_s"] == 7 and hinted["error"]["type"] == "server_error"
    assert ErrorEvent.decode(hinted).error.retry_after_s == 7
    plain = error_event("engine_unavailable", "loading").encode()
    assert "retry_after_s" not in plain["error"] and ErrorEvent.decode(plain).error.retry_after_s is None
    hinted["error"]["retry_after_s"] = "soon"  # a bad value from a server is dropped, not trusted
    assert ErrorEvent.decode(hinted).error.retry_after_s is None
