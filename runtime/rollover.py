"""What a session keeps when its live vLLM request is replaced: window, memories, dialogue.

vLLM 0.32 cannot evict KV inside one request, so a session bounds its request by *rolling over*:
before the token budget is reached it starts a fresh request from
``[system][memory tokens][last W visual steps][recent dialogue]`` and aborts the old one.
Steps that leave the window are first written into the Aaren slot memory (scored by the Titans
surprise of the step), whose pooled slots come back as one image-like item with a grid that keeps
the spatial layout. Everything here is bounded whatever the stream length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.memory import MemoryConfig
from runtime.perception import VisualChunk


@dataclass(frozen=True)
class Exchange:
    """One finished question and answer, as the dialogue tail keeps it."""

    question: str
    answer_ids: tuple[int, ...]


class SessionMemory:
    """The recent window of visual steps plus the long-term memories fed by evicted steps."""

    def __init__(self, config: MemoryConfig, hidden_size: int, merge: int, *, window: int, dialogue: int):
        if window < 0 or dialogue < 0:
            raise ValueError("window and dialogue must be >= 0")
        self.config = config
        self.merge = merge
        self.window: deque[VisualChunk] = deque()
        self.window_size = window
        self.dialogue: deque[Exchange] = deque(maxlen=max(dialogue, 1))
        self.keep_dialogue = dialogue
        self.slots = config.build_slots(hidden_size)
        self.titans = config.build_titans(hidden_size)
        self.surprise: dict[int, float] = {}  # id(chunk) -> surprise, for steps still in the window
        self.last_surprise: float | None = None
        self.steps_written = 0

    # called on the event loop: cheap bookkeeping only -------------------------------------------
    def add_step(self, chunk: VisualChunk) -> list[VisualChunk]:
        """Put an ingested camera step in the window; returns the steps it pushed out."""
        self.window.append(chunk)
        evicted = []
        while len(self.window) > self.window_size:
            evicted.append(self.window.popleft())
        return evicted

    def add_exchange(self, question: str, answer_ids: Sequence[int]) -> None:
        if self.keep_dialogue:
            self.dialogue.append(Exchange(question, tuple(answer_ids)))

    # called in the perception worker thread (the numerics) -----------------------------------------
    def observe(self, chunk: VisualChunk) -> None:
        """Score how surprising a new step is (Titans: loss before the write)."""
        if self.titans is None:
            return
        tokens = _tokens(chunk)
        self.last_surprise = float(self.titans.observe(tokens))
        self.surprise[id(chunk)] = self.last_surprise

    def absorb(self, evicted: Sequence[VisualChunk]) -> None:
        """Write steps that left the window into the slot memory before they are dropped."""
        for chunk in evicted:
            surprise = self.surprise.pop(id(chunk), 0.0)
            if self.slots is None:
                continue
            t, h, w = chunk.merged_grid
            bonus = self.config.surprise_weight * surprise
            timestamp = chunk.timestamps[-1] if chunk.timestamps else time.monotonic()
            self.slots.write(_tokens(chunk), timestamp=timestamp, bonus=bonus, grid=(t, h, w))
            self.steps_written += 1

    def memory_chunk(self) -> VisualChunk | None:
        """The slot memory as one visual item (None until something was written)."""
        if self.slots is None or self.steps_written == 0:
            return None
        import torch

        embeds = torch.from_numpy(np.ascontiguousarray(self.slots.read(), dtype=np.float32))
        _, sh, sw = self.slots.grid
        now = time.monotonic()
        grid = (1, sh * self.merge, sw * self.merge)
        return VisualChunk(embeds, grid, self.merge, (), (), (), now)

    def state_bytes(self) -> int:
        total = 0
        if self.slots is not None:
            total += self.slots.state_bytes()
        if self.titans is not None:
            total += self.titans.state_bytes()
        return total


def _tokens(chunk: VisualChunk) -> np.ndarray:
    embeds = chunk.embeds
    array = embeds.numpy() if hasattr(embeds, "numpy") else np.asarray(embeds)
    return np.asarray(array, dtype=np.float32)
