"""What the server needs from a runtime, a session and an answer: the one interface it types against.

`runtime.runtime.Runtime` / `runtime.session.Session` serve it for real, the fake runtime of the server
tests stands in for them; a test compares the method names and signatures of both with these
protocols, so neither side can drift without failing it. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import numpy as np

from runtime.health import EngineHealth
from runtime.wire import ResponseStatus, Schedule, SessionStats
from streams.change import ChangeFilterSettings
from streams.frame import Frame

__all__ = ["ServedResponse", "ServedRuntime", "ServedSession"]


class ServedResponse(Protocol):
    """One answer: its text deltas as an async iterator; ``status`` and ``usage`` final once it ends."""

    @property
    def id(self) -> str: ...

    @property
    def status(self) -> ResponseStatus: ...

    @property
    def usage(self) -> dict[str, int]: ...

    def __aiter__(self) -> AsyncIterator[str]: ...


class ServedSession(Protocol):
    """One watching conversation. It alone decides whether an answer may start (`ask` raises
    `runtime.errors.ResponseActive` otherwise)."""

    @property
    def id(self) -> str: ...

    def ingest(self, frame: Frame) -> None: ...

    def ask(
        self,
        text: str,
        max_tokens: int | None = None,
        *,
        images: Sequence[np.ndarray] = (),
        instructions: str | None = None,
        response_id: str | None = None,
    ) -> ServedResponse: ...

    async def cancel(self) -> None: ...

    def update(
        self,
        *,
        instructions: str | None = None,
        max_fps: float | None = None,
        schedule: str | None = None,
        change_filter: ChangeFilterSettings | None = None,
    ) -> None: ...

    def stats(self) -> SessionStats: ...

    async def close(self) -> None: ...


class ServedRuntime(Protocol):
    """The engine behind one server: started in the background, sessions opened on it.

    `open_session` raises `runtime.errors.EngineUnavailable` until started and
    `runtime.errors.SessionLimitReached` (its message says why, with the numbers) when the engine
    cannot hold another session; `stats` reports ``kv_tokens`` (in use), ``kv_tokens_reserved`` and
    ``kv_capacity_tokens`` (None until known) for ``/metrics``. ``ready`` is False while the engine
    loads, while it is restarted after a death, and once it could not be; ``engine_health`` says which
    (``/health``, ``/metrics``), with the hint of when to retry.
    """

    @property
    def ready(self) -> bool: ...

    @property
    def engine_health(self) -> EngineHealth: ...

    @property
    def model_name(self) -> str: ...

    @property
    def positions(self) -> str | None: ...  # None until started: the checkpoint decides

    @property
    def schedule(self) -> Schedule: ...

    @property
    def max_output_tokens(self) -> int: ...

    @property
    def dtype(self) -> str | None: ...  # None until started: chosen for the machine unless asked for

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def wait_failed(self) -> str: ...  # returns why once the engine died and could not be restarted

    def open_session(
        self,
        instructions: str | None = None,
        schedule: Schedule | None = None,
        *,
        max_fps: float | None = None,
        change_filter: ChangeFilterSettings | None = None,
    ) -> ServedSession: ...

    def stats(self) -> dict[str, object]: ...
