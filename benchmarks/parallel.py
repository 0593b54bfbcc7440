"""Parallel vs sequential schedule: S = T_sequential / T_parallel beside the analytic (a + b) / max(a, b).

One `Runtime` (the built-in tiny Qwen2-VL, float32) serves both schedules in one process; every
variant gets a fresh session and the two schedules alternate (ABAB, BABA, ...) so machine noise hits
both. The scripted workload, the same for both schedules:

* a camera stream of ``side x side`` frames (one 64-token visual item each at 224x224) arriving at a
  fixed rate ``f / b`` frames per second, so that ``f`` frames arrive per answer turn;
* ``--questions`` questions asked back to back, each answered greedily with exactly ``--max-tokens``
  tokens in turns of K = ``--turn-tokens`` tokens (the stream spans the expected answering time).

T for a variant is the wall time from the first question until every answer is complete AND every
frame of the stream is in the model's KV (``frames_ingested`` reaches the number pushed): the
end-to-end "watch the stream and answer" time that the analytic S refers to.

Calibration (idle sessions, interleaved): b = one answer turn of K tokens with no frames; a(f) = a
burst of f frames pushed at once until they are in KV (encode + engine), with its encode part read
from the session's perception stats. The ratio r = a/b is swept through frames per turn f; the
balanced point is the f whose a(f) is closest to b.

    python benchmarks/parallel.py [--quick] [--repeats 5] [--out docs/img/parallel.png]

Progress goes to stderr; the result table is printed last. Wrap it in
``flock /tmp/speakwatch-engine.lock`` on shared machines.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from progress import CpuClock, log  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUESTIONS = [
    "What is happening in front of the camera right now?",
    "Describe what changed since you last looked.",
    "Is anyone moving? Answer in detail.",
    "Summarise the scene so far.",
]


def med(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@dataclass
class Config:
    side: int
    turn_tokens: int
    questions: int
    max_tokens: int
    sweep: list[int]
    repeats: int
    calib_repeats: int
    encoder_threads: int | None
    max_model_len: int

    @property
    def turns(self) -> int:
        """Answer turns in one variant (all questions)."""
        return self.questions * -(-self.max_tokens // self.turn_tokens)


@dataclass
class Calibration:
    b: list[float] = field(default_factory=list)  # seconds per idle answer turn (K tokens)
    ttft: list[float] = field(default_factory=list)
    a: dict[int, list[float]] = field(default_factory=dict)  # f -> seconds to get f frames into KV
    a_enc: dict[int, list[float]] = field(default_factory=dict)  # f -> encode part of that
    tokens_per_frame: int = 0

    @property
    def b_s(self) -> float:
        return med(self.b)

    def a_s(self, f: int) -> float:
        return med(self.a[f])

    def a_enc_s(self, f: int) -> float:
        return med(self.a_enc[f])


@dataclass
class Variant:
    schedule: str
    f: int
    total_s: float
    answers_s: float
    pushed: int
    ingested: int
    dropped: int
    rollovers: int
    output_tokens: int
    statuses: list[str]
    ttft_ms: list[float]
    tokens_per_s: list[float]
    lag_p50_ms: float | None
    lag_p95_ms: float | None
    encode_s: float
    server_cpu_s: float
    engine_cpu_s: float


class Frames:
    """A small pool of deterministic noise frames (pixel content does not change the cost)."""

    def __init__(self, side: int, count: int = 16):
        rng = np.random.default_rng(0)
        self.pool = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.pool[index % len(self.pool)]


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def encode_seconds(session) -> float:
    stats = getattr(getattr(session, "perception", None), "stats", None)
    return float(getattr(stats, "encode_seconds", 0.0))


async def warm_session(session) -> None:
    """Open the session's vLLM request so that request setup is not timed."""
    await session.ask("Ready?", max_tokens=1).read()


# -- calibration ------------------------------------------------------------------------------------


