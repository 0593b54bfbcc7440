"""Sessions that watch while they answer: one long-lived vLLM streaming request per session.

vLLM appends streamed chunks to one request between *turns* (a turn ends at EOS or max_tokens)
and drops the last sampled token of every turn (it has no KV yet). So the scheduler answers in
turns of K tokens, and between turns it sends the next chunk: under ``parallel`` that chunk holds
the visual items that became ready meanwhile, followed by the re-fed last answer token, so one
forward pass both ingests the frames and decodes the next token. Under ``sequential`` frames wait
until the answer is over. Idle sessions ingest frames as they come (frame-only chunks whose one
sampled token is ignored).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from runtime import layout
from runtime.errors import ResponseActive, SessionClosed
from runtime.layout import Piece
from runtime.memory import MemoryConfig
from runtime.perception import Perception, VisualChunk, check_frame
from runtime.rollover import SessionMemory
from streams.frame import Frame

if TYPE_CHECKING:
    from runtime.runtime import Runtime

log = logging.getLogger("speakwatch.session")

Schedule = Literal["parallel", "sequential"]
SCHEDULES = ("parallel", "sequential")
ResponseStatus = Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
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

    # producer side (the session scheduler) --------------------------------------------------
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
class _Question:
    response: Response
    text: str
    images: list[VisualChunk]
    instructions: str | None
    frames_before: int  # frames pushed before the question (indices below this): it sees them


@dataclass
class _Turn:
    """A chunk sent to vLLM and what came back for it."""

    kind: Literal["frames", "answer"]
    max_tokens: int
    chunks: list[VisualChunk]
    received: int = 0
    last_token: int | None = None
    stopped: bool = False
    first_output_at: float | None = None


@dataclass
class SessionCounters:
    frames_received: int = 0
    frames_ingested: int = 0
    frames_dropped_rate: int = 0
    frames_dropped_backlog: int = 0
    frames_rejected: int = 0
    turns: int = 0
    requests_started: int = 0
    rollovers: int = 0
    max_request_tokens: int = 0
    lags_ms: deque = field(default_factory=lambda: deque(maxlen=512))


class Session:
    """A conversation with a model that keeps watching (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        instructions: str | None = None,
        schedule: Schedule = "parallel",
        max_fps: float | None = None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.runtime = runtime
        self.id = "sess_" + uuid.uuid4().hex[:16]
        self.schedule: Schedule = schedule
        self.instructions = instructions
        self.max_fps = runtime.settings.max_fps if max_fps is None else max_fps
        self.chat = runtime.info.chat
        self.counters = SessionCounters()
        self._ready: deque[VisualChunk] = deque()
        self._questions: deque[_Question] = deque()
        self._response: Response | None = None
        self._last_response: Response | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._last_frame_ts: float | None = None
        self._next_frame_index = 0
        # pieces that must open the next chunk (the system turn, the end of the previous answer)
        self._carry: list[Piece] = layout.system_turn(self.chat, instructions) if instructions else []
        settings = runtime.settings
        self.memory = SessionMemory(
            settings.memory or MemoryConfig.for_hidden_size(runtime.info.hidden_size),
            runtime.info.hidden_size,
            runtime.encoder.merge,
            window=settings.window_steps,
            dialogue=settings.dialogue_turns,
        )
        self._request_id: str | None = None
        self._inputs: asyncio.Queue | None = None
        self._outputs: asyncio.Queue | None = None
        self._consumer: asyncio.Task | None = None
        self.request_tokens = 0
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
        """Hand one camera frame to the session; returns False if the fps cap dropped it."""
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        try:
            rgb = check_frame(frame)
        except ValueError:
            self.counters.frames_rejected += 1
            raise
        now = time.monotonic()
        ts = float(timestamp) if timestamp is not None else now
        self.counters.frames_received += 1
        if self.max_fps and self._last_frame_ts is not None and ts - self._last_frame_ts < 1.0 / self.max_fps:
            self.counters.frames_dropped_rate += 1
            return False
        self._last_frame_ts = ts
        index, self._next_frame_index = self._next_frame_index, self._next_frame_index + 1
        self.perception.submit(Frame(rgb=rgb, timestamp=ts, arrival=now, index=index))
        return True

    def ask(
        self,
        text: str,
        max_tokens: int | None = None,
        *,
        images: Sequence[object] = (),
        instructions: str | None = None,
    ) -> Response:
        """Ask a question; the answer streams while the session keeps watching.

        Raises `ResponseActive` if the previous answer has not ended (cancel it first).
        """
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        if self._response is not None or self._questions:
            raise ResponseActive("the session is still answering; cancel it or wait for response.done")
        limit = self.runtime.settings.max_output_tokens
        if max_tokens is None:
            max_tokens = limit
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be an int in 1..{limit}, got {max_tokens!r}")
        rgb_images = [check_frame(image) for image in images]
        response = Response("resp_" + uuid.uuid4().hex[:16], max_tokens)
        self._response = response
        question = _Question(response, text, [], instructions, self._next_frame_index)
        if rgb_images:
            asyncio.get_running_loop().create_task(self._encode_images(question, rgb_images))
        else:
            self._questions.append(question)
            self._wake.set()
        return response

    async def cancel(self) -> None:
        """Stop the current answer (it ends with status ``cancelled``); no-op when idle."""
        response = self._response
        if response is None:
            return
        response.cancel_requested = True
        if any(q.response is response for q in self._questions):
            self._questions = deque(q for q in self._questions if q.response is not response)
            self._end_response("cancelled")
        self._wake.set()
        await response.wait()

    def update(
        self, *, instructions: str | None = None, max_fps: float | None = None, schedule: str | None = None
    ) -> None:
        if schedule is not None:
            if schedule not in SCHEDULES:
                raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
            self.schedule = schedule  # type: ignore[assignment]
            if schedule == "parallel":
                self.perception.resume()
        if max_fps is not None:
            if max_fps <= 0:
                raise ValueError("max_fps must be positive")
            self.max_fps = max_fps
        if instructions is not None and instructions != self.instructions:
            self.instructions = instructions
            self._carry.extend(layout.system_turn(self.chat, instructions))

    def stats(self) -> dict:
        c = self.counters
        last = self._last_response
        lags = list(c.lags_ms)
        dropped = c.frames_dropped_rate + self.perception.stats.dropped + c.frames_dropped_backlog
        return {
            "session_id": self.id,
            "schedule": self.schedule,
            "positions": self.runtime.positions,
            "frames_received": c.frames_received,
            "frames_ingested": c.frames_ingested,
            "frames_dropped": dropped,
            "frames_dropped_by_reason": {
                "rate": c.frames_dropped_rate,
                "perception_backlog": self.perception.stats.dropped,
                "chunk_backlog": c.frames_dropped_backlog,
            },
            "frames_rejected": c.frames_rejected,
            # every accepted frame is pending (queued, encoding, sent but not yet in KV), in KV, or dropped
            "frames_pending": c.frames_received - c.frames_ingested - dropped,
            "frame_lag_p50_ms": percentile(lags, 50),
            "frame_lag_p95_ms": percentile(lags, 95),
            "ttft_ms": last.ttft_ms if last else None,
            "tokens_per_s": last.tokens_per_s if last else None,
            "frames_during_answer": last.frames_during if last else 0,
            "last_response_status": last.status if last else None,
            "session_tokens": self.request_tokens,
            "turns": c.turns,
            "requests_started": c.requests_started,
            "rollovers": c.rollovers,
            "budget_tokens": self.runtime.budget_tokens,
            "max_request_tokens": c.max_request_tokens,
            "window_steps": len(self.memory.window),
            "memory_state_bytes": self.memory.state_bytes(),
            "memory_surprise": self.memory.last_surprise,
            "answering": self._response is not None,
        }

    async def close(self) -> None:
        """End the session: cancel any answer, abort the vLLM request, free its KV."""
        if self._closed:
            return
        self._closed = True
        if self._response is not None:
            self._end_response("cancelled")
        self._wake.set()
        await self.perception.close()
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass
        await self._end_request()
        self.runtime._forget(self)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # perception side -----------------------------------------------------------------------------
    def _on_chunks(self, chunks: list[VisualChunk]) -> None:
        self._ready.extend(chunks)
        limit = self.runtime.settings.ready_chunks
        while len(self._ready) > limit:
            dropped = self._ready.popleft()
            self.counters.frames_dropped_backlog += len(dropped.indices)
        self._wake.set()

    async def _encode_images(self, question: _Question, images: list[np.ndarray]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self.runtime.executor, self.runtime.encoder.encode, [[img] for img in images]
            )
        except Exception as exc:  # a broken image must not kill the session
            question.response.error = str(exc)
            self._end_response("failed", f"image could not be encoded: {exc}")
            return
        now = time.monotonic()
        question.images = [
            VisualChunk(embeds, grid, self.runtime.encoder.merge, (0.0,), (now,), (-1,), now)
            for embeds, grid in results
        ]
        if question.response.done:
            return
        self._questions.append(question)
        self._wake.set()

    # the scheduler -------------------------------------------------------------------------------
    async def _drive(self) -> None:
        try:
            while not self._closed:
                turn_plan = self._plan_turn()
                if turn_plan is None:
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                await self._run_turn(*turn_plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep the session usable: fail the answer, restart the request
            log.exception("session %s scheduler error", self.id)
            self._end_response("failed", str(exc))
            await self._end_request()
            if not self._closed:
                self._task = asyncio.get_running_loop().create_task(
                    self._drive(), name=f"speakwatch-{self.id}"
                )

    def _take_ready(self) -> list[VisualChunk]:
        limit = self.runtime.settings.max_chunks_per_turn
        taken = []
        while self._ready and len(taken) < limit:
            taken.append(self._ready.popleft())
        return taken

    def _plan_turn(self) -> tuple[str, list[Piece], int] | None:
        """Decide the next chunk body: (kind, its pieces in KV order, max_tokens).

        The body never includes ``self._carry`` (pieces that must open the next chunk, such as the
        end of the previous answer); `_run_turn` prepends it, or replaces it on a rollover. Every
        body is built by `runtime.layout`, the functions the trainer lays its samples out with.
        """
        response = self._response
        turn_tokens = self.runtime.settings.turn_tokens
        if response is not None and self._pending_token is not None and response.cancel_requested:
            self._carry = [*self._carry, *layout.closing(self.chat, self._pending_token)]
            self._pending_token = None
            self._finish_exchange(response)
            self._end_response("cancelled")
            response = None
        if response is not None and self._pending_token is not None:
            # mid-answer: the re-fed last token goes after any new frames
            visual = self._take_ready() if self.schedule == "parallel" else []
            remaining = response.max_tokens - response.usage["output_tokens"]
            body = layout.answer_chunk(self.chat, visual, self._pending_token)
            return "answer", body, min(turn_tokens, remaining)
        if self._questions:
            if not self.perception.settled(self._questions[0].frames_before):
                # a question sees the frames pushed before it (as the trainer lays samples out),
                # under both schedules; later frames do not hold it up
                return None
            if len(self._ready) > self.runtime.settings.max_chunks_per_turn:
                visual = self._take_ready()  # frames that came before the question go in first
                return "frames", layout.frames_chunk(self.chat, visual), 1
            question = self._questions.popleft()
            visual = self._take_ready()
            body = layout.question_chunk(
                self.chat,
                question.text,
                frames=visual,
                images=question.images,
                instructions=question.instructions,
            )
            response = question.response
            response.question = question.text
            response.usage["input_tokens"] = layout.token_length(body)
            return "answer", body, min(turn_tokens, response.max_tokens)
        if self._ready and response is None:
            visual = self._take_ready()
            return "frames", layout.frames_chunk(self.chat, visual), 1
        return None

    _pending_token: int | None = None

    async def _run_turn(self, kind: str, body: list[Piece], max_tokens: int) -> None:
        import torch
        from vllm.engine.protocol import StreamingInput

        pieces = [*self._carry, *body]
        budget = self.runtime.budget_tokens
        live = self._consumer is not None and not self._consumer.done()
        if live and self.request_tokens + layout.token_length(pieces) + max_tokens > budget:
            pieces = [*await self._rollover_prefix(body, max_tokens), *body]
            await self._start_request(replace_live=True)
            self.counters.rollovers += 1
        else:
            await self._ensure_request()
        self._carry = []
        self._pending_token = None
        visual: list[VisualChunk] = layout.visual_items(pieces)  # type: ignore[assignment]
        prompt: dict = {"prompt_token_ids": layout.prompt_ids(self.chat, pieces)}
        if visual:
            prompt["multi_modal_data"] = {
                "image": {
                    "image_embeds": torch.cat([c.embeds for c in visual]),
                    "image_grid_thw": torch.tensor([c.grid for c in visual], dtype=torch.long),
                }
            }
        expanded = layout.token_length(pieces)
        turn = _Turn(kind, max_tokens, layout.visual_items(body))  # type: ignore[arg-type]
        if kind == "answer" and self.schedule == "sequential":
            self.perception.pause()
        assert self._inputs is not None and self._outputs is not None
        self._inputs.put_nowait(StreamingInput(prompt, self.runtime.sampling_params(max_tokens)))
        self.request_tokens += expanded
        self.counters.max_request_tokens = max(
            self.counters.max_request_tokens, self.request_tokens + max_tokens
        )
        self.counters.turns += 1
        response = self._response if kind == "answer" else None
        while True:
            out = await self._outputs.get()
            if out is None or isinstance(out, BaseException):
                raise RuntimeError(f"vLLM request ended unexpectedly: {out!r}")
            if turn.first_output_at is None:
                turn.first_output_at = time.monotonic()
                self._ingested(turn, response)
            completion = out.outputs[0]
            new_ids = list(completion.token_ids)
            turn.received += len(new_ids)
            if new_ids:
                turn.last_token = new_ids[-1]
            if response is not None and new_ids:
                if response.first_token_at is None:
                    response.first_token_at = time.monotonic()
                stop = self.chat.im_end in new_ids
                counted = new_ids[: new_ids.index(self.chat.im_end)] if stop else new_ids
                response.usage["output_tokens"] += len(counted)
                response.token_ids.extend(counted)
                response._emit(completion.text)
                turn.stopped = turn.stopped or stop
            if turn.stopped or turn.received >= max_tokens or completion.finish_reason is not None:
                break
        # every sampled token but the last is in KV now
        self.request_tokens += max(0, turn.received - 1)
        if response is not None:
            self._after_answer_turn(response, turn)

    async def _rollover_prefix(self, body: list[Piece], max_tokens: int) -> list[Piece]:
        """[system][memory][window][dialogue][the answer in flight], trimmed to fit the budget."""
        loop = asyncio.get_running_loop()
        memory = self.memory
        memory_chunk = await loop.run_in_executor(self.runtime.executor, memory.memory_chunk)
        head: list[Piece] = layout.system_turn(self.chat, self.instructions) if self.instructions else []
        if memory_chunk is not None:
            head += layout.frames_chunk(self.chat, [memory_chunk])
        tail: list[Piece] = []
        response = self._response
        if response is not None and self._pending_token is not None:  # an answer in flight continues
            tail = [
                *self.chat.turn("user", response.question),
                *self.chat.assistant_header,
                *response.token_ids[:-1],
            ]
        window = list(memory.window)
        exchanges = list(memory.dialogue)
        budget = self.runtime.budget_tokens

        def build() -> list[Piece]:
            pieces = [*head, *layout.frames_chunk(self.chat, window)]
            for exchange in exchanges:
                pieces += layout.dialogue_turn(self.chat, exchange.question, exchange.answer_ids)
            return pieces + tail

        def total() -> int:
            return layout.token_length(pieces) + layout.token_length(body) + max_tokens

        pieces = build()
        while exchanges and total() > budget:
            exchanges.pop(0)
            pieces = build()
        while window and total() > budget:
            window.pop(0)
            pieces = build()
        if total() > budget:
            raise RuntimeError(
                f"session budget of {budget} tokens is too small for the system prompt, memory and this turn"
            )
        return pieces

    def _ingested(self, turn: _Turn, response: Response | None) -> None:
        now = time.monotonic()
        for chunk in turn.chunks:
            if chunk.indices == (-1,):
                continue  # an image attached to a question, not a camera frame
            self.counters.frames_ingested += len(chunk.indices)
            for arrival in chunk.arrivals:
                self.counters.lags_ms.append((now - arrival) * 1000)
            if response is not None and response.first_token_at is not None:
                response.frames_during += len(chunk.indices)
            evicted = self.memory.add_step(chunk)
            # the numerics run on the perception worker thread, in order, off the event loop
            self.runtime.executor.submit(self._remember, chunk, evicted)

    def _remember(self, chunk: VisualChunk, evicted: list[VisualChunk]) -> None:
        try:
            self.memory.observe(chunk)
            self.memory.absorb(evicted)
        except Exception:  # memory is an aid: never let it take the session down
            log.exception("session %s: memory update failed", self.id)

    def _finish_exchange(self, response: Response) -> None:
        self.memory.add_exchange(response.question, response.token_ids)

    def _after_answer_turn(self, response: Response, turn: _Turn) -> None:
        if (
            turn.stopped
            or response.cancel_requested
            or response.usage["output_tokens"] >= response.max_tokens
        ):
            self._finish_exchange(response)
        if turn.stopped:
            self._carry = layout.closing(self.chat, None)  # the sampled <|im_end|> has no KV: re-feed it
            self._end_response("cancelled" if response.cancel_requested else "completed")
        elif response.cancel_requested:
            self._carry = layout.closing(self.chat, turn.last_token) if turn.last_token is not None else []
            self._end_response("cancelled")
        elif response.usage["output_tokens"] >= response.max_tokens:
            self._carry = layout.closing(self.chat, turn.last_token) if turn.last_token is not None else []
            self._end_response("incomplete")
        else:
            self._pending_token = turn.last_token

    def _end_response(self, status: ResponseStatus, error: str | None = None) -> None:
        response = self._response
        if response is None:
            return
        self._response = None
        self._last_response = response
        self.perception.resume()
        response._finish(status, error)

    # the vLLM request ------------------------------------------------------------------------------
    async def _ensure_request(self) -> None:
        if self._consumer is not None and not self._consumer.done():
            return
        await self._start_request(replace_live=False)

    async def _start_request(self, *, replace_live: bool) -> None:
        """Open a new streaming request; on a rollover, the old one is aborted once the new exists."""
        old = (self._consumer, self._request_id, self._inputs) if replace_live else (None, None, None)
        self._request_id = f"{self.id}-{self.counters.requests_started}"
        self.counters.requests_started += 1
        self._inputs = asyncio.Queue()
        self._outputs = asyncio.Queue()
        self.request_tokens = 0
        self._consumer = asyncio.get_running_loop().create_task(
            self._consume(self._request_id, self._inputs, self._outputs), name=f"speakwatch-vllm-{self.id}"
        )
        if old[0] is not None:
            await self._stop_request(*old)

    async def _consume(self, request_id: str, inputs: asyncio.Queue, outputs: asyncio.Queue) -> None:
        async def stream():
            while True:
                item = await inputs.get()
                if item is None:
                    return
                yield item

        try:
            async for out in self.runtime.engine.generate(
                stream(), self.runtime.sampling_params(1), request_id=request_id
            ):
                outputs.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outputs.put_nowait(exc)
        finally:
            outputs.put_nowait(None)

    async def _end_request(self) -> None:
        """Finish the live vLLM request and free its KV."""
        consumer, request_id, inputs = self._consumer, self._request_id, self._inputs
        self._consumer = None
        self._pending_token = None
        await self._stop_request(consumer, request_id, inputs)

    async def _stop_request(
        self, consumer: asyncio.Task | None, request_id: str | None, inputs: asyncio.Queue | None
    ) -> None:
        if consumer is None:
            return
        if inputs is not None:
            inputs.put_nowait(None)
        consumer.cancel()
        try:
            await consumer
        except (asyncio.CancelledError, Exception):
            pass
        if request_id is not None:
            try:
                await self.runtime.engine.abort(request_id)
            except Exception:  # engine already gone
                log.debug("abort of %s failed", request_id, exc_info=True)
