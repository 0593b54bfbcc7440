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
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class _EngineCollector(Collector):
    """Numbers from ``runtime.stats()`` when scraped: the KV families of `_KV_FAMILIES` plus every other
    numeric key as ``speakwatch_engine_<key>`` (the engine decides what it reports; nothing is cached)."""

    def __init__(self, stats: Callable[[], Mapping[str, object]], ready: Callable[[], bool]) -> None:
        self._stats = stats
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("speakwatch_engine_ready", "1 when the engine is loaded and serving")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield ready
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
        if runtime is not None:
            r.register(_EngineCollector(lambda: runtime.stats(), lambda: runtime.ready))

    def render(self) -> bytes:
        return generate_latest(self.registry)
