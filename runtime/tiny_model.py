"""Built-in tiny checkpoints: real Qwen2-VL / Qwen2.5-VL architectures.

Nothing is downloaded. A checkpoint is complete (config, safetensors, tokenizer, a Qwen-style chat
template, preprocessor config), so vLLM and Hugging Face transformers load it like any local model.

Two vocabularies:
- ``qwen``: random weights and a byte-level tokenizer whose special tokens sit at Qwen's real ids
  (151643..), filler ids decoding to readable words. The text it writes is noise; every mechanism
  (vision tower, M-RoPE, streaming, memory) runs for real. Tests of the mechanism use it.
- ``task``: a small byte-level BPE vocabulary (a few hundred entries) learnt from the synthetic
  seeing task's text, special tokens at ids of its own that config and tokenizer name. The
  built-in *watching* checkpoint (runtime/training/builtin.py) is this, fine-tuned on that task.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = {
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
}
TINY_FORMAT = 2  # bump when the generated checkpoint changes, so caches are rebuilt

# Qwen's special tokens, in the order that gives them their real ids (151643, 151644, ...).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
FIRST_SPECIAL_ID = 151643
VOCAB_SIZE = 151936  # Qwen2-VL's embedding rows (the tokenizer has 151657 entries, as the real one)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _filler_word(index: int) -> str:
    """A short readable lowercase word for a filler vocabulary entry (deterministic)."""
    letters = string.ascii_lowercase
    word = ""
    index += 26 * 27  # at least three letters
    while index:
        index, rest = divmod(index, 26)
        word = letters[rest] + word
    return word


def _qwen_tokenizer():
    """Bytes, then " word" fillers up to Qwen's first special id, then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    # Fill ids 256..151642 with " word" tokens so any id the model samples decodes to visible text.
    space = next(ch for ch in byte_chars if _byte_of(ch) == ord(" "))
    for token_id in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[space + _filler_word(token_id)] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == FIRST_SPECIAL_ID + offset, token
    return tokenizer


def task_corpus() -> list[str]:
    """The text of the synthetic seeing task (and the chat template's words), for a small vocabulary."""
    from runtime.training import scenes

    lines = ["system", "user", "assistant", "You are a helpful assistant.", "You watch a camera."]
    lines += [*scenes.QUESTIONS, scenes.COMMENTARY]
    for color in scenes.COLORS:
        for shape in scenes.SHAPES:
            obj = scenes.SceneObject(shape=shape, color=color, cx=0.5, cy=0.5, area=0.2)
            lines += [scenes.answer(q, obj) for q in scenes.QUESTIONS]
            lines.append(f"{obj.phrase()}. {obj.phrase()}.")
    return lines * 4


TASK_VOCAB_SIZE = 384


def _task_tokenizer():
    """Special tokens at ids 0.., the 256 bytes, then BPE merges learnt from `task_corpus` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tokenizer = Tokenizer(models.BPE(fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TASK_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(task_corpus(), trainer=trainer)
    return tokenizer


def _build_tokenizer(directory: Path, vocab: str) -> dict[str, int]:
    """Write the tokenizer files; returns the special tokens' ids."""
    tokenizer = _qwen_tokenizer() if vocab == "qwen" else _task_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    added = {
        str(ids[tok]): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    # Slow-tokenizer files, so every Qwen2 tokenizer class can load the checkpoint.
    model = json.loads(tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = ["#version: 0.2", *(m if isinstance(m, str) else " ".join(m) for m in model["merges"])]
    (directory / "merges.txt").write_text("\n".join(merges) + "\n")
    return ids


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's byte-to-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of a generated checkpoint, and the pixel budget of its preprocessor."""

    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    max_pixels: int = 224 * 224
    init_std: float = 0.08  # std of the random initial weights


SIZES = {
    "tiny": ModelSize(),
    # the built-in watching model: enough vision capacity to tell shapes apart, still fast on 2 cores
    "watch": ModelSize(
        hidden=128,
        intermediate=384,
        layers=3,
        vision_width=96,
        vision_depth=3,
        vision_heads=4,
        max_pixels=168 * 168,
    ),
}


def _config(arch: str, ids: dict[str, int], vocab_size: int, size: ModelSize):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "initializer_range": size.init_std,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    special = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if arch == "qwen2-vl":
        vision = {
            "depth": size.vision_depth,
            "embed_dim": size.vision_width,
            "hidden_size": size.hidden,
            "num_heads": size.vision_heads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": size.init_std,
        }
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
    else:
        vision = {
            "depth": size.vision_depth,
            "hidden_size": size.vision_width,
            "intermediate_size": 2 * size.vision_width,
            "num_heads": size.vision_heads,
            "out_hidden_size": size.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [size.vision_depth - 1],
            "initializer_range": size.init_std,
        }
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
    config.architectures = [ARCHITECTURES[arch]]
    config.initializer_range = size.init_std
    return config


def _preprocessor(directory: Path, arch: str, max_pixels: int) -> None:
    image = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "merge_size": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "min_pixels": 56 * 56,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": 56 * 56, "longest_edge": max_pixels},
        "processor_class": "Qwen2_5_VLProcessor" if arch == "qwen2.5-vl" else "Qwen2VLProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    video = dict(image, video_processor_type="Qwen2VLVideoProcessor", fps=2.0)
    video.pop("image_processor_type")
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


VOCABS = ("qwen", "task")


def make_tiny_model(
    directory: str | os.PathLike,
    arch: str = "qwen2-vl",
    seed: int = 0,
    *,
    vocab: str = "qwen",
    size: str = "tiny",
) -> Path:
    """Write a complete checkpoint with random weights to ``directory`` (deterministic in its arguments)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocabulary {vocab!r}; choose one of {', '.join(VOCABS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    import torch
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = _build_tokenizer(directory, vocab)
    vocab_size = VOCAB_SIZE if vocab == "qwen" else _round_up(TASK_VOCAB_SIZE, 64)
    config = _config(arch, ids, vocab_size, SIZES[size])
    model_class = getattr(transformers, ARCHITECTURES[arch])
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(directory, safe_serialization=True)
    _preprocessor(directory, arch, SIZES[size].max_pixels)
    (directory / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": ids["<|im_start|>"], "eos_token_id": [ids["<|im_end|>"]], "do_sample": False}
        )
    )
    (directory / "speakwatch_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "vocab": vocab, "size": size, "format": TINY_FORMAT})
    )
    return directory


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cache_root() -> Path:
    base = os.environ.get("SPEAKWATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "speakwatch"
    )
    return Path(base)


def default_tiny_model(arch: str = "qwen2-vl") -> Path:
    """The cached built-in tiny checkpoint for ``arch``, generated on first use."""
    directory = cache_root() / f"tiny-{arch}-v{TINY_FORMAT}"
    marker = directory / "speakwatch_tiny.json"
    if marker.exists():
        return directory
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    make_tiny_model(tmp, arch)
    try:
        tmp.rename(directory)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return directory
