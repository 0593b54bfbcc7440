"""Bounded sessions on a real vLLM engine: hundreds of rollovers, within budget, nothing leaked.

The built-in watching model watches a long rendered clip (one shape drifting, now and then changing)
and comments on it / answers the task's questions across the rollovers. And the prompt a rollover
opens mid-answer is checked piece by piece and against a Hugging Face forward of the same sequence.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import transformers
from engine_recording import Recorder, served_sequence, with_logprobs

from positional import DEFAULT_GAP, assign
from runtime import ChangeFilterSettings, Runtime, layout
from runtime.memory import MemoryConfig
from runtime.training import scenes

pytestmark = pytest.mark.engine

BUDGET = 160
# asked every 150 frames: the commentary runs to max_tokens (rolling over mid-answer), questions complete
ASKED = (scenes.COMMENTARY, *scenes.QUESTIONS)


@pytest.fixture(scope="module")
async def small_runtime(test_model):
    """A runtime whose sessions roll over every few frames (tiny budget, tiny frames); the checkpoint's K."""
    rt = Runtime(
        test_model,
        engine_options={"dtype": "float32", "max_model_len": 1024, "kv_cache_gb": 1.0},
        budget_tokens=BUDGET,
        window_steps=2,
        dialogue_turns=1,
        max_fps=1000.0,
        memory=MemoryConfig(slot_grid=(2, 2), titans_rank=32),
        # these tests are about rollovers and count the frames in: a drifting clip's near-still
        # frames (about 1 in 75) must not be held back by the change filter
        change_filter=ChangeFilterSettings(enabled=False),
    )
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


