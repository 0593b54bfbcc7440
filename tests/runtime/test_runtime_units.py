"""Fast tests of the runtime's pure parts: token classification, chat format, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

import positional
from runtime.chat import ChatFormat
from runtime.engine import EngineOptions, ModelInfo
from runtime.layout import classify_tokens
from runtime.perception import smart_resize
from runtime.tiny_model import default_tiny_model


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo.load(default_tiny_model("qwen2-vl"))


@pytest.mark.parametrize("checkpoint", ["random", "watching"])
def test_chat_format_matches_the_chat_template(info: ModelInfo, checkpoint: str) -> None:
    from transformers import AutoTokenizer

    from runtime.training.builtin import watching_model

    if checkpoint == "watching":  # the small vocabulary, its own special ids
        info = ModelInfo.load(watching_model())

    tokenizer = AutoTokenizer.from_pretrained(str(info.path))
    messages = [
        {"role": "system", "content": "You watch."},
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And now?"},
    ]
    expected = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = expected["input_ids"]
    chat = info.chat
    ours = (
        chat.turn("system", "You watch.")
        + chat.user_turn_open()
        + chat.user_turn_close("What is this?")
        + [*chat.assistant_header, *chat.encode("A cat."), *chat.close_assistant()]
        + chat.turn("user", "And now?")
        + list(chat.assistant_header)
    )
    assert ours == list(expected)


def test_classify_tokens_marks_assistant_spans_and_vision(info: ModelInfo) -> None:
    chat = info.chat
    header = list(chat.assistant_header)
    system = chat.turn("system", "S")
    user = chat.turn("user", "Q")
    frame = chat.vision_block(6)  # [vs] 6 pads [ve]
    answer = chat.encode(" ab")
    ids = system + frame + user + header + answer[:1] + frame + answer[1:] + chat.close_assistant()
    first = len(system) + 1
    second = len(system) + len(frame) + len(user) + len(header) + 1 + 1
    items = [(first, 1, 2, 3), (second, 1, 3, 2)]
    segments = classify_tokens(
        ids,
        items,
        assistant_header=header,
        im_end=chat.im_end,
        vision_markers=[chat.vision_start, chat.vision_end],
    )
    assert segments == [
        ("input", len(system) + 1),
        ("vision", (1, 2, 3)),
        ("input", 1 + len(user)),
        ("output", len(header) + 1),
        ("input", 1),  # vision markers are input even inside an answer
        ("vision", (1, 3, 2)),
        ("input", 1),
        ("output", len(answer) - 1 + 1),  # rest of the answer and <|im_end|>
        ("input", len(chat.newline)),
    ]
    assert positional.token_count(segments) == len(ids)


def test_classify_tokens_without_header_is_all_input() -> None:
    assert classify_tokens([1, 2, 3], [], assistant_header=[9, 8], im_end=7, vision_markers=[5]) == [
        ("input", 3)
    ]


def test_smart_resize_keeps_budget_and_factor() -> None:
    for h, w in [(480, 640), (1080, 1920), (56, 56), (30, 400), (2000, 100)]:
        rh, rw = smart_resize(h, w, 28, 56 * 56, 224 * 224)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 56 * 56 <= rh * rw <= 224 * 224
    with pytest.raises(ValueError):
        smart_resize(1, 500, 28, 56 * 56, 224 * 224)


def test_patchify_matches_the_hf_image_processor(info: ModelInfo) -> None:
    """Our preprocessing gives the HF processor's pixel patches for a frame already at target size."""
    import torch
    from transformers import AutoImageProcessor

    from runtime.perception import VisionEncoder

    encoder = VisionEncoder(info)
    height, width = encoder.target_size(112, 168)
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours, grid = encoder.patchify([frame])
    processor = AutoImageProcessor.from_pretrained(str(info.path))
    theirs = processor(images=[frame], return_tensors="pt")
    assert tuple(theirs["image_grid_thw"][0].tolist()) == grid
    np.testing.assert_allclose(ours, theirs["pixel_values"].numpy(), atol=2e-5)
    embeds = encoder.encode([[frame]])[0][0]
    assert isinstance(embeds, torch.Tensor)
    assert embeds.shape == (grid[0] * grid[1] * grid[2] // 4, info.hidden_size)


def test_engine_options_validate() -> None:
    with pytest.raises(ValueError, match="unknown position scheme"):
        EngineOptions(positions="nope")
    with pytest.raises(ValueError):
        EngineOptions(max_model_len=10)


def test_model_info_rejects_non_models(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        ModelInfo.load(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match="not supported"):
        ModelInfo.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        ChatFormat.from_pretrained(tmp_path)


def test_two_frames_make_one_temporal_patch_on_qwen2_5_vl() -> None:
    """Qwen2.5-VL's temporal patch of 2: a pair of frames is one visual item with grid t = 1."""
    from runtime.perception import VisionEncoder

    encoder = VisionEncoder(ModelInfo.load(default_tiny_model("qwen2.5-vl")))
    rng = np.random.default_rng(1)
    first, second = (rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2))
    (pair, grid), (still, still_grid) = encoder.encode([[first, second], [first]])
    assert grid == still_grid == (1, 8, 8)
    assert pair.shape == still.shape == (16, 128)
    assert not np.allclose(pair.numpy(), still.numpy()), "the second frame must change the item"
    with pytest.raises(ValueError, match=r"1\.\.2 frames"):
        encoder.patchify([first, second, first])


class _SlowEncoder:
    """Encodes nothing until released, so the test sees frames queued and in flight."""

    merge = 2
    temporal_patch = 2

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()

    def encode(self, groups):
        import torch

        self.release.wait(10)
        return [(torch.zeros(1, 4), (1, 2, 2)) for _ in groups]


async def test_perception_settled_tracks_frames_before_a_question() -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from runtime.perception import Perception
    from streams.frame import Frame

    encoder = _SlowEncoder()
    chunks: list = []
    with ThreadPoolExecutor(1) as executor:
        perception = Perception(encoder, executor, chunks.extend, queue_size=8)  # type: ignore[arg-type]
        perception.start()
        rgb = np.zeros((4, 4, 3), dtype=np.uint8)
        assert perception.settled(0) and perception.settled(5), "nothing pushed: nothing to wait for"
        perception.submit(Frame(rgb=rgb, timestamp=0.0, arrival=0.0, index=0))
        perception.submit(Frame(rgb=rgb, timestamp=0.5, arrival=0.5, index=1))
        await asyncio.sleep(0.05)  # the first batch is encoding, blocked
        assert not perception.settled(1), "frame 0 is still encoding"
        assert perception.settled(0), "a question asked before any frame waits for none"
        encoder.release.set()
        async with asyncio.timeout(5):
            while not perception.settled(2):
                await asyncio.sleep(0.01)
        assert sum(1 for _ in chunks) == 2
        await perception.close()


async def test_a_lone_frame_waiting_for_its_temporal_partner_does_not_hold_a_question() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from runtime.perception import Perception
    from streams.frame import Frame

    with ThreadPoolExecutor(1) as executor:
        perception = Perception(_SlowEncoder(), executor, lambda chunks: None, frames_per_chunk=2)  # type: ignore[arg-type]
        perception.start()
        perception.submit(Frame(rgb=np.zeros((4, 4, 3), np.uint8), timestamp=0.0, arrival=0.0, index=0))
        assert perception.settled(1)
        await perception.close()
