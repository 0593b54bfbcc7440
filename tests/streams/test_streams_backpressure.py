"""A consumer that stalls for 30 s while 30 fps keeps arriving: queues stay bounded, the newest frames win.

aiortc leaves its receive queues unbounded (aiortc issue 1192): here one reader task keeps draining
the track, so the only frames held are the sampler's latest-N and one frame waiting for conversion.
"""

from __future__ import annotations

import asyncio
import gc
import time

import psutil
from streams_loopback import connect, settle_tasks

from streams import WebRTCPeer, pattern, synthetic_track

RATE = 30
STALL = 30.0
SIZE = (320, 240)  # 30 s of it held as decoded frames would be ~100 MB (YUV) or ~200 MB (RGB)
BUFFER = 4
MAX_AGE = 1.0


async def test_stalled_consumer_stays_bounded_and_gets_the_newest_frames() -> None:
    before_tasks = asyncio.all_tasks()
    process = psutil.Process()
    lb = await connect(synthetic_track(RATE, SIZE), WebRTCPeer(fps=2, buffer_size=BUFFER, max_age=MAX_AGE))
    source = await lb.peer.video(timeout=10)
    sender = lb.track.source

    warmup = []
    async for frame in source:  # a consumer that keeps up
        warmup.append(frame)
        if len(warmup) == 6:
            break
    gc.collect()
    rss_before = process.memory_info().rss
    stats_before = source.stats()

    # The consumer stalls: nobody iterates the source for 30 s while frames keep arriving.
    max_queues: dict[str, int] = {}
    stall_end = time.monotonic() + STALL
    while time.monotonic() < stall_end:
        await asyncio.sleep(0.5)
        for name, depth in source.stats().queues.items():
            max_queues[name] = max(max_queues.get(name, 0), depth)
    gc.collect()
    rss_after = process.memory_info().rss
    stats_stalled = source.stats()
    newest_sent = sender.stats().received - 1  # counter of the last frame the client produced

    after = []
    async for frame in source:
        after.append((pattern.decode(frame.rgb), time.monotonic() - frame.arrival))
        if len(after) == 4:
            break
    await lb.close()

    received = stats_stalled.received - stats_before.received
    print(
        f"\nstall {STALL:.0f}s: received {received}, "
        f"rss {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, "
        f"max queues {max_queues}, dropped {source.stats().dropped}, newest sent {newest_sent}, "
        f"delivered after {after}"
    )
    assert received >= 0.9 * RATE * STALL  # 30 fps really kept arriving
    # bounded: the sampler's latest-N, one frame waiting for conversion, aiortc's queues drained
    assert max_queues["buffer"] <= BUFFER and max_queues["convert"] <= 1
    assert max_queues["track"] <= 5 and max_queues["decoder"] <= 5, max_queues
    assert rss_after - rss_before < 40 * 2**20, (rss_before, rss_after)
    # dropped by reason: over the rate cap, pushed out of the full buffer, and too old once we came back
    dropped = stats_stalled.dropped
    assert dropped["rate"] - stats_before.dropped["rate"] >= 0.8 * received
    assert dropped["overflow"] - stats_before.dropped.get("overflow", 0) >= 2 * STALL - BUFFER - 4
    assert source.stats().dropped.get("stale", 0) >= 1
    # the newest frames are what is delivered after the stall
    first_counter, first_age = after[0]
    assert first_counter >= newest_sent - RATE * (MAX_AGE + 0.5), (first_counter, newest_sent)
    assert first_age <= MAX_AGE
    counters = [c for c, _ in after]
    assert counters == sorted(counters) and counters[0] > pattern.decode(warmup[-1].rgb) + RATE * (STALL - 2)
    assert not await settle_tasks(before_tasks)
