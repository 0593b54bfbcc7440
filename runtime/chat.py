"""The Qwen chat format as token ids, so a session can be streamed to vLLM chunk by chunk.

Text between special tokens is encoded as one piece, exactly where the chat template puts its
boundaries, so a streamed session holds the same ids as the rendered template would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFormat:
    """Token ids of the chat-template pieces a session is built from."""

    tokenizer: object  # tokenizers.Tokenizer
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    newline: tuple[int, ...]
    assistant_header: tuple[int, ...]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ChatFormat:
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer is required)")
        tokenizer = Tokenizer.from_file(str(file))

        def special(token: str) -> int:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{path}: tokenizer lacks the special token {token}")
            return token_id

        im_start = special("<|im_start|>")
        encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
        return cls(
            tokenizer=tokenizer,
            im_start=im_start,
            im_end=special("<|im_end|>"),
            vision_start=special("<|vision_start|>"),
            vision_end=special("<|vision_end|>"),
            image_pad=special("<|image_pad|>"),
            newline=encode("\n"),
            assistant_header=(im_start, *encode("assistant\n")),
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def turn(self, role: str, text: str) -> list[int]:
        """``<|im_start|>{role}\\n{text}<|im_end|>\\n``."""
        return [self.im_start, *self.encode(f"{role}\n{text}"), self.im_end, *self.newline]

    def user_turn_open(self) -> list[int]:
        return [self.im_start, *self.encode("user\n")]

    def user_turn_close(self, text: str) -> list[int]:
        return [*self.encode(text), self.im_end, *self.newline]

    def close_assistant(self) -> list[int]:
        """What ends an assistant turn: ``<|im_end|>\\n``."""
        return [self.im_end, *self.newline]

    def vision_block(self, n_tokens: int) -> list[int]:
        """A visual item as the model sees it: n_tokens placeholders between the vision markers."""
        return [self.vision_start, *([self.image_pad] * n_tokens), self.vision_end]

    def vision_prompt(self) -> list[int]:
        """A visual item as vLLM takes it in a prompt: one placeholder, which vLLM expands itself."""
        return [self.vision_start, self.image_pad, self.vision_end]
