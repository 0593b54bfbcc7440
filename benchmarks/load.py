"""Many cameras on one engine: N sessions, each a 2 fps camera with a question every 5 s (issue 13).

Every other benchmark measures one session, but a deployment puts several cameras on one engine, and
what breaks first there is latency that climbs with users and one session that starves the others.
This script runs N = 1, 2, 4, 8 sessions (``--ns``) on one `Runtime` (the built-in watching model,
the runtime's defaults: dtype, executor, rate cap, change filter), one phase per N, each phase for
the same fixed time (``--seconds``). Frames go in through the embedded SDK (`Session.push_frame`),
so this measures the runtime and the engine, not the WebSocket.

Per session, all on one asyncio loop, concurrently:

* a camera: a moving synthetic scene (`scenes.random_clip`, its own seed per session, 320x240),
  one frame every 1/fps s on a fixed schedule (its phase random per session), pushed on time even
  while answers stream (how late each push was is reported);
* a questioner: one question every ``--interval`` s (its phase random per session), cycling through
  the task's questions (`scenes.QUESTIONS`) and the running commentary (`scenes.COMMENTARY`), each
  answer capped at ``--max-tokens`` and read as it streams; a question whose time comes while the
  previous answer still runs waits for it (counted as late).

Reported per N, overall and per session: aggregate answer tokens/s (answer tokens produced inside the
window / window), TTFT p50/p95 (this client: from `ask` to the first text delta), decode tokens/s
per answer, frame lag p50/p95 (`SessionStats`: a frame's arrival until its chunk went to vLLM), drops
by reason and whether every frame is accounted for (after the window the cameras stop and the
sessions drain: pushed = received = ingested + dropped, nothing pending), and server CPU-seconds per
minute (this process plus the engine's child processes, psutil). Ratios are against N = 1, with the
issue's targets at the largest N: tokens/s >= 4x and TTFT p95 <= 3x.

The engine's KV cache is sized for exactly ``--capacity`` sessions' budgets (default: the largest N),
so admission by KV (`Runtime.open_session`, `SessionLimitReached`) is exercised: a phase ``N full``
repeats the largest N while one more session tries to open every ``--knock-s`` s. Each attempt must
be refused at once (how long the refusal took is reported) and the admitted sessions' numbers are
compared with the plain phase at the same N: does a refused session slow anyone down? With
``--busy`` (on by default) a last phase repeats the largest N with session 0 flooding the engine
(a 30 fps camera, commentary after commentary at the runtime's longest answer), again compared
with the plain phase: does one busy session starve the rest?

    .venv/bin/python benchmarks/load.py                    # N = 1, 2, 4, 8 for 60 s each, then busy
    .venv/bin/python benchmarks/load.py --quick            # N = 1, 2 for 12 s each, then busy (smoke)
    .venv/bin/python benchmarks/load.py --seconds 90 --json /tmp/load.json
    .venv/bin/python benchmarks/load.py --ns 1,8 --back-to-back --no-busy   # decode batching
    .venv/bin/python benchmarks/load.py --ns 8 --executor mp --dtype float32 # the old engine settings

Progress goes to stderr; the tables to stdout. It holds ``flock /tmp/speakwatch-engine.lock`` for the
run (``--lock ''`` when already wrapped in flock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.progress import CpuClock, log, take_lock  # noqa: E402
from runtime.errors import SessionLimitReached  # noqa: E402
from runtime.training import scenes  # noqa: E402

if TYPE_CHECKING:
    from runtime import Response, Runtime, Session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 13  # session i's clip and phases come from default_rng([SEED, i]): the same in every phase
HEIGHT, WIDTH = 240, 320
ASKED = (*scenes.QUESTIONS, scenes.COMMENTARY)  # session i starts at ASKED[i % 4], then cycles
BUSY_FPS = 30.0  # the busy session's camera (the rate cap keeps 2 fps of it)
CPU_BLOCK_SIZE = 128  # vLLM's KV block on CPU (the engine's own figure is checked after start)
DRAIN_S = 30.0  # after the window: longest wait for answers to end and frames to settle


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


class Clips:
    """Session i's frames, rendered once before the first phase that needs them (not timed)."""

    def __init__(self) -> None:
        self.frames: dict[int, list[np.ndarray]] = {}

    def ensure(self, sessions: int, count: int) -> None:
        for i in range(sessions):
            if len(self.frames.get(i, ())) < count:
                clip = scenes.random_clip(np.random.default_rng([SEED, i]), count, height=HEIGHT, width=WIDTH)
                self.frames[i] = clip.frames()

    def __call__(self, i: int, k: int) -> np.ndarray:
        frames = self.frames[i]
        return frames[k % len(frames)]


