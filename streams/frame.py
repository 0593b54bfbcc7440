"""The unit that flows from every source into a session, and the one check its pixels pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ASPECT = 200  # the vision tower's resize rule refuses longer strips


def rgb_pixels(image: object) -> np.ndarray:
    """The H x W x 3 uint8 RGB array of an ndarray or an ``av.VideoFrame``, or ValueError saying why not.

    The one validator of the media path: every frame and image, whichever input it came through
    (a WebRTC track, an appended JPEG, a pushed array, an image in a question), passes here.
    """
    if not isinstance(image, np.ndarray):
        to_ndarray = getattr(image, "to_ndarray", None)
        if to_ndarray is None:
            raise ValueError(
                f"frame must be an HxWx3 uint8 numpy array or av.VideoFrame, got {type(image).__name__}"
            )
        image = to_ndarray(format="rgb24")
    assert isinstance(image, np.ndarray)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"frame must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 RGB, got dtype {image.dtype}")
    height, width = image.shape[:2]
    if height < 2 or width < 2:
        raise ValueError(f"frame is too small: {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"frame aspect ratio must be below {MAX_ASPECT}, got {width}x{height}")
    return image


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame; its pixels passed `rgb_pixels` (a bad frame cannot be built).

    ``timestamp`` is the presentation time in seconds on the source's clock (stream time);
    ``arrival`` is ``time.monotonic()`` when the frame reached its input, kept all the way to the
    model: frame lag is measured from it.
    """

    rgb: np.ndarray  # H x W x 3, uint8, RGB
    timestamp: float
    arrival: float
    index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rgb, np.ndarray):
            raise ValueError(f"Frame.rgb must be a numpy array, got {type(self.rgb).__name__}")
        rgb_pixels(self.rgb)
