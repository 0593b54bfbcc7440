"""CPU the engine burns, and decode speed, per engine variant (issue 13: no CPU wasted by the engine).

vLLM's CPU build runs the engine core and a worker as two processes; the core waits for the worker's
answers in a shared-memory queue whose reader keeps spinning (``sched_yield``) for 1 s after every
read, so a session that sends frames at 2 fps keeps a whole core busy. This script starts one
runtime per variant, one after the other, each in its own process (the variant's environment must
be set before vLLM is imported), and measures in each, on the built-in watching model:

- CPU seconds per minute of our process, the engine core and the worker, while a session is open
  with nothing coming in (``idle``), while a 2 fps camera streams (``watching``), and while it
  streams and answers question after question (``answering``);
- decode ms/token of a 96-token commentary with no frames coming in (median of a few).

Variants: ``mp`` (vLLM's multiprocess executor: engine core + worker, the old default), ``uni``
(``distributed_executor_backend="uni"``, now the default on CPU: the model runs in the engine-core
process, no queue between them, one OpenMP thread per core but one), ``uni-all-threads`` (the same
with torch's own pool, every core), ``default`` (whatever runtime/engine.py chooses: dtype and
executor), ``bf16`` / ``f32`` (the default executor in bfloat16 / float32: which dtype decodes faster here).
Ratios are against the first variant.

    python benchmarks/engine_cpu.py [--variants mp,uni] [--dtype float32] [--seconds 20] [--json out.json]
        [--py-spy /tmp/spyenv/bin/py-spy]   # also: share of samples spinning in the shm queue
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.progress import log  # noqa: E402

PHASES = ("idle", "watching", "answering")
spin_shares: dict[tuple[str, str], float] = {}  # (phase, role) -> share of py-spy samples spinning
DECODE_TOKENS = 96
DECODE_REPEATS = 3

# environment and engine options per variant ("uni": what runtime/engine.py now does by itself)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "mp": ({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, {"executor": "mp"}),
    "uni": ({}, {"executor": "uni"}),
    "uni-all-threads": ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2"}, {"executor": "uni"}),
    "default": ({}, {}),
    "bf16": ({}, {"dtype": "bfloat16"}),  # the default executor in bfloat16 (default where native)
    "f32": ({}, {"dtype": "float32"}),  # the default executor in float32 (default elsewhere)
}


# -- child: one variant ------------------------------------------------------------------------------


def _role(proc: Any) -> str:
    """Which engine process this is, from the title vLLM gives it."""
    try:
        name = " ".join([proc.name(), *proc.cmdline()[:1]])
    except Exception:
        return "other"
    if "EngineCore" in name:
        return "engine_core"
    if "Worker" in name:
        return "worker"
    return "other"


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and each of its descendants, by role."""
    import psutil

    me = psutil.Process()
    times = {"ours": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            if "py-spy" in child.name():
                continue
            cpu = sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
        role = _role(child)
        times[role] = times.get(role, 0.0) + cpu
    return times


def _engine_pids() -> dict[str, int]:
    import psutil

    return {_role(p): p.pid for p in psutil.Process().children(recursive=True) if _role(p) != "other"}


def _spy_start(py_spy: str, seconds: float, tag: str) -> list[tuple[str, str, subprocess.Popen]]:
    """py-spy (sampling, no pausing) on each engine process for ``seconds``; raw collapsed stacks."""
    runs = []
    for role, pid in _engine_pids().items():
        out = f"/tmp/engine_cpu_{tag}_{role}.txt"
        cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "20"]
        cmd += ["--nonblocking", "--format", "raw", "--output", out]
        runs.append((role, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    return runs


def _spy_share(runs: list[tuple[str, str, subprocess.Popen]]) -> dict[str, float]:
    """Per engine process: the share of samples waiting in vLLM's shared-memory queue."""
    shares = {}
    for role, out, proc in runs:
        proc.wait()
        total = spin = 0
        for line in Path(out).read_text().splitlines() if Path(out).exists() else ():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            total += int(count)
            if "acquire_read" in stack or "sched_yield" in stack:
                spin += int(count)
        if total:
            shares[role] = spin / total
    return shares


async def _measure(label: str, seconds: float, work, spy: str | None = None) -> dict[str, float]:
    """CPU seconds per minute of each role while ``work`` (a coroutine factory) runs ``seconds``."""
    log(f"  {label}: {seconds:.0f} s")
    before, t0 = _cpu_by_role(), time.monotonic()
    task = asyncio.create_task(work())
    runs = _spy_start(spy, seconds / 2, label.split()[0]) if spy else []
    await asyncio.sleep(seconds)
    after, elapsed = _cpu_by_role(), time.monotonic() - t0
    for role, share in _spy_share(runs).items():
        log(f"    py-spy: {share:.0%} of {role} samples in shm_broadcast acquire_read/sched_yield")
        spin_shares[(label.split()[0], role)] = share
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    per_min = {k: (after[k] - before.get(k, 0.0)) * 60.0 / elapsed for k in after}
    per_min["engine"] = sum(v for k, v in per_min.items() if k != "ours")
    log("    " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per_min.items())) + " CPU-s/min")
    return per_min


