"""Does the model watch? Accuracy and reaction time per position scheme, served by real vLLM.

For each of the four schemes, one checkpoint is trained with the built-in recipe (same base
checkpoint, data, seed and steps; only ``positions`` differs): stage one (the vision tower on
labelled frames, which does not depend on the scheme) once, shared, then stage two (the streaming
fine-tune) per scheme. Each is then served (one engine per scheme, float32) and measured under both
schedules:

- accuracy on held-out scenes (fresh seeds, random frame sizes): colour, shape, colour+shape;
- reaction: a commentary is running on one object; a different object (new colour and shape)
  replaces it; from that frame's push to the first answer word naming the new colour, in ms and
  in answer tokens (colour, because it is what these tiny models see reliably; a shape word
  can be right by chance). Under ``sequential`` the current answer cannot see it, so the
  commentary is asked again as soon as it ends and the clock runs on into that next answer;
- how the commentary reads across the change: well-formed phrases ("<colour> <shape>"), and the
  share of colours named after the first mention of the new one that are the new one.

    .venv/bin/python benchmarks/watching.py                # all four schemes, 300 steps each
    .venv/bin/python benchmarks/watching.py --quick        # 2 schemes, 40 steps, few scenes (a smoke run)
    .venv/bin/python benchmarks/watching.py --builtin      # only the shipped checkpoint (no training)

Progress goes to stderr; the result tables to stdout (and --json FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.progress import log
from runtime.wire import SCHEDULES

SCHEMES = ("sequential", "overlapped", "group-decoupled", "gap-isolated")
HELD_OUT_SEED = 3_000_000_000


@dataclass
class Point:
    scheme: str
    schedule: str
    color: float
    shape: float
    both: float
    scenes: int
    reaction_ms_p50: float | None
    reaction_ms_p95: float | None
    reaction_tokens_p50: float | None
    reaction_tokens_p95: float | None
    reacted_in_same_answer: float
    well_formed: float
    new_color_stays: float
    trials: int
    steps: int


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def accuracy(rt, schedule: str, n: int) -> tuple[float, float, float]:
    from runtime.training import scenes
    from runtime.training.evaluate import probe_scenes

    right = np.zeros(3)
    for frames, obj in probe_scenes(n, seed=HELD_OUT_SEED):
        async with rt.open_session(schedule=schedule) as session:
            for i, frame in enumerate(frames):
                await session.push_frame(frame, timestamp=i * 0.5)
            # settled: each frame in KV or dropped by the change filter as showing nothing new
            while (stats := session.stats()).frames_received < len(frames) or stats.frames_pending:
                await asyncio.sleep(0.01)
            color = scenes.mentions(await session.ask(scenes.QUESTIONS[0], max_tokens=4).read())
            shape = scenes.mentions(await session.ask(scenes.QUESTIONS[1], max_tokens=4).read())
            both = scenes.mentions(await session.ask(scenes.QUESTIONS[2], max_tokens=6).read())
        right += [
            bool(color) and color[0][0] == obj.color,
            bool(shape) and shape[0][1] == obj.shape,
            bool(both) and both[0] == (obj.color, obj.shape),
        ]
    return tuple(float(x) for x in right / n)  # type: ignore[return-value]


async def reaction_trial(rt, schedule: str, seed: int) -> dict:
    """One scene change during a commentary: reaction in ms and tokens, and how the text reads."""
    from runtime.training import scenes

    rng = np.random.default_rng([HELD_OUT_SEED, seed])
    height, width = 240, 320
    first = scenes.random_object(rng, aspect=width / height)
    second = scenes.random_object(
        rng,
        aspect=width / height,
        color=str(rng.choice([c for c in scenes.COLORS if c != first.color])),
        shape=str(rng.choice([s for s in scenes.SHAPES if s != first.shape])),
    )
    k = rt.settings.turn_tokens
    budget = 12 * k
    async with rt.open_session(schedule=schedule) as session:
        await session.push_frame(scenes.render(first, height, width, rng), timestamp=0.0)
        while session.stats().frames_ingested < 1:
            await asyncio.sleep(0.01)
        delay_turns = int(rng.integers(1, 4))
        changed_at: float | None = None
        tokens_at_change = 0
        reaction: tuple[float, int] | None = None
        texts = []
        tokens_before = 0
        for attempt in range(2):  # sequential: the change can only show in the next answer
            response = session.ask(scenes.COMMENTARY, max_tokens=budget)
            seen = ""
            async for delta in response:
                now = time.monotonic()
                produced = tokens_before + len(response.token_ids)
                if changed_at is None and len(response.token_ids) >= delay_turns * k:
                    await session.push_frame(scenes.render(second, height, width, rng), timestamp=1.0)
                    changed_at, tokens_at_change = time.monotonic(), produced
                    continue
                if changed_at is not None and reaction is None:
                    seen += delta
                    words = set(seen.lower().replace(".", " ").split())
                    if second.color in words:
                        reaction = ((now - changed_at) * 1000, produced - tokens_at_change)
            texts.append(response.text)
            tokens_before += len(response.token_ids)
            if reaction is not None or attempt == 1:
                break
    said = scenes.mentions(" ".join(texts))
    pairs = [p for p in said if p[0] and p[1]]
    colors = [c for c, _ in said if c]
    after = colors[colors.index(second.color) :] if second.color in colors else []
    return {
        "reaction": reaction,
        "same_answer": reaction is not None and len(texts) == 1,
        "well_formed": len(pairs) / max(1, len(said)),
        "stays_after": (sum(c == second.color for c in after) / len(after)) if after else 0.0,
    }


async def measure(model: Path, scheme: str, n_scenes: int, trials: int) -> list[Point]:
    from runtime import Runtime

    log(f"{scheme}: starting an engine on {model}")
    points = []
    async with Runtime(
        model, positions=scheme, engine_options={"dtype": "float32", "max_model_len": 4096}
    ) as rt:
        for schedule in SCHEDULES:
            log(f"{scheme}/{schedule}: accuracy on {n_scenes} held-out scenes")
            color, shape, both = await accuracy(rt, schedule, n_scenes)
            log(
                f"{scheme}/{schedule}: colour {color:.0%} shape {shape:.0%} both {both:.0%}; "
                f"reaction x{trials}"
            )
            results = [await reaction_trial(rt, schedule, seed) for seed in range(trials)]
            ms = [r["reaction"][0] for r in results if r["reaction"]]
            tok = [float(r["reaction"][1]) for r in results if r["reaction"]]
            points.append(
                Point(
                    scheme,
                    schedule,
                    color,
                    shape,
                    both,
                    n_scenes,
                    percentile(ms, 50),
                    percentile(ms, 95),
                    percentile(tok, 50),
                    percentile(tok, 95),
                    float(np.mean([r["same_answer"] for r in results])),
                    float(np.mean([r["well_formed"] for r in results])),
                    float(np.mean([r["stays_after"] for r in results])),
                    trials,
                    int((rt.info.trained_for or {}).get("steps", 0)),
                )
            )
    return points


def table(points: list[Point], k: int) -> str:
    def fmt(x: float | None, pattern: str = "{:.0f}") -> str:
        return "-" if x is None else pattern.format(x)

    lines = [
        f"watching benchmark: K = {k} tokens per turn; float32; reaction = first word naming the new colour",
        "scheme           steps schedule    colour  shape  both  | reaction ms p50/p95   tokens p50/p95  "
        "same-answer  well-formed  new-colour-stays",
    ]
    for p in points:
        lines.append(
            f"{p.scheme:<16} {p.steps:5d} {p.schedule:<10} {p.color:6.0%} {p.shape:6.0%} {p.both:5.0%}  | "
            f"{fmt(p.reaction_ms_p50):>8} / {fmt(p.reaction_ms_p95):<8}  "
            f"{fmt(p.reaction_tokens_p50):>5} / {fmt(p.reaction_tokens_p95):<6}  "
            f"{p.reacted_in_same_answer:10.0%}  {p.well_formed:10.0%}  {p.new_color_stays:12.0%}"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Point]:
    from runtime.training.builtin import RECIPE, train_builtin, train_stage_one, watching_model

    if args.builtin:
        return await measure(watching_model(), str(RECIPE["positions"]), args.scenes, args.trials)
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="speakwatch-watching-") as tmp:
        root = args.models or Path(tmp)
        stage_one = args.stage_one or root / "stage-one" / "seeing"
        if not (stage_one / "config.json").exists():
            log("stage one (the vision tower on labelled frames), shared by every scheme")
            train_stage_one(stage_one.parent, out=sys.stderr, threads=args.threads)
        for scheme in args.schemes:
            out = root / scheme
            if not (out / "config.json").exists():
                log(f"{scheme}: stage two of the built-in recipe for {args.steps} steps")
                started = time.monotonic()
                train_builtin(
                    out,
                    stage_one=stage_one,
                    positions=scheme,
                    max_steps=args.steps,
                    out=sys.stderr,
                    log_every=50,
                    threads=args.threads,
                )
                log(f"{scheme}: trained in {time.monotonic() - started:.0f} s")
            else:
                log(f"{scheme}: using the checkpoint trained before in {out}")
            if not args.train_only:
                points += await measure(out, scheme, args.scenes, args.trials)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--steps", type=int, default=300, help="training steps per scheme")
    parser.add_argument("--scenes", type=int, default=24, help="held-out scenes per schedule")
    parser.add_argument("--trials", type=int, default=10, help="scene changes per schedule")
    parser.add_argument("--builtin", action="store_true", help="measure only the shipped checkpoint")
    parser.add_argument("--quick", action="store_true", help="2 schemes, 40 steps, 4 scenes, 3 trials")
    parser.add_argument("--json", type=Path, help="also write the points here")
    parser.add_argument(
        "--models", type=Path, help="keep the per-scheme checkpoints here (reused if present)"
    )
    parser.add_argument("--train-only", action="store_true", help="train the checkpoints, measure nothing")
    parser.add_argument(
        "--stage-one", type=Path, help="a stage-one checkpoint to start every scheme from (else trained)"
    )
    parser.add_argument("--threads", type=int, help="torch threads for training")
    args = parser.parse_args()
    if args.quick:
        args.schemes, args.steps, args.scenes, args.trials = ["sequential", "group-decoupled"], 40, 4, 3
    from runtime.training.builtin import RECIPE

    points = asyncio.run(run(args))
    if args.train_only:
        return
    print(table(points, int(RECIPE["turn_tokens"])))
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in points], indent=2))


if __name__ == "__main__":
    main()
