"""One long-lived vLLM streaming request: chunks in, outputs out, aborted when it is done.

vLLM 0.32 takes a streaming request's input as an async generator of ``StreamingInput`` chunks
(see design/vllm.md). `StreamingRequest` owns that generator's queue, the task that consumes the
engine's outputs, and the abort that frees the request's KV; the session glue only sends chunks,
reads outputs and replaces the request on a rollover.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

from runtime import layout
from runtime.chat import ChatFormat
from runtime.layout import Piece

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.engine.protocol import StreamingInput
    from vllm.outputs import RequestOutput

log = logging.getLogger("speakwatch.request")


class StreamingEngine(Protocol):
    """What a request needs of vLLM's ``AsyncLLM``."""

    def generate(
        self, prompt: AsyncIterator[StreamingInput], sampling_params: SamplingParams, *, request_id: str
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...


class RequestEnded(RuntimeError):
    """The request's output stream ended (or raised) while a turn still expected outputs."""


class EngineGone(RequestEnded):
    """The engine died under the request (vLLM's `EngineDeadError`, or the runtime saw it die)."""


def is_engine_death(exc: BaseException) -> bool:
    """Whether ``exc`` is vLLM's `EngineDeadError` (without importing vLLM where it is not loaded:
    an engine that raised it has loaded its module)."""
    module = sys.modules.get("vllm.v1.engine.exceptions")
    dead = getattr(module, "EngineDeadError", None)
    return isinstance(dead, type) and isinstance(exc, dead)


def render_chunk(chat: ChatFormat, pieces: Sequence[Piece]) -> dict:
    """A chunk as vLLM takes it: token ids with one placeholder per visual item, and their embeddings."""
    import torch

    prompt: dict = {"prompt_token_ids": layout.prompt_ids(chat, pieces)}
    visual = layout.visual_items(pieces)
    if visual:
        prompt["multi_modal_data"] = {
            "image": {
                "image_embeds": torch.cat([item.embeds for item in visual]),  # type: ignore[attr-defined]
                "image_grid_thw": torch.tensor([item.grid for item in visual], dtype=torch.long),  # type: ignore[attr-defined]
            }
        }
    return prompt


class StreamingRequest:
    """A vLLM streaming request that lives until `stop` (a session holds one at a time)."""

    def __init__(self, engine: StreamingEngine, request_id: str, open_params: SamplingParams):
        self.engine = engine
        self.id = request_id
        self._inputs: asyncio.Queue[StreamingInput | None] = asyncio.Queue()
        self._outputs: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self._consumer = asyncio.get_running_loop().create_task(
            self._consume(open_params), name=f"speakwatch-vllm-{request_id}"
        )

    def send(self, prompt: dict, params: SamplingParams) -> None:
        """Append a chunk: vLLM starts it once the turn before it has stopped."""
        from vllm.engine.protocol import StreamingInput

        self._inputs.put_nowait(StreamingInput(prompt, params))

    async def next_output(self) -> RequestOutput:
        """The next output; `RequestEnded` when the stream is over, which a live session never expects."""
        output = await self._outputs.get()
        if isinstance(output, EngineGone):
            raise output
        if isinstance(output, BaseException) and is_engine_death(output):
            raise EngineGone(f"the engine died under request {self.id}: {output}") from output
        if output is None or isinstance(output, BaseException):
            raise RequestEnded(f"vLLM request ended unexpectedly: {output!r}")
        return output

    def interrupt(self, reason: str) -> None:
        """The engine is gone: a reader waiting for the next output gets `EngineGone` at once."""
        self._outputs.put_nowait(EngineGone(reason))

    async def stop(self) -> None:
        """End the input stream, stop reading and abort the request in the engine (frees its KV)."""
        self._inputs.put_nowait(None)
        self._consumer.cancel()
        try:
            await self._consumer
        except (asyncio.CancelledError, Exception):
            pass
        try:
            await self.engine.abort(self.id)
        except Exception:  # the engine is already gone
            log.debug("abort of %s failed", self.id, exc_info=True)

    async def _consume(self, open_params: SamplingParams) -> None:
        async def chunks() -> AsyncIterator[StreamingInput]:
            while (item := await self._inputs.get()) is not None:
                yield item

        try:
            async for output in self.engine.generate(chunks(), open_params, request_id=self.id):
                self._outputs.put_nowait(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._outputs.put_nowait(exc)
        finally:
            self._outputs.put_nowait(None)