async def _child(variant: str, dtype: str | None, seconds: float, py_spy: str | None) -> dict[str, Any]:
    import numpy as np

    from runtime import ChangeFilterSettings, Runtime
    from runtime.training import scenes
    from runtime.training.scenes import COMMENTARY, QUESTIONS

    _, forced = VARIANTS[variant]
    options: dict[str, Any] = {"max_model_len": 4096, "kv_cache_gb": 1.0, **forced}
    if dtype:
        options["dtype"] = dtype
    started = time.monotonic()
    rt = Runtime(engine_options=options)
    await rt.start()
    result: dict[str, Any] = {
        "variant": variant,
        "dtype": rt.options.dtype,
        "start_s": time.monotonic() - started,
    }
    log(f"  engine ready in {result['start_s']:.0f} s (dtype {rt.options.dtype})")
    rng = np.random.default_rng(0)
    thing = scenes.random_object(rng, aspect=160 / 120)
    # the engine's CPU per ingested frame is measured: every frame of the drifting camera goes in
    session = rt.open_session(change_filter=ChangeFilterSettings(enabled=False))
    clock = {"t": 0.0}

    async def camera() -> None:
        nonlocal thing
        while True:
            await session.push_frame(scenes.render(thing, 120, 160, rng), timestamp=clock["t"])
            thing = scenes.step_object(thing, rng, aspect=160 / 120)
            clock["t"] += 0.5
            await asyncio.sleep(0.5)

    async def nothing() -> None:
        await asyncio.sleep(3600)

    answers: list[float] = []  # TTFT ms of the answers in the answering phase
    tokens: list[int] = []  # and their lengths

    async def questions() -> None:
        cam = asyncio.create_task(camera())
        try:
            i = 0
            while True:
                response = session.ask(QUESTIONS[i % len(QUESTIONS)], max_tokens=16)
                await response.read()
                tokens.append(response.usage["output_tokens"])
                if response.ttft_ms is not None:
                    answers.append(response.ttft_ms)
                i += 1
        finally:
            cam.cancel()

    # warm-up: one frame in, one answer out
    await session.push_frame(scenes.render(thing, 120, 160, rng), timestamp=0.0)
    clock["t"] = 0.5
    await session.ask(QUESTIONS[0], max_tokens=8).read()
    await asyncio.sleep(2.0)  # past the queue's 1 s busy window

    cpu = {
        "idle": await _measure("idle (session open, nothing coming in)", seconds, nothing),
        "watching": await _measure("watching (2 fps camera)", seconds, camera),
        "answering": await _measure("answering (2 fps camera, question after question)", seconds, questions),
    }
    await session.cancel()
    await asyncio.sleep(2.0)
    if py_spy:  # profiled apart from the measured phases: py-spy's own sampling costs CPU
        await _measure("watching (profiled)", 10, camera, spy=py_spy)
        await _measure("answering (profiled)", 10, questions, spy=py_spy)
        await session.cancel()
        await asyncio.sleep(2.0)
    result["spin_share"] = {f"{phase}/{role}": share for (phase, role), share in spin_shares.items()}
    result["cpu_per_min"] = cpu
    result["answers"] = len(answers)
    result["answer_tokens"] = sum(tokens)
    answering = cpu["answering"]["engine"] * seconds / 60.0
    result["engine_cpu_ms_per_answer_token"] = 1000 * answering / sum(tokens) if sum(tokens) else None
    result["ttft_ms_median"] = float(np.median(answers)) if answers else None

    log(f"  decode: {DECODE_REPEATS} x {DECODE_TOKENS}-token commentary on a fresh session, no frames")
    await session.close()
    session = rt.open_session()
    await session.push_frame(scenes.render(thing, 120, 160, rng), timestamp=0.0)
    per_token, seen = [], []
    for _ in range(DECODE_REPEATS):
        response = session.ask(COMMENTARY, max_tokens=DECODE_TOKENS)
        arrivals = [time.monotonic() async for _ in response]
        n = response.usage["output_tokens"]
        seen.append(f"{response.status}/{n} tokens/{len(arrivals)} deltas")
        if response.first_token_at is not None and response.finished_at is not None and n > 1:
            per_token.append((response.finished_at - response.first_token_at) * 1000 / (n - 1))
        elif len(arrivals) > 1:  # no token count: the spacing of the deltas
            per_token.append((arrivals[-1] - arrivals[0]) * 1000 / (len(arrivals) - 1))
    result["decode_ms_per_token"] = float(np.median(per_token)) if per_token else None
    result["decode_ms_per_token_all"] = per_token
    each = ", ".join(f"{x:.1f}" for x in per_token)
    log(f"    decode ms/token: {each or 'none'} ({'; '.join(seen)})")
    await session.close()
    await rt.close()
    return result


