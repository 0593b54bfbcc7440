"""A stand-in for ``runtime.Runtime`` with exactly the interface the server needs, for fast server tests.

It serves `runtime.server.contract` (``tests/server/test_contract.py`` checks it against the
protocols and the real classes, so the two cannot drift apart).

No model: a session records what it is given (frames, questions, updates) and answers with a
deterministic text built from it, one word per delta, ``token_delay`` seconds apart, so tests can
check that frames and images reached the session. A question containing "forever" gets an endless
answer (for cancel tests). ``start()`` waits for ``gate`` when the runtime is built with
``hold=True``, so tests can watch ``/health`` answer 503 during a "load". With ``kv_capacity_tokens``
it admits sessions by KV as ``Runtime`` does (the same `runtime.admission` arithmetic: every open
session reserves ``budget_tokens`` in blocks of ``block_size``) and raises `SessionLimitReached`.

Like ``Runtime``, ``positions`` and ``settings.turn_tokens`` default to None and are resolved by
``start()`` from the "checkpoint" (``trained_positions`` / ``trained_turn_tokens``, those of the
built-in watching model unless given).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from runtime import admission
from runtime.admission import KVCapacity
from runtime.errors import EngineUnavailable, ResponseActive, SessionLimitReached
from runtime.health import EngineHealth
from runtime.runtime import RuntimeSettings
from runtime.wire import ResponseStatus, Schedule, SessionStats
from streams.change import ChangeFilterSettings
from streams.frame import Frame, rgb_pixels

_ids = itertools.count(1)


@dataclass
class Asked:
    text: str
    max_tokens: int | None
    images: list[np.ndarray]
    instructions: str | None
    response_id: str | None


class FakeResponse:
    """Async iterator of word deltas; ends early (status "cancelled") when the session cancels it."""

    def __init__(
        self, session: FakeSession, words: list[str] | None, max_tokens: int | None, response_id: str | None
    ) -> None:
        self.id = response_id or f"fake_resp_{next(_ids)}"
        self.status: ResponseStatus = "in_progress"
        self.usage: dict[str, int] = {"input_tokens": 10 + len(session.frames), "output_tokens": 0}
        self._session = session
        self._words = words  # None: endless
        self._max_tokens = max_tokens
        self.cancelled = asyncio.Event()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[str]:
        words = iter(self._words) if self._words is not None else (f"w{i} " for i in itertools.count())
        try:
            for word in words:
                if self._max_tokens is not None and self.usage["output_tokens"] >= self._max_tokens:
                    self.status = "incomplete"
                    return
                try:
                    await asyncio.wait_for(self.cancelled.wait(), self._session.runtime.token_delay)
                except TimeoutError:
                    pass
                if self.cancelled.is_set():
                    self.status = "cancelled"
                    return
                self.usage["output_tokens"] += 1
                yield word
            self.status = "completed"
        finally:
            if self.status == "in_progress":
                self.status = "cancelled"
            if self._session.active is self:
                self._session.active = None


@dataclass
class FakeSession:
    runtime: FakeRuntime
    instructions: str | None
    schedule: Schedule
    id: str = field(default_factory=lambda: f"sess_fake{next(_ids)}")
    ingested: list[Frame] = field(default_factory=list)
    asked: list[Asked] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    active: FakeResponse | None = None
    cancels: int = 0
    closed: bool = False
    max_fps: float | None = None
    change_filter: ChangeFilterSettings | None = None

    @property
    def frames(self) -> list[tuple[tuple[int, ...], float]]:
        """(shape, stream timestamp) of every frame ingested."""
        return [(frame.rgb.shape, frame.timestamp) for frame in self.ingested]

    def ingest(self, frame: Frame) -> None:
        if self.closed:
            raise RuntimeError("session is closed")
        self.ingested.append(frame)

    def ask(
        self,
        text: str,
        max_tokens: int | None = None,
        *,
        images: Sequence[np.ndarray] = (),
        instructions: str | None = None,
        response_id: str | None = None,
    ) -> FakeResponse:
        if self.closed:
            raise EngineUnavailable("session is closed")
        if self.active is not None:
            raise ResponseActive("a response is in progress")
        if self.runtime.fail_asks:
            raise EngineUnavailable("the fake engine is down", self.runtime.engine_health.retry_after_s)
        images = [rgb_pixels(image) for image in images]
        self.asked.append(Asked(text, max_tokens, images, instructions, response_id))
        shapes = ",".join(f"{im.shape[1]}x{im.shape[0]}" for im in images) or "none"
        words = None
        if "forever" not in text:
            answer = f"seen {len(self.frames)} frames, images {shapes}, you said: {text}"
            words = [word + " " for word in answer.split()]
        self.active = FakeResponse(self, words, max_tokens, response_id)
        return self.active

    async def cancel(self) -> None:
        self.cancels += 1
        if self.active is not None:
            self.active.cancelled.set()

    def update(
        self,
        *,
        instructions: str | None = None,
        max_fps: float | None = None,
        schedule: str | None = None,
        change_filter: ChangeFilterSettings | None = None,
    ) -> None:
        self.updates.append({"instructions": instructions, "max_fps": max_fps, "schedule": schedule})
        if change_filter is not None:
            self.change_filter = change_filter
        if schedule is not None:
            self.schedule = schedule  # type: ignore[assignment]  # the protocol core validated it
        if max_fps is not None:
            self.max_fps = max_fps

    def stats(self) -> SessionStats:
        n = len(self.frames)
        return SessionStats(
            session_id=self.id,
            schedule=self.schedule,
            positions=str(self.runtime.positions),
            max_fps=self.max_fps,
            frames_received=n,
            frames_sampled=n,
            frames_ingested=n,
            frame_lag_p50_ms=5.0 if n else None,
            frame_lag_p95_ms=9.0 if n else None,
            answering=self.active is not None,
            session_tokens=64 * n,
        )

    async def close(self) -> None:
        if self.active is not None:
            self.active.cancelled.set()
        self.closed = True


class FakeRuntime:
    """The ``Runtime`` interface without an engine."""

    def __init__(
        self,
        model: str | None = None,
        *,
        positions: str | None = None,
        trained_positions: str = "group-decoupled",
        trained_turn_tokens: int = 3,
        turn_tokens: int | None = None,
        schedule: Schedule = "parallel",
        token_delay: float = 0.005,
        hold: bool = False,
        fail_start: bool = False,
        kv_capacity_tokens: int | None = None,
        budget_tokens: int = 1024,
        block_size: int = 16,
        **options: Any,
    ) -> None:
        self.model_name = model or "fake-vlm"
        self.positions = positions  # None until start(): the checkpoint's own, as in Runtime
        self.trained_positions = trained_positions
        self.trained_turn_tokens = trained_turn_tokens
        self.settings = RuntimeSettings(turn_tokens=turn_tokens)
        self.schedule = schedule
        self.options = options
        self.token_delay = token_delay
        self.fail_start = fail_start
        self.fail_asks = False
        self.gate = asyncio.Event()
        if not hold:
            self.gate.set()
        self.ready = False
        self.started = False
        self.closed = False
        self.engine_health = EngineHealth("starting")  # `lose_engine` / `restore_engine` move it
        self.gave_up = asyncio.Event()  # `fail_engine`: what `wait_failed` waits for
        self.sessions: list[FakeSession] = []
        self.budget_tokens = budget_tokens
        self.kv_capacity: KVCapacity | None = None
        if kv_capacity_tokens is not None:
            self.kv_capacity = KVCapacity(kv_capacity_tokens // block_size, block_size)

    async def start(self) -> None:
        self.started = True
        await self.gate.wait()
        if self.fail_start:
            raise RuntimeError("no weights here")
        self.positions = self.positions or self.trained_positions
        if self.settings.turn_tokens is None:
            self.settings = replace(self.settings, turn_tokens=self.trained_turn_tokens)
        self.ready = True
        self.engine_health = EngineHealth("up")

    def lose_engine(self, reason: str = "killed by SIGKILL", retry_after_s: int = 3) -> None:
        """As `Runtime` when its engine dies: not ready, restarting, with the hint of when to retry."""
        self.ready = False
        self.engine_health = replace(
            self.engine_health,
            state="restarting",
            failures=self.engine_health.failures + 1,
            last_failure=reason,
            retry_after_s=retry_after_s,
        )

    def fail_engine(self, reason: str = "restart attempt 3 failed: no weights") -> None:
        """As `Runtime` when every restart failed: not ready, "failed", `wait_failed` returns."""
        self.ready = False
        health = self.engine_health
        self.engine_health = replace(health, state="failed", last_failure=reason, retry_after_s=None)
        self.gave_up.set()

    async def wait_failed(self) -> str:
        await self.gave_up.wait()
        return self.engine_health.last_failure or "failed"

    def restore_engine(self) -> None:
        health = self.engine_health
        self.engine_health = replace(
            health,
            state="up",
            restarts=health.restarts + 1,
            restart_attempts=health.restart_attempts + 1,
            last_restart_s=2.5,
            retry_after_s=None,
        )
        self.ready = True

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        self.ready = False
        self.closed = True
        self.engine_health = EngineHealth("stopped")

    async def __aenter__(self) -> FakeRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open_session(
        self,
        instructions: str | None = None,
        schedule: Schedule | None = None,
        *,
        max_fps: float | None = None,
        change_filter: ChangeFilterSettings | None = None,
    ) -> FakeSession:
        if not self.ready:
            raise EngineUnavailable("not started", self.engine_health.retry_after_s)
        if self.kv_capacity is not None and self.settings.admission == "kv":
            decision = admission.decide(
                self.kv_capacity, self._reserved_blocks, len(self.open_sessions), self.budget_tokens
            )
            if not decision.admitted:
                raise SessionLimitReached(decision.reason)
        session = FakeSession(
            self, instructions, schedule or self.schedule, max_fps=max_fps, change_filter=change_filter
        )
        self.sessions.append(session)
        return session

    @property
    def max_output_tokens(self) -> int:
        return self.settings.max_output_tokens

    @property
    def dtype(self) -> str | None:
        return None  # no engine: nothing to serve in

    @property
    def open_sessions(self) -> list[FakeSession]:
        return [s for s in self.sessions if not s.closed]

    @property
    def _reserved_blocks(self) -> int:
        if self.kv_capacity is None:
            return 0
        per_session = admission.session_blocks(self.budget_tokens, self.kv_capacity.block_size)
        return len(self.open_sessions) * per_session

    def stats(self) -> dict[str, object]:
        capacity = self.kv_capacity
        return {
            "sessions": len(self.open_sessions),
            "kv_tokens": sum(64 * len(s.frames) for s in self.open_sessions),
            "kv_tokens_reserved": self._reserved_blocks * (capacity.block_size if capacity else 0),
            "kv_capacity_tokens": capacity.tokens if capacity is not None else None,
            "rollovers": 0,
        }


# -- helpers for the tests -------------------------------------------------------------------------


def image_url(width: int = 32, height: int = 24, fmt: str = "JPEG") -> str:
    """A real JPEG/PNG as a data URL."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = (np.arange(width) % 256).astype(np.uint8)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


async def eventually(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy."""
    async with asyncio.timeout(timeout):
        while not (result := check()):
            await asyncio.sleep(interval)
    return result
