"""Tests of the fine-tuning inputs and loss (runtime/training/finetune.py) on the tiny task-vocab model."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import positional
from runtime import layout
from runtime.engine import ModelInfo
from runtime.layout import IGNORE
from runtime.tiny_model import make_tiny_model
from runtime.training.data import Exchange, Phrase, Sample
from runtime.training.finetune import Encoder, FinetuneConfig, answer_loss, supervised_logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), vocab="task", size="tiny")


@pytest.fixture(scope="module")
def info(checkpoint) -> ModelInfo:
    return ModelInfo.load(checkpoint)


def load_model(info: ModelInfo):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, info.architecture).from_pretrained(str(info.path), dtype=torch.float32)


def small_sample(n_frames: int, height: int, width: int, seed: int) -> Sample:
    """A stream of small noise frames with a plain question and a cut-off commentary."""
    rng = np.random.default_rng(seed)
    frames = tuple(rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n_frames))
    times = tuple(i / 2 for i in range(n_frames))
    asked = times[n_frames // 2]
    exchanges = (
        Exchange(asked, "What do you see?", (Phrase(asked, "a red square"),)),
        Exchange(
            asked,
            "Describe what you see as it happens.",
            (Phrase(asked, "red square."), Phrase(times[-1], "blue circle.")),
            complete=False,
        ),
    )
    return Sample(frames, times, exchanges, "You watch a camera.", f"small-{seed}")


SAMPLES = ((2, 56, 56, 1), (4, 56, 84, 2), (3, 84, 56, 3))


def encoded(info, config, samples=SAMPLES):
    encoder = Encoder(info, config)
    rows, segments = [], []
    for spec in samples:
        laid, patches = encoder.encode(small_sample(*spec), np.random.default_rng(spec[-1]))
        segs = layout.segments_of(info.chat, laid.pieces)
        rows.append((laid, patches))
        segments.append(segs)
    return encoder, rows, segments


def config_for(info, tmp_path, **changes) -> FinetuneConfig:
    return FinetuneConfig(model=info.path, output=tmp_path / "out", **changes)


@pytest.mark.parametrize("scheme", positional.SCHEMES)
def test_batch_tensors(info, tmp_path, scheme) -> None:
    config = config_for(info, tmp_path, positions=scheme)
    encoder, rows, segments = encoded(info, config)
    batch = encoder.batch(rows)
    lengths = [len(laid.labels) for laid, _ in rows]
    assert len(set(lengths)) == len(lengths)  # rows of different lengths: some are padded
    n, length = len(rows), max(lengths)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (n, length)
    assert batch.position_ids.shape == (3, n, length) and batch.position_ids.dtype == torch.long
    pad = info.chat.tokenizer.token_to_id("<|endoftext|>")
    for b, ((laid, _), segs) in enumerate(zip(rows, segments, strict=True)):
        used = lengths[b]
        assert segs == layout.segments_of(info.chat, laid.pieces)
        expected = positional.assign(scheme, segs, tau=1.0, gap=config.gap)
        assert np.array_equal(batch.position_ids[:, b, :used].numpy(), expected)
        assert batch.input_ids[b, :used].tolist() == layout.expanded_ids(info.chat, laid.pieces)
        assert batch.labels[b, :used].tolist() == laid.labels
        # padding: ignored by the loss, masked out, the pad token
        assert (batch.labels[b, used:] == IGNORE).all()
        assert batch.attention_mask[b].tolist() == [1] * used + [0] * (length - used)
        assert (batch.input_ids[b, used:] == pad).all()
    assert batch.tokens == int((batch.labels != IGNORE).sum()) > 0
    # visual inputs: every item of every row, in stream order, with its patches
    items = [item for laid, _ in rows for item in laid.items]
    assert batch.image_grid_thw.tolist() == [list(item.grid) for item in items]
    patches = [p for _, row_patches in rows for p in row_patches]
    assert (
        batch.pixel_values.shape[0]
        == sum(p.shape[0] for p in patches)
        == int(batch.image_grid_thw.prod(dim=1).sum())
    )
    merge = info.spatial_merge_size
    assert int((batch.input_ids == info.chat.image_pad).sum()) == sum(
        int(np.prod(item.grid)) // (merge * merge) for item in items
    )
    geometry = encoder.geometry
    sample = small_sample(*SAMPLES[0])
    first = rows[0][0].items[0]
    expected_patches, grid = geometry.patchify([sample.frames[first.frame]])
    assert tuple(grid) == first.grid
    assert np.array_equal(batch.pixel_values[: expected_patches.shape[0]].numpy(), expected_patches)


def test_the_paper_mask(info, tmp_path) -> None:
    config = config_for(info, tmp_path, mask="paper")
    encoder, rows, segments = encoded(info, config)
    batch = encoder.batch(rows)
    n, length = batch.input_ids.shape
    additive = batch.attention_mask
    assert additive.shape == (n, 1, length, length) and additive.dtype == torch.float32
    mask = additive == 0  # attended where the additive mask adds nothing
    eye = torch.eye(length, dtype=torch.bool)
    for b, segs in enumerate(segments):
        used = positional.token_count(segs)
        assert torch.equal(mask[b, 0, :used, :used], positional.streaming_mask(segs))
        # padding sees only itself (no NaN rows) and is seen by nobody
        assert torch.equal(mask[b, 0, used:, :], eye[used:]) and not mask[b, 0, :used, used:].any()
    # it differs from causal: frames inserted mid-answer do not see the answer text
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    used = [positional.token_count(segs) for segs in segments]
    assert any(not torch.equal(mask[b, 0, :u, :u], causal[:u, :u]) for b, u in enumerate(used))


def test_collate_lays_out_and_checks_the_length(info, tmp_path) -> None:
    config = config_for(info, tmp_path)
    encoder, rows, _ = encoded(info, config, SAMPLES[:2])
    samples = [small_sample(*spec) for spec in SAMPLES[:2]]
    batch = encoder.collate(samples, np.random.default_rng(0))
    again = encoder.collate(samples, np.random.default_rng(0))
    assert torch.equal(batch.input_ids, again.input_ids) and torch.equal(batch.labels, again.labels)
    assert torch.equal(batch.input_ids, encoder.batch(rows).input_ids)
    short = Encoder(info, config_for(info, tmp_path, max_length=20))
    with pytest.raises(ValueError, match="max_length"):
        short.collate(samples, np.random.default_rng(0))


def test_supervised_logits_are_the_full_forward_at_the_labels(info, tmp_path) -> None:
    config = config_for(info, tmp_path)
    encoder, rows, _ = encoded(info, config, SAMPLES[:2])
    batch = encoder.batch(rows)
    model = load_model(info).eval()
    with torch.no_grad():
        picked = supervised_logits(model, batch)
        full = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
        ).logits
        loss = answer_loss(model, batch)
    mask = batch.labels != IGNORE
    assert picked.shape == (batch.tokens, full.shape[-1])
    assert torch.allclose(picked, full[mask], atol=1e-5)
    # no shift: position i predicts labels[i] (the token sampled from it)
    expected = torch.nn.functional.cross_entropy(full[mask], batch.labels[mask])
    assert torch.allclose(loss, expected, atol=1e-5)


def test_the_paper_mask_gives_a_finite_loss_with_padding(info, tmp_path) -> None:
    config = config_for(info, tmp_path, mask="paper")
    encoder, rows, _ = encoded(info, config, SAMPLES[:2])
    batch = encoder.batch(rows)
    model = load_model(info).eval()
    with torch.no_grad():
        loss = answer_loss(model, batch)
        paper = supervised_logits(model, batch)
        served = supervised_logits(
            model, encoded(info, config_for(info, tmp_path), SAMPLES[:2])[0].batch(rows)
        )
    assert math.isfinite(float(loss))
    # the mask is applied: frames that may not see answer text change the logits after them
    assert float((paper - served).abs().max()) > 1e-3


def test_answer_loss_overfits_a_fixed_batch(info, tmp_path) -> None:
    config = config_for(info, tmp_path)
    encoder, rows, _ = encoded(info, config, SAMPLES[:2])
    batch = encoder.batch(rows)
    model = load_model(info).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad(set_to_none=True)
        loss = answer_loss(model, batch)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[0] > math.log(10)  # a random model: about uniform over the vocabulary
    assert losses[-1] < 0.25 * losses[0]
    assert all(later < losses[0] for later in losses[1:])
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 12


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(positions="rotary"), "position scheme"),
        (dict(mask="causal"), "mask"),
        (dict(warmup=1.0), "warmup"),
        (dict(warmup=1.5), "warmup"),
        (dict(warmup=-0.1), "warmup"),
        (dict(dtype="float16"), "dtype"),
        (dict(turn_tokens=0), "turn_tokens"),
        (dict(per_device_batch=0), "per_device_batch"),
        (dict(effective_batch=0), "effective_batch"),
    ],
)
def test_config_rejects_bad_values(tmp_path, changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(model=tmp_path, output=tmp_path / "out", **changes)


def test_config_defaults(tmp_path) -> None:
    config = FinetuneConfig(model=str(tmp_path), output=str(tmp_path / "out"), warmup=0.0, dtype="bfloat16")
    assert isinstance(config.model, Path) and isinstance(config.output, Path)
    assert config.positions in positional.SCHEMES and config.mask == "served" and config.turn_tokens == 3
