"""Ingest cost: CPU time per received frame and frame age at delivery, 640x480 @ 30 fps in, 2 fps sampled.

The sender (an aiortc client peer sending the counter pattern) runs in a subprocess, so the CPU time
this process spends is the receive path alone: SRTP, jitter buffer, VP8 decode (aiortc's decoder
thread), our reader and sampler, and RGB conversion of the sampled frames (our worker threads).
Signalling goes over the subprocess's stdin/stdout. The consumer keeps up (it only decodes counters).

    python benchmarks/ingest.py [--seconds 20] [--fps 2] [--size 640x480] [--rate 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streams import WebRTCPeer, pattern, synthetic_track

WARMUP = 2.0  # seconds excluded from the measurement (ICE, DTLS, first keyframe)


# -- sender (subprocess) --------------------------------------------------------------------------


async def _readline() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run_sender(rate: float, size: tuple[int, int]) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = synthetic_track(rate, size)
    pc.addTrack(track)
    await pc.setLocalDescription(await pc.createOffer())
    _say({"offer": pc.localDescription.sdp})
    answer = json.loads(await _readline())["answer"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    while track.source.started_at is None:
        await asyncio.sleep(0.01)
    _say({"started_at": track.source.started_at})
    cpu0 = time.process_time()
    await _readline()  # "stop"
    cpu = time.process_time() - cpu0
    sent = track.source.stats().delivered
    await pc.close()
    await track.aclose()
    _say({"cpu": cpu, "sent": sent})


# -- receiver (this process) ----------------------------------------------------------------------


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread group, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    groups: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id, "")
        if t.id == threading.main_thread().native_id:
            group = "event loop (RTP, SRTP, reader, sampler)"
        elif name.startswith("video-decoder"):
            group = "aiortc VP8 decoder thread"
        elif name.startswith("streams"):
            group = "streams RGB conversion threads"
        else:
            group = "other threads"
        groups[group] = groups.get(group, 0.0) + t.user_time + t.system_time
    return groups


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    a = np.array(values) * 1000
    return f"{np.percentile(a, 50):7.1f} / {np.percentile(a, 95):7.1f} / {a.max():7.1f}"


async def run(seconds: float, fps: float, rate: float, size: tuple[int, int]) -> None:
    sender = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--role",
        "sender",
        "--rate",
        str(rate),
        "--size",
        f"{size[0]}x{size[1]}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert sender.stdin is not None and sender.stdout is not None

    async def ask(message: dict[str, object] | None = None, line: str | None = None) -> dict[str, object]:
        if message is not None or line is not None:
            sender.stdin.write(((json.dumps(message) if message else line) + "\n").encode())
            await sender.stdin.drain()
        return json.loads(await sender.stdout.readline())

    peer = WebRTCPeer(fps=fps, buffer_size=4, max_age=2.0)
    offer = (await ask())["offer"]
    started_at = float((await ask({"answer": await peer.accept(str(offer))}))["started_at"])
    source = await peer.video(timeout=15)

    ages: list[float] = []  # arrival at our reader -> delivered to the consumer
    e2e: list[float] = []  # produced by the sender -> delivered to the consumer
    delivered = unreadable = 0
    start = time.monotonic()
    measure_from = start + WARMUP
    end = measure_from + seconds
    stats0 = cpu0 = threads0 = None
    next_progress = start + 1
    async for frame in source:
        now = time.monotonic()
        if now >= end:
            break
        if stats0 is None and now >= measure_from:
            stats0, cpu0, threads0 = source.stats(), time.process_time(), thread_cpu()
        if stats0 is not None:
            counter = pattern.decode(frame.rgb)
            delivered += 1
            ages.append(now - frame.arrival)
            if counter is None:
                unreadable += 1
            else:
                e2e.append(now - (started_at + counter / rate))
        if now >= next_progress:
            s = source.stats()
            phase = "warm-up" if stats0 is None else "measuring"
            print(
                f"  {now - start:5.1f}s {phase:9s} received {s.received:5d}  delivered {s.delivered:4d}"
                f"  queues {s.queues}",
                file=sys.stderr,
                flush=True,
            )
            next_progress += 1
    if stats0 is None or cpu0 is None or threads0 is None:
        raise SystemExit(f"the stream ended during warm-up ({source.end_reason})")
    seconds = min(time.monotonic(), end) - measure_from
    cpu = time.process_time() - cpu0
    threads1 = thread_cpu()
    stats1 = source.stats()
    sent = await ask(line="stop")
    await sender.wait()
    await peer.close()

    received = stats1.received - stats0.received
    per_frame = lambda s: f"{s / max(received, 1) * 1000:8.3f} ms"  # noqa: E731
    dropped = {k: v - stats0.dropped.get(k, 0) for k, v in stats1.dropped.items()}
    rows = [
        ("input", f"{size[0]}x{size[1]} @ {rate:g} fps, sampled at {fps:g} fps, {seconds:.1f} s measured"),
        ("frames received", f"{received} ({received / seconds:.1f}/s)"),
        ("frames converted to RGB", str(stats1.decoded - stats0.decoded)),
        ("frames delivered", f"{delivered} ({delivered / seconds:.2f}/s, {unreadable} unreadable)"),
        ("dropped by reason", ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "none"),
        ("receiver CPU / received frame", per_frame(cpu) + "  (whole process, all threads)"),
    ]
    for group in sorted(threads1):
        rows.append((f"  {group}", per_frame(threads1[group] - threads0.get(group, 0.0))))
    sender_ms = float(sent["cpu"]) / max(int(sent["sent"]), 1) * 1000
    rows += [
        ("sender CPU / sent frame", f"{sender_ms:8.3f} ms  (subprocess: pattern, VP8 encode, RTP)"),
        ("receiver CPU load", f"{cpu / seconds * 100:7.1f} % of one core"),
        ("age at delivery, ms p50/p95/max", percentiles(ages) + "  (arrival at reader -> consumer)"),
        ("end-to-end age, ms p50/p95/max", percentiles(e2e) + "  (sender capture -> consumer)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"{'ingest benchmark':<{width}}  value")
    print(f"{'-' * width}  {'-' * 60}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds (after a 2 s warm-up)")
    parser.add_argument("--fps", type=float, default=2.0, help="sampling rate of the receiver")
    parser.add_argument("--rate", type=float, default=30.0, help="frame rate sent")
    parser.add_argument("--size", default="640x480", help="WxH sent")
    parser.add_argument("--role", choices=["receiver", "sender"], default="receiver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.role == "sender":
        asyncio.run(run_sender(args.rate, size))
    else:
        print(f"ingest benchmark: {args.seconds:g} s + {WARMUP:g} s warm-up", file=sys.stderr, flush=True)
        asyncio.run(run(args.seconds, args.fps, args.rate, size))


if __name__ == "__main__":
    main()
