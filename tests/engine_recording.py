"""Recording what a session sends to vLLM and gets back, to rebuild the sequence the engine held.

Shared by the end-to-end tests that compare a served stream with a Hugging Face forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.engine import ModelInfo


@dataclass
class Request:
    """One streaming vLLM request: every chunk sent and every output received, in order."""

    request_id: str
    chunks: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class Recorder:
    """Wraps the engine's ``generate``; ``requests`` in the order they were opened."""

    def __init__(self, engine) -> None:
        self.original = engine.generate
        self.requests: list[Request] = []

    @property
    def chunks(self) -> list:
        return [chunk for request in self.requests for chunk in request.chunks]

    @property
    def outputs(self) -> list:
        return [out for request in self.requests for out in request.outputs]

    def generate(self, prompt, params, request_id, **kwargs):
        request = Request(request_id)
        self.requests.append(request)

        async def tee():
            async for item in prompt:
                request.chunks.append(item)
                yield item

        async def run():
            async for out in self.original(tee(), params, request_id=request_id, **kwargs):
                request.outputs.append(out)
                yield out

        return run()


def served_sequence(chunks: list, outputs: list, info: ModelInfo):
    """The KV sequence vLLM held for these chunks, and each chunk's sampled (source, token, logprob).

    The source is the index of the position each token was sampled from; the last sampled token
    of a chunk has no KV (vLLM drops it), every other one is part of the sequence.
    """
    chat = info.chat
    sampled: list[tuple[int, float]] = []
    for out in outputs:
        completion = out.outputs[0]
        for token, logprobs in zip(completion.token_ids, completion.logprobs or [], strict=True):
            sampled.append((token, logprobs[token].logprob))
    sequence: list[int] = []
    per_chunk: list[list[tuple[int, int, float]]] = []
    cursor = 0
    for chunk in chunks:
        prompt = chunk.prompt
        grids = []
        if "multi_modal_data" in prompt:
            grids = [tuple(g) for g in prompt["multi_modal_data"]["image"]["image_grid_thw"].tolist()]
        items = iter(grids)
        for token in prompt["prompt_token_ids"]:
            if token == chat.image_pad:
                t, h, w = next(items)
                sequence.extend([token] * (t * h * w // info.spatial_merge_size**2))
            else:
                sequence.append(token)
        limit = chunk.sampling_params.max_tokens
        turn: list[tuple[int, int, float]] = []
        while cursor < len(sampled) and len(turn) < limit:
            token, logprob = sampled[cursor]
            cursor += 1
            turn.append((len(sequence) - 1 + len(turn), token, logprob))
            if token == chat.im_end:
                break
        sequence.extend(token for _, token, _ in turn[:-1])
        per_chunk.append(turn)
    return sequence, per_chunk


def with_logprobs(runtime, monkeypatch) -> None:
    """Make the runtime's sampling parameters return the sampled token's logprob."""
    plain = runtime.sampling_params

    def params(max_tokens: int):
        out = plain(max_tokens).clone()
        out.logprobs = 0
        return out

    monkeypatch.setattr(runtime, "sampling_params", params)