async def calibrate(rt, cfg: Config, frames: Frames, sweep: list[int]) -> Calibration:
    cal = Calibration()
    turns_per_answer = -(-cfg.max_tokens // cfg.turn_tokens)
    for rep in range(cfg.calib_repeats):
        session = rt.open_session(schedule="parallel", max_fps=1000.0)
        try:
            await warm_session(session)
            started = time.monotonic()
            response = session.ask(QUESTIONS[0], max_tokens=cfg.max_tokens)
            await response.read()
            elapsed = time.monotonic() - started
            cal.b.append(elapsed / turns_per_answer)
            cal.ttft.append(response.ttft_ms or float("nan"))
            ts = 0.0
            for f in sweep:
                before_n = session.stats().frames_ingested
                before_enc = encode_seconds(session)
                before_tokens = session.stats().session_tokens
                started = time.monotonic()
                for i in range(f):
                    ts += 1.0
                    await session.push_frame(frames[i], timestamp=ts)
                target = before_n + f
                await wait_for(lambda s=session, t=target: s.stats().frames_ingested >= t, 60, "calibration")
                cal.a.setdefault(f, []).append(time.monotonic() - started)
                cal.a_enc.setdefault(f, []).append(encode_seconds(session) - before_enc)
                # frame-only chunks: their one sampled token is not in KV (the last f has no carry)
                cal.tokens_per_frame = (session.stats().session_tokens - before_tokens) // f
        finally:
            await session.close()
        log(
            f"calibration {rep + 1}/{cfg.calib_repeats}: b={cal.b[-1] * 1000:.0f} ms/turn  "
            + "  ".join(f"a({f})={cal.a[f][-1] * 1000:.0f}" for f in sweep)
        )
    return cal


# -- one variant ------------------------------------------------------------------------------------


async def run_variant(rt, cfg: Config, frames: Frames, schedule: str, f: int, b_s: float) -> Variant:
    clock = CpuClock()
    session = rt.open_session(schedule=schedule, max_fps=1000.0)
    try:
        await warm_session(session)
        base = session.stats()
        base_enc = encode_seconds(session)
        rate = f / b_s  # frames per second: f frames per (idle) answer turn
        n_frames = f * cfg.turns
        pushed = 0
        cpu0 = clock.sample()
        t0 = time.monotonic()

        async def camera() -> None:
            nonlocal pushed
            for j in range(n_frames):
                due = t0 + (j + 0.5) / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await session.push_frame(frames[j], timestamp=due)
                pushed += 1

        stream = asyncio.get_running_loop().create_task(camera())
        responses = []
        for q in range(cfg.questions):
            response = session.ask(QUESTIONS[q % len(QUESTIONS)], max_tokens=cfg.max_tokens)
            await response.read()
            responses.append(response)
        answers_s = time.monotonic() - t0
        await stream
        target = base.frames_ingested + n_frames

        def all_in() -> bool:
            st = session.stats()
            return st.frames_ingested + st.frames_dropped - base.frames_dropped >= target

        await wait_for(all_in, 120, f"{schedule} ingestion")
        total_s = time.monotonic() - t0
        cpu1 = clock.sample()
        st = session.stats()
        return Variant(
            schedule=schedule,
            f=f,
            total_s=total_s,
            answers_s=answers_s,
            pushed=pushed,
            ingested=st.frames_ingested - base.frames_ingested,
            dropped=st.frames_dropped - base.frames_dropped,
            rollovers=int(st.get("rollovers", 0)),
            output_tokens=sum(r.usage["output_tokens"] for r in responses),
            statuses=[r.status for r in responses],
            ttft_ms=[r.ttft_ms for r in responses if r.ttft_ms is not None],
            tokens_per_s=[r.tokens_per_s for r in responses if r.tokens_per_s is not None],
            lag_p50_ms=st.frame_lag_p50_ms,
            lag_p95_ms=st.frame_lag_p95_ms,
            encode_s=encode_seconds(session) - base_enc,
            server_cpu_s=cpu1[0] - cpu0[0],
            engine_cpu_s=cpu1[1] - cpu0[1],
        )
    finally:
        await session.close()


def check(v: Variant, cfg: Config) -> list[str]:
    problems = []
    want = cfg.questions * cfg.max_tokens
    if v.output_tokens != want:
        problems.append(f"{v.output_tokens} output tokens, expected {want} (statuses {v.statuses})")
    if v.dropped:
        problems.append(f"{v.dropped} frames dropped")
    if v.rollovers:
        problems.append(f"{v.rollovers} rollovers")
    return problems


# -- reporting --------------------------------------------------------------------------------------


@dataclass
class Point:
    f: int
    fps: float
    a_s: float
    a_enc_s: float
    b_s: float
    seq: list[Variant]
    par: list[Variant]

    @property
    def r(self) -> float:
        return self.a_s / self.b_s

    @property
    def analytic(self) -> float:
        return (self.a_s + self.b_s) / max(self.a_s, self.b_s)

    @property
    def ratios(self) -> list[float]:
        return [s.total_s / p.total_s for s, p in zip(self.seq, self.par, strict=True)]

    @property
    def s(self) -> float:
        return med([v.total_s for v in self.seq]) / med([v.total_s for v in self.par])

    def m(self, variants: list[Variant], attr: str) -> float:
        values = [getattr(v, attr) for v in variants]
        return med([x for x in values if x is not None])

    def turn_ms(self, variants: list[Variant], k: int) -> float:
        """One answer turn (K tokens) at the tokens/s measured under this variant."""
        tps = med([x for v in variants for x in v.tokens_per_s])
        return k / tps * 1000


def plot(points: list[Point], balanced: int, k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p.r)  # a(f) is measured, so r need not rise with f
    r = [p.r for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(r, [p.analytic for p in points], "o--", color="gray", label="analytic (a+b)/max(a,b)")
    left.plot(r, [p.s for p in points], "o-", color="C0", label="measured S (median T ratio)")
    for p in points:
        left.plot([p.r] * len(p.ratios), p.ratios, ".", color="C0", alpha=0.35)
    bal = next(p for p in points if p.f == balanced)
    left.annotate(f"balanced, f={bal.f}", (bal.r, bal.s), textcoords="offset points", xytext=(6, -14))
    left.axhline(1.0, color="black", lw=0.6)
    left.axhline(1.5, color="C3", lw=0.6, ls=":", label="target 1.5 at balance")
    left.set_xlabel("r = a / b (perception / generation per turn, measured idle)")
    left.set_ylabel("S = T_sequential / T_parallel")
    left.set_title("speed-up")
    left.legend(fontsize=8)
    for variants, name, color in (("par", "parallel", "C0"), ("seq", "sequential", "C1")):
        p50 = [p.m(getattr(p, variants), "lag_p50_ms") for p in points]
        p95 = [p.m(getattr(p, variants), "lag_p95_ms") for p in points]
        right.plot(r, p95, "o-", color=color, label=f"{name} p95")
        right.plot(r, p50, "o--", color=color, alpha=0.6, label=f"{name} p50")
    right.plot(r, [p.turn_ms(p.par, k) for p in points], "k:", label=f"one turn (K={k}) under parallel")
    right.set_yscale("log")
    right.set_xlabel("r = a / b")
    right.set_ylabel("frame lag, arrival -> in KV (ms)")
    right.set_title("frame lag")
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report(cfg: Config, cal: Calibration, points: list[Point], balanced: int, meta: dict) -> str:
    k = cfg.turn_tokens
    lines = []
    lines.append("raw T per repeat, seconds (sequential | parallel), in run order:")
    for p in points:
        seq = " ".join(f"{v.total_s:.2f}" for v in p.seq)
        par = " ".join(f"{v.total_s:.2f}" for v in p.par)
        lines.append(f"  f={p.f}: {seq} | {par}")
    lines.append("")
    lines.append("where the time goes (medians per variant; CPU-seconds over T; 2 cores = 2 s per second):")
    lines.append(
        f"{'f':>2} {'sched':>10} {'T s':>6} {'answers s':>9} {'encode s':>8}"
        f" {'server cpu':>10} {'engine cpu':>10}"
    )
    for p in points:
        for name, vs in (("sequential", p.seq), ("parallel", p.par)):
            lines.append(
                f"{p.f:>2} {name:>10} {p.m(vs, 'total_s'):6.2f} {p.m(vs, 'answers_s'):9.2f} "
                f"{p.m(vs, 'encode_s'):8.2f} {p.m(vs, 'server_cpu_s'):10.2f} {p.m(vs, 'engine_cpu_s'):10.2f}"
            )
    lines.append("")
    title = (
        f"parallel vs sequential: {cfg.side}x{cfg.side} frames ({cal.tokens_per_frame} tokens each), "
        f"K={k}, {cfg.questions} questions x {cfg.max_tokens} tokens, {cfg.repeats} repeats, "
        f"b={cal.b_s * 1000:.0f} ms/turn idle"
    )
    lines.append(title)
    cols = (
        f"{'f/turn':>6} {'fps':>5} {'a ms':>5} {'(enc)':>5} {'r=a/b':>5} {'bound':>5} {'S':>5}"
        f" {'S min-max':>9}"
        f" {'T_seq':>5} {'T_par':>5} {'lag50 par':>9} {'lag95 par':>9} {'turn par':>8} {'lag95 seq':>9}"
        f" {'TTFT seq/par ms':>15} {'tok/s seq/par':>13}"
    )
    lines.append(cols)
    lines.append("-" * len(cols))
    for p in points:
        ratios = p.ratios
        mark = " <- balanced" if p.f == balanced else ""
        lines.append(
            f"{p.f:>6} {p.fps:5.1f} {p.a_s * 1000:5.0f} {p.a_enc_s * 1000:5.0f} {p.r:5.2f} {p.analytic:5.2f}"
            f" {p.s:5.2f} {min(ratios):4.2f}-{max(ratios):4.2f} {p.m(p.seq, 'total_s'):5.2f}"
            f" {p.m(p.par, 'total_s'):5.2f} {p.m(p.par, 'lag_p50_ms'):9.0f} {p.m(p.par, 'lag_p95_ms'):9.0f}"
            f" {p.turn_ms(p.par, k):8.0f} {p.m(p.seq, 'lag_p95_ms'):9.0f}"
            f" {med([x for v in p.seq for x in v.ttft_ms]):7.0f}/"
            f"{med([x for v in p.par for x in v.ttft_ms]):<7.0f}"
            f" {med([x for v in p.seq for x in v.tokens_per_s]):6.1f}/"
            f"{med([x for v in p.par for x in v.tokens_per_s]):<6.1f}{mark}"
        )
    bal = next(p for p in points if p.f == balanced)
    lag95 = bal.m(bal.par, "lag_p95_ms")
    turn = bal.turn_ms(bal.par, k)
    lines.append("")
    lines.append(
        f"balanced (f={bal.f}, r={bal.r:.2f}): S = {bal.s:.2f} (analytic bound {bal.analytic:.2f}); "
        f"target S >= 1.5: {'met' if bal.s >= 1.5 else 'MISSED'}"
    )
    lines.append(
        f"balanced: frame lag p95 under parallel {lag95:.0f} ms vs one answer turn {turn:.0f} ms "
        f"(idle {cal.b_s * 1000:.0f} ms); target p95 <= one turn: {'met' if lag95 <= turn else 'MISSED'}"
    )
    lines.append(
        f"machine: {meta['cpus']} CPUs, load avg {meta['load_before']:.2f} -> {meta['load_after']:.2f}; "
        f"engine start {meta['engine_start_s']:.0f} s; total {meta['total_s']:.0f} s; "
        f"torch threads in this process {meta['torch_threads']}"
    )
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    begun = time.monotonic()
    load_before = os.getloadavg()[0]
    if args.quick:
        args.repeats = args.repeats or 1
        sweep = sorted(set(args.sweep or [1, 4, 8]))
        calib_repeats = 2
    else:
        args.repeats = args.repeats or 5
        sweep = sorted(set(args.sweep or [1, 2, 4, 6, 8]))
        calib_repeats = 5
    cfg = Config(
        side=args.side,
        turn_tokens=args.turn_tokens,
        questions=args.questions,
        max_tokens=args.max_tokens,
        sweep=sweep,
        repeats=args.repeats,
        calib_repeats=calib_repeats,
        encoder_threads=args.encoder_threads,
        max_model_len=args.max_model_len,
    )
    from runtime import ChangeFilterSettings, Runtime, RuntimeSettings

    calib_sweep = list(range(1, max(sweep) + 1))
    settings = RuntimeSettings(
        turn_tokens=cfg.turn_tokens,
        max_output_tokens=max(256, cfg.max_tokens),
        max_fps=1000.0,
        pixel_budget=cfg.side * cfg.side,
        frame_queue=512,  # never drop: both schedules must ingest the same frames
        ready_chunks=512,
        max_chunks_per_turn=max(calib_sweep),  # a turn can take all the frames of one turn
        encoder_threads=cfg.encoder_threads,
        # it times ingest: every frame of the noise pool goes in (the filter would hold back some)
        change_filter=ChangeFilterSettings(enabled=False),
    )
    # the random-weight tiny model: its answers run to max_tokens, which this timing benchmark needs
    rt = Runtime(
        arch="qwen2-vl",
        positions="group-decoupled",
        engine_options={"dtype": "float32", "max_model_len": cfg.max_model_len},
        settings=settings,
    )
    log("starting the engine (about 1-2 minutes on CPU)")
    started = time.monotonic()
    await rt.start()
    engine_start_s = time.monotonic() - started
    import torch

    log(f"engine ready in {engine_start_s:.0f} s; torch threads here: {torch.get_num_threads()}")
    frames = Frames(cfg.side)
    try:
        # warm-up: first-use costs (kernels, processor caches) out of the measurements
        warm = rt.open_session(schedule="parallel", max_fps=1000.0)
        await warm_session(warm)
        for i in range(4):
            await warm.push_frame(frames[i], timestamp=float(i))
        await wait_for(lambda: warm.stats().frames_ingested >= 4, 60, "warm-up")
        await warm.ask("warm up", max_tokens=cfg.turn_tokens * 2).read()
        await warm.close()

        cal = await calibrate(rt, cfg, frames, calib_sweep)
        b_s = cal.b_s
        balanced = min(calib_sweep, key=lambda f: abs(cal.a_s(f) - b_s))
        points_f = sorted(set(sweep) | {balanced})
        budget = getattr(rt, "budget_tokens", (3 * cfg.max_model_len) // 4)
        worst = max(points_f) * cfg.turns * cal.tokens_per_frame + cfg.questions * (cfg.max_tokens + 40)
        if worst > budget:
            log(f"warning: up to {worst} tokens per session > budget {budget}; sessions may roll over")
        log(
            f"calibrated: b={b_s * 1000:.0f} ms per turn of {cfg.turn_tokens} tokens; "
            + ", ".join(f"a({f})={cal.a_s(f) * 1000:.0f} ms" for f in calib_sweep)
            + f"; balanced at f={balanced}; {cal.tokens_per_frame} tokens per frame"
        )
        results: dict[int, dict[str, list[Variant]]] = {
            f: {"sequential": [], "parallel": []} for f in points_f
        }
        for rep in range(cfg.repeats):
            order = ("sequential", "parallel") if rep % 2 == 0 else ("parallel", "sequential")
            for f in points_f:
                for schedule in order:
                    v = await run_variant(rt, cfg, frames, schedule, f, b_s)
                    results[f][schedule].append(v)
                    problems = check(v, cfg)
                    log(
                        f"repeat {rep + 1}/{cfg.repeats} f={f} {schedule:>10}: T={v.total_s:.2f} s "
                        f"(answers {v.answers_s:.2f} s) frames {v.ingested}/{v.pushed} "
                        f"lag p95 {v.lag_p95_ms or float('nan'):.0f} ms"
                        + (f"  PROBLEM: {'; '.join(problems)}" if problems else "")
                    )
    finally:
        await rt.close()

    points = [
        Point(
            f=f,
            fps=f / b_s,
            a_s=cal.a_s(f),
            a_enc_s=cal.a_enc_s(f),
            b_s=b_s,
            seq=results[f]["sequential"],
            par=results[f]["parallel"],
        )
        for f in points_f
    ]
    out = Path(args.out)
    plot(points, balanced, cfg.turn_tokens, out)
    log(f"wrote {out}")
    meta = {
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "engine_start_s": engine_start_s,
        "total_s": time.monotonic() - begun,
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        raw = {
            "config": cfg.__dict__,
            "calibration": {
                "b_s": cal.b,
                "ttft_ms": cal.ttft,
                "a_s": cal.a,
                "a_enc_s": cal.a_enc,
                "tokens_per_frame": cal.tokens_per_frame,
            },
            "balanced_f": balanced,
            "variants": [v.__dict__ for p in points for v in [*p.seq, *p.par]],
            "meta": meta,
        }
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print(report(cfg, cal, points, balanced, meta), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, 3 sweep points")
    parser.add_argument("--repeats", type=int, default=None, help="ABAB repeats per point (default 5)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "parallel.png"), help="PNG plot path")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--sweep", type=int, nargs="+", default=None, help="frames per turn to sweep")
    parser.add_argument("--side", type=int, default=224, help="frame side in pixels (224: 64 tokens)")
    parser.add_argument("--turn-tokens", type=int, default=8, help="K, answer tokens per turn")
    parser.add_argument("--questions", type=int, default=2, help="questions per variant")
    parser.add_argument("--max-tokens", type=int, default=40, help="tokens per answer (greedy, exact)")
    parser.add_argument("--encoder-threads", type=int, default=None, help="torch threads for the encoder")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("-v", "--verbose", action="store_true", help="show runtime/vLLM logs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING)
    asyncio.run(main(arguments))
