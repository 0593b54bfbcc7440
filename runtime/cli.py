"""The ``speakwatch`` command: ``serve``, ``make-tiny-model`` and ``finetune``.

Every ``serve`` option can also come from the environment as ``SPEAKWATCH_<OPTION>`` (``--api-key`` is
``SPEAKWATCH_API_KEY``, ``--max-model-len`` is ``SPEAKWATCH_MAX_MODEL_LEN``); the command line wins.
The server listens before the engine has loaded (``/health`` answers 503 meanwhile), reports the load
as it goes and prints the URL once sessions can be opened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from runtime.admission import ADMISSIONS
from runtime.health import EXIT_ENGINE_FAILED, RestartPolicy
from runtime.wire import SCHEDULES
from streams.change import ChangeFilterSettings

ENV_PREFIX = "SPEAKWATCH_"
ARCHES = ("qwen2-vl", "qwen2.5-vl")
PROGRESS_EVERY = 10.0  # seconds between "still loading" lines


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _boolean(text: str) -> bool:
    """An environment variable's yes or no (the flag itself is --X / --no-X)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a yes or no: {text}")


def _levels(text: str) -> float:
    """A change threshold, checked where the filter checks it."""
    try:
        return ChangeFilterSettings(threshold=float(text)).threshold
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