async def test_hundreds_of_rollovers_stay_within_budget_and_keep_answering(small_runtime) -> None:
    rt = small_runtime
    engine = rt.engine
    clip = scenes.random_clip(np.random.default_rng(0), 900, height=112, width=112)  # 16 visual tokens
    async with rt.open_session(instructions="You watch a camera.") as session:
        seen_memory_bytes = set()
        for i in range(900):
            await session.push_frame(clip.frame(i), timestamp=i * 0.5)
            while session.stats().frames_pending > 1:  # accelerated, but without backlog drops
                await asyncio.sleep(0.005)
            if i % 150 == 149:  # a question now and then, answered across rollovers
                text = await session.ask(ASKED[(i // 150) % len(ASKED)], max_tokens=24).read()
                assert text.strip()
                seen_memory_bytes.add(session.stats().memory_state_bytes)
            if i % 10 == 0:
                await asyncio.sleep(0.02)
                assert engine.output_processor.get_num_unfinished_requests() <= 1
        deadline = asyncio.get_running_loop().time() + 60
        while session.stats().frames_pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        stats = session.stats()
        assert stats.rollovers >= 100, str(stats)
        assert stats.max_request_tokens <= BUDGET, str(stats)
        assert stats.session_tokens <= BUDGET
        assert stats.frames_ingested >= 850, str(stats)
        assert len(seen_memory_bytes) == 1, "memory state must not grow with the stream"
        assert stats.memory_surprise is not None
        final = await session.ask(scenes.QUESTIONS[2], max_tokens=30).read()
        assert final.strip()
    assert engine.output_processor.get_num_unfinished_requests() == 0


def _find(sequence: list[int], part: list[int]) -> int:
    """Where ``part`` first occurs in ``sequence`` (-1 if nowhere)."""
    return next((i for i in range(len(sequence) - len(part) + 1) if sequence[i : i + len(part)] == part), -1)


def _contains(sequence: list[int], part: list[int]) -> bool:
    return _find(sequence, part) >= 0


def _images(chunk) -> dict:
    return chunk.prompt.get("multi_modal_data", {}).get("image", {})


def _carried(request, info, in_flight: list[int]) -> int:
    """How many answer tokens a request's first chunk carries after the in-flight question (-1: none)."""
    if not request.chunks:
        return -1
    sequence, _ = served_sequence(request.chunks[:1], [], info)  # the first chunk alone
    at = _find(sequence, in_flight)
    return -1 if at < 0 else len(sequence) - (at + len(in_flight))


def _visual_items(sequence: list[int], grids: list[tuple[int, int, int]], merge: int, pad: int):
    """(offset, t, h, w) of each run of placeholders, with the merged grid of the item it holds."""
    items, grids_left, i = [], iter(grids), 0
    while i < len(sequence):
        if sequence[i] == pad:
            t, h, w = next(grids_left)
            items.append((i, t, h // merge, w // merge))
            i += t * h * w // merge**2
        else:
            i += 1
    return items


async def test_rollover_prompt_matches_a_hugging_face_forward(small_runtime, monkeypatch) -> None:
    """The request a rollover opens mid-answer: [system][memory][window][dialogue][answer in flight].

    Its layout is checked piece by piece (the memory item has the slot grid, the window holds the
    last steps, the finished exchange is there, the answer so far is classified as output), and a
    Hugging Face forward of the same sequence, with `positional.assign` positions over
    `layout.classify_tokens` segments, gives every token vLLM sampled in it as its argmax.
    """
    from engine_recording import served_sequence

    rt = small_runtime
    info, chat, merge = rt.info, rt.info.chat, rt.info.spatial_merge_size
    recorder = Recorder(rt.engine)
    monkeypatch.setattr(rt.engine, "generate", recorder.generate)
    with_logprobs(rt, monkeypatch)
    clip = scenes.random_clip(np.random.default_rng(3), 4, height=112, width=112)
    system = "You watch a camera."
    async with rt.open_session(instructions=system) as session:
        for i in range(4):  # more steps than the window holds: the first ones go into the memory
            await session.push_frame(clip.frame(i), timestamp=i * 0.5)
            async with asyncio.timeout(60):
                while session.stats().frames_pending:
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(30):  # the memory write runs on the worker thread
            while session.memory.steps_written < 2:
                await asyncio.sleep(0.01)
        asked = scenes.QUESTIONS[0]
        first = session.ask(asked, max_tokens=8)
        await first.read()
        assert first.status == "completed"
        before = len(recorder.requests)
        commentary = session.ask(scenes.COMMENTARY, max_tokens=96)  # longer than the budget: rolls over
        await commentary.read()
        stats = session.stats()
    assert stats.memory_update_failures == 0
    in_flight = [*chat.turn("user", scenes.COMMENTARY), *chat.assistant_header]
    rolled = next(r for r in recorder.requests[before:] if _carried(r, info, in_flight) >= 2)
    sequence, per_chunk = served_sequence(rolled.chunks, rolled.outputs, info)
    with_images = [chunk for chunk in rolled.chunks if _images(chunk)]
    grids = [tuple(g) for chunk in with_images for g in _images(chunk)["image_grid_thw"].tolist()]
    embeds = torch.cat([_images(chunk)["image_embeds"] for chunk in with_images])

    # the layout: system turn, the memory item (slot grid), the window, the dialogue, the answer so far
    head = layout.expanded_ids(chat, layout.system_turn(chat, system))
    assert sequence[: len(head)] == head
    slots = rt.settings.memory.slot_grid
    frame_grid = (1, 112 // 14, 112 // 14)
    assert grids[0] == (1, slots[0] * merge, slots[1] * merge), "the memory item comes first"
    window = grids[1 : 1 + rt.settings.window_steps]
    assert window == [frame_grid] * rt.settings.window_steps, "then the last steps"
    assert _contains(sequence, [*chat.turn("user", asked), *chat.assistant_header]), "the finished exchange"
    assert _contains(sequence, list(first.token_ids)), "with its whole answer"
    assert _contains(sequence, in_flight), "the question of the answer in flight"
    items = _visual_items(sequence, grids, merge, chat.image_pad)
    segments = layout.classify_tokens(
        sequence,
        items,
        assistant_header=chat.assistant_header,
        im_end=chat.im_end,
        vision_markers=(chat.vision_start, chat.vision_end),
    )
    first_chunk = per_chunk[0][0][0] + 1  # the first sample is read from the chunk's last position
    carried = _carried(rolled, info, in_flight)  # the answer so far and the re-fed last token
    kind, n = segments[-1]
    assert kind == "output" and n >= len(sequence) - first_chunk + carried, "the answer so far is output"

    # a Hugging Face forward of the same sequence gives what vLLM sampled
    model = getattr(transformers, info.architecture).from_pretrained(str(info.path), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([sequence])
    with torch.inference_mode():
        inputs_embeds = model.get_input_embeddings()(ids)
        pads = (ids[0] == chat.image_pad).nonzero().flatten()
        assert len(pads) == len(embeds)
        inputs_embeds[0, pads] = embeds.to(inputs_embeds.dtype)
        positions = torch.from_numpy(assign(rt.positions, segments, tau=1.0, gap=DEFAULT_GAP))
        logits = model(inputs_embeds=inputs_embeds, position_ids=positions[:, None, :]).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    sampled = [entry for turn in per_chunk for entry in turn]
    assert len(sampled) >= 2
    for source, token, vllm_logprob in sampled:
        assert int(logprobs[source].argmax()) == token, f"greedy token differs at {source}"
        assert abs(float(logprobs[source, token]) - vllm_logprob) < 2e-3, (
            f"logprob {vllm_logprob} (vLLM) vs {float(logprobs[source, token])} (HF) at {source}"
        )