# -- parent: run the variants, print the table ------------------------------------------------------


def _run_variant(variant: str, dtype: str | None, seconds: float, py_spy: str | None) -> dict[str, Any]:
    env_add, _ = VARIANTS[variant]
    env = {**os.environ, **env_add}
    cmd = [sys.executable, __file__, "--child", variant, "--seconds", str(seconds)]
    if dtype:
        cmd += ["--dtype", dtype]
    if py_spy:
        cmd += ["--py-spy", py_spy]
    log(f"variant {variant}: {' '.join(f'{k}={v}' for k, v in env_add.items()) or '(engine defaults)'}")
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(results: list[dict[str, Any]]) -> str:
    base = results[0]
    lines = [
        "| variant | dtype | phase | ours | engine core | worker | engine total | x first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for phase in PHASES:
            c = r["cpu_per_min"][phase]
            b = base["cpu_per_min"][phase]["engine"]
            ratio = c["engine"] / b if b else float("nan")
            lines.append(
                f"| {r['variant']} | {r['dtype']} | {phase} | {c.get('ours', 0):.1f} | "
                f"{c.get('engine_core', 0):.1f} | {c.get('worker', 0):.1f} | "
                f"{c['engine']:.1f} | {ratio:.2f} |"
            )
    lines += [
        "",
        "| variant | decode ms/token | x first | answers (tokens) in the answering phase | TTFT median ms "
        "| engine CPU ms per answer token |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        d, bd = r["decode_ms_per_token"] or float("nan"), base["decode_ms_per_token"] or float("nan")
        ttft = r["ttft_ms_median"]
        per_token = r.get("engine_cpu_ms_per_answer_token")
        lines.append(
            f"| {r['variant']} | {d:.1f} | {d / bd:.2f} | {r['answers']} ({r.get('answer_tokens', '-')}) | "
            f"{'-' if ttft is None else f'{ttft:.0f}'} | {'-' if per_token is None else f'{per_token:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mp,uni", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--dtype", default=None, help="engine dtype (default: the runtime's choice)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--py-spy", metavar="EXE", help="profile the engine processes with this py-spy (half of each phase)"
    )
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(_child(args.child, args.dtype, args.seconds, args.py_spy))
        print(json.dumps(result), flush=True)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}")
    results = [_run_variant(v, args.dtype, args.seconds, args.py_spy) for v in variants]
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
