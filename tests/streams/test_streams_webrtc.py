"""Real aiortc peers over loopback: an offering client sends the counter pattern to our WebRTCPeer."""

from __future__ import annotations

import asyncio
import time

import aioice.ice
import numpy as np
import pytest
from streams_loopback import Loopback, connect, settle_tasks

from streams import WebRTCPeer, pattern, synthetic_track

RATE = 30


async def collect(lb: Loopback, seconds: float) -> list:
    source = await lb.peer.video(timeout=10)
    frames = []
    deadline = time.monotonic() + seconds
    async for frame in source:
        frames.append(frame)
        if time.monotonic() > deadline:
            break
    return frames


async def test_end_to_end_order_timestamps_and_rate() -> None:
    before = asyncio.all_tasks()
    lb = await connect(synthetic_track(RATE, (320, 240)), WebRTCPeer(fps=2, max_age=1.0))
    frames = await collect(lb, 4.0)
    source = lb.peer.video_source
    stats = source.stats()
    await lb.close()

    counters = np.array([pattern.decode(f.rgb) for f in frames])
    timestamps = np.array([f.timestamp for f in frames])
    assert None not in counters.tolist() and len(frames) >= 7
    assert np.all(np.diff(counters) > 0)  # in order, no repeats
    assert np.all(np.diff(timestamps) > 0)
    # stream time survives the trip: receiver time = sender time (counter / rate) minus a constant
    assert np.allclose(timestamps - counters / RATE, timestamps[0] - counters[0] / RATE, atol=1e-3)
    # sampled at 2 fps of stream time: every 15th frame (an occasional lost frame shifts it by one)
    assert np.median(np.diff(counters)) == RATE // 2
    assert np.all(np.abs(np.diff(timestamps) - 0.5) <= 1.5 / RATE)
    assert np.all([f.arrival <= time.monotonic() for f in frames])
    assert stats.received >= 25 * 4 and stats.dropped["rate"] >= stats.received * 0.8
    assert stats.decoded == stats.sampled  # only sampled frames were converted
    assert source.end_reason in ("track-ended", "closed")
    assert not await settle_tasks(before)


async def test_events_channel_json_both_ways_and_audio_is_drained() -> None:
    lb = await connect(synthetic_track(RATE, (64, 48)), WebRTCPeer(), audio=True)
    lb.events.send({"type": "session.update", "n": 1})  # queued until the channel opens
    assert await asyncio.wait_for(lb.peer.events.recv(), 10) == {"type": "session.update", "n": 1}
    lb.events.channel.send("not json")
    lb.events.channel.send("[1, 2]")
    lb.events.send({"type": "ping"})
    assert await asyncio.wait_for(lb.peer.events.recv(), 5) == {"type": "ping"}
    assert lb.peer.events.stats()["invalid"] == 2
    lb.peer.events.send({"type": "response.text.delta", "delta": "héllo"})
    assert await asyncio.wait_for(lb.events.recv(), 5) == {"type": "response.text.delta", "delta": "héllo"}
    # an audio track nobody asked for is read and discarded, not left to pile up in aiortc's queue
    await asyncio.sleep(1.0)
    audio = [r.track for r in lb.peer.pc.getReceivers() if r.track.kind == "audio"]
    assert audio and audio[0]._queue.qsize() <= 5
    await lb.close()
    assert lb.peer.events.closed


async def test_client_closes_without_signaling_ends_the_source() -> None:
    before = asyncio.all_tasks()
    lb = await connect(synthetic_track(RATE, (64, 48)), WebRTCPeer(fps=5))
    await collect(lb, 0.5)
    start = time.monotonic()
    await lb.client.close()  # no BYE over the app's signaling: the transport just goes away
    async for _ in lb.peer.video_source:
        pass
    assert time.monotonic() - start < 3
    assert lb.peer.video_source.end_reason == "track-ended"
    await asyncio.wait_for(lb.peer.wait_closed(), 5)
    await lb.close()
    assert not await settle_tasks(before)


async def test_track_that_stops_sending_ends_by_media_timeout() -> None:
    before = asyncio.all_tasks()
    lb = await connect(synthetic_track(RATE, (64, 48)), WebRTCPeer(fps=5, media_timeout=1.0))
    await collect(lb, 0.5)
    start = time.monotonic()
    lb.track.stop()  # the camera stops; the connection stays up, no RTCP BYE is sent
    async for _ in lb.peer.video_source:
        pass
    assert time.monotonic() - start < 3
    assert lb.peer.video_source.end_reason == "media-timeout"
    await lb.close()
    assert not await settle_tasks(before)


async def test_peer_vanishing_ends_the_source_via_ice_consent(monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 7675 consent checks: aioice defaults detect a dead peer after ~30 s; shortened here.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 3)
    before = asyncio.all_tasks()
    lb = await connect(synthetic_track(RATE, (64, 48)), WebRTCPeer(fps=5, media_timeout=None))
    await collect(lb, 0.5)
    start = time.monotonic()
    for protocol in lb.client.getTransceivers()[0].sender.transport.transport._connection._protocols:
        protocol.transport.close()  # the client's sockets vanish: no DTLS close, no BYE, nothing
    async for _ in lb.peer.video_source:
        pass
    assert time.monotonic() - start < 5
    await asyncio.wait_for(lb.peer.wait_closed(), 5)
    assert lb.peer.connection_state in ("failed", "closed")
    await lb.close()
    assert not await settle_tasks(before)
