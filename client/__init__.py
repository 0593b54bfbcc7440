"""Clients of a speakwatch server: the remote Python SDK (:func:`connect`, :func:`connect_sync`), the
terminal chat (``speakwatch chat``, :mod:`client.chat`) and the live camera page (``client/web/``).

The SDK mirrors the embedded ``runtime.Session`` (``push_frame``, ``ask``, ``cancel``, ``stats``,
``close``) over the OpenAI-Realtime-style WebSocket; it depends only on the wire protocol.
"""

from .remote import (
    ConversationItem,
    ErrorEvent,
    Event,
    EventStream,
    OutputTextDelta,
    OutputTextDone,
    RealtimeError,
    RemoteResponse,
    RemoteSession,
    ResponseCreated,
    ResponseDone,
    SessionCreated,
    SessionUpdated,
    SyncResponse,
    SyncSession,
    VideoStats,
    connect,
    connect_sync,
    parse_event,
    realtime_url,
)

__all__ = [
    "ConversationItem",
    "ErrorEvent",
    "Event",
    "EventStream",
    "OutputTextDelta",
    "OutputTextDone",
    "RealtimeError",
    "RemoteResponse",
    "RemoteSession",
    "ResponseCreated",
    "ResponseDone",
    "SessionCreated",
    "SessionUpdated",
    "SyncResponse",
    "SyncSession",
    "VideoStats",
    "connect",
    "connect_sync",
    "parse_event",
    "realtime_url",
]
