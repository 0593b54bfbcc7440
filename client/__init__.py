"""Clients of a speakwatch server: the remote Python SDK (:func:`connect`, :func:`connect_sync`), the
terminal chat (``speakwatch chat``, :mod:`client.chat`) and the live camera page (``client/web/``).

The SDK mirrors the embedded ``runtime.Session`` (``push_frame``, ``ask``, ``cancel``, ``stats``,
``close``) over the OpenAI-Realtime-style WebSocket; it depends only on the wire schema
(`runtime.wire`), whose typed server events it hands out under the names below.
"""

from runtime.wire import ConversationItemEvent as ConversationItem
from runtime.wire import (
    ErrorEvent,
    OutputTextDelta,
    OutputTextDone,
    ResponseCreated,
    ResponseDone,
    SessionCreated,
    SessionUpdated,
)
from runtime.wire import InputVideoStats as VideoStats
from runtime.wire import ServerEvent as Event
from runtime.wire import UnknownServerEvent as UnknownEvent
from runtime.wire import decode_server_event as parse_event

from .core import RealtimeError
from .remote import (
    EventStream,
    RemoteResponse,
    RemoteSession,
    SyncResponse,
    SyncSession,
    connect,
    connect_sync,
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
    "UnknownEvent",
    "VideoStats",
    "connect",
    "connect_sync",
    "parse_event",
    "realtime_url",
]
