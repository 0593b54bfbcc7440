"""Admission by KV: a session is opened only while the engine can hold every open session's budget.

Each session holds one long-lived vLLM request that grows until its token budget, then rolls over.
vLLM admits requests while blocks are free *now*, so sessions that are small today fill the cache
later, and then vLLM preempts (recomputes) or stalls one of them. Reserving every session's worst
case up front, and refusing a session that does not fit, keeps that from ever happening.

Pure arithmetic (numbers in, a `Decision` out); `runtime.Runtime.open_session` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Admission = Literal["kv", "off"]
ADMISSIONS: tuple[Admission, ...] = ("kv", "off")

# vLLM's block pool hands its first block out as the "null block" (padding for skipped attention),
# never to a request.
NULL_BLOCKS = 1
# Blocks a session reserves beyond its budget: the scheduler counts its request's tokens itself, and
# vLLM's output deltas can merge across chunk boundaries (design/vllm.md), so a count a token off
# must never reach into another session's blocks.
SLACK_BLOCKS = 1


def blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks that ``tokens`` tokens of one request occupy (its last block may be partly used)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return -(-max(0, tokens) // block_size)


@dataclass(frozen=True)
class KVCapacity:
    """What the engine's KV cache can give requests, in vLLM blocks of ``block_size`` tokens."""

    blocks: int
    block_size: int

    @classmethod
    def from_engine(cls, num_blocks: int, block_size: int, watermark: float = 0.0) -> KVCapacity:
        """From vLLM's cache config (``num_gpu_blocks`` after profiling, ``block_size``) and the
        scheduler's ``watermark`` (a fraction of blocks it keeps free when admitting waiting work,
        which a resumed streaming chunk is): both are blocks no session can count on."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"an engine reports blocks >= 1 of size >= 1, got {num_blocks} x {block_size}")
        kept = NULL_BLOCKS + int(watermark * num_blocks)
        return cls(max(0, num_blocks - kept), block_size)

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size


def session_blocks(budget_tokens: int, block_size: int) -> int:
    """The blocks one session reserves: its whole budget, plus `SLACK_BLOCKS`.

    One budget, not two, although a rollover creates the new request before it aborts the old one
    (`Session._send`): vLLM adds a streaming request to the engine only with its first chunk, and
    that chunk is sent after the old request's abort went down the same ordered channel to the
    engine core, which frees the old blocks before it schedules the new request. So a session's
    requests never hold KV at the same time. Every chunk a request is sent counts against the
    budget, answer tokens included (the scheduler rolls over before a turn would pass it).
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
    return blocks_for(budget_tokens, block_size) + SLACK_BLOCKS


@dataclass(frozen=True)
class Decision:
    """Whether one more session fits, and the numbers that say why (in tokens, for people)."""

    admitted: bool
    capacity_tokens: int
    reserved_tokens: int  # by the sessions already admitted
    asked_tokens: int  # what the new session would reserve
    sessions: int  # already admitted
    budget_tokens: int

    @property
    def reason(self) -> str:
        if self.admitted:
            return (
                f"admitted: {self.reserved_tokens + self.asked_tokens} of {self.capacity_tokens} "
                f"KV tokens reserved"
            )
        return (
            f"the engine's KV cache cannot hold another session: capacity {self.capacity_tokens} "
            f"tokens, {self.reserved_tokens} reserved by {self.sessions} open session"
            f"{'' if self.sessions == 1 else 's'}, a new session asks {self.asked_tokens} "
            f"(its {self.budget_tokens}-token budget); retry when a session closes"
        )


def decide(capacity: KVCapacity, reserved_blocks: int, sessions: int, budget_tokens: int) -> Decision:
    """Admit a session with ``budget_tokens`` while every reservation, its own included, fits."""
    asked = session_blocks(budget_tokens, capacity.block_size)
    size = capacity.block_size
    return Decision(
        admitted=reserved_blocks + asked <= capacity.blocks,
        capacity_tokens=capacity.tokens,
        reserved_tokens=reserved_blocks * size,
        asked_tokens=asked * size,
        sessions=sessions,
        budget_tokens=budget_tokens,
    )


def sessions_that_fit(capacity: KVCapacity, budget_tokens: int) -> int:
    """How many sessions of ``budget_tokens`` the capacity admits (for logs and docs)."""
    return capacity.blocks // session_blocks(budget_tokens, capacity.block_size)


__all__ = [
    "ADMISSIONS",
    "Admission",
    "Decision",
    "KVCapacity",
    "blocks_for",
    "decide",
    "session_blocks",
    "sessions_that_fit",
]
