"""The ``speakwatch`` command: options and their environment fallbacks, and ``serve`` on the fake runtime."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from fake_runtime import FakeRuntime, eventually

import runtime
from runtime import cli

pytestmark = pytest.mark.timeout(60)


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_serve_defaults_env_fallbacks_and_precedence(monkeypatch) -> None:
    args = parse("serve")
    assert (args.host, args.port, args.api_key, args.model) == ("127.0.0.1", 8000, None, None)
    # no --arch: the built-in watching model; no --positions: the scheme the checkpoint was trained for
    assert (args.positions, args.schedule, args.max_sessions, args.arch) == (None, "parallel", 16, None)
    kwargs = cli.runtime_kwargs(args)
    assert (kwargs["arch"], kwargs["positions"]) == (None, None)
    monkeypatch.setenv("SPEAKWATCH_PORT", "9001")
    monkeypatch.setenv("SPEAKWATCH_API_KEY", "from-env")
    monkeypatch.setenv("SPEAKWATCH_KV_CACHE_GB", "2.5")
    monkeypatch.setenv("SPEAKWATCH_SCHEDULE", "sequential")
    args = parse("serve")
    assert (args.port, args.api_key, args.kv_cache_gb, args.schedule) == (9001, "from-env", 2.5, "sequential")
    args = parse("serve", "--port", "9002", "--api-key", "flag")
    assert (args.port, args.api_key) == (9002, "flag")


def test_bad_environment_values_are_usage_errors(monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPEAKWATCH_PORT", "eighty")
    monkeypatch.setenv("SPEAKWATCH_SCHEDULE", "whenever")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "SPEAKWATCH_PORT='eighty'" in err and "SPEAKWATCH_SCHEDULE='whenever'" in err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--max-fps", "0"])


def test_runtime_and_server_options() -> None:
    args = parse(
        "serve",
        "--model",
        "/models/qwen",
        "--max-model-len",
        "4096",
        "--tensor-parallel-size",
        "2",
        "--max-sessions",
        "4",
        "--max-fps",
        "5",
        "--arch",
        "qwen2.5-vl",
        "--positions",
        "group-decoupled",
    )
    kwargs = cli.runtime_kwargs(args)
    assert kwargs["engine_options"] == {"max_model_len": 4096, "tensor_parallel_size": 2, "max_num_seqs": 4}
    assert kwargs["arch"] == "qwen2.5-vl" and kwargs["max_fps"] == 5.0 and kwargs["schedule"] == "parallel"
    config = cli.server_config(args)
    assert (config.max_sessions, config.max_fps, config.default_fps, config.api_key) == (4, 5.0, 5.0, None)


def test_admission_option_reaches_the_runtime(monkeypatch) -> None:
    assert cli.runtime_kwargs(parse("serve"))["admission"] == "kv"
    assert cli.runtime_kwargs(parse("serve", "--admission", "off"))["admission"] == "off"
    monkeypatch.setenv("SPEAKWATCH_ADMISSION", "off")
    assert cli.runtime_kwargs(parse("serve"))["admission"] == "off"
    runtime.Runtime(**cli.runtime_kwargs(parse("serve"))).executor.shutdown()  # a RuntimeSettings field


def test_change_filter_options_reach_the_server_and_the_runtime(monkeypatch) -> None:
    from streams.change import ChangeFilterSettings

    default = ChangeFilterSettings()
    assert cli.server_config(parse("serve")).change_filter == default
    assert cli.runtime_kwargs(parse("serve"))["change_filter"] == default
    args = parse("serve", "--no-change-filter", "--change-threshold", "3.5", "--change-keepalive", "4")
    expected = ChangeFilterSettings(enabled=False, threshold=3.5, keepalive_s=4.0)
    assert cli.server_config(args).change_filter == expected
    assert cli.runtime_kwargs(args)["change_filter"] == expected
    monkeypatch.setenv("SPEAKWATCH_CHANGE_FILTER", "off")
    monkeypatch.setenv("SPEAKWATCH_CHANGE_THRESHOLD", "2")
    assert cli.server_config(parse("serve")).change_filter == ChangeFilterSettings(False, 2.0)
    assert cli.server_config(parse("serve", "--change-filter")).change_filter.enabled
    for bad in (("--change-threshold", "255"), ("--change-threshold", "-1"), ("--change-keepalive", "0")):
        with pytest.raises(SystemExit):
            parse("serve", *bad)


def test_make_tiny_model_delegates_and_chat_points_elsewhere(monkeypatch, tmp_path, capsys) -> None:
    made = []
    monkeypatch.setattr(
        "runtime.tiny_model.make_tiny_model",
        lambda d, arch, seed, **kw: made.append((d, arch, seed, kw)) or tmp_path,
    )
    assert cli.main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2.5-vl"]) == 0
    assert made == [(str(tmp_path / "m"), "qwen2.5-vl", 0, {"vocab": "qwen", "size": "tiny"})]
    assert cli.main(["make-tiny-model", str(tmp_path / "w"), "--vocab", "task", "--size", "watch"]) == 0
    assert made[-1] == (str(tmp_path / "w"), "qwen2-vl", 0, {"vocab": "task", "size": "watch"})
    assert "done" in capsys.readouterr().out

    # the terminal chat is the client's own console script (runtime never imports client)
    with pytest.raises(SystemExit) as exited:
        cli.main(["chat", "ws://x/v1/realtime"])
    assert exited.value.code == 2
    assert "speakwatch-chat URL" in capsys.readouterr().err


async def test_serve_listens_before_the_engine_is_ready(monkeypatch) -> None:
    fake = FakeRuntime(hold=True)
    built = []
    monkeypatch.setattr(
        runtime, "Runtime", lambda model, **kwargs: built.append((model, kwargs)) or fake, raising=False
    )
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.05)
    said: list[str] = []
    monkeypatch.setattr(cli, "_say", said.append)
    stop = asyncio.Event()
    serving = asyncio.create_task(cli.serve(parse("serve", "--port", "0", "--api-key", "k"), stop))
    url = (await eventually(lambda: [m for m in said if m.startswith("listening on ")]))[0].split()[2]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    ((model, kwargs),) = built
    assert model is None and kwargs["arch"] is None and kwargs["positions"] is None
    loading = next(m for m in said if m.startswith("loading "))
    assert "built-in watching model" in loading and "random" not in loading, loading
    assert "positions the checkpoint's own" in loading, loading
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/health") as reply:
            assert reply.status == 503
        await eventually(lambda: any("still loading" in m for m in said))
        fake.gate.set()
        await eventually(lambda: any(m.startswith("ready") for m in said))
        async with http.get(url + "/health") as reply:
            assert reply.status == 200
        async with http.get(url + "/v1/models") as reply:
            assert reply.status == 401
    stop.set()
    assert await asyncio.wait_for(serving, 10) == 0
    assert fake.closed and said[-1] == "stopped"


async def test_serve_exits_when_the_engine_fails(monkeypatch) -> None:
    fake = FakeRuntime(fail_start=True)
    built = []
    monkeypatch.setattr(
        runtime, "Runtime", lambda model, **kwargs: built.append((model, kwargs)) or fake, raising=False
    )
    said: list[str] = []
    monkeypatch.setattr(cli, "_say", said.append)
    args = parse("serve", "--port", "0", "--arch", "qwen2.5-vl", "--positions", "sequential")
    assert await asyncio.wait_for(cli.serve(args), 10) == 1
    assert any("failed to start" in m and "no weights here" in m for m in said)
    # --arch: the random-weight tiny checkpoint instead of the watching model, said as much
    assert built[0][1]["arch"] == "qwen2.5-vl" and built[0][1]["positions"] == "sequential"
    loading = next(m for m in said if m.startswith("loading "))
    assert "random-weight tiny qwen2.5-vl" in loading and "positions sequential" in loading, loading