@dataclass
class SessionResult:
    """One session's numbers in one phase."""

    index: int
    busy: bool
    pushed: int = 0  # push_frame calls
    push_late_ms: list[float] = field(default_factory=list)  # how late each push was against its schedule
    received: int = 0
    ingested: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    pending: int = 0  # after the drain: received - ingested - dropped
    ingested_in_window: int = 0
    lag_p50_ms: float | None = None
    lag_p95_ms: float | None = None
    lags_ms: list[float] = field(default_factory=list)
    asked: int = 0
    late_questions: int = 0  # asked more than 0.5 s after their time (the previous answer still ran)
    ask_late_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    runtime_ttft_ms: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)  # per answer, the runtime's tokens_per_s
    tokens_in_window: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # a few (question, answer) pairs, to see sense
    errors: list[str] = field(default_factory=list)  # answers that failed
    rollovers: int = 0
    max_request_tokens: int = 0

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    @property
    def accounted(self) -> bool:
        return self.pushed == self.received == self.ingested + self.dropped and self.pending == 0


@dataclass
class Phase:
    """One N: the sessions that were admitted, the refusals, CPU over the window."""

    label: str
    n: int
    busy: bool
    knocking: bool = False  # one more session tried to open every --knock-s s during the window
    seconds: float = 0.0
    refused: list[str] = field(default_factory=list)
    refusal_ms: list[float] = field(default_factory=list)  # how long each refused open_session took
    admitted_past_capacity: int = 0  # knocks that were let in (closed at once): admission failed
    sessions: list[SessionResult] = field(default_factory=list)
    own_cpu_s: float = 0.0
    engine_cpu_s: float = 0.0
    load_avg: float = 0.0

    @property
    def admitted(self) -> int:
        return len(self.sessions)

    def calm(self) -> list[SessionResult]:
        """The sessions with the ordinary load (all but the busy one)."""
        return [s for s in self.sessions if not s.busy]

    def tokens_per_s(self) -> float:
        return sum(s.tokens_in_window for s in self.sessions) / self.seconds

    def cpu_per_min(self) -> float:
        return (self.own_cpu_s + self.engine_cpu_s) / self.seconds * 60

    def all(self, attr: str, sessions: list[SessionResult] | None = None) -> list[float]:
        return [x for s in (self.sessions if sessions is None else sessions) for x in getattr(s, attr)]


