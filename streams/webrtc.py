"""The answering WebRTC peer: SDP offer in, answer out, the video as a :class:`TrackSource`, JSON events.

One task per remote track always drains it (the video into its source, anything else discarded), so
aiortc's unbounded receive queues never grow. A peer that vanishes ends the video source: the remote
closing (DTLS close / RTCP BYE) ends the track, ICE consent failure turns the connection 'failed' and
we close it, and a track that stops delivering ends the source after ``media_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .convert import Size
from .sources import TrackSource

logger = logging.getLogger(__name__)

EVENTS_LABEL = "oai-events"


class ChannelClosed(Exception):
    """The event channel is closed and holds no more messages."""


class EventChannel:
    """JSON objects both ways over an RTCDataChannel, bounded both ways.

    Incoming messages go to ``on_message`` if given, else to a bounded inbox read with :meth:`recv` or
    ``async for``; when the inbox is full the oldest message is dropped and counted. :meth:`send` never
    blocks: messages sent before the channel opens wait in a bounded outbox; while the channel's own
    send buffer is above ``max_buffered`` bytes, messages are dropped and counted. The channel can be
    attached later (it usually arrives from the remote side after the answer).
    """

    def __init__(
        self,
        channel: RTCDataChannel | None = None,
        *,
        inbox_size: int = 256,
        outbox_size: int = 256,
        max_buffered: int = 4 * 1024 * 1024,
        on_message: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.on_message = on_message
        self.max_buffered = max_buffered
        self.counters = {"received": 0, "sent": 0, "invalid": 0, "dropped_in": 0, "dropped_out": 0}
        self._inbox: deque[dict[str, Any]] = deque(maxlen=inbox_size)
        self._outbox: deque[str] = deque(maxlen=outbox_size)
        self._wake = asyncio.Event()
        self._opened = asyncio.Event()
        self._closed = False
        self.channel: RTCDataChannel | None = None
        if channel is not None:
            self.attach(channel)

    @property
    def label(self) -> str | None:
        return self.channel.label if self.channel is not None else None

    @property
    def is_open(self) -> bool:
        return self.channel is not None and self.channel.readyState == "open" and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def attach(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("open", self._on_open)
        channel.on("close", self._on_close)
        if channel.readyState == "open":
            self._on_open()
        elif channel.readyState == "closed":
            self._on_close()

    async def wait_open(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._opened.wait()
        if self._closed:
            raise ChannelClosed

    @property
    def buffered_amount(self) -> int:
        """Bytes the open channel has taken and not sent yet (0 before it opens)."""
        return self.channel.bufferedAmount if self.is_open and self.channel is not None else 0

    def send(self, message: dict[str, Any]) -> bool:
        """Queue one JSON object for the peer; returns False if it had to be dropped."""
        return self.send_text(json.dumps(message, separators=(",", ":")))

    def send_text(self, text: str) -> bool:
        """`send` for a message already encoded as JSON text."""
        if self._closed:
            raise ChannelClosed
        if not self.is_open:
            if len(self._outbox) == self._outbox.maxlen:
                self.counters["dropped_out"] += 1
            self._outbox.append(text)
            return True
        return self._send_now(text)

    async def recv(self) -> dict[str, Any]:
        """The next message from the peer; raises :class:`ChannelClosed` once closed and drained."""
        while not self._inbox:
            if self._closed:
                raise ChannelClosed
            self._wake.clear()
            await self._wake.wait()
        return self._inbox.popleft()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self.recv()
        except ChannelClosed:
            raise StopAsyncIteration from None

    def stats(self) -> dict[str, int]:
        return {**self.counters, "inbox": len(self._inbox), "outbox": len(self._outbox)}

    def close(self) -> None:
        if self.channel is not None and self.channel.readyState in ("connecting", "open"):
            self.channel.close()
        self._on_close()

    def _send_now(self, text: str) -> bool:
        assert self.channel is not None
        if self.channel.bufferedAmount > self.max_buffered:
            self.counters["dropped_out"] += 1
            return False
        self.channel.send(text)
        self.counters["sent"] += 1
        return True

    def _on_open(self) -> None:
        self._opened.set()
        while self._outbox and self.is_open:
            self._send_now(self._outbox.popleft())

    def _on_close(self) -> None:
        self._closed = True
        self._outbox.clear()
        self._opened.set()
        self._wake.set()

    def _on_message(self, data: str | bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.counters["invalid"] += 1
            return
        self.counters["received"] += 1
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                logger.exception("event handler failed")
            return
        if len(self._inbox) == self._inbox.maxlen:
            self.counters["dropped_in"] += 1
        self._inbox.append(message)
        self._wake.set()


class WebRTCPeer:
    """The server side of one WebRTC session: accepts an offer, receives video and ``oai-events``.

    ``fps``/``buffer_size``/``max_age``/``max_size``/``media_timeout`` configure the video
    :class:`TrackSource`. With no ``ice_servers`` no STUN is used: host candidates, enough on
    localhost and LANs. :meth:`close` stops every task this peer started.
    """

    def __init__(
        self,
        *,
        ice_servers: Sequence[RTCIceServer] = (),
        fps: float | None = 2.0,
        buffer_size: int = 4,
        max_age: float | None = 2.0,
        max_size: Size | None = None,
        media_timeout: float | None = 10.0,
        events_label: str = EVENTS_LABEL,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        inbox_size: int = 256,
    ) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
        self.events = EventChannel(inbox_size=inbox_size, on_message=on_event)
        self.events_label = events_label
        self.video_source: TrackSource | None = None
        self._source_options: dict[str, Any] = {
            "fps": fps,
            "buffer_size": buffer_size,
            "max_age": max_age,
            "max_size": max_size,
            "media_timeout": media_timeout,
        }
        self._video_ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self.close_reason: str | None = None
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    @property
    def connection_state(self) -> str:
        return self.pc.connectionState

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def accept(self, offer: str | RTCSessionDescription) -> str:
        """Apply the remote offer and return the answer SDP (with every ICE candidate, no trickle)."""
        if isinstance(offer, str):
            offer = RTCSessionDescription(sdp=offer, type="offer")
        await self.pc.setRemoteDescription(offer)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def video(self, timeout: float | None = None) -> TrackSource:
        """The video source, once the remote video track has arrived."""
        async with asyncio.timeout(timeout):
            await self._video_ready.wait()  # also set on close
        if self.video_source is None:
            raise ConnectionError(f"peer closed before sending video ({self.close_reason})")
        return self.video_source

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def stats(self) -> dict[str, Any]:
        return {
            "connection": self.connection_state,
            "video": self.video_source.stats().as_dict() if self.video_source else None,
            "events": self.events.stats(),
        }

    async def close(self, reason: str = "closed") -> None:
        """Close the connection, the video source, the drain tasks and the event channel."""
        if self._close_task is None:
            self.close_reason = reason
            self._close_task = asyncio.create_task(self._close(), name="WebRTCPeer.close")
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        try:
            self.events.close()
            await self.pc.close()
            if self.video_source is not None:
                await self.video_source.close()
            for task in self._drains:
                task.cancel()
            await asyncio.gather(*self._drains, return_exceptions=True)
        finally:
            self._closed.set()
            self._video_ready.set()

    def _on_state(self) -> None:
        state = self.pc.connectionState
        logger.debug("connection state %s", state)
        if state in ("failed", "closed") and self._close_task is None:
            self.close_reason = f"connection {state}"
            self._close_task = asyncio.ensure_future(self._close())

    def _on_track(self, track: MediaStreamTrack) -> None:
        if self._close_task is not None:
            return
        if track.kind == "video" and self.video_source is None:
            receivers = (t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            receiver = next(receivers, None)
            self.video_source = TrackSource(track, receiver=receiver, **self._source_options)
            self.video_source.start()
            self._video_ready.set()
            return
        task = asyncio.ensure_future(_drain(track))  # audio or extra video: read and discard
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label == self.events_label and self.events.channel is None:
            self.events.attach(channel)
        else:
            logger.info("ignoring data channel %r", channel.label)


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
