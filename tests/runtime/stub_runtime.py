"""A real `Session` without an engine: a stub runtime with a stub vision tower, for fast session tests.

Perception runs for real (its encoder returns one token of zeros per frame). There is no chat format
and no vLLM engine: an answer fails at its first turn, which is enough to test what happens around
answers (ids, their one-at-a-time rule) and everything on the media path.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from runtime.memory import MemoryConfig
from runtime.runtime import RuntimeSettings
from runtime.session import Session


class StubEncoder:
    """The interface `Perception` uses."""

    merge = 2
    temporal_patch = 2

    def encode(self, groups: Sequence[Sequence[np.ndarray]]) -> list[tuple[object, tuple[int, int, int]]]:
        return [(np.zeros((1, 4), np.float32), (1, 2, 2)) for _ in groups]


class StubRuntime:
    """What `Session` reads from its runtime."""

    positions = "group-decoupled"
    budget_tokens = 4096

    def __init__(self, executor: ThreadPoolExecutor, max_fps: float) -> None:
        self.settings = RuntimeSettings(
            turn_tokens=3, max_fps=max_fps, frame_queue=4096, memory=MemoryConfig(enabled=False)
        )
        self.info = SimpleNamespace(chat=None, hidden_size=16)
        self.encoder = StubEncoder()
        self.executor = executor

    def _forget(self, session: Session) -> None:
        pass


@contextlib.asynccontextmanager
async def stub_session(max_fps: float = 2.0) -> AsyncIterator[Session]:
    with ThreadPoolExecutor(1) as executor:
        session = Session(StubRuntime(executor, max_fps))  # type: ignore[arg-type]
        try:
            yield session
        finally:
            await session.close()