def _origin(text: str) -> str:
    """A web origin for --allow-origin (scheme://host[:port]) or ``*``, checked where the server checks it."""
    from runtime.server.origins import ANY_ORIGIN, Origin

    if text.strip() == ANY_ORIGIN:
        return ANY_ORIGIN
    try:
        return str(Origin.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Repeated(argparse.Action):
    """A repeatable option whose flags replace the environment's list (the command line wins)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, values])


class _EnvDefaults:
    """Adds options whose default comes from ``SPEAKWATCH_<OPTION>`` (validated like the flag itself)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.errors: list[str] = []

    def add(
        self,
        flag: str,
        *,
        default: Any = None,
        type: Any = str,
        help: str,
        repeat: bool = False,
        **kwargs: Any,
    ) -> None:
        """``repeat``: the flag may be given many times; the variable is a comma-separated list."""
        env = _env_name(flag)
        raw = os.environ.get(env)
        value = default
        if repeat:
            kwargs["action"] = _Repeated
        if raw not in (None, ""):
            try:
                value = [type(part) for part in raw.split(",") if part.strip()] if repeat else type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                self.errors.append(f"{env}={raw!r}: {exc}")
            choices = kwargs.get("choices")
            if choices is not None and value not in choices:
                self.errors.append(f"{env}={raw!r}: choose from {', '.join(map(str, choices))}")
        shown = "" if default is None else f"; default {default}"
        self.parser.add_argument(flag, default=value, type=type, help=f"{help} (env {env}{shown})", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    import positional

    parser = argparse.ArgumentParser(
        prog="speakwatch", description="A self-hosted vision-language model that watches a video stream live."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the realtime server (WebSocket, WebRTC, demo page)")
    opt = _EnvDefaults(serve)
    opt.add(
        "--model",
        metavar="PATH",
        help="local Qwen2-VL / Qwen2.5-VL checkpoint; default: the built-in watching model",
    )
    opt.add("--arch", choices=ARCHES, help="serve a random-weight tiny model of this architecture instead")
    opt.add("--host", default="127.0.0.1", help="address to bind")
    opt.add("--port", type=_port, default=8000, help="TCP port (0 picks a free one)")
    opt.add("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/*")
    opt.add(
        "--allow-origin",
        metavar="URL",
        type=_origin,
        repeat=True,
        help="also let web pages of this origin (scheme://host[:port], repeatable; * for any) use /v1/*; "
        "browser requests from other origins than the server's own get 403",
    )
    opt.add(
        "--positions",
        choices=tuple(positional.SCHEMES),
        help="position scheme; default: the one the checkpoint was fine-tuned for (sequential if stock)",
    )
    opt.add("--schedule", choices=SCHEDULES, default="parallel", help="default schedule of new sessions")
    opt.add("--max-sessions", type=_positive(int), default=16, help="realtime sessions at once")
    opt.add(
        "--resume-grace",
        type=_non_negative_float,
        default=30.0,
        help="seconds a WebSocket session waits for its client to reconnect (?resume=TOKEN) after a lost "
        "socket, then it is closed; 0: never",
    )
    opt.add(
        "--admission",
        choices=ADMISSIONS,
        default="kv",
        help="kv: open a session only while the KV cache holds every open session's token budget; "
        "off: open every session (vLLM preempts one when the cache fills)",
    )
    opt.add(
        "--max-fps", type=_positive(float), help="frames per second a session accepts; faster ones dropped"
    )
    opt.add(
        "--change-filter",
        type=_boolean,
        default=True,
        action=argparse.BooleanOptionalAction,
        help="drop frames that show nothing new since the last one that went in (counted 'unchanged')",
    )
    opt.add(
        "--change-threshold",
        type=_levels,
        default=ChangeFilterSettings().threshold,
        help="levels (0-255) a region's colour must change, beyond the noise, to count as new",
    )
    opt.add(
        "--change-keepalive",
        type=_positive(float),
        default=ChangeFilterSettings().keepalive_s,
        help="seconds after which an unchanged frame still goes in",
    )
    opt.add(
        "--restart-attempts",
        type=_positive(int),
        default=RestartPolicy().attempts,
        help="times a dead engine is rebuilt before the server exits with status 70",
    )
    opt.add(
        "--restart-backoff",
        type=_positive(float),
        default=RestartPolicy().backoff_s,
        help="seconds before the first rebuild of a dead engine; each next attempt waits twice as long",
    )
    opt.add("--max-model-len", type=_positive(int), help="vLLM context length")
    opt.add("--kv-cache-gb", type=_positive(float), help="KV cache size in GiB")
    opt.add(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype; default: bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX), float32 on "
        "other CPUs, vLLM's auto on GPUs",
    )
    opt.add("--tensor-parallel-size", type=_positive(int), help="vLLM tensor parallel size")
    opt.add("--pipeline-parallel-size", type=_positive(int), help="vLLM pipeline parallel size")
    opt.add("--data-parallel-size", type=_positive(int), help="vLLM data parallel size")
    opt.add(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log verbosity"
    )
    serve.set_defaults(env_errors=opt.errors)

    from runtime.tiny_model import SIZES, VOCABS

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint (tests, demos)")
    tiny.add_argument("directory", metavar="DIR")
    tiny.add_argument("--arch", choices=ARCHES, default="qwen2-vl")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--vocab",
        choices=VOCABS,
        default="qwen",
        help="qwen: Qwen's special-token ids; task: a small vocabulary",
    )
    tiny.add_argument("--size", choices=tuple(SIZES), default="tiny", help="widths and depths")

    from runtime.training.cli import add_finetune_parser

    add_finetune_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``speakwatch`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["chat"]:  # the chat client is its own console script: runtime never imports client
        parser.error("the terminal chat is its own command: speakwatch-chat URL (or python -m client.chat)")
    args = parser.parse_args(argv)
    if args.command == "make-tiny-model":
        return make_tiny_model(args)
    if args.command == "finetune":
        from runtime.training.cli import run_finetune

        return run_finetune(args, parser)
    if args.env_errors:
        parser.error("; ".join(args.env_errors))
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


def make_tiny_model(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from runtime.tiny_model import make_tiny_model as make

    out = out or sys.stdout

    print(f"writing a tiny {args.arch} checkpoint to {args.directory} ...", file=out, flush=True)
    path = make(args.directory, arch=args.arch, seed=args.seed, vocab=args.vocab, size=args.size)
    print(f"done: {path}", file=out, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------


def runtime_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``Runtime(**...)`` from the serve options: engine options only when given (the engine's
    defaults otherwise); vLLM runs one request per session, so ``max_num_seqs`` follows the limit."""
    engine: dict[str, Any] = {
        "max_model_len": args.max_model_len,
        "kv_cache_gb": args.kv_cache_gb,
        "dtype": args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "data_parallel_size": args.data_parallel_size,
        "max_num_seqs": args.max_sessions,
    }
    kwargs: dict[str, Any] = {
        "arch": args.arch,
        "positions": args.positions,
        "schedule": args.schedule,
        "engine_options": {k: v for k, v in engine.items() if v is not None},
    }
    if args.max_fps is not None:
        kwargs["max_fps"] = args.max_fps
    kwargs["change_filter"] = change_filter(args)
    kwargs["admission"] = args.admission
    kwargs["restart_attempts"] = args.restart_attempts
    kwargs["restart_backoff_s"] = args.restart_backoff
    return kwargs


def change_filter(args: argparse.Namespace) -> ChangeFilterSettings:
    """The scene-change filter new sessions start with, from ``--[no-]change-filter`` and its two values."""
    return ChangeFilterSettings(args.change_filter, args.change_threshold, args.change_keepalive)


def server_config(args: argparse.Namespace) -> Any:
    from runtime.server.app import ServerConfig

    fps: dict[str, float] = {}
    if args.max_fps is not None:  # the cap, and the rate new sessions start with
        fps = {"max_fps": args.max_fps, "default_fps": args.max_fps}
    return ServerConfig(
        api_key=args.api_key or None,
        max_sessions=args.max_sessions,
        change_filter=change_filter(args),
        allow_origins=tuple(args.allow_origin or ()),
        resume_grace=args.resume_grace,
        **fps,
    )


def _say(message: str) -> None:
    print(f"speakwatch: {message}", file=sys.stderr, flush=True)


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    """Listen at once, load the engine in the background, run until SIGINT/SIGTERM (or ``stop``)."""
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from aiohttp import web

    from runtime import Runtime
    from runtime.server.app import SERVER, create_app

    runtime = Runtime(args.model, **runtime_kwargs(args))
    app = create_app(runtime, server_config(args))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0)
    await runner.setup()  # startup: the engine begins loading in the background
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        _say(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        await runner.cleanup()
        return 1
    port = runner.addresses[0][1] if runner.addresses else args.port
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if args.model:
        model = args.model
    elif args.arch:
        model = f"the random-weight tiny {args.arch} model (its answers are noise)"
    else:
        model = "the built-in watching model (tiny Qwen2-VL fine-tuned on the synthetic shapes task)"
    _say(f"listening on {url} (/health answers 503 until the engine is ready)")
    positions = args.positions or "the checkpoint's own"
    _say(f"loading {model}; positions {positions}, schedule {args.schedule}")

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    server = app[SERVER]
    status = 0
    try:
        started = time.monotonic()
        waiting = asyncio.create_task(server.wait_ready())
        stopping = asyncio.create_task(stop.wait())
        while not stop.is_set() and not waiting.done():
            await asyncio.wait(
                {waiting, stopping}, timeout=PROGRESS_EVERY, return_when=asyncio.FIRST_COMPLETED
            )
            if not waiting.done() and not stop.is_set():
                _say(f"still loading the engine ({time.monotonic() - started:.0f} s) ...")
        if waiting.done():
            if server.ready:
                _say(f"ready in {time.monotonic() - started:.1f} s: open {url}/")
                if runtime.dtype:
                    chosen = "asked for" if args.dtype else "chosen for this machine"
                    _say(f"engine dtype {runtime.dtype} ({chosen})")
                _say(
                    f"realtime API: ws://{url.removeprefix('http://')}/v1/realtime; metrics at {url}/metrics"
                )
                failing = asyncio.create_task(runtime.wait_failed())
                await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
                if failing.done() and not stop.is_set():
                    # a supervisor (systemd, Kubernetes, a shell loop) starts the server afresh
                    _say(
                        f"the engine died and could not be restarted ({failing.result()}): "
                        f"exiting with status {EXIT_ENGINE_FAILED}"
                    )
                    status = EXIT_ENGINE_FAILED
                failing.cancel()
            else:
                _say(f"the engine failed to start: {server.startup_error}")
                status = 1
        waiting.cancel()
        stopping.cancel()
    finally:
        _say("shutting down ...")
        await runner.cleanup()
        for sig in handled:
            loop.remove_signal_handler(sig)
        _say("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
