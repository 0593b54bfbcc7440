"""Media in: camera frames from WebRTC, files/RTSP, numpy pushes and a test pattern, sampled and bounded.

Every source has the same interface::

    source = SyntheticSource(rate=30, size=(640, 480), fps=2)   # or FileSource, PushSource, TrackSource
    async for frame in source:      # Frame(rgb HxWx3 uint8, timestamp (stream s), arrival, index)
        ...
    source.stats()                  # StreamStats: received/decoded/sampled/delivered, dropped, queues
    await source.close()            # stops its tasks and releases the input

Common keyword arguments: ``fps`` (target rate, default 2, None = all), ``buffer_size`` (latest-N, 4),
``max_age`` (seconds, 2), ``max_size`` ((w, h) resolution cap, keeps aspect). Every queue is bounded
and every dropped frame is counted by reason (``rate``, ``overflow``, ``stale``, ``error``, ``closed``,
``unchanged``: a sampler given a :class:`ChangeFilter` holds back frames that show nothing new).
RGB conversion and scaling run on worker threads, only for frames the sampler keeps.

WebRTC: :class:`WebRTCPeer` accepts an SDP offer, returns the answer, exposes the video as a
:class:`TrackSource` and the ``oai-events`` data channel as an :class:`EventChannel` of JSON objects.
:func:`synthetic_track` / :class:`SourceTrack` are the sending side (tests, benchmark, chat client).
"""

from .change import ChangeFilter, ChangeFilterSettings
from .convert import fit_size, to_rgb
from .frame import Frame, rgb_pixels
from .sampler import FrameSampler, StreamStats
from .sources import FileSource, FrameSource, PushSource, SyntheticSource, TrackSource
from .tracks import SourceTrack, synthetic_track
from .webrtc import EVENTS_LABEL, ChannelClosed, EventChannel, WebRTCPeer

__all__ = [
    "EVENTS_LABEL",
    "ChangeFilter",
    "ChangeFilterSettings",
    "ChannelClosed",
    "EventChannel",
    "FileSource",
    "Frame",
    "FrameSampler",
    "FrameSource",
    "PushSource",
    "SourceTrack",
    "StreamStats",
    "SyntheticSource",
    "TrackSource",
    "WebRTCPeer",
    "fit_size",
    "rgb_pixels",
    "synthetic_track",
    "to_rgb",
]
