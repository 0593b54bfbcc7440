"""Sending side: an aiortc video track fed by any frame source (the tests, the benchmark, the chat client)."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, VideoStreamTrack

from .convert import Size
from .sources import FrameSource, SyntheticSource, pts_of

VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)


class SourceTrack(VideoStreamTrack):
    """A ``VideoStreamTrack`` that sends the frames of a :class:`FrameSource`, timed by their timestamps.

    The source paces the frames (e.g. a realtime :class:`SyntheticSource`); the RTP timestamp of each
    frame is its ``Frame.timestamp`` on the 90 kHz video clock, so the receiver sees the same stream
    time. The track ends when the source ends; stopping the track closes the source.
    """

    def __init__(self, source: FrameSource) -> None:
        super().__init__()
        self.source = source
        self._closing: asyncio.Task[None] | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            frame = await anext(self.source)
        except StopAsyncIteration:
            self.stop()
            raise MediaStreamError from None
        video = av.VideoFrame.from_ndarray(frame.rgb, format="rgb24")
        video.pts = pts_of(frame.timestamp, VIDEO_CLOCK_RATE)
        video.time_base = VIDEO_TIME_BASE
        return video

    def stop(self) -> None:
        super().stop()
        if self._closing is None:
            try:
                self._closing = asyncio.get_running_loop().create_task(self.source.close())
            except RuntimeError:  # no running loop: nothing to clean up asynchronously
                pass

    async def aclose(self) -> None:
        """Stop and wait until the source has released everything."""
        self.stop()
        if self._closing is not None:
            await self._closing


def synthetic_track(
    rate: float = 30.0, size: Size = (640, 480), *, start: int = 0, count: int | None = None, **kwargs: Any
) -> SourceTrack:
    """A client-side track that sends the counter test pattern at ``rate`` fps, every frame (no sampling).

    The source's small buffer only drops (counted as ``overflow``/``stale``) if the encoder cannot
    keep up, like a real camera.
    """
    kwargs.setdefault("fps", None)
    kwargs.setdefault("buffer_size", 2)
    kwargs.setdefault("max_age", 1.0)
    return SourceTrack(SyntheticSource(rate, size, start=start, count=count, **kwargs))
