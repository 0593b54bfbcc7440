"""`Runtime`: one vLLM engine and one vision encoder shared by many watching sessions."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime import admission
from runtime.admission import ADMISSIONS, Admission, KVCapacity
from runtime.engine import (
    DTYPE_BITS,
    EngineOptions,
    ModelInfo,
    build_async_llm,
    engine_failure,
    kv_capacity,
    resolve_dtype,
    stop_engine,
)
from runtime.errors import EngineUnavailable, SessionLimitReached
from runtime.health import EngineHealth, EngineSupervisor, RestartPolicy, retry_after
from runtime.memory import MemoryConfig
from runtime.session import Session
from runtime.wire import SCHEDULES, Schedule
from streams.change import ChangeFilterSettings

log = logging.getLogger("speakwatch.runtime")

DEFAULT_TURN_TOKENS = 8


@dataclass(frozen=True)
class RuntimeSettings:
    """Session behaviour shared by every session of a runtime (defaults suit the tiny model on CPU)."""

    # K: answer tokens per turn, frames are inserted between turns; None: the checkpoint's trained K, else 8
    turn_tokens: int | None = None
    max_output_tokens: int = 256
    max_fps: float = 2.0
    frame_queue: int = 8  # unencoded frames per session before the oldest are dropped
    ready_chunks: int = 16  # encoded items waiting for the model before the oldest are dropped
    max_chunks_per_turn: int = 4
    frames_per_chunk: int = 1  # 2 packs two frames into one temporal patch
    pixel_budget: int | None = None  # resize frames to at most this many pixels (model's default)
    temperature: float = 0.0
    encoder_threads: int | None = None
    budget_tokens: int | None = None  # live-request tokens before a rollover; default 3/4 of max_model_len
    window_steps: int = 8  # recent visual steps carried into the next request on a rollover
    dialogue_turns: int = 4  # recent question/answer pairs carried over
    memory: MemoryConfig | None = None  # None: defaults for the model size; MemoryConfig(enabled=False): off
    # push_frame's scene-change filter: frames that show nothing new are dropped ("unchanged"), one
    # still goes in every keepalive_s; ChangeFilterSettings(enabled=False): every frame goes in
    change_filter: ChangeFilterSettings = field(default_factory=ChangeFilterSettings)
    # "kv": open a session only while the engine's KV cache holds every open session's whole budget
    # (runtime.admission); "off": open every session, and vLLM preempts one when the cache fills
    admission: Admission = "kv"
    # a dead engine is rebuilt up to restart_attempts times, the n-th after restart_backoff_s * 2**(n-1)
    # seconds (runtime.health.RestartPolicy); then the runtime is failed (the server exits with 70)
    restart_attempts: int = RestartPolicy.attempts
    restart_backoff_s: float = RestartPolicy.backoff_s
    engine_poll_s: float = 0.25  # how often the engine's liveness is checked (a death shows in /health)

    def __post_init__(self) -> None:
        if self.turn_tokens is not None and self.turn_tokens < 1:
            raise ValueError("turn_tokens must be >= 1")
        if self.max_output_tokens < 1:
            raise ValueError("max_output_tokens must be >= 1")
        if self.max_fps <= 0:
            raise ValueError("max_fps must be positive")
        if not isinstance(self.change_filter, ChangeFilterSettings):
            raise ValueError("change_filter must be a ChangeFilterSettings")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        RestartPolicy(self.restart_attempts, self.restart_backoff_s)  # raises on bad values
        if self.engine_poll_s <= 0:
            raise ValueError(f"engine_poll_s must be positive, got {self.engine_poll_s}")

    @property
    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(attempts=self.restart_attempts, backoff_s=self.restart_backoff_s)


class Runtime:
    """The embedded SDK entry point.

    ``async with Runtime() as rt:`` starts the engine; ``rt.open_session()`` gives a `Session`.
    With no ``model``, the built-in watching checkpoint (a tiny Qwen2-VL fine-tuned on the synthetic
    seeing task); ``arch="qwen2-vl"`` / ``"qwen2.5-vl"`` instead gives a random-weight tiny checkpoint
    (every mechanism, noise answers). ``positions=None`` serves the scheme the checkpoint was trained
    for (``sequential`` for stock checkpoints).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        arch: str | None = None,
        positions: str | None = None,
        schedule: Schedule = "parallel",
        engine_options: EngineOptions | dict[str, Any] | None = None,
        settings: RuntimeSettings | None = None,
        **setting_overrides: Any,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if isinstance(engine_options, dict):
            engine_options = EngineOptions(**{"positions": positions, **engine_options})
        self.options = engine_options or EngineOptions(positions=positions)
        if positions is not None and self.options.positions != positions:
            self.options = replace(self.options, positions=positions)
        self.settings = replace(settings or RuntimeSettings(), **setting_overrides)
        self.model_path = Path(model) if model is not None else None
        self.arch = arch
        self.schedule: Schedule = schedule
        self.engine = None
        self.encoder = None
        self.info: ModelInfo | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speakwatch-perception")
        self.sessions: dict[str, Session] = {}
        self.kv_capacity: KVCapacity | None = None  # what the engine's KV cache holds, once started
        self._reserved: dict[str, int] = {}  # session id -> KV blocks reserved for its budget
        self.ready = False  # the engine serves: False while it loads, restarts, or after it failed
        self.started_at: float | None = None
        self._sampling_cache: dict[int, Any] = {}
        self._supervisor: EngineSupervisor[Any] | None = None  # builds, watches and rebuilds the engine
        self._closed = False
        self._gave_up = asyncio.Event()  # the engine died and could not be restarted
        self.failure: str | None = None  # why, once it could not be restarted

    @property
    def positions(self) -> str | None:
        """The served scheme (None until `start` reads the checkpoint's own, when none was asked for)."""
        return self.options.positions

    @property
    def dtype(self) -> str | None:
        """The dtype the engine serves in (None until `start` chooses one for this machine)."""
        return self.options.dtype

    @property
    def budget_tokens(self) -> int:
        """Tokens a session's live request may hold before it rolls over."""
        budget = self.settings.budget_tokens or (3 * self.options.max_model_len) // 4
        return min(budget, self.options.max_model_len)

    @property
    def max_output_tokens(self) -> int:
        return self.settings.max_output_tokens

    @property
    def model_name(self) -> str:
        if self.model_path is not None:
            return self.model_path.name
        if self.arch:
            return f"speakwatch-tiny-{self.arch}"
        from runtime.training.builtin import ASSET

        return ASSET.name

    async def start(self) -> None:
        """Load the model (off the event loop); returns when sessions can be opened."""
        if self.ready:
            return
        started = time.monotonic()
        if self.model_path is None and self.arch is not None:
            from runtime.tiny_model import default_tiny_model

            log.info("preparing the random-weight tiny %s checkpoint (answers are noise)", self.arch)
            self.model_path = await asyncio.to_thread(default_tiny_model, self.arch)
        elif self.model_path is None:
            from runtime.training.builtin import watching_model

            self.model_path = watching_model()
            log.info("using the built-in watching checkpoint %s", self.model_path)
        self.info = await asyncio.to_thread(ModelInfo.load, self.model_path)
        self.options = replace(self.options, positions=self.info.positions_for(self.options.positions))
        # the dtype for this machine's processor unless one was asked for (logged; see `dtype`)
        self.options = replace(self.options, dtype=await asyncio.to_thread(resolve_dtype, self.options.dtype))
        if self.settings.turn_tokens is None:
            self.settings = replace(
                self.settings, turn_tokens=self.info.trained_turn_tokens or DEFAULT_TURN_TOKENS
            )
        log.info("loading the vision encoder from %s", self.model_path)
        from runtime.perception import VisionEncoder

        self.encoder = await asyncio.to_thread(
            VisionEncoder,
            self.info,
            pixel_budget=self.settings.pixel_budget,
            threads=self.settings.encoder_threads,
        )
        log.info("starting the vLLM engine (this takes a while on CPU)")
        info, options = self.info, self.options
        await self._start_engine(lambda: build_async_llm(info, options))
        log.info("engine ready in %.1f s", time.monotonic() - started)

    async def _start_engine(
        self,
        build: Callable[[], Any],
        probe: Callable[[Any], str | None] = engine_failure,
        stop: Callable[[Any], None] = stop_engine,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Build the engine (``build`` blocks: it runs in a thread) under a supervisor that polls
        ``probe`` and rebuilds it when it dies (tests pass fakes, a clock and a sleep)."""
        supervisor = EngineSupervisor(
            build,
            probe,
            stop,
            self.settings.restart_policy,
            poll_s=self.settings.engine_poll_s,
            on_lost=self._engine_lost,
            on_restored=self._engine_restored,
            on_failed=self._engine_failed,
            sleep=sleep,
            clock=clock,
        )
        self._supervisor = supervisor
        self.engine = await supervisor.start()
        self.kv_capacity = kv_capacity(self.engine)
        self._log_capacity()
        self.ready = True
        self.started_at = time.monotonic()

    async def close(self) -> None:
        self._closed = True
        for session in list(self.sessions.values()):
            await session.close()
        self.ready = False
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await supervisor.close()  # shuts the engine down (or the one being rebuilt, once built)
        self.engine = None
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- the engine's life (runtime.health.EngineSupervisor reports it, on the loop) -------------------
    @property
    def engine_health(self) -> EngineHealth:
        """The engine's state, deaths and restarts (``/health`` and ``/metrics`` report it)."""
        if self._supervisor is not None:
            return self._supervisor.health
        return EngineHealth("stopped" if self._closed else "starting")

    def engine_unavailable(self) -> EngineUnavailable:
        """The error for a session or question refused while the engine cannot serve, with the hint
        (``retry_after_s``) of when to try again while it restarts."""
        health = self.engine_health
        if health.state == "restarting":
            return EngineUnavailable(
                f"the engine died ({health.last_failure}) and is being restarted; "
                f"retry in {health.retry_after_s} s",
                health.retry_after_s,
            )
        if health.state == "failed":
            return EngineUnavailable(f"the engine died and could not be restarted: {self.failure}")
        if health.state == "up":  # a session saw the engine die before the monitor did
            policy = self.settings.restart_policy
            hint = retry_after(0.0, policy.delay(1)) if policy.attempts else None
            return EngineUnavailable("the engine stopped answering; it is being restarted", hint)
        if health.state == "stopped":
            return EngineUnavailable("the runtime is closed")
        return EngineUnavailable("the engine is not running; await runtime.start() first")

    async def wait_failed(self) -> str:
        """Returns the reason once the engine died and every restart failed (the server then exits)."""
        await self._gave_up.wait()
        return self.failure or "the engine could not be restarted"

    def _engine_lost(self, reason: str) -> None:
        self.ready = False
        self.engine = None
        for session in list(self.sessions.values()):
            session.engine_lost(reason)

    def _engine_restored(self, engine: Any) -> None:
        """The new engine serves every open session: their reservations stand (the same budgets in the
        new cache, which is re-read: a smaller one refuses new sessions until enough close)."""
        self.engine = engine
        self.kv_capacity = kv_capacity(engine)
        self._log_capacity()
        capacity = self.kv_capacity
        if capacity is not None and sum(self._reserved.values()) > capacity.blocks:
            log.warning(
                "after the restart the KV cache holds %d tokens, but the %d open sessions reserve %d",
                capacity.tokens,
                len(self._reserved),
                self.kv_tokens_reserved,
            )
        self.ready = True
        for session in list(self.sessions.values()):
            session.engine_restored()

    def _engine_failed(self, reason: str) -> None:
        self.ready = False
        self.failure = reason
        self._gave_up.set()

    async def __aenter__(self) -> Runtime:
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
    ) -> Session:
        """A new session on this runtime's engine (call from the event loop); ``max_fps`` and
        ``change_filter`` default to the runtime's settings.

        Raises `SessionLimitReached` (with capacity, reserved and asked tokens) when the engine's KV
        cache cannot hold this session's budget beside every open session's (``admission="kv"``);
        closing a session gives its reservation back.
        """
        if not self.ready:
            raise self.engine_unavailable()
        blocks = self._admit()
        session = Session(
            self,
            instructions=instructions,
            schedule=schedule or self.schedule,
            max_fps=max_fps,
            change_filter=change_filter,
        )
        self.sessions[session.id] = session
        if blocks:
            self._reserved[session.id] = blocks
        return session

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self._reserved.pop(session.id, None)  # its request is aborted: the blocks are free again

    def _admit(self) -> int:
        """The KV blocks a new session reserves (0 when the engine reports no capacity); with
        ``admission="kv"``, `SessionLimitReached` when they do not fit beside the open sessions'.
        With "off" the reservation is still counted, so `stats` shows the overcommitment."""
        capacity = self.kv_capacity
        if capacity is None:
            return 0
        decision = admission.decide(
            capacity, sum(self._reserved.values()), len(self._reserved), self.budget_tokens
        )
        if not decision.admitted and self.settings.admission == "kv":
            log.warning("session refused: %s", decision.reason)
            raise SessionLimitReached(decision.reason)
        return admission.session_blocks(self.budget_tokens, capacity.block_size)

    @property
    def kv_tokens_reserved(self) -> int:
        """KV tokens the open sessions reserved (their budgets, in whole blocks)."""
        size = self.kv_capacity.block_size if self.kv_capacity is not None else 0
        return sum(self._reserved.values()) * size

    def _log_capacity(self) -> None:
        capacity = self.kv_capacity
        if capacity is None:
            log.warning("the engine reports no KV capacity: sessions are admitted unchecked")
            return
        fit = admission.sessions_that_fit(capacity, self.budget_tokens)
        log.info(
            "KV cache: %d tokens (%d blocks of %d); %d sessions of %d budget tokens fit (admission %s)",
            capacity.tokens,
            capacity.blocks,
            capacity.block_size,
            fit,
            self.budget_tokens,
            self.settings.admission,
        )
        if fit == 0 and self.settings.admission == "kv":
            log.warning("the KV cache cannot hold one session's budget: every session will be refused")

    def sampling_params(self, max_tokens: int):
        params = self._sampling_cache.get(max_tokens)
        if params is None:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            assert self.info is not None
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=self.settings.temperature,
                stop_token_ids=[self.info.chat.im_end],
                output_kind=RequestOutputKind.DELTA,
                skip_special_tokens=True,
            )
            self._sampling_cache[max_tokens] = params
        return params

    def stats(self) -> dict:
        sessions = [s.stats() for s in self.sessions.values()]
        return {
            "ready": self.ready,
            "engine_state": self.engine_health.state,
            "model": self.model_name,
            "positions": self.positions,
            "dtype": self.dtype,
            "dtype_bits": DTYPE_BITS.get(self.dtype or "", 0),  # numeric, so /metrics shows it (0: "auto")
            "sessions": len(sessions),
            "kv_tokens": sum(s.session_tokens for s in sessions),  # in use: the live requests' tokens
            "kv_tokens_reserved": self.kv_tokens_reserved,
            "kv_capacity_tokens": self.kv_capacity.tokens if self.kv_capacity is not None else None,
            "admission": self.settings.admission,
            "rollovers": sum(s.rollovers for s in sessions),
            "frames_received": sum(s.frames_received for s in sessions),
            "frames_ingested": sum(s.frames_ingested for s in sessions),
            "frames_dropped": sum(s.frames_dropped for s in sessions),
        }


__all__ = ["Runtime", "RuntimeSettings"]
