"""The unit that flows from every source into a session."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame.

    ``timestamp`` is the presentation time in seconds on the source's clock (stream time);
    ``arrival`` is ``time.monotonic()`` when the frame reached us, used to measure frame lag.
    """

    rgb: np.ndarray  # H x W x 3, uint8, RGB
    timestamp: float
    arrival: float
    index: int = 0
