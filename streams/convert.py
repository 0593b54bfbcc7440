"""Frame conversion to RGB arrays, with a resolution cap, on worker threads (never on the event loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import av
import numpy as np

from .frame import rgb_pixels

Size = tuple[int, int]  # (width, height)
T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The shared pool for conversion and demuxing: small, so media work cannot starve the machine."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="streams")
        return _executor


async def run_off_loop(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)


def fit_size(width: int, height: int, max_size: Size | None) -> Size:
    """The largest size within ``max_size`` (w, h) with the same aspect ratio; never upscales."""
    if max_size is None:
        return width, height
    max_w, max_h = max_size
    scale = min(1.0, max_w / width, max_h / height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: av.VideoFrame | np.ndarray, max_size: Size | None = None) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from a decoded video frame or an array (RGB, RGBA or grey).

    Grey and RGBA arrays are converted, everything else is left to `rgb_pixels` to accept or refuse.
    Blocking (swscale): call it through :func:`run_off_loop`.
    """
    if isinstance(image, av.VideoFrame):
        width, height = fit_size(image.width, image.height, max_size)
        return rgb_pixels(image.to_ndarray(format="rgb24", width=width, height=height))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    arr = rgb_pixels(np.ascontiguousarray(arr))
    height, width = arr.shape[:2]
    target = fit_size(width, height, max_size)
    if target == (width, height):
        return arr
    frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
    return frame.to_ndarray(format="rgb24", width=target[0], height=target[1])
