"""Position schemes for streaming M-RoPE models (pure functions; see positions.md)."""

from positional.schemes import (
    DEFAULT_GAP,
    SCHEMES,
    Segment,
    assign,
    next_position,
    streaming_mask,
    token_count,
)

__all__ = [
    "DEFAULT_GAP",
    "SCHEMES",
    "Segment",
    "assign",
    "next_position",
    "streaming_mask",
    "token_count",
]