class SessionLoad:
    """Drives one session: its camera and its questioner, both on the one event loop."""

    def __init__(self, index: int, session: Session, clips: Clips, args: argparse.Namespace, busy: bool):
        self.index, self.session, self.clips, self.args, self.busy = index, session, clips, args, busy
        rng = np.random.default_rng([SEED, index, 1])
        self.fps = BUSY_FPS if busy else args.fps
        self.frame_phase = float(rng.uniform(0.0, 1.0 / self.fps))
        self.ask_phase = 0.0 if busy else float(rng.uniform(0.0, args.interval))
        self.result = SessionResult(index, busy)
        self.responses: list[Response] = []

    async def camera(self, t0: float, t_end: float) -> None:
        """Push frame k at t0 + phase + k / fps with stream time k / fps, until the window ends."""
        r = self.result
        k = 0
        while True:
            due = t0 + self.frame_phase + k / self.fps
            if due >= t_end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            r.push_late_ms.append((time.monotonic() - due) * 1000)
            # the scene moves at the clip's pace (a new picture every 1/args.fps s of stream time): a
            # faster camera (the busy one) repeats each picture, which the rate cap drops
            picture = self.clips(self.index, int(k * self.args.fps / self.fps))
            await self.session.push_frame(picture, timestamp=k / self.fps)
            r.pushed += 1
            k += 1

    async def questioner(self, t0: float, t_end: float) -> None:
        """Ask on schedule (or back to back, when busy) until the window ends; read each answer."""
        r = self.result
        j = 0
        while True:
            if self.busy:
                due, question, max_tokens = time.monotonic(), scenes.COMMENTARY, self.args.busy_max_tokens
            elif self.args.back_to_back:  # the engine's decode capacity, not the offered load
                due, question, max_tokens = time.monotonic(), scenes.COMMENTARY, self.args.max_tokens
            else:
                due = t0 + self.ask_phase + j * self.args.interval
                question = ASKED[(self.index + j) % len(ASKED)]
                max_tokens = self.args.max_tokens
            if due >= t_end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            late_ms = (sent - due) * 1000
            r.ask_late_ms.append(late_ms)
            r.late_questions += late_ms > 500
            response = self.session.ask(question, max_tokens=max_tokens)
            self.responses.append(response)
            r.asked += 1
            first: float | None = None
            try:
                async for _delta in response:
                    if first is None:
                        first = time.monotonic()
            except RuntimeError as exc:  # a failed answer: counted in statuses, the session goes on
                r.errors.append(str(exc)[:200])
            if first is not None:
                r.ttft_ms.append((first - sent) * 1000)
            if response.ttft_ms is not None:
                r.runtime_ttft_ms.append(response.ttft_ms)
            if response.tokens_per_s is not None:
                r.decode_tps.append(response.tokens_per_s)
            r.statuses[response.status] = r.statuses.get(response.status, 0) + 1
            if len(r.samples) < 4:
                r.samples.append(f"{question} -> {response.text.strip()[:60]!r}")
            j += 1

    def answer_tokens(self) -> int:
        return sum(resp.usage["output_tokens"] for resp in self.responses)

    def settle(self) -> None:
        """Copy the session's final counters into the result."""
        st = self.session.stats()
        r = self.result
        r.received, r.ingested = st.frames_received, st.frames_ingested
        r.dropped_by_reason = dict(st.frames_dropped_by_reason)
        r.pending = st.frames_pending
        r.lag_p50_ms, r.lag_p95_ms = st.frame_lag_p50_ms, st.frame_lag_p95_ms
        r.lags_ms = [float(x) for x in self.session.counters.lags_ms]  # for the phase's overall p95
        r.rollovers, r.max_request_tokens = st.rollovers, st.max_request_tokens


def open_one(rt: Runtime) -> tuple[Session | None, str | None, float]:
    """A new session, or (None, why) when admission refuses it; and how long opening took, ms."""
    started = time.perf_counter()
    try:
        session = rt.open_session()
    except SessionLimitReached as exc:
        return None, f"{type(exc).__name__}: {exc}", (time.perf_counter() - started) * 1000
    return session, None, (time.perf_counter() - started) * 1000


async def knock(rt: Runtime, phase: Phase, t0: float, t_end: float, every_s: float) -> None:
    """Past capacity: one more session tries to open every ``every_s`` s; each should be refused."""
    k = 0
    while (due := t0 + every_s / 2 + k * every_s) < t_end:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        session, why, took_ms = open_one(rt)
        if session is None:
            phase.refused.append(why or "refused")
            phase.refusal_ms.append(took_ms)
        else:
            phase.admitted_past_capacity += 1
            log(f"N={phase.label}: a session past capacity was admitted")
            await session.close()
        k += 1


