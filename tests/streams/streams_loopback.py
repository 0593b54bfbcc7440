"""Loopback helpers: a real aiortc client peer (the offerer) connected to our WebRTCPeer over localhost."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streams import EVENTS_LABEL, EventChannel, SourceTrack, WebRTCPeer


@dataclass
class Loopback:
    client: RTCPeerConnection
    track: SourceTrack
    events: EventChannel
    peer: WebRTCPeer

    async def close(self) -> None:
        await self.client.close()
        await self.peer.close()
        await self.track.aclose()


async def connect(track: SourceTrack, peer: WebRTCPeer, audio: bool = False) -> Loopback:
    """Offer from a client peer sending ``track`` (and opening ``oai-events``), answered by ``peer``."""
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    client.addTrack(track)
    if audio:
        client.addTrack(AudioStreamTrack())  # silence
    events = EventChannel(client.createDataChannel(EVENTS_LABEL))
    await client.setLocalDescription(await client.createOffer())
    answer = await peer.accept(client.localDescription.sdp)
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return Loopback(client, track, events, peer)


async def settle_tasks(before: set[asyncio.Task], timeout: float = 3.0) -> set[asyncio.Task]:
    """Tasks started since ``before`` that are still alive after ``timeout`` seconds of grace."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = {t for t in asyncio.all_tasks() - before if not t.done()}
        left.discard(asyncio.current_task())
        if not left or asyncio.get_running_loop().time() > deadline:
            return left
        await asyncio.sleep(0.05)
