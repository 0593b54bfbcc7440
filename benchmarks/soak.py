"""Constant memory soak: a simulated 2-hour camera stream at 2 fps, accelerated, with questions sprinkled in.

One `Runtime` (the built-in tiny random-weight Qwen2-VL unless ``--model``) and one session receive
``hours * 3600 * fps`` small synthetic frames with stream timestamps 0, 0.5, 1.0, ... s. The stream is
*accelerated* in drain mode: each frame is pushed as soon as the previous one is in the model's KV
(``frames_ingested`` grew), so nothing is ever dropped and every step is timed alone. Every
``--question-every`` simulated minutes the session is asked a question (``max_tokens=16``) without
pausing the stream: the answer is generated while the following frames are ingested (parallel schedule).

Measured per step (one frame pushed -> in the live request): step latency (wall time from `push_frame`
to the session reporting it ingested, polled every ms), and the live request's tokens
(``stats().session_tokens``). Every ``--sample-every`` steps: RSS of this process and of its child
processes (the vLLM engine core runs in one), memory-state bytes, rollovers. Reported: medians over the
first and last quarter of the stream and their ratio, slope and max/min, PASS/FAIL against the targets
(RSS and step latency within 10% first vs last quarter, live-request tokens never above the budget,
constant memory state, every question answered, no frame dropped). Plot: docs/img/soak.png.

Start the engine under the shared lock on a shared machine:

    flock /tmp/speakwatch-engine.lock python benchmarks/soak.py              # 2 h simulated (14,400 frames)
    flock /tmp/speakwatch-engine.lock python benchmarks/soak.py --hours 1
    flock /tmp/speakwatch-engine.lock python benchmarks/soak.py --quick      # 6 simulated minutes, smoke run

Progress goes to stderr; the result table is printed last (stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from progress import log  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from runtime import ChangeFilterSettings, Runtime  # noqa: E402
from runtime.wire import SessionStats  # noqa: E402

QUESTIONS = [
    "What is happening right now?",
    "What did you see at the start of the stream?",
    "Has the scene changed in the last minute?",
    "Describe the moving square.",
    "What colour is the background?",
    "Summarise the last ten minutes.",
]
QUESTION_TOKENS = 16
STEP_TIMEOUT_S = 120.0  # one frame not ingested in this long: the session is stuck, stop
MB = 1024 * 1024


# -- the synthetic camera ------------------------------------------------------------------------


class Scene:
    """A cheap, deterministic scene: a gradient background that changes every few simulated minutes and
    a square that moves across it, plus a little sensor noise (so consecutive frames differ)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        self.base = np.stack([xx, yy, 1.0 - xx], axis=-1)

    def frame(self, t: float) -> np.ndarray:
        scene = int(t // 240.0)  # a new background every 4 simulated minutes
        tint = np.array([(scene * 53) % 256, (scene * 97) % 256, (scene * 29) % 256], np.float32) / 255.0
        img = 0.6 * self.base + 0.4 * tint
        side = max(self.size // 4, 2)
        span = self.size - side
        x = int((t * 3.0) % (2 * span))
        x = x if x < span else 2 * span - x
        y = int((np.sin(t / 7.0) * 0.5 + 0.5) * span)
        img[y : y + side, x : x + side] = (1.0, 0.9, 0.1)
        img = img * 255.0 + self.rng.normal(0.0, 4.0, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)


# -- measurement ----------------------------------------------------------------------------------


def tree_rss() -> tuple[int, int]:
    """(RSS of this process, summed RSS of all its descendants: the vLLM engine core and helpers)."""
    me = psutil.Process()
    own = me.memory_info().rss
    children = 0
    for child in me.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:
            pass
    return own, children


@dataclass
class Sample:
    step: int
    sim_s: float
    wall_s: float
    rss_main: int
    rss_engine: int
    memory_bytes: int
    rollovers: int
    session_tokens: int
    max_request_tokens: int

    @property
    def rss_total(self) -> int:
        return self.rss_main + self.rss_engine


@dataclass
class Asked:
    step: int
    sim_s: float
    question: str
    status: str = "?"
    text: str = ""
    ttft_ms: float | None = None
    output_tokens: int = 0


@dataclass
class Run:
    hours: float
    fps: float
    frames: int
    frame_size: int
    tokens_per_frame: int
    budget: int
    max_model_len: int
    window_steps: int
    dialogue_turns: int
    engine_start_s: float = 0.0
    stream_wall_s: float = 0.0
    step_latency_ms: list[float] = field(default_factory=list)
    session_lag_ms: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_rollovers: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    questions: list[Asked] = field(default_factory=list)
    final_stats: SessionStats | None = None


async def soak(args: argparse.Namespace) -> Run:
    frames = round(args.hours * 3600 * args.fps)
    interval = 1.0 / args.fps
    question_every = max(1, round(args.question_every * 60 * args.fps))  # in steps
    rt = Runtime(
        args.model,
        arch=None if args.model else "qwen2-vl",  # the random-weight tiny model, as in the runs reported
        positions=None if args.model else "group-decoupled",
        engine_options={"dtype": "float32", "max_model_len": args.max_model_len, "kv_cache_gb": 1.0},
        budget_tokens=args.budget,
        window_steps=args.window,
        dialogue_turns=args.dialogue,
        max_fps=args.fps,  # stream timestamps are exactly 1/fps apart: the cap drops nothing
        pixel_budget=args.pixel_budget,
        memory=None,  # the defaults for the model's width
        # each step measures one frame's ingest: the slowly moving square must go in every time
        change_filter=ChangeFilterSettings(enabled=False),
    )
    scene = Scene(args.size)
    log(f"starting the engine ({args.model or 'built-in tiny qwen2-vl'}, max_model_len {args.max_model_len})")
    started = time.monotonic()
    await rt.start()
    engine_start = time.monotonic() - started
    log(f"engine ready in {engine_start:.1f} s")
    embeds, _ = rt.encoder.encode([[scene.frame(0.0)]])[0]
    run = Run(
        hours=args.hours,
        fps=args.fps,
        frames=frames,
        frame_size=args.size,
        tokens_per_frame=int(embeds.shape[0]),
        budget=rt.budget_tokens,
        max_model_len=args.max_model_len,
        window_steps=args.window,
        dialogue_turns=args.dialogue,
        engine_start_s=engine_start,
    )
    try:
        async with rt.open_session(instructions="You watch a camera. Answer briefly.") as session:
            await _stream(run, session, scene, frames, interval, question_every, args.sample_every)
    finally:
        await rt.close()
    return run


async def _stream(
    run: Run, session, scene: Scene, frames: int, interval: float, question_every: int, sample_every: int
) -> None:
    counters = session.counters
    pending: tuple[Asked, object, asyncio.Task] | None = None

    async def settle(item: tuple[Asked, object, asyncio.Task]) -> None:
        asked, response, reader = item
        try:
            asked.text = await asyncio.wait_for(reader, STEP_TIMEOUT_S)
        except Exception as exc:  # recorded as a failure, not raised: the soak goes on
            asked.text = f"<{type(exc).__name__}: {exc}>"
        asked.status = response.status
        asked.ttft_ms = response.ttft_ms
        asked.output_tokens = response.usage["output_tokens"]

    def sample(step: int) -> None:
        own, children = tree_rss()
        stats = session.stats()
        run.samples.append(
            Sample(
                step=step,
                sim_s=step * interval,
                wall_s=time.monotonic() - t0,
                rss_main=own,
                rss_engine=children,
                memory_bytes=stats.memory_state_bytes,
                rollovers=stats.rollovers,
                session_tokens=stats.session_tokens,
                max_request_tokens=stats.max_request_tokens,
            )
        )

    t0 = time.monotonic()
    last_log, last_step = t0, 0
    for step in range(frames):
        ts = step * interval
        if step and step % question_every == 0:  # a question, asked while the stream goes on
            if pending is not None:
                await settle(pending)
            text = QUESTIONS[len(run.questions) % len(QUESTIONS)]
            asked = Asked(step, ts, text)
            run.questions.append(asked)
            response = session.ask(text, max_tokens=QUESTION_TOKENS)
            pending = (asked, response, asyncio.ensure_future(response.read()))
        frame = scene.frame(ts)
        done_before = settled(session)
        pushed_at = time.perf_counter()
        accepted = await session.push_frame(frame, timestamp=ts)
        if accepted:
            deadline = pushed_at + STEP_TIMEOUT_S
            while settled(session) <= done_before:
                if time.perf_counter() > deadline:
                    raise RuntimeError(
                        f"frame {step} not ingested within {STEP_TIMEOUT_S} s: {session.stats()}"
                    )
                await asyncio.sleep(0.001)
        run.step_latency_ms.append((time.perf_counter() - pushed_at) * 1000)
        run.session_lag_ms.append(counters.lags_ms[-1] if counters.lags_ms else float("nan"))
        run.step_tokens.append(session.request_tokens)
        run.step_rollovers.append(counters.rollovers)
        if step % sample_every == 0 or step == frames - 1:
            sample(step)
        now = time.monotonic()
        if now - last_log >= 20.0 or step == frames - 1:
            s = run.samples[-1]
            log(
                f"sim {ts / 60:6.1f} min  step {step + 1}/{frames}  "
                f"{(step - last_step) / (now - last_log):5.1f} steps/s  rollovers {counters.rollovers}  "
                f"tokens {session.request_tokens}/{run.budget}  RSS main {s.rss_main / MB:.0f} MB "
                f"engine {s.rss_engine / MB:.0f} MB  questions {len(run.questions)}"
            )
            last_log, last_step = now, step
    if pending is not None:
        await settle(pending)
    run.stream_wall_s = time.monotonic() - t0
    run.final_stats = session.stats()


def settled(session) -> int:
    """Frames that reached the model or were dropped."""
    stats = session.stats()
    return stats.frames_ingested + stats.frames_dropped


# -- results -------------------------------------------------------------------------------------


def quarters(values: list[float]) -> tuple[float, float]:
    n = len(values)
    q = max(n // 4, 1)
    return statistics.median(values[:q]), statistics.median(values[n - q :])


def sample_quarters(run: Run, key) -> tuple[float, float]:
    """Medians over samples whose step lies in the first / last quarter of the stream."""
    n = run.frames
    first = [key(s) for s in run.samples if s.step < n / 4]
    last = [key(s) for s in run.samples if s.step >= 3 * n / 4]
    return statistics.median(first or [key(run.samples[0])]), statistics.median(
        last or [key(run.samples[-1])]
    )


def slope_per_hour(xs_s: list[float], ys: list[float]) -> float:
    if len(xs_s) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(xs_s) / 3600.0, np.asarray(ys, dtype=np.float64), 1)[0])


def report(run: Run) -> bool:
    stats = run.final_stats
    assert stats is not None, "a finished run has its session's final stats"
    rows: list[tuple[str, str, str, str, str]] = []
    checks: list[tuple[str, bool, str]] = []

    def row(name: str, first: float, last: float, unit: str, fmt: str = "{:.1f}") -> float:
        ratio = last / first if first else float("nan")
        rows.append((name, fmt.format(first) + unit, fmt.format(last) + unit, f"{ratio:.3f}", ""))
        return ratio

    sims = [s.sim_s for s in run.samples]
    rss_f, rss_l = sample_quarters(run, lambda s: s.rss_total / MB)
    rss_ratio = row("RSS total (main + engine)", rss_f, rss_l, " MB")
    row("  RSS main process", *sample_quarters(run, lambda s: s.rss_main / MB), " MB")
    row("  RSS engine processes", *sample_quarters(run, lambda s: s.rss_engine / MB), " MB")
    lat_f, lat_l = quarters(run.step_latency_ms)
    lat_ratio = row("step latency p50 (push -> in KV)", lat_f, lat_l, " ms")
    lag = [x for x in run.session_lag_ms if x == x]
    if lag:
        row("  session frame lag p50", *quarters(lag), " ms")
    p95 = [float(np.percentile(part, 95)) for part in _quarter_parts(run.step_latency_ms)]
    row("  step latency p95", p95[0], p95[1], " ms")
    mem_f, mem_l = sample_quarters(run, lambda s: s.memory_bytes)
    mem_ratio = row("memory state", mem_f, mem_l, " B", "{:.0f}")
    tok_first, tok_last = _quarter_parts([float(t) for t in run.step_tokens])
    row(
        "live-request tokens p50 (sawtooth)",
        statistics.median(tok_first),
        statistics.median(tok_last),
        "",
        "{:.0f}",
    )
    row("live-request tokens max", max(tok_first), max(tok_last), "", "{:.0f}")
    rolls = run.step_rollovers
    q = max(len(rolls) // 4, 1)
    row(
        "rollovers per quarter",
        float(rolls[q - 1]),
        float(rolls[-1] - rolls[len(rolls) - q - 1]),
        "",
        "{:.0f}",
    )

    mem_values = {s.memory_bytes for s in run.samples[1:]}  # sample 0 may precede the first write
    max_tokens_seen = max(run.step_tokens + [s.session_tokens for s in run.samples])
    answered = [a for a in run.questions if a.status in ("completed", "incomplete")]
    checks.append(
        ("RSS total within 10% (last/first quarter)", abs(rss_ratio - 1) <= 0.10, f"{rss_ratio:.3f}")
    )
    checks.append(
        ("step latency p50 within 10% (last/first quarter)", abs(lat_ratio - 1) <= 0.10, f"{lat_ratio:.3f}")
    )
    checks.append(
        (
            "live-request tokens never above budget",
            stats.max_request_tokens <= run.budget and max_tokens_seen <= run.budget,
            f"max_request_tokens {stats.max_request_tokens}, max sampled {max_tokens_seen}, "
            f"budget {run.budget}",
        )
    )
    checks.append(
        ("memory state constant", len(mem_values) <= 1 and mem_ratio == 1.0, f"{sorted(mem_values)} B")
    )
    checks.append(
        (
            "every question answered (completed/incomplete)",
            len(answered) == len(run.questions),
            f"{len(answered)}/{len(run.questions)}",
        )
    )
    checks.append(
        (
            "no frame dropped",
            stats.frames_dropped == 0 and stats.frames_ingested == run.frames,
            f"ingested {stats.frames_ingested}/{run.frames}, dropped {stats.frames_dropped}",
        )
    )

    rss = [s.rss_total / MB for s in run.samples]
    rolled = [lat for i, lat in enumerate(run.step_latency_ms) if i and rolls[i] != rolls[i - 1]]
    plain = [lat for i, lat in enumerate(run.step_latency_ms) if i and rolls[i] == rolls[i - 1]]
    ttfts = [a.ttft_ms for a in run.questions if a.ttft_ms is not None]

    print()
    print(
        f"soak: {run.hours:g} h simulated at {run.fps:g} fps = {run.frames} frames of {run.frame_size}x"
        f"{run.frame_size} ({run.tokens_per_frame} visual tokens each), budget {run.budget} tokens "
        f"(max_model_len {run.max_model_len}), window {run.window_steps} steps, dialogue {run.dialogue_turns}"
    )
    print(
        f"engine start {run.engine_start_s:.0f} s; stream {run.stream_wall_s:.0f} s wall "
        f"({run.frames / max(run.stream_wall_s, 1e-9):.1f} steps/s, "
        f"{run.frames / run.fps / max(run.stream_wall_s, 1e-9):.0f}x real time), "
        "drain mode (one frame in flight)"
    )
    print(
        f"rollovers {stats.rollovers} (one every {run.frames / max(stats.rollovers, 1):.0f} frames); "
        f"requests started {stats.requests_started}; turns {stats.turns}"
    )
    print(
        f"RSS total: min {min(rss):.0f} MB, max {max(rss):.0f} MB, max/min {max(rss) / min(rss):.3f}, "
        f"slope {slope_per_hour(sims, rss):+.1f} MB per simulated hour"
    )
    if rolled and plain:
        print(
            f"step latency p50: ordinary steps {statistics.median(plain):.1f} ms, "
            f"rollover steps {statistics.median(rolled):.1f} ms ({len(rolled)} rollover steps)"
        )
    print(
        f"questions: {len(run.questions)}, one every {run.questions[1].sim_s - run.questions[0].sim_s:.0f} s "
        f"of stream, statuses {_count(a.status for a in run.questions)}, TTFT p50 "
        f"{statistics.median(ttfts):.0f} ms"
        if len(run.questions) > 1 and ttfts
        else f"questions: {len(run.questions)}, statuses {_count(a.status for a in run.questions)}"
    )
    print()
    widths = [
        max(len(r[i]) for r in [("metric", "first quarter", "last quarter", "last/first", ""), *rows])
        for i in range(4)
    ]
    header = ("metric", "first quarter", "last quarter", "last/first")
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r[:4], widths, strict=True))
            )
        )
    print()
    ok = True
    for name, passed, detail in checks:
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
    return ok