async def run_phase(
    rt: Runtime, clips: Clips, args: argparse.Namespace, n: int, busy: bool, knocking: bool = False
) -> Phase:
    label = f"{n}" + (" busy" if busy else " full" if knocking else "")
    phase = Phase(label, n, busy, knocking)
    log(f"phase N={label}: {args.seconds:.0f} s")
    clips.ensure(n, int(args.seconds * args.fps) + 2)
    loads: list[SessionLoad] = []
    for i in range(n):
        session, why, took_ms = open_one(rt)
        if session is None:
            phase.refused.append(why or "refused")
            phase.refusal_ms.append(took_ms)
            log(f"N={label}: session {i} refused: {why}")
            continue
        loads.append(SessionLoad(i, session, clips, args, busy=busy and i == 0))
    if not loads:
        log(f"N={label}: every session refused; nothing to measure")
        return phase
    clock = CpuClock()
    t0 = time.monotonic() + 0.2
    t_end = t0 + args.seconds
    cpu0 = clock.sample()
    tasks = [asyncio.create_task(load.camera(t0, t_end)) for load in loads]
    askers = [asyncio.create_task(load.questioner(t0, t_end)) for load in loads]
    tasks += askers
    if knocking:
        tasks.append(asyncio.create_task(knock(rt, phase, t0, t_end, args.knock_s)))

    async def progress() -> None:
        last = clock.sample()
        last_t = time.monotonic()
        while True:
            await asyncio.sleep(args.progress_s)
            now, cpu = time.monotonic(), clock.sample()
            busy_cores = (sum(cpu) - sum(last)) / (now - last_t)
            last, last_t = cpu, now
            ingested = sum(load.session.stats().frames_ingested for load in loads)
            log(
                f"N={label}: {min(now - t0, args.seconds):4.0f}/{args.seconds:.0f} s  "
                f"frames in {ingested}  answers {sum(load.result.asked for load in loads)}  "
                f"tokens {sum(load.answer_tokens() for load in loads)}  CPU {busy_cores:.2f} cores"
            )

    reporter = asyncio.create_task(progress())
    failure: BaseException | None = None
    await asyncio.sleep(max(0.0, t_end - time.monotonic()))
    # the window's end: what counts (answers may still stream; they finish in the drain, uncounted)
    cpu1 = clock.sample()
    phase.seconds = time.monotonic() - t0
    phase.own_cpu_s, phase.engine_cpu_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    phase.load_avg = os.getloadavg()[0]
    for load in loads:
        load.result.tokens_in_window = load.answer_tokens()
        load.result.ingested_in_window = load.session.stats().frames_ingested
    reporter.cancel()
    for load in loads:
        if load.busy:
            await load.session.cancel()  # its long commentary would only lengthen the drain
    done, still = await asyncio.wait(tasks, timeout=DRAIN_S)
    for task in still:
        task.cancel()
    for task in done:
        if task.exception() is not None and failure is None:
            failure = task.exception()
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline and any(load.session.stats().frames_pending for load in loads):
        await asyncio.sleep(0.05)
    for load in loads:
        load.settle()
        phase.sessions.append(load.result)
        await load.session.close()
    if failure is not None:
        raise failure
    if still:
        log(f"N={label}: {len(still)} task(s) still running {DRAIN_S:.0f} s after the window (cancelled)")
    log(summary_line(phase))
    await asyncio.sleep(args.pause_s)  # let the engine go idle between phases
    return phase


def summary_line(p: Phase) -> str:
    ttft = p.all("ttft_ms")
    return (
        f"N={p.label} done: {p.admitted} admitted, {len(p.refused)} refused; {p.tokens_per_s():.1f} tok/s; "
        f"TTFT p50/p95 {fmt(pct(ttft, 50))}/{fmt(pct(ttft, 95))} ms; "
        f"lag p95 {fmt(pct(p.all('lags_ms'), 95))} ms; CPU {p.cpu_per_min():.1f} s/min; "
        f"accounted {'yes' if all(s.accounted for s in p.sessions) else 'NO'}"
    )


