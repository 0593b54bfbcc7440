"""WebRTC calls against the server: a real aiortc client peer sending the synthetic test pattern."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from fake_runtime import FakeRuntime, eventually

from runtime.server.app import ServerConfig
from streams import EVENTS_LABEL, EventChannel, SourceTrack, synthetic_track

pytestmark = pytest.mark.timeout(60)


@dataclass
class ClientCall:
    pc: RTCPeerConnection
    track: SourceTrack
    events: EventChannel
    location: str

    async def close(self) -> None:
        await self.pc.close()
        await self.track.aclose()


async def call(served, session_id: str | None = None, *, rate: float = 15.0, status: int = 201) -> ClientCall:
    """Offer video (and the oai-events channel) to POST /v1/realtime/calls; apply the answer."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = synthetic_track(rate, (96, 64))
    pc.addTrack(track)
    events = EventChannel(pc.createDataChannel(EVENTS_LABEL))
    await pc.setLocalDescription(await pc.createOffer())
    url = served.url + "/v1/realtime/calls" + (f"?session_id={session_id}" if session_id else "")
    headers = {"Content-Type": "application/sdp"}
    async with served.http.post(url, data=pc.localDescription.sdp, headers=headers) as reply:
        assert reply.status == status, await reply.text()
        if status != 201:
            await pc.close()
            await track.aclose()
            return ClientCall(pc, track, events, "")
        assert reply.content_type == "application/sdp"
        answer = await reply.text()
        location = reply.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return ClientCall(pc, track, events, location)


async def test_call_attached_to_a_websocket_session_feeds_its_video(serve) -> None:
    served = await serve()
    client = await served.connect()
    session_id = (await client.recv())["session"]["id"]
    await client.send({"type": "session.update", "session": {"video": {"max_fps": 5}}})
    await client.until("session.updated")
    rtc = await call(served, session_id)
    assert rtc.location.startswith("/v1/realtime/calls/rtc_")
    session = served.runtime.sessions[0]
    await eventually(lambda: len(session.frames) >= 4, timeout=15)
    assert session.frames[0][0] == (64, 96, 3)
    timestamps = [ts for _, ts in session.frames]
    assert all(b > a for a, b in itertools.pairwise(timestamps))

    report = None
    async with asyncio.timeout(10):
        while report is None or report["frames_ingested"] < 4:
            report = (await client.until("input_video.stats"))[-1]
    assert report["frames_received"] > report["frames_sampled"] >= report["frames_ingested"] >= 4
    assert report["frames_dropped_by_reason"].get("rate", 0) > 0 and report["max_fps"] == 5.0
    answer, _ = await client.ask("what do you see?")
    assert answer.startswith("seen ") and not answer.startswith("seen 0 ")

    # hang up: the call ends, the WebSocket session lives on
    async with served.http.delete(served.url + rtc.location) as reply:
        assert reply.status == 204
    assert not served.server.calls
    count = len(session.frames)
    await asyncio.sleep(0.5)
    assert len(session.frames) == count and not session.closed
    _, done = await client.ask("still there?")
    assert done["response"]["status"] == "completed"
    await rtc.close()

    # a call attached to a session ends with that session
    rtc = await call(served, session_id)
    await eventually(lambda: len(session.frames) > count, timeout=15)
    await client.close()
    await eventually(lambda: not served.server.calls and not served.server.connections, timeout=10)
    assert session.closed
    await rtc.close()


async def test_call_without_session_is_driven_over_the_data_channel(serve) -> None:
    served = await serve(ServerConfig(max_sessions=1, stats_interval=0.2))
    rtc = await call(served)
    created = await asyncio.wait_for(rtc.events.recv(), 15)
    assert created["type"] == "session.created"
    (session,) = served.runtime.sessions
    assert created["session"]["id"] == session.id
    await eventually(lambda: len(session.frames) >= 2, timeout=15)
    rtc.events.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi there"}],
            },
        }
    )
    rtc.events.send({"type": "response.create"})
    rtc.events.send({"type": "bogus"})
    seen: list[dict] = []
    async with asyncio.timeout(10):
        while not any(e["type"] == "response.done" for e in seen):
            seen.append(await rtc.events.recv())
    kinds = [e["type"] for e in seen]
    assert "error" in kinds and "input_video.stats" in kinds
    done = next(e for e in seen if e["type"] == "response.done")
    assert done["response"]["status"] == "completed"
    answer = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
    assert answer.strip().endswith("hi there")

    # the call holds the only session slot
    client = await served.connect()
    assert (await client.recv())["error"]["code"] == "session_limit_reached"
    await call(served, status=429)

    async with served.http.delete(served.url + rtc.location) as reply:
        assert reply.status == 204
    await eventually(lambda: session.closed and not served.server.connections)
    assert served.server.metrics.sessions._value.get() == 0
    await rtc.close()


async def test_client_vanishing_ends_a_standalone_call(serve) -> None:
    served = await serve(ServerConfig(stats_interval=0.2, resume_grace=0.5))
    rtc = await call(served)
    await asyncio.wait_for(rtc.events.recv(), 15)
    session = served.runtime.sessions[0]
    await eventually(lambda: session.frames, timeout=15)
    await rtc.close()  # no DELETE: the transport just goes away (the session waits 0.5 s for a resume)
    await eventually(lambda: session.closed and not served.server.calls, timeout=15)
    assert served.server.metrics.sessions._value.get() == 0


async def test_shutdown_hangs_up_every_call(serve) -> None:
    served = await serve(ServerConfig(api_key="k"))
    headers = {"Authorization": "Bearer k"}
    client = await served.connect(headers=headers)
    session_id = (await client.recv())["session"]["id"]
    async with served.http.post(served.url + "/v1/realtime/calls", data="v=0\r\n") as reply:
        assert reply.status == 401
    served.http.headers.update(headers)  # the calls endpoints are under /v1: the key is needed there too
    attached = await call(served, session_id)
    standalone = await call(served)
    await asyncio.wait_for(standalone.events.recv(), 15)
    await eventually(lambda: all(s.frames for s in served.runtime.sessions), timeout=15)
    assert len(served.server.calls) == 2 and len(served.server.connections) == 2
    await served.stop()
    assert not served.server.calls and not served.server.connections
    assert all(s.closed for s in served.runtime.sessions) and served.runtime.closed
    assert served.server.metrics.sessions._value.get() == 0
    await attached.close()
    await standalone.close()


async def test_a_standalone_call_past_the_kv_capacity_is_refused(serve) -> None:
    served = await serve(runtime=FakeRuntime(kv_capacity_tokens=1100, budget_tokens=1024))
    client = await served.connect()  # takes the only session the cache holds
    assert (await client.recv())["type"] == "session.created"
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = synthetic_track(15.0, (96, 64))
    pc.addTrack(track)
    pc.createDataChannel(EVENTS_LABEL)
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    async with served.http.post(
        served.url + "/v1/realtime/calls", data=pc.localDescription.sdp, headers=headers
    ) as reply:
        assert reply.status == 429
        error = (await reply.json())["error"]
    await pc.close()
    await track.aclose()
    assert error["code"] == "session_limit_reached" and error["type"] == "server_error"
    assert "capacity 1088 tokens, 1040 reserved by 1 open session," in error["message"]
    assert not served.server.calls and len(served.runtime.sessions) == 1
