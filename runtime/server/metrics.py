"""Prometheus metrics of one server, in a private registry (several apps in one process never collide).

Counters move only forward: the transport reports what it sees itself (frames received and sampled,
TTFT, tokens/s) and the per-tick deltas of each session's own counters (frames ingested and dropped,
rollovers). Engine-wide numbers (KV tokens, ...) are read from ``runtime.stats()`` at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.health import ENGINE_STATES, EngineHealth

if TYPE_CHECKING:
    from .contract import ServedRuntime

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPS_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


# runtime.stats() keys exported under their own names: stats key -> (metric, help, always shown)
_KV_FAMILIES: dict[str, tuple[str, str, bool]] = {
    "kv_tokens": ("speakwatch_kv_tokens", "KV tokens in use: the tokens of every live session request", True),
    "kv_tokens_reserved": (
        "speakwatch_kv_tokens_reserved",
        "KV tokens reserved by the open sessions (each its whole budget, in blocks)",
        True,
    ),
    # absent, not 0, while the engine has reported none
    "kv_capacity_tokens": ("speakwatch_kv_capacity_tokens", "KV tokens the engine's cache holds", False),
}


def engine_health_families(health: EngineHealth) -> Iterator[Metric]:
    """The engine's life: up, its state, deaths, restart attempts and restarts, the last failure."""
    up = GaugeMetricFamily("speakwatch_engine_up", "1 while the engine serves, 0 while it loads or restarts")
    up.add_metric([], 1.0 if health.up else 0.0)
    yield up
    state = GaugeMetricFamily("speakwatch_engine_state", "1 for the engine's current state", labels=["state"])
    for name in ENGINE_STATES:
        state.add_metric([name], 1.0 if health.state == name else 0.0)
    yield state
    counts = (
        ("speakwatch_engine_failures", "engine deaths seen", health.failures),
        (
            "speakwatch_engine_restart_attempts",
            "engine builds attempted after a death",
            health.restart_attempts,
        ),
        ("speakwatch_engine_restarts", "engine restarts that brought it back", health.restarts),
    )
    for name, help_text, value in counts:
        family = CounterMetricFamily(name, help_text)
        family.add_metric([], float(value))
        yield family
    if health.last_restart_s is not None:
        took = GaugeMetricFamily(
            "speakwatch_engine_last_restart_seconds", "the last death until the engine was back"
        )
        took.add_metric([], health.last_restart_s)
        yield took
    if health.last_failure is not None:
        failure = InfoMetricFamily(
            "speakwatch_engine_last_failure", "why the engine last died or failed to restart"
        )
        failure.add_metric([], {"reason": health.last_failure[:200]})
        yield failure


class _EngineCollector(Collector):
    """Numbers from ``runtime.stats()`` when scraped: the KV families of `_KV_FAMILIES` plus every other
    numeric key as ``speakwatch_engine_<key>`` (the engine decides what it reports; nothing is cached),
    and the engine's health (`engine_health_families`)."""

    def __init__(
        self,
        stats: Callable[[], Mapping[str, object]],
        ready: Callable[[], bool],
        health: Callable[[], EngineHealth] | None = None,
    ) -> None:
        self._stats = stats
        self._ready = ready
        self._health = health

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("speakwatch_engine_ready", "1 when the engine is loaded and serving")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield ready
        if self._health is not None:
            yield from engine_health_families(self._health())
        stats: Mapping[str, object] = {}
        if self._ready():
            try:
                stats = self._stats() or {}
            except Exception:  # a scrape must never fail because the engine is in a bad state
                logger.exception("runtime.stats() failed")
        for key, (name, help_text, always) in _KV_FAMILIES.items():
            number = _number(stats.get(key))
            if number is None and not always:
                continue
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], number or 0.0)
            yield family
        for key, value in sorted(stats.items()):
            number = _number(value)
            if number is None or key in _KV_FAMILIES or not key.isidentifier():
                continue
            family = GaugeMetricFamily(f"speakwatch_engine_{key}", f"runtime.stats()[{key!r}]")
            family.add_metric([], number)
            yield family


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class ServerMetrics:
    """Every metric the server exports; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, runtime: ServedRuntime | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions = Gauge("speakwatch_sessions", "open realtime sessions", registry=r)
        self.calls = Gauge("speakwatch_webrtc_calls", "open WebRTC calls", registry=r)
        self.frames_received = Counter(
            "speakwatch_frames_received", "video frames that reached the server", registry=r
        )
        self.frames_sampled = Counter(
            "speakwatch_frames_sampled", "frames that passed the session's fps cap", registry=r
        )
        self.frames_ingested = Counter(
            "speakwatch_frames_ingested", "frames the sessions fed to the model", registry=r
        )
        self.frames_dropped = Counter(
            "speakwatch_frames_dropped", "frames dropped, by reason", ["reason"], registry=r
        )
        self.frame_lag = Histogram(
            "speakwatch_frame_lag_seconds",
            "arrival of a frame at the server until the session accepted it",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "speakwatch_ttft_seconds",
            "response.create until the first text delta",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens_per_s = Histogram(
            "speakwatch_tokens_per_second",
            "output tokens per second of each answer",
            buckets=_TPS_BUCKETS,
            registry=r,
        )
        self.output_tokens = Counter("speakwatch_output_tokens", "generated tokens", registry=r)
        self.input_tokens = Counter("speakwatch_input_tokens", "prompt tokens of answers", registry=r)
        self.responses = Counter(
            "speakwatch_responses", "finished responses, by status", ["status"], registry=r
        )
        self.rollovers = Counter("speakwatch_rollovers", "session rollovers (fresh vLLM request)", registry=r)
        self.errors = Counter("speakwatch_client_errors", "error events sent, by code", ["code"], registry=r)
        self.detached = Gauge(
            "speakwatch_sessions_detached",
            "sessions without a socket, in their resume grace period",
            registry=r,
        )
        self.resumes = Counter(
            "speakwatch_session_resumes",
            "reconnects that asked to resume a session, by result",
            ["result"],
            registry=r,
        )
        self.replayed_events = Counter(
            "speakwatch_replayed_events", "server events replayed to resumed sessions", registry=r
        )
        self.grace_expired = Counter(
            "speakwatch_sessions_grace_expired",
            "sessions closed because no client resumed them in time",
            registry=r,
        )
        self.ws_closed = Counter(
            "speakwatch_websocket_closed_by_server",
            "WebSockets the server closed on its own, by reason (slow_client: its send buffer was full)",
            ["reason"],
            registry=r,
        )
        if runtime is not None:
            r.register(
                _EngineCollector(
                    lambda: runtime.stats(), lambda: runtime.ready, lambda: runtime.engine_health
                )
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)
