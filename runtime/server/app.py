"""The HTTP side of speakwatch: one aiohttp application serving the realtime API of one ``Runtime``.

``create_app(runtime, config)`` returns an application that starts listening at once and loads the
engine in a background task (``/health`` answers 503 until ``runtime.ready``), serves realtime sessions
over WebSocket and WebRTC, exports Prometheus metrics and the demo page, and on shutdown cancels
every response and closes every session before closing the runtime.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Handler

from runtime.errors import SessionLimitReached
from runtime.wire import Schedule
from streams import ChangeFilterSettings, WebRTCPeer

from .contract import ServedRuntime
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import DEFAULT_VIDEO, Limits, SessionConfig, error_event, session_limit_reached
from .transport import Call, ChannelSink, ConnectionOptions, EventSink, RealtimeConnection, WebSocketSink

logger = logging.getLogger(__name__)

__all__ = ["SERVER", "RealtimeServer", "ServerConfig", "create_app"]

API_KEY_SUBPROTOCOL = "openai-insecure-api-key."
REALTIME_SUBPROTOCOL = "realtime"


@dataclass(frozen=True)
class ServerConfig:
    """Everything about serving that is not the engine. Every limit is explicit."""

    api_key: str | None = None  # required on /v1/* when set (Bearer header or WebSocket subprotocol)
    max_sessions: int = 16  # realtime sessions at once (WebSocket sessions + standalone WebRTC calls)
    max_fps: float = 30.0  # the highest frame rate a session may ask for (session.video.max_fps)
    default_fps: float = DEFAULT_VIDEO["max_fps"]  # a new session's frame-rate cap; faster frames dropped
    # a new session's scene-change filter (session.video.change_filter changes it per session)
    change_filter: ChangeFilterSettings = field(default_factory=ChangeFilterSettings)
    limits: Limits = field(default_factory=Limits)  # message bytes, image pixels/bytes, instructions...
    ws_max_msg_size: int = 64 * 1024 * 1024  # above limits.max_message_bytes: the core answers, not aiohttp
    ws_heartbeat: float | None = 30.0  # ping interval that finds vanished clients
    stats_interval: float = 1.0  # input_video.stats period while frames flow
    max_pending_images: int = 16
    max_calls_per_session: int = 2  # WebRTC calls feeding one session's video at once
    media_timeout: float = 10.0  # a WebRTC track silent this long ends
    cancel_timeout: float = 5.0
    static_dir: Path | None = None  # None: the live camera page shipped with the server (WEB_ROOT)
    own_runtime: bool = True  # start the runtime in the background at startup, close it at cleanup

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if not 0 < self.max_fps:
            raise ValueError("max_fps must be positive")
        if self.ws_max_msg_size <= self.limits.max_message_bytes:
            raise ValueError("ws_max_msg_size must exceed limits.max_message_bytes")

    def connection_options(
        self, max_output_tokens: int | None = None, schedule: Schedule | None = None
    ) -> ConnectionOptions:
        """What every connection gets; ``max_output_tokens`` is the runtime's own cap, if lower, and
        ``schedule`` the runtime's default schedule."""
        limits = replace(self.limits, max_video_fps=self.max_fps)
        if max_output_tokens is not None and max_output_tokens < limits.max_output_tokens:
            limits = replace(limits, max_output_tokens=max_output_tokens)
        video = {**DEFAULT_VIDEO, "max_fps": min(self.default_fps, self.max_fps)}
        if schedule is not None:
            video["schedule"] = schedule
        return ConnectionOptions(
            limits=limits,
            defaults=SessionConfig(video=video, change_filter=self.change_filter),
            stats_interval=self.stats_interval,
            max_pending_images=self.max_pending_images,
            cancel_timeout=self.cancel_timeout,
        )


