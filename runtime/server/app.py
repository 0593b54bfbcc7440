"""The HTTP side of speakwatch: one aiohttp application serving the realtime API of one ``Runtime``.

``create_app(runtime, config)`` returns an application that starts listening at once and loads the
engine in a background task (``/health`` answers 503 until ``runtime.ready``), serves realtime sessions
over WebSocket and WebRTC, exports Prometheus metrics and the demo page, and on shutdown cancels
every response and closes every session before closing the runtime.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Handler

from runtime.errors import EngineUnavailable, SessionLimitReached
from runtime.wire import Schedule, WireError
from streams import ChangeFilterSettings, WebRTCPeer

from . import client_secrets
from .contract import ServedRuntime
from .metrics import CONTENT_TYPE, ServerMetrics
from .origins import OriginPolicy, cors_headers, preflight_headers
from .protocol import DEFAULT_VIDEO, ErrorEvent, Limits, SessionConfig, error_event, session_limit_reached
from .transport import (
    RESUME_REFUSAL_STATUS,
    Call,
    ChannelSink,
    ConnectionOptions,
    EventSink,
    RealtimeConnection,
    SessionResumer,
    WebSocketSink,
    read_websocket,
)

logger = logging.getLogger(__name__)

__all__ = ["SERVER", "RealtimeServer", "ServerConfig", "create_app"]

API_KEY_SUBPROTOCOL = "openai-insecure-api-key."
WS_WRITER_LIMIT = 64 * 1024  # a WebSocket's socket buffer holds at most ~2x this beyond its queue
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
    # web origins besides the server's own whose pages may call /v1/* ("*": any); others get 403
    allow_origins: tuple[str, ...] = ()
    max_client_secrets: int = 1000  # unused, unexpired client secrets at once; minting more is 429
    clock: Callable[[], float] = time.time  # Unix seconds, for client-secret expiry (tests inject one)
    # a WebSocket session outlives a lost socket this long (s) for a resume (?resume=TOKEN); 0: never
    resume_grace: float = 30.0
    replay_max_events: int = 10_000  # the server events a resumable session keeps for a replay...
    replay_max_bytes: int = 8 * 1024 * 1024  # ...and their bytes at most
    ws_max_output_bytes: int = 1024 * 1024  # unsent bytes per WebSocket; beyond, it is closed (1008)

    def __post_init__(self) -> None:
        if self.resume_grace < 0:
            raise ValueError("resume_grace cannot be negative")
        if self.replay_max_events < 1 or self.replay_max_bytes < 1 or self.ws_max_output_bytes < 1:
            raise ValueError("replay_max_events, replay_max_bytes and ws_max_output_bytes must be positive")
        OriginPolicy.of(self.allow_origins)  # a bad origin fails here, not on the first request
        if self.max_client_secrets < 1:
            raise ValueError("max_client_secrets must be at least 1")
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
        self.resumer = SessionResumer(
            config.resume_grace,
            self.connections,
            self.metrics,
            replay_max_events=config.replay_max_events,
            replay_max_bytes=config.replay_max_bytes,
        )
        self.secrets: client_secrets.ClientSecrets[SessionConfig] = client_secrets.ClientSecrets(
            config.max_client_secrets
        )
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

    def unavailable(self) -> tuple[str, int | None]:
        """Why the engine cannot serve now, and when to retry (whole seconds; None when unknown)."""
        health = self.runtime.engine_health
        if health.state == "restarting":
            retry = health.retry_after_s
            return f"the engine died ({health.last_failure}); restarting it, retry in {retry} s", retry
        if health.state == "failed":
            return f"the engine died and could not be restarted: {health.last_failure}", None
        return self.startup_error or "the engine is still loading", None

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
        self.resumer.close()
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

    def open_connection(self, sink: EventSink, defaults: SessionConfig | None = None) -> RealtimeConnection:
        """A new session on ``sink``. Synchronous: no race between the checks and the registration.
        ``defaults`` (a client secret's session) replace the server's session defaults.

        Raises `SessionLimitReached` (its message is the reason the client gets) when the server is
        at ``max_sessions`` or the runtime refuses (its KV cache cannot hold another session's budget),
        and `EngineUnavailable` while the engine loads.
        """
        if len(self.connections) >= self.config.max_sessions:
            raise SessionLimitReached(f"the server is at its limit of {self.config.max_sessions} sessions")
        options = self.options
        if defaults is None:
            session = self.runtime.open_session()
        else:
            schedule: Schedule = "sequential" if defaults.video["schedule"] == "sequential" else "parallel"
            session = self.runtime.open_session(defaults.instructions, schedule)
            options = replace(options, defaults=defaults)
        positions = self.positions
        assert positions is not None, "a started runtime serves a resolved scheme"
        conn = RealtimeConnection(
            session,
            sink,
            model=self.model_name,
            positions=positions,
            options=options,
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
GRANTED = web.RequestKey("speakwatch.granted", SessionConfig)  # the session defaults of a redeemed secret
SESSION_OPENERS = {("GET", "/v1/realtime"), ("POST", "/v1/realtime/calls")}  # where a client secret works


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _error(
    status: int, code: str, message: str, *, kind: str = "invalid_request_error", param: str | None = None
) -> web.Response:
    """An OpenAI-shaped HTTP error body."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _engine_unavailable(server: RealtimeServer) -> web.Response:
    """503 ``engine_unavailable``, with ``Retry-After`` while the engine restarts."""
    message, retry = server.unavailable()
    response = _error(503, "engine_unavailable", message, kind="server_error")
    if retry is not None:
        response.headers["Retry-After"] = str(retry)
    return response


def _resume_refused(refusal: ErrorEvent | None) -> web.Response:
    """A call's refused ``?resume=`` (None: combined with ``session_id``, which cannot be)."""
    if refusal is None:
        return _error(400, "invalid_value", "resume and session_id cannot be combined", param="resume")
    error = refusal.error
    status = RESUME_REFUSAL_STATUS.get(error.code, 400)
    return _error(status, error.code, error.message, kind=error.type, param=error.param)


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

    origins = OriginPolicy.of(config.allow_origins)

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Browser requests to /v1/* only from the server's own origin or an allowed one (else 403);
        an allowed origin's CORS preflight is answered here, and its answers made readable."""
        origin = request.headers.get("Origin")
        if origin is None or not request.path.startswith("/v1/"):
            return await handler(request)
        verdict = origins.check(origin, request.scheme, request.host)
        if verdict == "refused":
            server.metrics.errors.labels(code="origin_not_allowed").inc()
            return _error(403, "origin_not_allowed", origins.refusal(origin))
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers=preflight_headers(origin, request.headers))
        if verdict == "same-origin":
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(cors_headers(origin))
            raise
        if not response.prepared:  # a WebSocket has answered already (and needs no CORS)
            response.headers.update(cors_headers(origin))
        return response

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        """The API key on /v1/*; where a session opens, a client secret instead (spent here)."""
        if request.path.startswith("/v1/"):
            opens = (request.method, request.path) in SESSION_OPENERS
            store = server.secrets if opens else None
            keys = _presented_keys(request)
            verdict = client_secrets.authorize(keys, api_key=config.api_key, store=store, now=config.clock())
            if not isinstance(verdict, client_secrets.Granted):
                return _error(401, "invalid_api_key", verdict.message)
            if verdict.session is not None:
                request[GRANTED] = verdict.session
        return await handler(request)

    app = web.Application(middlewares=[check_origin, authenticate])
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
        engine = server.runtime.engine_health
        body["engine"] = engine.encode()
        if server.ready:
            return web.json_response({"status": "ok", **body})
        if engine.state in ("restarting", "failed"):  # the engine died: 503 at once, with a hint
            message, retry = server.unavailable()
            headers = {"Retry-After": str(retry)} if retry is not None else None
            return web.json_response(
                {"status": engine.state, "error": message, **body}, status=503, headers=headers
            )
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
            writer_limit=WS_WRITER_LIMIT,  # bytes between flow-control checks: caps the socket buffer
        )
        if not ws.can_prepare(request).ok:
            return _error(426, "invalid_value", "expected a WebSocket upgrade")
        await ws.prepare(request)
        sink = WebSocketSink(
            ws, request.transport, max_buffered_bytes=config.ws_max_output_bytes, metrics=server.metrics
        )
        token = request.query.get("resume")
        if not server.ready and token is None:  # a resumed session needs no engine to come back
            message, retry = server.unavailable()
            sink.send(error_event("engine_unavailable", message, retry_after_s=retry))
            await sink.close(WSCloseCode.TRY_AGAIN_LATER, "engine unavailable")
            return ws
        if token is not None:  # a reconnect: the same session, with what it missed replayed
            resumed = server.resumer.resume(token, request.query.get("last_event_id"), sink)
            if not isinstance(resumed, RealtimeConnection):
                sink.send(resumed)
                await sink.close(WSCloseCode.POLICY_VIOLATION, "session not resumed")
                return ws
            conn = resumed
        else:
            try:
                conn = server.open_connection(sink, request.get(GRANTED))
            except SessionLimitReached as exc:
                server.metrics.errors.labels(code="session_limit_reached").inc()
                sink.send(session_limit_reached(str(exc)))
                await sink.close(WSCloseCode.TRY_AGAIN_LATER, "session limit reached")
                return ws
            except EngineUnavailable as exc:  # the engine died since the check above
                sink.send(error_event("engine_unavailable", str(exc), retry_after_s=exc.retry_after_s))
                await sink.close(WSCloseCode.TRY_AGAIN_LATER, "engine unavailable")
                return ws
            server.resumer.register(conn)
        deliberate = False
        try:
            if token is None:
                conn.start()
            deliberate = await read_websocket(ws, conn)
        finally:  # a deliberate close ends the session; a lost socket starts its grace period
            await server.resumer.disconnected(conn, sink, deliberate=deliberate)
        return ws

    async def create_call(request: web.Request) -> web.Response:
        if not server.ready and "resume" not in request.query:  # a resumed session needs no engine
            return _engine_unavailable(server)
        offer = await request.text()
        if "v=0" not in offer:
            return _error(400, "invalid_value", "the body must be an SDP offer (application/sdp)")
        session_id = request.query.get("session_id")
        token, last_event_id = request.query.get("resume"), request.query.get("last_event_id")
        if token is not None:  # a standalone call taking over its session after a lost peer
            refusal = server.resumer.check(token, last_event_id) if not session_id else None
            if session_id or refusal is not None:
                return _resume_refused(refusal)
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
        sink = ChannelSink(peer.events)
        resumed = server.resumer.resume(token, last_event_id, sink) if token is not None else None
        if isinstance(resumed, ErrorEvent):  # its grace ended while the offer was accepted
            await peer.close("session not resumed")
            return _resume_refused(resumed)
        try:
            conn = attached or resumed or server.open_connection(sink, request.get(GRANTED))
        except SessionLimitReached as exc:
            await peer.close("session limit")
            server.metrics.errors.labels(code="session_limit_reached").inc()
            return _error(429, "session_limit_reached", str(exc), kind="server_error")
        except EngineUnavailable:
            await peer.close("engine unavailable")
            return _engine_unavailable(server)
        if attached is None and resumed is None:
            server.resumer.register(conn)
            conn.start()
        call = Call(
            f"rtc_{uuid.uuid4().hex[:24]}",
            peer,
            conn,
            owns_connection=attached is None,
            on_close=server._call_closed,
            sink=sink if attached is None else None,
            resumer=server.resumer,
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

    async def create_client_secret(request: web.Request) -> web.Response:
        """A single-use secret that opens one session with the given defaults (the API key mints it)."""
        positions = server.positions
        if not server.ready or positions is None:
            return _engine_unavailable(server)
        try:
            payload = await request.json() if request.can_read_body else None
        except ValueError:
            return _error(400, "invalid_json", "the body is not valid JSON")
        try:
            ask = client_secrets.decode_request(payload)
            defaults, shape = client_secrets.session_defaults(
                ask.session,
                model=server.model_name,
                positions=positions,
                limits=server.options.limits,
                defaults=server.options.defaults,
            )
        except WireError as exc:
            return _error(400, exc.code, exc.message, param=exc.param)
        try:
            secret = server.secrets.mint(defaults, ask.seconds, config.clock())
        except client_secrets.TooManySecrets as exc:
            return _error(429, "too_many_client_secrets", str(exc))
        return web.json_response({"value": secret.value, "expires_at": secret.expires_at, "session": shape})

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
    app.router.add_post("/v1/realtime/client_secrets", create_client_secret)
    app.router.add_delete("/v1/realtime/calls/{call_id}", delete_call)
    app.router.add_get("/", static)
    app.router.add_get("/{path:.+}", static)  # last: every route above wins over it
    return app
