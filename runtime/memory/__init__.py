"""Bounded long-term memory for a streaming session (see design/memory.md).

- :class:`SlotMemory` (Aaren): K slots, each an exact softmax-weighted mean of real visual token
  embeddings, fed back to the model as an image-like embedding with grid (1, sh, sw).
- :class:`TitansMemory`: a delta-rule key -> value memory that scores surprise and indexes the past.

Both keep a state whose size does not depend on the stream length. Everything here is pure numpy,
deterministic given the seed, and needs no trained weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .aaren import AarenState, SlotMemory, SlotMode, adaptive_pool_pairs, combine
from .titans import TitansMemory, orthogonal_projection

__all__ = [
    "AarenState",
    "MemoryConfig",
    "SlotMemory",
    "SlotMode",
    "TitansMemory",
    "adaptive_pool_pairs",
    "combine",
    "orthogonal_projection",
]


@dataclass(frozen=True)
class MemoryConfig:
    """Memory settings of a session. ``enabled=False`` means window only (no memory tokens).

    ``decay`` is lambda per second of stream time (half-life ln 2 / lambda; default 10 min).
    ``surprise_weight`` scales the Titans surprise of a step into the slot score bonus.
    Defaults are mechanical (sizes, numerics); none was tuned for answer quality with real weights.
    """

    enabled: bool = True
    slots_enabled: bool = True
    titans_enabled: bool = True
    mode: SlotMode = "spatial"
    slot_grid: tuple[int, int] = (8, 8)
    beta: float = 1.0
    decay: float = math.log(2) / 600.0
    surprise_weight: float = 2.0
    normalize_tokens: bool = True
    titans_rank: int = 256
    titans_theta: float = 0.4
    titans_eta: float = 0.2
    titans_alpha: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("spatial", "prototype"):
            raise ValueError(f"unknown slot mode {self.mode!r}")
        if len(self.slot_grid) != 2 or min(self.slot_grid) <= 0:
            raise ValueError(f"slot_grid must be two positive ints, got {self.slot_grid!r}")
        if self.decay < 0 or self.titans_rank <= 0:
            raise ValueError("decay must be >= 0 and titans_rank > 0")

    @property
    def num_slots(self) -> int:
        return self.slot_grid[0] * self.slot_grid[1]

    @property
    def use_slots(self) -> bool:
        return self.enabled and self.slots_enabled

    @property
    def use_titans(self) -> bool:
        return self.enabled and self.titans_enabled

    @classmethod
    def for_hidden_size(cls, hidden_size: int, **overrides: Any) -> MemoryConfig:
        """Defaults by model width: more slots and a larger Titans rank for bigger models.

        hidden < 1024 (tiny test models): 4x4 slots; <= 2048 (Qwen2-VL-2B, Qwen2.5-VL-3B): 6x6;
        larger (7B: 3584 and up): 8x8 = 64 memory tokens. Titans rank 256 up to d = 2048, else 512
        (clipped to d). beta = sqrt(d): prototype scores of random directions have std ~1.
        """
        d = int(hidden_size)
        if d <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        grid = (4, 4) if d < 1024 else (6, 6) if d <= 2048 else (8, 8)
        rank = min(d, 256 if d <= 2048 else 512)
        base = cls(slot_grid=grid, titans_rank=rank, beta=math.sqrt(d))
        return replace(base, **overrides)

    def build_slots(self, dim: int) -> SlotMemory | None:
        """The slot memory for embeddings of width ``dim``, or None when slots are off."""
        if not self.use_slots:
            return None
        return SlotMemory(
            dim,
            mode=self.mode,
            slot_grid=self.slot_grid,
            beta=self.beta,
            decay=self.decay,
            normalize_tokens=self.normalize_tokens,
            seed=self.seed,
        )

    def build_titans(self, dim: int) -> TitansMemory | None:
        """The Titans memory for embeddings of width ``dim``, or None when it is off."""
        if not self.use_titans:
            return None
        return TitansMemory(
            dim,
            self.titans_rank,
            theta=self.titans_theta,
            eta=self.titans_eta,
            alpha=self.titans_alpha,
            seed=self.seed,
        )