class RealtimeServer:
    """The state behind one app: the runtime's startup, the open sessions and calls, the metrics."""

    def __init__(self, runtime: ServedRuntime, config: ServerConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.options = config.connection_options(runtime.max_output_tokens, runtime.schedule)
        self.metrics = ServerMetrics(runtime)
        self.connections: dict[str, RealtimeConnection] = {}
        self.calls: dict[str, Call] = {}
        self.started_at = time.time()
        self.startup_error: str | None = None
        self.ready_event = asyncio.Event()  # set once the startup finished, successfully or not
        self._startup: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    @property
    def model_name(self) -> str:
        return self.runtime.model_name or "speakwatch"

    @property
    def positions(self) -> str | None:
        """The served scheme; None while loading (the runtime reads it from the checkpoint)."""
        return self.runtime.positions or None

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Until the startup has finished; True when the engine is ready."""
        async with asyncio.timeout(timeout):
            await self.ready_event.wait()
        return self.ready

    # -- lifecycle (app signals) --------------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        if self.config.own_runtime and not self.ready:
            self._startup = asyncio.create_task(self._start_runtime(), name="speakwatch runtime start")
        else:
            self.ready_event.set()

    async def _start_runtime(self) -> None:
        try:
            await self.runtime.start()
        except asyncio.CancelledError:
            self.startup_error = "startup cancelled"
            raise
        except Exception as exc:
            self.startup_error = f"{type(exc).__name__}: {exc}"
            logger.exception("the engine failed to start")
        finally:
            self.ready_event.set()

    async def on_shutdown(self, app: web.Application) -> None:
        """Hang up every call and close every session (each cancels its response first)."""
        await asyncio.gather(*(call.close() for call in list(self.calls.values())), return_exceptions=True)
        await asyncio.gather(
            *(
                conn.close(WSCloseCode.GOING_AWAY, "server shutdown")
                for conn in list(self.connections.values())
            ),
            return_exceptions=True,
        )

    async def on_cleanup(self, app: web.Application) -> None:
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            await asyncio.gather(self._startup, return_exceptions=True)
        if self.config.own_runtime:
            try:
                await self.runtime.close()
            except Exception:
                logger.exception("closing the runtime failed")

    # -- sessions -----------------------------------------------------------------------------------

    def open_connection(self, sink: EventSink) -> RealtimeConnection:
        """A new session on ``sink``. Synchronous: no race between the checks and the registration.

        Raises `SessionLimitReached` (its message is the reason the client gets) when the server is
        at ``max_sessions`` or the runtime refuses (its KV cache cannot hold another session's budget),
        and `EngineUnavailable` while the engine loads.
        """
        if len(self.connections) >= self.config.max_sessions:
            raise SessionLimitReached(f"the server is at its limit of {self.config.max_sessions} sessions")
        session = self.runtime.open_session()
        positions = self.positions
        assert positions is not None, "a started runtime serves a resolved scheme"
        conn = RealtimeConnection(
            session,
            sink,
            model=self.model_name,
            positions=positions,
            options=self.options,
            metrics=self.metrics,
            on_close=self._connection_closed,
        )
        self.connections[conn.id] = conn
        self.metrics.sessions.set(len(self.connections))
        return conn

    def _connection_closed(self, conn: RealtimeConnection) -> None:
        self.connections.pop(conn.id, None)
        self.metrics.sessions.set(len(self.connections))

    def _call_closed(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        self.metrics.calls.set(len(self.calls))


SERVER = web.AppKey("speakwatch.server", RealtimeServer)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, *, kind: str = "invalid_request_error") -> web.Response:
    """An OpenAI-shaped HTTP error body."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _offered_subprotocols(request: web.Request) -> list[str]:
    header = request.headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in header.split(",") if p.strip()]


def _presented_keys(request: web.Request) -> list[str]:
    keys = []
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    keys += [
        p[len(API_KEY_SUBPROTOCOL) :]
        for p in _offered_subprotocols(request)
        if p.startswith(API_KEY_SUBPROTOCOL)
    ]
    return keys


def _key_ok(presented: list[str], expected: str) -> bool:
    wanted = expected.encode()
    return any(hmac.compare_digest(key.encode(), wanted) for key in presented)


def _choose_subprotocol(offered: list[str]) -> str | None:
    """``realtime`` if offered; else the first offered one (browsers fail a handshake that answers none)."""
    if REALTIME_SUBPROTOCOL in offered:
        return REALTIME_SUBPROTOCOL
    plain = [p for p in offered if not p.startswith(API_KEY_SUBPROTOCOL)]
    return (plain or offered or [None])[0]


WEB_ROOT = Path(__file__).with_name("web")  # the live camera page: package data of runtime.server


def _static_root(config: ServerConfig) -> Path:
    return WEB_ROOT if config.static_dir is None else Path(config.static_dir)


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------


def create_app(runtime: ServedRuntime, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application serving ``runtime``; ``app[SERVER]`` is its :class:`RealtimeServer`."""
    config = config or ServerConfig()
    server = RealtimeServer(runtime, config)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if config.api_key and request.path.startswith("/v1/"):
            if not _key_ok(_presented_keys(request), config.api_key):
                return _error(
                    401, "invalid_api_key", "missing or incorrect API key (Authorization: Bearer KEY)"
                )
        return await handler(request)

    app = web.Application(middlewares=[authenticate])
    app[SERVER] = server
    app.on_startup.append(server.on_startup)
    app.on_shutdown.append(server.on_shutdown)
    app.on_cleanup.append(server.on_cleanup)

    async def health(request: web.Request) -> web.Response:
        body: dict[str, object] = {
            "model": server.model_name,
            "positions": server.positions,
            "sessions": len(server.connections),
            "max_sessions": config.max_sessions,
            "calls": len(server.calls),
            "uptime_s": round(time.time() - server.started_at, 3),
        }
        if server.ready:
            return web.json_response({"status": "ok", **body})
        if server.startup_error is not None:
            return web.json_response({"status": "error", "error": server.startup_error, **body}, status=503)
        return web.json_response({"status": "starting", **body}, status=503)

    async def metrics(request: web.Request) -> web.Response:
        body = server.metrics.render()  # on the loop: runtime.stats() reads state the loop mutates
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def models(request: web.Request) -> web.Response:
        model = {
            "id": server.model_name,
            "object": "model",
            "created": int(server.started_at),
            "owned_by": "speakwatch",
        }
        return web.json_response({"object": "list", "data": [model]})

    async def realtime(request: web.Request) -> web.StreamResponse:
        protocol = _choose_subprotocol(_offered_subprotocols(request))
        ws = web.WebSocketResponse(
            protocols=(protocol,) if protocol else (),
            max_msg_size=config.ws_max_msg_size,
            heartbeat=config.ws_heartbeat,
        )
        if not ws.can_prepare(request).ok:
            return _error(426, "invalid_value", "expected a WebSocket upgrade")
        await ws.prepare(request)
        sink = WebSocketSink(ws)
        if not server.ready:
            sink.send(
                error_event("engine_unavailable", server.startup_error or "the engine is still loading")
            )
            await sink.close(WSCloseCode.TRY_AGAIN_LATER, "engine unavailable")
            return ws
        try:
            conn = server.open_connection(sink)
        except SessionLimitReached as exc:
            server.metrics.errors.labels(code="session_limit_reached").inc()
            sink.send(session_limit_reached(str(exc)))
            await sink.close(WSCloseCode.TRY_AGAIN_LATER, "session limit reached")
            return ws
        try:
            conn.start()
            async for message in ws:
                if message.type in (web.WSMsgType.TEXT, web.WSMsgType.BINARY):
                    await conn.handle(message.data)
                elif message.type == web.WSMsgType.ERROR:
                    logger.info("session %s: WebSocket error %s", conn.id, ws.exception())
                    break
        finally:
            await conn.close()
        return ws

    async def create_call(request: web.Request) -> web.Response:
        if not server.ready:
            return _error(503, "engine_unavailable", "the engine is still loading", kind="server_error")
        offer = await request.text()
        if "v=0" not in offer:
            return _error(400, "invalid_value", "the body must be an SDP offer (application/sdp)")
        session_id = request.query.get("session_id")
        attached = server.connections.get(session_id) if session_id else None
        if session_id and attached is None:
            return _error(404, "session_not_found", f"no open session {session_id!r}")
        if attached is not None and len(attached.closers) >= config.max_calls_per_session:
            message = f"session {session_id!r} already has {config.max_calls_per_session} calls"
            return _error(429, "too_many_calls", message)
        fps = attached.max_fps if attached is not None else server.options.defaults.video["max_fps"]
        peer = WebRTCPeer(fps=fps, media_timeout=config.media_timeout)
        try:
            answer = await peer.accept(offer)
        except Exception as exc:
            await peer.close("invalid offer")
            return _error(400, "invalid_value", f"cannot accept the SDP offer: {exc}")
        if attached is not None and attached.closed:
            await peer.close("session closed")
            return _error(404, "session_not_found", f"session {session_id!r} has ended")
        try:
            conn = attached or server.open_connection(ChannelSink(peer.events))
        except SessionLimitReached as exc:
            await peer.close("session limit")
            server.metrics.errors.labels(code="session_limit_reached").inc()
            return _error(429, "session_limit_reached", str(exc), kind="server_error")
        if attached is None:
            conn.start()
        call = Call(
            f"rtc_{uuid.uuid4().hex[:24]}",
            peer,
            conn,
            owns_connection=attached is None,
            on_close=server._call_closed,
        )
        server.calls[call.id] = call
        server.metrics.calls.set(len(server.calls))
        call.start()
        location = f"/v1/realtime/calls/{call.id}"
        return web.Response(
            status=201, text=answer, content_type="application/sdp", headers={"Location": location}
        )

    async def delete_call(request: web.Request) -> web.Response:
        call = server.calls.get(request.match_info["call_id"])
        if call is None:
            return _error(404, "call_not_found", "no such call")
        await call.close()
        return web.Response(status=204)

    async def static(request: web.Request) -> web.StreamResponse:
        root = _static_root(config)
        name = request.match_info.get("path") or "index.html"
        if not root.is_dir():
            raise web.HTTPNotFound(text="no web client is installed")
        base = root.resolve()
        target = (base / name).resolve()
        if not target.is_relative_to(base):
            raise web.HTTPNotFound()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(target)

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_post("/v1/realtime/calls", create_call)
    app.router.add_delete("/v1/realtime/calls/{call_id}", delete_call)
    app.router.add_get("/", static)
    app.router.add_get("/{path:.+}", static)  # last: every route above wins over it
    return app
