"""Train/serve parity on the built-in (fine-tuned) checkpoint, from the pixels to the logprobs.

A live session on real vLLM: a system prompt, a frame while idle, a commentary during which a new
frame arrives (inserted between answer turns), then a second question. Everything the session sent
to vLLM and every token it got back is recorded. Then:
- the trainer's layout (`StreamBuilder`, driven by the same events) equals what was served, token
  for token, with the same position segments;
- the trainer's forward pass over that layout (its own patches of the same frames through the
  Hugging Face vision tower, `positional.assign` positions, the served causal mask) gives every
  token vLLM sampled as its argmax, with logprobs within `LOGPROB_TOLERANCE`.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import transformers
from engine_recording import Recorder, served_sequence, with_logprobs

from runtime import layout
from runtime.training import scenes
from runtime.training.data import FrameRef, LaidOut
from runtime.training.finetune import Encoder, FinetuneConfig, supervised_logits

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

LOGPROB_TOLERANCE = 2e-3  # fp32 on both sides
SYSTEM = "You watch a camera."


def _frame(color: str, shape: str, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    obj = scenes.random_object(rng, shape=shape, color=color, aspect=width / height)
    return scenes.render(obj, height, width, rng)


async def test_served_stream_equals_the_training_forward(runtime, monkeypatch) -> None:
    info = runtime.info
    chat = info.chat
    red = _frame("red", "square", 120, 160, seed=1)
    blue = _frame("blue", "circle", 480, 640, seed=2)
    recorder = Recorder(runtime.engine)
    monkeypatch.setattr(runtime.engine, "generate", recorder.generate)
    with_logprobs(runtime, monkeypatch)
    k = runtime.settings.turn_tokens
    async with runtime.open_session(instructions=SYSTEM, schedule="parallel") as session:
        await session.push_frame(red)
        async with asyncio.timeout(60):
            while session.stats().frames_ingested < 1:
                await asyncio.sleep(0.02)
        commentary = session.ask(scenes.COMMENTARY, max_tokens=8 * k)
        pushed = False
        async for _ in commentary:
            if not pushed:
                await session.push_frame(blue)
                pushed = True
        assert commentary.status == "incomplete"
        assert session.stats().frames_during_answer == 1, "the second frame must arrive mid-answer"
        second = session.ask("What do you see?", max_tokens=8)
        await second.read()
        await asyncio.sleep(0.2)
    sequence, per_chunk = served_sequence(recorder.chunks, recorder.outputs, info)

    # the trainer's layout, driven by the same events
    merge = info.spatial_merge_size
    encoder = Encoder(info, FinetuneConfig(model=info.path, output=info.path, positions=runtime.positions))
    patched = [encoder.geometry.patchify([frame]) for frame in (red, blue)]
    refs = [FrameRef(i, grid, merge) for i, (_, grid) in enumerate(patched)]
    builder = layout.StreamBuilder(chat)
    builder.system(SYSTEM)
    chunks = iter(zip(recorder.chunks, per_chunk, strict=True))
    chunk, _ = next(chunks)
    assert chunk.sampling_params.max_tokens == 1, "the idle frame goes in alone"
    builder.idle_frames(refs[:1])
    for question, limit in ((scenes.COMMENTARY, 8 * k), ("What do you see?", 8)):
        builder.ask(question)
        produced = 0
        while builder.answering and produced < limit:
            chunk, turn = next(chunks)
            images = chunk.prompt.get("multi_modal_data")
            frames = refs[1:] if images is not None and produced else []
            builder.answer_turn([token for _, token, _ in turn], frames=frames)
            produced += len(turn)
        builder.end_answer()
    assert next(chunks, None) is None, "every chunk the session sent is accounted for"

    trainer_ids = layout.expanded_ids(chat, builder.pieces)
    assert trainer_ids == sequence, "the trainer's layout must equal the served stream"
    served_items = [(i, *r.merged_grid) for i, r in zip(_item_offsets(builder.pieces), refs, strict=True)]
    assert layout.segments_of(chat, builder.pieces) == layout.classify_tokens(
        sequence,
        served_items,
        assistant_header=chat.assistant_header,
        im_end=chat.im_end,
        vision_markers=(chat.vision_start, chat.vision_end),
    )

    # the training forward pass over that layout
    model = getattr(transformers, info.architecture).from_pretrained(str(info.path), dtype=torch.float32)
    laid = LaidOut(builder.pieces, builder.labels, refs)
    batch = encoder.batch([(laid, [patches for patches, _ in patched])])
    with torch.inference_mode():
        logprobs = torch.log_softmax(supervised_logits(model.eval(), batch).float(), dim=-1)
    served = [entry for turn in per_chunk[1:] for entry in turn]
    sources = [i for i, label in enumerate(builder.labels) if label != layout.IGNORE]
    assert sources == [source for source, _, _ in served]
    for row, (source, token, vllm_logprob) in zip(logprobs, served, strict=True):
        assert int(row.argmax()) == token, f"greedy token differs at {source}"
        assert abs(float(row[token]) - vllm_logprob) < LOGPROB_TOLERANCE, (
            f"logprob {vllm_logprob} (vLLM) vs {float(row[token])} (trainer) at {source}"
        )


def _item_offsets(pieces) -> list[int]:
    offsets, at = [], 0
    for piece in pieces:
        if isinstance(piece, int):
            at += 1
        else:
            offsets.append(at)
            at += piece.n_tokens
    return offsets
