"""Sessions that watch while they answer: one long-lived vLLM streaming request per session.

`Session` is glue between three parts: the `Perception` stage (frames in, visual chunks out), the
`TurnScheduler` (runtime/scheduler.py: every decision about what goes to vLLM and how an answer
ends, a pure state machine) and one `StreamingRequest` (runtime/request.py). It feeds the
scheduler events and carries out its plans; the scheduling rules are documented there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from runtime.errors import EngineUnavailable, ResponseActive, SessionClosed
from runtime.memory import MemoryConfig
from runtime.perception import Perception, VisualChunk
from runtime.request import EngineGone, StreamingRequest, render_chunk
from runtime.rollover import SessionMemory
from runtime.scheduler import (
    ATTACHED_IMAGE,
    Cancel,
    Close,
    Configure,
    EmitDelta,
    EndResponse,
    EngineLost,
    EngineRestored,
    Event,
    Failure,
    FramesReady,
    FramesSettled,
    ImagesEncoded,
    ImagesFailed,
    MemoryRead,
    PausePerception,
    Plan,
    QuestionAsked,
    ReadMemory,
    Remember,
    ResumePerception,
    SchedulerConfig,
    SendChunk,
    StopRequest,
    TurnCounters,
    TurnOutput,
    TurnScheduler,
    TurnState,
)
from runtime.wire import SCHEDULES, ResponseStatus, Schedule, SessionStats
from streams.change import ChangeFilter, ChangeFilterSettings
from streams.frame import Frame, rgb_pixels
from streams.sampler import FrameSampler

if TYPE_CHECKING:
    from runtime.runtime import Runtime

log = logging.getLogger("speakwatch.session")

_END = object()


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


class Response:
    """One answer: an async iterator of text deltas; ``status`` and ``usage`` are final once it ends."""

    def __init__(self, response_id: str, max_tokens: int):
        self.id = response_id
        self.max_tokens = max_tokens
        self.status: ResponseStatus = "in_progress"
        self.error: str | None = None
        self.usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        self.text = ""
        self.asked_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.frames_during = 0
        self.cancel_requested = False
        self.question = ""
        self.token_ids: list[int] = []  # answer tokens the model produced (what the user saw)
        self._deltas: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()

    # producer side (the session, carrying out the scheduler's plans) -------------------------
    def _emit(self, delta: str) -> None:
        if delta and not self.cancel_requested:
            self.text += delta
            self._deltas.put_nowait(delta)

    def _finish(self, status: ResponseStatus, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.status = status
        self.error = error
        self.finished_at = time.monotonic()
        self._deltas.put_nowait(_END)
        self._done.set()

    # consumer side ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> ResponseStatus:
        await self._done.wait()
        return self.status

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            if self._done.is_set() and self._deltas.empty():
                item = _END  # iterated (or read) before: it has ended
            else:
                item = await self._deltas.get()
            if item is _END:
                if self.status == "failed":
                    raise RuntimeError(f"response failed: {self.error}")
                return
            yield item

    async def read(self) -> str:
        """The whole answer text (waits for the end)."""
        async for _ in self:
            pass
        return self.text

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.asked_at) * 1000

    @property
    def tokens_per_s(self) -> float | None:
        n = self.usage["output_tokens"]
        if self.first_token_at is None or self.finished_at is None or n < 2:
            return None
        span = self.finished_at - self.first_token_at
        return (n - 1) / span if span > 0 else None


@dataclass
class SessionCounters(TurnCounters):
    """What the session counts itself (the scheduler advances the `TurnCounters` part); the rate cap
    and the change filter of `push_frame` count in its own `FrameSampler`."""

    frames_invalid: int = 0  # pushed frames `rgb_pixels` refused
    frames_from_inputs: int = 0  # frames handed to `ingest` by an input that sampled them
    memory_update_failures: int = 0  # `observe`/`absorb` raised (logged each time)


class Session:
    """A conversation with a model that keeps watching (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        instructions: str | None = None,
        schedule: Schedule = "parallel",
        max_fps: float | None = None,
        change_filter: ChangeFilterSettings | None = None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.runtime = runtime
        self.id = "sess_" + uuid.uuid4().hex[:16]
        # the embedded SDK's input: the rate cap and change filter of `push_frame` (frames of other
        # inputs were sampled and filtered by their own input's sampler)
        self._change = ChangeFilter(change_filter or runtime.settings.change_filter)
        self._pushed = FrameSampler(
            runtime.settings.max_fps if max_fps is None else max_fps,
            buffer_size=1,
            max_age=None,
            change=self._change,
        )
        self.chat = runtime.info.chat
        self.counters = SessionCounters()
        self._response: Response | None = None
        self._last_response: Response | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._next_frame_index = 0
        settings = runtime.settings
        self.memory = SessionMemory(
            settings.memory or MemoryConfig.for_hidden_size(runtime.info.hidden_size),
            runtime.info.hidden_size,
            runtime.encoder.merge,
            window=settings.window_steps,
            dialogue=settings.dialogue_turns,
        )
        assert settings.turn_tokens is not None, "the runtime sets K when it starts"
        self.scheduler = TurnScheduler(
            self.chat,
            SchedulerConfig(
                turn_tokens=settings.turn_tokens,
                budget_tokens=runtime.budget_tokens,
                ready_chunks=settings.ready_chunks,
                max_chunks_per_turn=settings.max_chunks_per_turn,
            ),
            self.memory,
            instructions=instructions,
            schedule=schedule,
            counters=self.counters,
        )
        self._request: StreamingRequest | None = None
        # what the runtime says of the engine; the drive loop brings the scheduler in line with it
        self._engine_up = True
        self._engine_reason: str | None = None
        self._engine_epoch = 0  # one more at every loss the runtime reports
        self._synced_epoch = 0  # the loss the scheduler was last told of
        self.perception = Perception(
            runtime.encoder,
            runtime.executor,
            self._on_chunks,
            queue_size=runtime.settings.frame_queue,
            frames_per_chunk=runtime.settings.frames_per_chunk,
        )
        self.perception.start()
        self._task = asyncio.get_running_loop().create_task(self._drive(), name=f"speakwatch-{self.id}")

    # public API -------------------------------------------------------------------------------
    async def push_frame(self, frame: object, timestamp: float | None = None) -> bool:
        """Hand one camera frame to the session; returns False if it was dropped (and counted).

        The embedded SDK's input: ``timestamp`` is stream time in seconds (default: now), capped at
        ``max_fps`` by a `FrameSampler`, whose change filter then drops a frame that shows nothing new
        since the last one that went in (``"unchanged"``; a keep-alive still goes in every
        ``change_filter.keepalive_s`` seconds of wall time). Raises ValueError for anything but an RGB
        picture.
        """
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        arrival = time.monotonic()
        try:
            rgb = rgb_pixels(frame)
        except ValueError:
            self.counters.frames_invalid += 1
            raise
        stream_time = arrival if timestamp is None else float(timestamp)
        if not self._pushed.admit(stream_time):
            return False
        self._pushed.offer(Frame(rgb=rgb, timestamp=stream_time, arrival=arrival))
        kept = self._pushed.take()  # a buffer of one without an age limit: this frame, or a drop
        if kept is None:
            return False
        self._submit(kept)
        return True

    def ingest(self, frame: Frame) -> None:
        """Take a frame that its input already sampled (a WebRTC track, the server's appended frames).

        No second rate cap or change filter, and the frame's own ``arrival`` is kept: frame lag is
        measured from it.
        """
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        self.counters.frames_from_inputs += 1
        self._submit(frame)

    def _submit(self, frame: Frame) -> None:
        index, self._next_frame_index = self._next_frame_index, self._next_frame_index + 1
        self.perception.submit(replace(frame, index=index))

    @property
    def max_fps(self) -> float | None:
        """The rate cap of `push_frame` (frames handed to `ingest` were capped by their input)."""
        return self._pushed.fps

    @property
    def change_filter(self) -> ChangeFilterSettings:
        """The settings of `push_frame`'s change filter (frames handed to `ingest` were filtered by
        their input)."""
        return self._change.settings

    def ask(
        self,
        text: str,
        max_tokens: int | None = None,
        *,
        images: Sequence[object] = (),
        instructions: str | None = None,
        response_id: str | None = None,
    ) -> Response:
        """Ask a question; the answer streams while the session keeps watching.

        ``response_id`` names the answer (the server passes its wire id, so one id runs end to end).
        Raises `ResponseActive` if the previous answer has not ended (cancel it first): the session is
        the one place that decides whether an answer may start.
        """
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        if self._response is not None:
            raise ResponseActive("the session is still answering; cancel it or wait for response.done")
        if not self._engine_up:
            raise self.runtime.engine_unavailable()
        limit = self.runtime.settings.max_output_tokens
        if max_tokens is None:
            max_tokens = limit
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be an int in 1..{limit}, got {max_tokens!r}")
        rgb_images = [rgb_pixels(image) for image in images]
        response = Response(response_id or "resp_" + uuid.uuid4().hex[:16], max_tokens)
        response.question = text
        self._response = response
        asked = QuestionAsked(
            response.id, text, max_tokens, self._next_frame_index, instructions, bool(rgb_images)
        )
        self._handle(asked)
        if rgb_images:
            asyncio.get_running_loop().create_task(self._encode_images(response.id, rgb_images))
        return response

    async def cancel(self) -> None:
        """Stop the current answer (it ends with status ``cancelled``); no-op when idle."""
        response = self._response
        if response is None:
            return
        response.cancel_requested = True
        self._handle(Cancel())
        await response.wait()

    def update(
        self,
        *,
        instructions: str | None = None,
        max_fps: float | None = None,
        schedule: str | None = None,
        change_filter: ChangeFilterSettings | None = None,
    ) -> None:
        """Change what is given; None leaves a setting as it is. ``change_filter`` replaces the filter's
        settings (build it with ``dataclasses.replace(session.change_filter, ...)``); its reference
        frame stays, so a new threshold does not resend the scene."""
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if max_fps is not None and max_fps <= 0:
            raise ValueError("max_fps must be positive")
        if change_filter is not None and not isinstance(change_filter, ChangeFilterSettings):
            kind = type(change_filter).__name__
            raise ValueError(f"change_filter must be a ChangeFilterSettings, got {kind}")
        if max_fps is not None:
            self._pushed.fps = max_fps
        if change_filter is not None:
            self._change.configure(change_filter)
        self._handle(Configure(instructions, schedule))  # type: ignore[arg-type]  # checked above

    @property
    def schedule(self) -> Schedule:
        return self.scheduler.schedule

    @property
    def instructions(self) -> str | None:
        return self.scheduler.instructions

    @property
    def request_tokens(self) -> int:
        """KV tokens the live vLLM request holds."""
        return self.scheduler.request_tokens

    def stats(self) -> SessionStats:
        """A snapshot of the session's numbers (the names the server and the remote SDK use too)."""
        c = self.counters
        last = self._last_response
        lags = list(c.lags_ms)
        pushed, perceived = self._pushed.stats, self.perception.stats
        by_reason = {
            **pushed.dropped,  # "rate" and "unchanged"
            "invalid": c.frames_invalid,
            "perception_backlog": perceived.dropped - perceived.failed,
            "encode_failed": perceived.failed,
            "chunk_backlog": c.frames_dropped_backlog,
            "turn_failed": c.frames_dropped_failed,
            "engine_unavailable": c.frames_dropped_engine,
        }
        return SessionStats(
            session_id=self.id,
            schedule=self.schedule,
            positions=str(self.runtime.positions),
            max_fps=self.max_fps,
            frames_received=pushed.received + c.frames_invalid + c.frames_from_inputs,
            frames_sampled=pushed.sampled + c.frames_from_inputs,
            frames_ingested=c.frames_ingested,
            frames_dropped_by_reason={reason: n for reason, n in by_reason.items() if n},
            frame_lag_p50_ms=percentile(lags, 50),
            frame_lag_p95_ms=percentile(lags, 95),
            answering=self._response is not None,
            last_response_status=last.status if last else None,
            ttft_ms=last.ttft_ms if last else None,
            tokens_per_s=last.tokens_per_s if last else None,
            frames_during_answer=last.frames_during if last else 0,
            session_tokens=self.request_tokens,
            budget_tokens=self.runtime.budget_tokens,
            max_request_tokens=c.max_request_tokens,
            turns=c.turns,
            requests_started=c.requests_started,
            rollovers=c.rollovers,
            window_steps=len(self.memory.window),
            memory_state_bytes=self.memory.state_bytes(),
            memory_surprise=self.memory.last_surprise,
            memory_update_failures=c.memory_update_failures,
        )

    async def close(self) -> None:
        """End the session: cancel any answer, abort the vLLM request, free its KV."""
        if self._closed:
            return
        self._closed = True
        plans = self.scheduler.handle(Close())
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass
        await self._apply(plans)
        await self.perception.close()
        self.runtime._forget(self)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # the engine's life, as the runtime reports it (on the event loop) ---------------------------
    def engine_lost(self, reason: str) -> None:
        """The engine died: the answer in flight ends ``failed``, nothing is sent until it is back."""
        self._engine_up = False
        self._engine_reason = reason
        self._engine_epoch += 1
        if self._request is not None:
            self._request.interrupt(reason)  # a turn waiting for output ends now
        self._wake.set()

    def engine_restored(self) -> None:
        """A new engine is up: the next chunk opens a request carrying what a rollover carries."""
        self._engine_up = True
        self._wake.set()

    async def _sync_engine(self) -> None:
        """Tell the scheduler of each loss the runtime reported (once), and when the engine is back."""
        if self._synced_epoch != self._engine_epoch:
            self._synced_epoch = self._engine_epoch
            if self.scheduler.turn_state is not TurnState.DOWN:
                reason = self._engine_reason or "the engine stopped"
                await self._apply(self.scheduler.handle(EngineLost(reason)))
        if self.scheduler.turn_state is TurnState.DOWN and self._engine_up:
            self.scheduler.handle(EngineRestored())

    # events in, plans out ---------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        """Feed the scheduler an event from outside the drive loop; its plans need no awaiting."""
        for plan in self.scheduler.handle(event):
            self._perform(plan)
        self._wake.set()

    def _on_chunks(self, chunks: list[VisualChunk]) -> None:
        if not self._closed:
            self._handle(FramesReady(tuple(chunks)))

    async def _encode_images(self, response_id: str, images: list[np.ndarray]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self.runtime.executor, self.runtime.encoder.encode, [[img] for img in images]
            )
        except Exception as exc:  # a broken image must not kill the session
            if not self._closed:
                self._handle(ImagesFailed(response_id, f"image could not be encoded: {exc}"))
            return
        now = time.monotonic()
        encoded = tuple(
            VisualChunk(embeds, grid, self.runtime.encoder.merge, (0.0,), (now,), ATTACHED_IMAGE, now)
            for embeds, grid in results
        )
        if not self._closed:
            self._handle(ImagesEncoded(response_id, encoded))

    async def _drive(self) -> None:
        """The session's one task: send what the scheduler plans, read the turn's outputs back."""
        while not self._closed:
            try:
                await self._sync_engine()
                await self._next_turn()
            except asyncio.CancelledError:
                raise
            except EngineGone as exc:  # seen here first: the runtime's monitor reports it too
                if self._closed:
                    return
                if self._synced_epoch == self._engine_epoch:
                    self.engine_lost(str(exc))
            except Exception as exc:  # keep the session usable: fail the answer, restart the request
                if self._closed:
                    return
                if not self._engine_up or self._synced_epoch != self._engine_epoch:
                    continue  # the engine went away under this turn: _sync_engine ends it
                log.exception("session %s: turn failed", self.id)
                await self._apply(self.scheduler.handle(Failure(str(exc))))

    async def _next_turn(self) -> None:
        if self.scheduler.turn_state is TurnState.DOWN:  # frames are still taken in meanwhile
            await self._wake.wait()
            self._wake.clear()
            return
        before = self.scheduler.frames_awaited
        if before is not None and self.perception.settled(before):
            self.scheduler.handle(FramesSettled(before))
        plans = self.scheduler.next_turn()
        if not plans:
            await self._wake.wait()
            self._wake.clear()
            return
        await self._apply(plans)
        while self.scheduler.awaiting_output:
            assert self._request is not None
            output = await self._request.next_output()
            completion = output.outputs[0]
            event = TurnOutput(
                tuple(completion.token_ids),
                completion.text,
                completion.finish_reason is not None,
                time.monotonic(),
            )
            await self._apply(self.scheduler.handle(event))

    async def _apply(self, plans: list[Plan]) -> None:
        for plan in plans:
            if isinstance(plan, SendChunk):
                await self._send(plan)
            elif isinstance(plan, ReadMemory):
                loop = asyncio.get_running_loop()
                memory_chunk = await loop.run_in_executor(self.runtime.executor, self.memory.memory_chunk)
                await self._apply(self.scheduler.handle(MemoryRead(memory_chunk)))
            elif isinstance(plan, StopRequest):
                request, self._request = self._request, None
                if request is not None:
                    await request.stop()
            else:
                self._perform(plan)

    def _perform(self, plan: Plan) -> None:
        """The plans that complete at once (no I/O to await)."""
        if isinstance(plan, EmitDelta):
            response = self._response_for(plan.response_id)
            response.usage["output_tokens"] += len(plan.token_ids)
            response.token_ids.extend(plan.token_ids)
            if response.first_token_at is None:
                response.first_token_at = plan.at
            response._emit(plan.text)
        elif isinstance(plan, EndResponse):
            response = self._response_for(plan.response_id)
            self._response = None
            self._last_response = response
            response.usage["input_tokens"] = plan.input_tokens
            response.frames_during = plan.frames_during
            response._finish(plan.status, plan.error)
        elif isinstance(plan, Remember):
            # the numerics run on the perception worker thread, in order, off the event loop
            self.runtime.executor.submit(self._remember, plan.chunk, plan.evicted)
        elif isinstance(plan, PausePerception):
            self.perception.pause()
        elif isinstance(plan, ResumePerception):
            self.perception.resume()
        else:
            raise TypeError(f"{type(plan).__name__} needs the drive loop")

    def _response_for(self, response_id: str) -> Response:
        response = self._response
        if response is None or response.id != response_id:
            raise RuntimeError(f"the scheduler planned for {response_id}, the session answers {response}")
        return response

    async def _send(self, plan: SendChunk) -> None:
        if not self._engine_up:
            raise EngineUnavailable(self._engine_reason or "the engine is down")
        if plan.new_request is not None:  # on a rollover the old request is aborted once the new exists
            old = self._request
            self._request = StreamingRequest(
                self.runtime.engine,
                f"{self.id}-{self.counters.requests_started - 1}",
                self.runtime.sampling_params(1),
            )
            if old is not None:
                await old.stop()
        assert self._request is not None, "the scheduler opens a request before its first chunk"
        prompt = render_chunk(self.chat, plan.pieces)
        self._request.send(prompt, self.runtime.sampling_params(plan.max_tokens))

    def _remember(self, chunk: VisualChunk, evicted: tuple[VisualChunk, ...]) -> None:
        try:
            self.memory.observe(chunk)
            self.memory.absorb(evicted)
        except Exception:  # memory is an aid: it must not take the session down, nor fail unseen
            self.counters.memory_update_failures += 1
            log.exception(
                "session %s: memory update failed (%d so far)", self.id, self.counters.memory_update_failures
            )
