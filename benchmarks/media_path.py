"""Frames per second that reach the model through WebRTC: a fast camera against `speakwatch serve --max-fps`.

Starts `speakwatch serve` (the built-in model) as a subprocess, opens a call on `/v1/realtime/calls`
with an aiortc peer sending the counter pattern at ``--rate`` fps, and reads the session's
``input_video.stats`` from the call's event channel. After a warm-up it reports the rate frames were
ingested (reached the model's KV) against the cap asked for: with one sampler per input the two
should match (issue 12 measured 1.00 fps for a cap of 2 before, when a second cap in the session
dropped admitted frames again).

    python benchmarks/media_path.py [--rate 25] [--max-fps 2] [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams import EVENTS_LABEL, EventChannel, synthetic_track

WARMUP_S = 5.0  # excluded: ICE, DTLS, the first keyframe, the first frames' encoder warm-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url + "/health") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"the server at {url} was not healthy within {timeout} s")


async def measure(url: str, rate: float, seconds: float) -> dict[str, float]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = synthetic_track(rate, (640, 480))
    pc.addTrack(track)
    events = EventChannel(pc.createDataChannel(EVENTS_LABEL))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        offer, headers = pc.localDescription.sdp, {"Content-Type": "application/sdp"}
        async with http.post(url + "/v1/realtime/calls", data=offer, headers=headers) as reply:
            if reply.status != 201:
                raise RuntimeError(f"call refused: {reply.status} {await reply.text()}")
            answer = await reply.text()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    samples: list[tuple[float, int, int]] = []  # (time, frames_received, frames_ingested)
    start = time.monotonic()
    try:
        while time.monotonic() - start < WARMUP_S + seconds:
            try:
                event = await asyncio.wait_for(events.recv(), timeout=5.0)
            except TimeoutError:
                continue
            if event.get("type") == "input_video.stats":
                now = time.monotonic() - start
                samples.append((now, int(event["frames_received"]), int(event["frames_ingested"])))
                print(
                    f"  t={now:5.1f} s  received {event['frames_received']:4d}  "
                    f"ingested {event['frames_ingested']:4d}  "
                    f"dropped {event.get('frames_dropped_by_reason')}",
                    flush=True,
                )
    finally:
        await pc.close()
        await track.aclose()
    window = [s for s in samples if s[0] >= WARMUP_S]
    if len(window) < 2:
        raise RuntimeError("too few input_video.stats reports to measure a rate")
    (t0, r0, i0), (t1, r1, i1) = window[0], window[-1]
    return {"sent_fps": (r1 - r0) / (t1 - t0), "ingested_fps": (i1 - i0) / (t1 - t0), "span_s": t1 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=25.0, help="frames per second the camera sends")
    parser.add_argument("--max-fps", type=float, default=2.0, help="the server's frame-rate cap")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time after the warm-up")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = [sys.executable, "-m", "runtime.cli", "serve", "--port", str(port)]
    server += ["--max-fps", str(args.max_fps)]
    print(f"starting {' '.join(server[2:])} (engine start: about a minute)", flush=True)
    proc = subprocess.Popen(server, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    try:
        asyncio.run(_wait_healthy(url, 300))
        print(f"calling with a {args.rate:g} fps camera for {WARMUP_S:g} + {args.seconds:g} s", flush=True)
        figures = asyncio.run(measure(url, args.rate, args.seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    figures = {"rate": args.rate, "max_fps": args.max_fps, **figures}
    figures["ingested_over_cap"] = figures["ingested_fps"] / args.max_fps
    print(
        f"camera {figures['sent_fps']:.1f} fps received; model ingested {figures['ingested_fps']:.2f} fps "
        f"for a cap of {args.max_fps:g} ({figures['ingested_over_cap']:.2f} of the cap)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