def _quarter_parts(values: list[float]) -> tuple[list[float], list[float]]:
    q = max(len(values) // 4, 1)
    return values[:q], values[len(values) - q :]


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = np.arange(run.frames) / run.fps / 60.0
    sim_min = np.array([s.sim_s for s in run.samples]) / 60.0
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(sim_min, [s.rss_total / MB for s in run.samples], label="total")
    ax.plot(sim_min, [s.rss_main / MB for s in run.samples], label="main process (runtime, encoder)")
    ax.plot(sim_min, [s.rss_engine / MB for s in run.samples], label="engine processes (vLLM core)")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(
        f"soak: {run.hours:g} h at {run.fps:g} fps ({run.frames} frames), accelerated; "
        f"{run.final_stats.rollovers if run.final_stats else 0} rollovers"
    )
    ax = axes[1]
    ax.plot(minutes, run.step_tokens, lw=0.5, label="live-request tokens")
    ax.axhline(run.budget, color="red", ls="--", label=f"budget {run.budget}")
    ax.set_ylabel("tokens")
    ax.set_ylim(0, run.budget * 1.15)
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    lat = np.asarray(run.step_latency_ms)
    ax.plot(minutes, lat, ".", ms=1.0, alpha=0.3, color="tab:blue", label="per step")
    k = max(run.frames // 200, 1)
    if len(lat) >= k:
        smooth = np.convolve(lat, np.ones(k) / k, mode="valid")  # a running mean, for the trend
        ax.plot(minutes[k - 1 :], smooth, color="black", lw=1.0, label=f"running mean ({k} steps)")
    for asked in run.questions:
        ax.axvline(asked.sim_s / 60.0, color="green", lw=0.5, alpha=0.5)
    ax.set_ylabel("step latency (ms)")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8, title="green: questions", title_fontsize=8)
    ax = axes[3]
    ax.plot(sim_min, [s.memory_bytes for s in run.samples], drawstyle="steps-post")
    ax.set_ylabel("memory state (bytes)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("simulated stream time (min)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(path: Path) -> Run:
    data = json.loads(path.read_text())
    data["samples"] = [Sample(**s) for s in data["samples"]]
    data["questions"] = [Asked(**q) for q in data["questions"]]
    if data.get("final_stats") is not None:
        data["final_stats"] = SessionStats.from_dict(data["final_stats"])
    return Run(**data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=2.0, help="simulated stream length (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.1 h, a question every 2 min")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=56, help="frame side in pixels (56: 4 visual tokens)")
    parser.add_argument("--pixel-budget", type=int, default=None)
    parser.add_argument("--budget", type=int, default=1024, help="live-request token budget")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--window", type=int, default=8, help="visual steps carried over a rollover")
    parser.add_argument("--dialogue", type=int, default=4, help="question/answer pairs carried over")
    parser.add_argument("--question-every", type=float, default=10.0, help="simulated minutes")
    parser.add_argument("--sample-every", type=int, default=50, help="steps between RSS samples")
    parser.add_argument(
        "--model", default=None, help="checkpoint directory (default: the built-in tiny model)"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "soak.png")
    parser.add_argument("--json", type=Path, default=None, help="write the raw series here")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="no run: report and plot a series saved with --json"
    )
    args = parser.parse_args()
    if args.quick:
        args.hours, args.question_every = 0.1, 2.0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run = load(args.from_json) if args.from_json else asyncio.run(soak(args))
    plot(run, args.plot)
    log(f"plot written to {args.plot}")
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(run)
        args.json.write_text(json.dumps(data, default=str))
        log(f"raw series written to {args.json}")
    ok = report(run)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
