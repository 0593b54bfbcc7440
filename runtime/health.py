"""Engine death, seen and survived: the restart policy (pure) and the supervisor that applies it.

vLLM's `AsyncLLM` does not restart a dead engine core: every open request gets `EngineDeadError` and
the object stays dead. `EngineSupervisor` polls the engine's liveness (``probe``, every ``poll_s``),
and on a death tells its listener (the `Runtime`: sessions stop sending, ``/health`` turns 503), then
rebuilds the engine off the event loop with bounded, exponentially backed-off attempts
(`RestartPolicy`), and tells the listener it is back, or that it gave up (the server then exits
with `EXIT_ENGINE_FAILED`, so a process supervisor can start it afresh).

`RestartPolicy` and `EngineHealth` are plain data; the supervisor takes its clock, sleep and the
blocking build / stop functions as arguments, so tests drive it with fakes and no vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

log = logging.getLogger("speakwatch.health")

EngineState = Literal["starting", "up", "restarting", "failed", "stopped"]
ENGINE_STATES: tuple[EngineState, ...] = ("starting", "up", "restarting", "failed", "stopped")
# the server's exit status when the engine died and could not be restarted (BSD EX_SOFTWARE)
EXIT_ENGINE_FAILED = 70

E = TypeVar("E")


@dataclass(frozen=True)
class RestartPolicy:
    """How a dead engine is rebuilt: ``attempts`` tries, the n-th after ``backoff_s * factor**(n-1)``
    seconds (at most ``max_backoff_s``), so a lasting fault ends. An engine that dies again less than
    ``stable_s`` after a restart goes on with the attempts left, so a crash loop ends too."""

    attempts: int = 3
    backoff_s: float = 1.0
    factor: float = 2.0
    max_backoff_s: float = 30.0
    stable_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"restart attempts must be >= 0, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.stable_s < 0:
            raise ValueError("restart back-off and stable_s must be >= 0 seconds")
        if self.factor < 1:
            raise ValueError(f"restart back-off factor must be >= 1, got {self.factor}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempts count from 1, got {attempt}")
        return min(self.max_backoff_s, self.backoff_s * self.factor ** (attempt - 1))

    def delays(self) -> tuple[float, ...]:
        return tuple(self.delay(n) for n in range(1, self.attempts + 1))


@dataclass(frozen=True)
class EngineHealth:
    """What ``/health`` and ``/metrics`` say about the engine (a snapshot)."""

    state: EngineState
    failures: int = 0  # engine deaths seen
    restarts: int = 0  # successful restarts
    restart_attempts: int = 0  # every build attempted after a death, successful or not
    last_failure: str | None = None  # why the engine last died (or the last attempt failed)
    last_restart_s: float | None = None  # the last death until the engine was back
    retry_after_s: int | None = None  # while restarting: when to try again (whole seconds, >= 1)

    @property
    def up(self) -> bool:
        return self.state == "up"

    def encode(self) -> dict[str, object]:
        return {
            "state": self.state,
            "failures": self.failures,
            "restarts": self.restarts,
            "restart_attempts": self.restart_attempts,
            "last_failure": self.last_failure,
            "last_restart_s": self.last_restart_s,
            "retry_after_s": self.retry_after_s,
        }


def retry_after(now: float, ready_at: float) -> int:
    """Whole seconds until ``ready_at`` (at least 1: "now" is not a useful hint)."""
    return max(1, math.ceil(ready_at - now))


class EngineSupervisor(Generic[E]):
    """Owns one engine: builds it, watches it, rebuilds it after a death (see the module docstring).

    ``build`` and ``stop`` block (seconds to minutes for a vLLM engine) and run in a worker thread;
    ``probe`` is cheap and runs on the loop: the reason the engine cannot serve, or None. The owner
    hears of a death (``on_lost``, before the rebuild), a new engine (``on_restored``) and the end
    (``on_failed``: every attempt failed), on the event loop.
    """

    def __init__(
        self,
        build: Callable[[], E],
        probe: Callable[[E], str | None],
        stop: Callable[[E], None],
        policy: RestartPolicy | None = None,
        *,
        on_lost: Callable[[str], None] = lambda reason: None,
        on_restored: Callable[[E], None] = lambda engine: None,
        on_failed: Callable[[str], None] = lambda reason: None,
        poll_s: float = 0.25,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        self._build, self._probe, self._stop = build, probe, stop
        self._on_lost, self._on_restored, self._on_failed = on_lost, on_restored, on_failed
        self.policy = policy or RestartPolicy()
        self.poll_s = poll_s
        self._sleep, self._clock = sleep, clock
        self.engine: E | None = None
        self.state: EngineState = "starting"
        self.failures = self.restarts = self.restart_attempts = 0
        self.last_failure: str | None = None
        self.last_restart_s: float | None = None
        self.build_s: float | None = None  # how long the last successful build took
        self._ready_at: float | None = None  # while restarting: when the engine is expected back
        self._restored_at: float | None = None  # when the last restart brought the engine back
        self._attempt = 0  # the attempt that did
        self._monitor: asyncio.Task[None] | None = None
        self.gave_up = asyncio.Event()

    @property
    def health(self) -> EngineHealth:
        hint = None
        if self.state == "restarting" and self._ready_at is not None:
            hint = retry_after(self._clock(), self._ready_at)
        return EngineHealth(
            self.state,
            self.failures,
            self.restarts,
            self.restart_attempts,
            self.last_failure,
            self.last_restart_s,
            hint,
        )

    async def start(self) -> E:
        """Build the first engine (no retries: a bad checkpoint fails at once) and start watching."""
        engine = await self._timed_build()
        self.engine, self.state = engine, "up"
        loop = asyncio.get_running_loop()
        self._monitor = loop.create_task(self._watch(), name="speakwatch engine monitor")
        return engine

    async def close(self) -> None:
        """Stop watching and shut the engine down (a build in progress is shut down when it ends)."""
        self.state = "stopped"
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        engine, self.engine = self.engine, None
        if engine is not None:
            await self._shutdown(engine)

    def check(self) -> str | None:
        """Why the current engine cannot serve, or None (the probe, guarded)."""
        engine = self.engine
        if engine is None:
            return "no engine"
        try:
            return self._probe(engine)
        except Exception as exc:  # a probe that breaks says nothing good about the engine
            return f"liveness probe failed: {type(exc).__name__}: {exc}"

    async def _watch(self) -> None:
        while self.state == "up":
            await self._sleep(self.poll_s)
            reason = self.check() if self.state == "up" else None
            if reason is not None:
                await self._recover(reason)

    async def _recover(self, reason: str) -> None:
        died = self._clock()
        first = 1
        if self._restored_at is not None and died - self._restored_at < self.policy.stable_s:
            first = self._attempt + 1  # it died again soon after a restart: a crash loop
        self.failures += 1
        self.last_failure = reason
        self.state = "restarting"
        attempts = range(first, self.policy.attempts + 1)
        if attempts:
            self._ready_at = died + self.policy.delay(first) + (self.build_s or 0.0)
        log.error(
            "the engine died (%s); restarting it (attempts %d to %d, back-off %s s)",
            reason,
            first,
            self.policy.attempts,
            ", ".join(f"{self.policy.delay(n):g}" for n in attempts) or "-",
        )
        dead, self.engine = self.engine, None
        self._on_lost(reason)
        if dead is not None:
            await self._shutdown(dead)
        for attempt in attempts:
            delay = self.policy.delay(attempt)
            self._ready_at = self._clock() + delay + (self.build_s or 0.0)
            log.warning("engine restart attempt %d of %d in %g s", attempt, self.policy.attempts, delay)
            await self._sleep(delay)
            self.restart_attempts += 1
            try:
                engine = await self._timed_build()
            except Exception as exc:
                self.last_failure = f"restart attempt {attempt} failed: {type(exc).__name__}: {exc}"
                log.error("engine restart attempt %d of %d failed: %s", attempt, self.policy.attempts, exc)
                continue
            self.engine = engine
            still = self.check()
            if still is not None:
                self.engine = None
                self.last_failure = f"restart attempt {attempt}: the new engine is not alive ({still})"
                log.error("engine restart attempt %d of %d: %s", attempt, self.policy.attempts, still)
                await self._shutdown(engine)
                continue
            self.restarts += 1
            self.last_restart_s = self._clock() - died
            self.state, self._ready_at = "up", None
            self._restored_at, self._attempt = self._clock(), attempt
            log.warning(
                "engine restarted (attempt %d of %d) %.1f s after it died",
                attempt,
                self.policy.attempts,
                self.last_restart_s,
            )
            self._on_restored(engine)
            return
        self.state, self._ready_at = "failed", None
        log.critical(
            "the engine could not be restarted after %d attempts (last: %s)",
            self.policy.attempts,
            self.last_failure,
        )
        self.gave_up.set()
        self._on_failed(self.last_failure or reason)

    async def _timed_build(self) -> E:
        started = self._clock()
        build = asyncio.get_running_loop().run_in_executor(None, self._build_boxed)
        try:
            box = await asyncio.shield(build)
        except asyncio.CancelledError:
            # closed while building: the thread cannot be stopped, so the engine it makes is shut down
            build.add_done_callback(self._discard)
            raise
        self.build_s = self._clock() - started
        return box.pop()

    def _build_boxed(self) -> list[E]:
        """The engine in a box that the loop empties. A worker thread's frames can outlive the call
        (vLLM keeps the traceback of an import that failed inside the first build, and with it
        every frame that led there), and a frame or future still holding the engine itself would
        keep it alive after it died and was replaced."""
        return [self._build()]

    def _discard(self, build: asyncio.Future[list[E]]) -> None:
        if not build.cancelled() and build.exception() is None:
            engine = build.result().pop()
            asyncio.get_running_loop().run_in_executor(None, self._stop_quietly, engine)

    async def _shutdown(self, engine: E) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._stop_quietly, engine)

    def _stop_quietly(self, engine: E) -> None:
        try:
            self._stop(engine)
        except Exception:  # a dead engine may fail to shut down cleanly: nothing more to free
            log.warning("shutting the engine down failed", exc_info=True)


__all__ = [
    "ENGINE_STATES",
    "EXIT_ENGINE_FAILED",
    "EngineHealth",
    "EngineState",
    "EngineSupervisor",
    "RestartPolicy",
    "retry_after",
]