async def warm_up(rt: Runtime, clips: Clips) -> None:
    """First-use costs (kernels, processor caches, the first request) out of the first phase."""
    clips.ensure(1, 8)
    session, why, _ = open_one(rt)
    if session is None:
        raise RuntimeError(f"the warm-up session was refused: {why}")
    try:
        for k in range(4):
            await session.push_frame(clips(0, k), timestamp=k / 2)
            await asyncio.sleep(0.5)
        for question in ASKED:
            await session.ask(question, max_tokens=16).read()
    finally:
        await session.close()


# -- reporting --------------------------------------------------------------------------------------


def drops_text(by_reason: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(by_reason.items())) or "none"


def report(phases: list[Phase], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    chosen = "the runtime defaults" if args.dtype is None and args.executor is None else "as given"
    asking = "commentary back to back" if args.back_to_back else f"a question every {args.interval:g} s"
    lines = [
        f"load: the built-in model; dtype {meta['dtype']}, executor {meta['executor']} ({chosen}); "
        f"max_fps {meta['max_fps']}, change filter {meta['change_filter']}; "
        f"{args.fps:g} fps {WIDTH}x{HEIGHT} moving scene and {asking} "
        f"(max_tokens {args.max_tokens}) per session; {args.seconds:g} s per N; embedded SDK",
        "",
    ]
    head = (
        f"{'N':>7} {'adm':>3} {'ref':>3} {'tok/s':>6} {'/sess':>5} {'TTFT p50':>8} {'p95':>5}"
        f" {'dec t/s':>7} {'lag p50':>7} {'p95':>5} {'in fps':>6} {'pushed':>6} {'ingest':>6}"
        f" {'pend':>4} {'ok':>3} {'CPU s/min':>9} {'own':>5} {'engine':>6} {'/sess':>5}"
        f" {'late q':>6} {'push p95':>8}  drops"
    )
    lines += [head, "-" * len(head)]
    for p in phases:
        if not p.sessions:
            lines.append(f"{p.label:>7} {0:>3} {len(p.refused):>3}  (every session refused)")
            continue
        ttft, lags = p.all("ttft_ms"), p.all("lags_ms")
        drops: Counter[str] = Counter()
        for s in p.sessions:
            drops.update(s.dropped_by_reason)
        ok = "yes" if all(s.accounted for s in p.sessions) else "NO"
        own, engine = p.own_cpu_s / p.seconds * 60, p.engine_cpu_s / p.seconds * 60
        lines.append(
            f"{p.label:>7} {p.admitted:>3} {len(p.refused):>3} {p.tokens_per_s():6.1f}"
            f" {p.tokens_per_s() / p.admitted:5.2f} {fmt(pct(ttft, 50)):>8} {fmt(pct(ttft, 95)):>5}"
            f" {fmt(pct(p.all('decode_tps'), 50), '.1f'):>7} {fmt(pct(lags, 50)):>7} {fmt(pct(lags, 95)):>5}"
            f" {sum(s.ingested_in_window for s in p.sessions) / p.seconds:6.2f}"
            f" {sum(s.pushed for s in p.sessions):>6} {sum(s.ingested for s in p.sessions):>6}"
            f" {sum(s.pending for s in p.sessions):>4} {ok:>3}"
            f" {p.cpu_per_min():9.1f} {own:5.1f} {engine:6.1f}"
            f" {p.cpu_per_min() / p.admitted:5.1f} {sum(s.late_questions for s in p.sessions):>6}"
            f" {fmt(pct(p.all('push_late_ms'), 95), '.1f'):>8}  {drops_text(dict(drops))}"
        )
    lines += [
        "",
        "tok/s: answer tokens produced inside the window / window (all sessions; /sess: per session); TTFT:",
        "ask() to the first text delta, this client; dec t/s: median per-answer decode rate; lag: a frame's",
        "arrival until its chunk went to vLLM (SessionStats); in fps: frames ingested per second, all",
        "sessions; ok: every frame accounted for (pushed = received = ingested + dropped, 0 pending after",
        "the drain); CPU: this process + the engine's child processes, per minute of window; late q:",
        "questions asked > 0.5 s after their time; push p95: how late a camera push was, ms.",
    ]
    plain = [p for p in phases if not p.busy and not p.knocking and p.sessions]
    base = next((p for p in plain if p.n == 1), None)
    if base is not None and len(plain) > 1:
        lines += ["", "ratios against N = 1:"]
        b_ttft = pct(base.all("ttft_ms"), 95)
        b_lag = pct(base.all("lags_ms"), 95)
        for p in plain[1:]:
            lines.append(
                f"  N={p.n}: tok/s x{fmt(ratio(p.tokens_per_s(), base.tokens_per_s()), '.2f')}"
                f" (offered x{p.admitted / base.admitted:.0f}); TTFT p95"
                f" x{fmt(ratio(pct(p.all('ttft_ms'), 95), b_ttft), '.2f')};"
                f" lag p95 x{fmt(ratio(pct(p.all('lags_ms'), 95), b_lag), '.2f')};"
                f" CPU/min x{fmt(ratio(p.cpu_per_min(), base.cpu_per_min()), '.2f')}"
            )
        top = plain[-1]
        tok = ratio(top.tokens_per_s(), base.tokens_per_s())
        ttft = ratio(pct(top.all("ttft_ms"), 95), b_ttft)
        lines.append(
            f"target tok/s at N={top.n} >= 4x N=1: x{fmt(tok, '.2f')} "
            f"{'met' if tok is not None and tok >= 4 else 'MISSED'}"
        )
        lines.append(
            f"target TTFT p95 at N={top.n} <= 3x N=1: x{fmt(ttft, '.2f')} "
            f"{'met' if ttft is not None and ttft <= 3 else 'MISSED'}"
        )
    every = all(s.accounted for p in phases for s in p.sessions)
    lines.append(f"every frame accounted for in every phase: {'yes' if every else 'NO'}")
    lines.append(f"KV capacity: {meta['capacity']}")
    refused = [(p.label, r) for p in phases for r in p.refused]
    if refused:
        lines.append(f"refused sessions: {len(refused)}; first: N={refused[0][0]}: {refused[0][1]}")
    else:
        lines.append("refused sessions: none")
    for p in phases:
        if p.n == max(q.n for q in phases) and p.sessions and not p.knocking:
            lines += ["", f"per session, N={p.label}:", per_session_head()]
            lines += [per_session_row(s, p.seconds) for s in p.sessions]
    full = next((p for p in phases if p.knocking and p.sessions), None)
    same = next((p for p in plain if full is not None and p.n == full.n), None)
    if full is not None and same is not None:
        took = full.refusal_ms
        lines += [
            "",
            f"past capacity: N={full.n} admitted, one more session tried every {args.knock_s:g} s: "
            f"{len(full.refused)} refused (open_session took p50 {fmt(pct(took, 50), '.2f')} ms, "
            f"max {fmt(max(took, default=None), '.2f')} ms), "
            f"{full.admitted_past_capacity} let in past capacity",
            "  the admitted sessions, plain phase -> the phase with refusals:",
        ]
        lines += compare(same, same.sessions, full, full.sessions)
    busy = next((p for p in phases if p.busy and p.sessions), None)
    if busy is not None and same is not None:
        others = [s for s in same.sessions if s.index != 0]
        calm = busy.calm()
        lines += [
            "",
            f"fairness: sessions 1..{busy.n - 1} at N={busy.n}, plain phase -> the phase where session 0"
            " floods:",
        ]
        lines += compare(same, others, busy, calm)
        flood = next(s for s in busy.sessions if s.busy)
        lines.append(
            f"  session 0 (busy): {flood.tokens_in_window / busy.seconds:.1f} tok/s, "
            f"{flood.asked} answers, frames in {flood.ingested_in_window / busy.seconds:.2f}/s; "
            f"the others: {sum(s.tokens_in_window for s in calm) / busy.seconds:.1f} tok/s together"
        )
    lines.append("")
    lines.append(
        f"machine: {meta['cpus']} CPUs; load avg {meta['load_before']:.2f} -> "
        + ", ".join(f"{p.load_avg:.2f}" for p in phases)
        + f"; engine start {meta['engine_start_s']:.0f} s; total {meta['total_s']:.0f} s"
    )
    return "\n".join(lines)


def compare(
    a: Phase, a_sessions: list[SessionResult], b: Phase, b_sessions: list[SessionResult]
) -> list[str]:
    """The same sessions' latency and frame rate in phase ``a`` against phase ``b``."""
    lines = []
    for name, attr, q, spec in (
        ("TTFT p50 ms", "ttft_ms", 50, ".0f"),
        ("TTFT p95 ms", "ttft_ms", 95, ".0f"),
        ("lag p95 ms", "lags_ms", 95, ".0f"),
        ("decode tok/s p50", "decode_tps", 50, ".1f"),
    ):
        before, after = pct(a.all(attr, a_sessions), q), pct(b.all(attr, b_sessions), q)
        change = fmt(ratio(after, before), ".2f")
        lines.append(f"  {name:<17} {fmt(before, spec):>7} -> {fmt(after, spec):>7}  x{change}")
    a_in = sum(s.ingested_in_window for s in a_sessions) / a.seconds / max(1, len(a_sessions))
    b_in = sum(s.ingested_in_window for s in b_sessions) / b.seconds / max(1, len(b_sessions))
    lines.append(f"  {'frames in /s/sess':<17} {a_in:7.2f} -> {b_in:7.2f}")
    return lines


def per_session_head() -> str:
    return (
        f"  {'sess':>4} {'asked':>5} {'late':>4} {'TTFT p50':>8} {'p95':>5} {'dec t/s':>7} {'tok/s':>5}"
        f" {'in fps':>6} {'lag p50':>7} {'p95':>5} {'pushed':>6} {'ok':>3}  drops"
    )


def per_session_row(s: SessionResult, seconds: float) -> str:
    return (
        f"  {s.index:>4}{'*' if s.busy else ' '}{s.asked:>4} {s.late_questions:>4}"
        f" {fmt(pct(s.ttft_ms, 50)):>8} {fmt(pct(s.ttft_ms, 95)):>5} {fmt(pct(s.decode_tps, 50), '.1f'):>7}"
        f" {s.tokens_in_window / seconds:5.2f} {s.ingested_in_window / seconds:6.2f}"
        f" {fmt(s.lag_p50_ms):>7} {fmt(s.lag_p95_ms):>5} {s.pushed:>6} {'yes' if s.accounted else 'NO':>3}"
        f"  {drops_text(s.dropped_by_reason)}"
    )


# -- main -------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    begun = time.monotonic()
    load_before = os.getloadavg()[0]
    from runtime import Runtime
    from runtime.admission import sessions_that_fit

    options: dict[str, Any] = {"dtype": args.dtype, "executor": args.executor}  # None: the runtime's choice
    options.update(sized_engine(args.capacity, args.dtype))
    rt = Runtime(engine_options=options)  # the built-in model, every other default
    log("starting the engine (about a minute on CPU)")
    await rt.start()
    engine_start_s = time.monotonic() - begun
    capacity = rt.kv_capacity
    fit = None if capacity is None else sessions_that_fit(capacity, rt.budget_tokens)
    if args.capacity and fit != args.capacity:
        log(f"the engine's cache holds {fit} sessions, not the {args.capacity} it was sized for")
    executor = rt.options.executor
    if executor is None:  # what engine_args chose for this machine
        from runtime.engine import choose_executor, engine_device

        executor = str(choose_executor(engine_device(), rt.options.tensor_parallel_size) or "vLLM's")
    meta: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "engine_start_s": engine_start_s,
        "dtype": rt.dtype,
        "executor": executor,
        "max_fps": rt.settings.max_fps,
        "change_filter": "on" if rt.settings.change_filter.enabled else "off",
        "capacity": "unknown"
        if capacity is None
        else f"{capacity.tokens} tokens ({capacity.blocks} blocks of {capacity.block_size}), "
        f"{fit} sessions of {rt.budget_tokens} budget tokens fit",
        "budget_tokens": rt.budget_tokens,
        "max_model_len": rt.options.max_model_len,
    }
    log(f"engine ready in {engine_start_s:.0f} s ({meta['dtype']}, executor {executor})")
    clips = Clips()
    phases: list[Phase] = []
    try:
        await warm_up(rt, clips)
        top = max(args.ns)
        plan = [(n, False, False) for n in args.ns]
        plan += [(top, False, True)] if args.capacity == top else []
        plan += [(top, True, False)] if args.busy else []
        for n, busy, knocking in plan:
            phase = await run_phase(rt, clips, args, n, busy, knocking)
            phases.append(phase)
    finally:
        await rt.close()
    meta["total_s"] = time.monotonic() - begun
    if args.json:
        raw = {"args": vars(args), "meta": meta, "phases": [asdict(p) for p in phases]}
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
        log(f"wrote {args.json}")
    print(report(phases, args, meta), flush=True)
    return 0


