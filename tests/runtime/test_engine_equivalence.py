"""A streamed vLLM session equals a Hugging Face forward pass with our explicit positions.

For every position scheme and both architectures: stream a session to a real vLLM engine (input
text, frames given as ``image_embeds``, answer turns of a few tokens with frames between them),
then run the Hugging Face model once over the full resulting sequence with
``position_ids = positional.assign(scheme, segments)`` and the same embeddings. Every token vLLM
sampled must be the HF argmax at the position it was sampled from, with matching logprobs.
The segments are written out by hand from the script, independently of the engine hook.
"""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest
import torch

import positional
from runtime.engine import EngineOptions, ModelInfo, build_async_llm
from runtime.tiny_model import default_tiny_model

pytestmark = pytest.mark.engine

LOGPROB_TOLERANCE = 2e-3  # fp32 on both sides; observed differences are ~1e-5
TURNS = (3, 3, 2)  # answer tokens per turn; a frame is inserted before turns 2 and 3
RESULTS: dict[tuple[str, str], list[float]] = {}


def _script(info: ModelInfo, rng: np.random.Generator):
    """Token chunks (ids, segments, visual embeds) of the streamed session, except re-fed tokens."""
    chat = info.chat
    merge = info.spatial_merge_size
    grids = [(1, 4, 6), (1, 4, 4), (1, 6, 4)]  # patches before the merge
    embeds = [
        torch.from_numpy(rng.standard_normal((t * h * w // merge**2, info.hidden_size)).astype(np.float32))
        for t, h, w in grids
    ]

    def vision(i: int):
        t, h, w = grids[i]
        n = t * h * w // merge**2
        ids = chat.vision_block(n)
        segs = [("input", 1), ("vision", (t, h // merge, w // merge)), ("input", 1)]
        return ids, segs

    system = chat.turn("system", "You watch a camera.")
    user_open = chat.user_turn_open()
    v0_ids, v0_segs = vision(0)
    user_close = chat.user_turn_close("What happens?")
    header = list(chat.assistant_header)
    first_ids = system + user_open + v0_ids + user_close + header
    first_segs = [("input", len(system) + len(user_open)), *v0_segs, ("input", len(user_close))]
    first_segs.append(("output", len(header)))
    chunks = [(first_ids, first_segs, [0])]
    for i in (1, 2):
        ids, segs = vision(i)
        chunks.append((ids, segs, [i]))
    return chunks, grids, embeds


async def _stream(engine, info: ModelInfo, chunks, grids, embeds):
    """Run the session on vLLM; return the full token sequence, its segments and the samples."""
    from vllm import SamplingParams
    from vllm.engine.protocol import StreamingInput
    from vllm.sampling_params import RequestOutputKind

    def params(n: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=n, temperature=0.0, logprobs=0, output_kind=RequestOutputKind.DELTA, ignore_eos=True
        )

    inputs: asyncio.Queue = asyncio.Queue()

    async def stream():
        while (item := await inputs.get()) is not None:
            yield item

    sequence: list[int] = []
    segments: list = []
    samples: list[tuple[int, int, float]] = []  # (source index, token, logprob)
    pending: int | None = None
    turn = 0

    def submit() -> None:
        nonlocal pending
        ids, segs, items = chunks[turn]
        ids = list(ids)
        segs = list(segs)
        if pending is not None:  # the last sampled token of a turn has no KV: re-feed it
            ids.append(pending)
            segs.append(("output", 1))
        prompt = {
            "prompt_token_ids": ids,
            "multi_modal_data": {
                "image": {
                    "image_embeds": torch.cat([embeds[i] for i in items]),
                    "image_grid_thw": torch.tensor([grids[i] for i in items]),
                }
            },
        }
        sequence.extend(ids)
        segments.extend(segs)
        # vLLM takes one placeholder per image in a prompt and expands it to the item's tokens
        collapsed: list[int] = []
        for token in ids:
            if not (token == info.chat.image_pad and collapsed and collapsed[-1] == info.chat.image_pad):
                collapsed.append(token)
        prompt["prompt_token_ids"] = collapsed
        inputs.put_nowait(StreamingInput(prompt, params(TURNS[turn])))

    submit()
    got: list[tuple[int, float]] = []
    async for out in engine.generate(stream(), params(TURNS[0]), request_id="equivalence"):
        completion = out.outputs[0]
        for token, logprobs in zip(completion.token_ids, completion.logprobs or [], strict=True):
            got.append((token, logprobs[token].logprob))
        if len(got) >= TURNS[turn]:
            # sample k was read from the position of the token before it
            source = len(sequence) - 1
            for k, (token, logprob) in enumerate(got):
                samples.append((source + k, token, logprob))
            kept = [token for token, _ in got[:-1]]
            sequence.extend(kept)
            segments.append(("output", len(kept)))
            pending = got[-1][0]
            got = []
            turn += 1
            if turn == len(TURNS):
                inputs.put_nowait(None)
            else:
                submit()
    return sequence, segments, samples


def _hf_logprobs(model, info: ModelInfo, sequence, segments, grids, embeds, scheme: str) -> torch.Tensor:
    ids = torch.tensor([sequence])
    with torch.inference_mode():
        inputs_embeds = model.get_input_embeddings()(ids)
        pads = (ids[0] == info.chat.image_pad).nonzero().flatten()
        visual = torch.cat(embeds)
        assert len(pads) == len(visual), "placeholder count must match the embeddings"
        inputs_embeds[0, pads] = visual
        positions = torch.from_numpy(positional.assign(scheme, segments, tau=1.0))
        assert positions.shape[1] == len(sequence)
        logits = model(inputs_embeds=inputs_embeds, position_ids=positions[:, None, :]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def hf_models():
    import transformers

    models = {}
    for arch in ("qwen2-vl", "qwen2.5-vl"):
        info = ModelInfo.load(default_tiny_model(arch))
        cls = getattr(transformers, info.architecture)
        model = cls.from_pretrained(str(info.path), dtype=torch.float32, attn_implementation="eager").eval()
        models[arch] = (info, model)
    return models


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize("scheme", list(positional.SCHEMES))
def test_streamed_session_matches_hf_forward(arch: str, scheme: str, hf_models) -> None:
    info, model = hf_models[arch]
    engine = build_async_llm(info, EngineOptions(positions=scheme, dtype="float32", max_model_len=2048))
    try:
        chunks, grids, embeds = _script(info, np.random.default_rng(7))
        sequence, segments, samples = asyncio.run(_stream(engine, info, chunks, grids, embeds))
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    assert positional.token_count(segments) == len(sequence)
    assert len(samples) == sum(TURNS)
    logprobs = _hf_logprobs(model, info, sequence, segments, grids, embeds, scheme)
    for source, token, vllm_logprob in samples:
        row = logprobs[source]
        assert int(row.argmax()) == token, f"{scheme}/{arch}: greedy token differs at {source}"
        assert abs(float(row[token]) - vllm_logprob) < LOGPROB_TOLERANCE, (
            f"{scheme}/{arch}: logprob {vllm_logprob} vs HF {float(row[token])} at {source}"
        )
    RESULTS[(arch, scheme)] = [lp for _, _, lp in samples]


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl"])
def test_schemes_change_the_logits(arch: str, hf_models) -> None:
    """A hook that silently fell back to native positions would make every scheme agree."""
    info, model = hf_models[arch]
    chunks, grids, embeds = _script(info, np.random.default_rng(7))
    sequence: list[int] = []
    segments: list = []
    for ids, segs, _ in chunks:
        sequence += ids
        segments += segs
        sequence += [info.chat.encode(" x")[0]] * 3
        segments.append(("output", 3))
    per_scheme = {
        scheme: _hf_logprobs(model, info, sequence, segments, grids, embeds, scheme)
        for scheme in positional.SCHEMES
    }
    schemes = list(positional.SCHEMES)
    for i, a in enumerate(schemes):
        for b in schemes[i + 1 :]:
            gap = (per_scheme[a] - per_scheme[b]).abs().max()
            if {a, b} == {"sequential", "overlapped"}:
                # In a served stream every frame sits between <|vision_start|> and <|vision_end|>, which
                # are input: the marker closes the pending output run before the frame, so overlapped
                # never overlaps and equals sequential (positions.md's example has no markers).
                assert gap < 1e-5, "overlapped must equal sequential when markers separate frames"
            else:
                assert gap > 1e-3, f"{a} and {b} give the same logits"
    measured = {scheme: RESULTS.get((arch, scheme)) for scheme in schemes}
    if all(v is not None for v in measured.values()):
        distinct = {tuple(round(x, 4) for x in v) for v in measured.values()}
        assert len(distinct) > 1, f"{arch}: vLLM gave identical logprobs under every scheme"