def sized_engine(sessions: int, dtype: str | None) -> dict[str, float]:
    """Engine options whose KV cache holds exactly ``sessions`` sessions' budgets in ``dtype`` (None:
    the runtime's choice) or, for 0, none (the default cache, which holds many more): admission by
    KV then refuses the next session."""
    if sessions < 1:
        return {}
    from runtime import Runtime
    from runtime.admission import NULL_BLOCKS, session_blocks
    from runtime.engine import kv_bytes_per_token, resolve_dtype
    from runtime.training.builtin import watching_model

    budget = Runtime().budget_tokens  # the default settings' budget (nothing is started)
    blocks = sessions * session_blocks(budget, CPU_BLOCK_SIZE) + NULL_BLOCKS
    per_token = kv_bytes_per_token(watching_model(), resolve_dtype(dtype))
    return {"kv_cache_gb": blocks * CPU_BLOCK_SIZE * per_token / 2**30}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ns", default="1,2,4,8", help="session counts, one phase each (comma-separated)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per phase")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 1, 2 for 12 s each")
    parser.add_argument("--fps", type=float, default=2.0, help="camera frames per second per session")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between a session's questions")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer cap (the commentary reaches it)")
    parser.add_argument("--busy-max-tokens", type=int, default=256, help="the busy session's answer cap")
    parser.add_argument("--no-busy", dest="busy", action="store_false", help="skip the busy-session phase")
    parser.add_argument(
        "--back-to-back",
        action="store_true",
        help="every session asks for commentary after commentary (--max-tokens each) instead of a question "
        "every --interval s: aggregate tokens/s then measures how vLLM batches the sessions' decoding",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="size the KV cache for this many sessions (default: the largest N; 0: vLLM's default cache); "
        "at the largest N a phase then tries one session past it every --knock-s s",
    )
    parser.add_argument("--knock-s", type=float, default=5.0, help="seconds between attempts past capacity")
    parser.add_argument("--dtype", default=None, help="engine dtype (default: the runtime's choice here)")
    parser.add_argument(
        "--executor", default=None, help='vLLM executor backend, e.g. "mp" (default: the runtime\'s choice)'
    )
    parser.add_argument("--progress-s", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--pause-s", type=float, default=3.0, help="idle seconds between phases")
    parser.add_argument("--json", default="", help="also write the raw numbers here")
    parser.add_argument("--lock", default="/tmp/speakwatch-engine.lock", help="flock file held for the run")
    parser.add_argument("-v", "--verbose", action="store_true", help="show runtime/vLLM logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.ns, args.seconds = "1,2", min(args.seconds, 12.0)
    args.ns = sorted({int(x) for x in str(args.ns).split(",")})
    if not args.ns or min(args.ns) < 1:
        parser.error("--ns needs positive session counts")
    if args.capacity is None:
        args.capacity = max(args.ns)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING)
    lock = take_lock(arguments.lock)
    sys.exit(asyncio.run(main(arguments)))
