"""The synthetic "seeing" task a tiny vision-language model is fine-tuned on.

A scene holds one object: a filled square, circle or triangle, in one of eight colours (red, green,
blue, yellow, orange, purple, white, black), covering roughly 10-40% of the frame area at any
position, always fully inside the frame, on a background of grey-level noise or of a dull random
texture (low saturation, smooth), at any frame size. From one frame to the next the object may move,
or change its colour and/or its shape. The model learns to say what it sees ("a red square"), which
colour or shape it is, and to comment as the scene changes ("red square. blue circle.").

Everything is numpy (PIL only to upsample textures) and deterministic given a
`numpy.random.Generator`, so a clip is its objects, its size and one seed. Backgrounds keep well
clear of the eight colours (low saturation, never near pure white or black), so an object's pixels
are exactly those within a few levels of its colour: tests and benchmarks can find it by colour.

Geometry: an object's centre is given as fractions of the frame's width and height, and its size as
the fraction of the frame's area the filled shape covers. Every shape has a square bounding box
(the triangle is isosceles, base = height), at most `FIT` of the frame's smaller side, so the area a
shape can have depends on the frame's aspect ratio (`largest_area`); rendering clips it to that.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
BACKGROUNDS: tuple[str, ...] = ("noise", "texture")

QUESTIONS: tuple[str, ...] = ("What color is it?", "What shape is it?", "What do you see?")
COMMENTARY = "Describe what you see as it happens."

FIT = 0.9  # the largest bounding box side, as a fraction of the frame's smaller side
OBJECT_NOISE = 3  # the object's per-pixel brightness jitter (same in R, G, B), at most this many levels
BACKGROUND_LEVELS = (40, 215)  # every background channel value lies in this range
TEXTURE_CHROMA = 15  # a texture channel is at most this far from the pixel's grey level
MIN_SIDE, MAX_SIDE = 64, 640  # random_clip's frame sides, when not given

_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # shape area / bounding box area
_WORD = re.compile(r"[a-z]+")
_PIXEL = np.dtype((np.void, 3))  # one RGB pixel as a single item
_JITTER = (np.arange(256) * (2 * OBJECT_NOISE + 1) >> 8) - OBJECT_NOISE  # byte -> -N..N, near uniform


@dataclass(frozen=True)
class SceneObject:
    """The one object in a frame.

    ``cx``, ``cy``: the centre of its bounding box, as fractions of the frame's width and height.
    ``area``: the fraction of the frame's area the filled shape covers. ``flip``: a triangle points
    down instead of up (ignored for the other shapes, where this module keeps it False).
    """

    shape: str
    color: str
    cx: float
    cy: float
    area: float
    flip: bool = False

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(COLORS)}")
        if not (0.0 <= self.cx <= 1.0 and 0.0 <= self.cy <= 1.0):
            raise ValueError(f"centre ({self.cx}, {self.cy}) must lie in the frame, as fractions in [0, 1]")
        if not 0.0 < self.area <= 1.0:
            raise ValueError(f"area {self.area} must be a fraction of the frame in (0, 1]")

    def phrase(self) -> str:
        """How answers name it: colour then shape, e.g. "red square"."""
        return f"{self.color} {self.shape}"


def largest_area(shape: str, aspect: float = 1.0) -> float:
    """The largest area fraction ``shape`` may cover in a frame of this aspect (width / height).

    The bounding box side is at most `FIT` of the smaller frame side, which leaves a margin so the
    object is never cut by the frame's edge.
    """
    if shape not in _FILL:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if aspect <= 0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    return FIT * FIT * _FILL[shape] / max(aspect, 1.0 / aspect)


def _half_extent(shape: str, area: float, aspect: float) -> tuple[float, float]:
    """Half the bounding box side, as fractions of the frame's width and of its height."""
    side = math.sqrt(area / _FILL[shape])  # in units of sqrt(width * height)
    return side / math.sqrt(aspect) / 2, side * math.sqrt(aspect) / 2


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def random_object(
    rng: np.random.Generator,
    *,
    min_area: float = 0.10,
    max_area: float = 0.40,
    shape: str | None = None,
    color: str | None = None,
    aspect: float = 1.0,
) -> SceneObject:
    """A random object that fits in a frame of this aspect (width / height).

    Shape and colour are random unless given; the area is uniform in [min_area, max_area], clipped to
    what the shape can cover at this aspect (`largest_area`); the centre is uniform over the
    positions where the whole shape is inside the frame.
    """
    if not 0.0 < min_area <= max_area <= 1.0:
        raise ValueError(f"need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
    shape = _pick(rng, SHAPES) if shape is None else shape
    color = _pick(rng, tuple(COLORS)) if color is None else color
    area = min(float(rng.uniform(min_area, max_area)), largest_area(shape, aspect))
    hx, hy = _half_extent(shape, area, aspect)
    cx, cy = float(rng.uniform(hx, 1.0 - hx)), float(rng.uniform(hy, 1.0 - hy))
    flip = bool(rng.random() < 0.5) and shape == "triangle"
    return SceneObject(shape, color, cx, cy, area, flip)


def step_object(
    obj: SceneObject,
    rng: np.random.Generator,
    *,
    move: float = 0.05,
    change_p: float = 0.0,
    aspect: float = 1.0,
) -> SceneObject:
    """The object one frame later, in a frame of this aspect (width / height).

    With probability ``change_p`` it changes its colour, its shape, or both (equally likely; always
    to a different value); a new shape keeps the area, clipped to what it can cover. The centre then
    drifts a random distance up to ``move`` (fractions of the frame's width and height) in a random
    direction, and is held where the whole shape stays inside the frame.
    """
    if move < 0:
        raise ValueError(f"move must be >= 0, got {move}")
    if not 0.0 <= change_p <= 1.0:
        raise ValueError(f"change_p must be a probability, got {change_p}")
    shape, color, flip = obj.shape, obj.color, obj.flip
    if change_p > 0 and rng.random() < change_p:
        what = int(rng.integers(3))  # 0: colour, 1: shape, 2: both
        if what != 1:
            color = _pick(rng, tuple(c for c in COLORS if c != color))
        if what != 0:
            shape = _pick(rng, tuple(s for s in SHAPES if s != shape))
            flip = bool(rng.random() < 0.5) and shape == "triangle"
    area = min(obj.area, largest_area(shape, aspect))
    angle, distance = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(0.0, move)
    hx, hy = _half_extent(shape, area, aspect)
    cx = min(max(obj.cx + distance * math.cos(angle), hx), 1.0 - hx)
    cy = min(max(obj.cy + distance * math.sin(angle), hy), 1.0 - hy)
    return SceneObject(shape, color, float(cx), float(cy), area, flip)


def _place(centre: float, side: float, length: int) -> float:
    """The centre (pixels) held so the box sits inside the frame with a pixel to spare."""
    lo, hi = side / 2 + 1.0, length - side / 2 - 1.0
    if lo > hi:
        return length / 2
    return min(max(centre, lo), hi)


def _object_pixels(obj: SceneObject, height: int, width: int) -> tuple[int, int, np.ndarray]:
    """The object's mask over its bounding box: (top row, left column, boolean mask).

    A pixel is the object's when its centre is inside the shape, so the mask's area is the shape's
    up to rasterisation (about one pixel row and column).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame must have positive size, got {height}x{width}")
    area = min(obj.area, largest_area(obj.shape, width / height))
    side = math.sqrt(area * height * width / _FILL[obj.shape])
    half = side / 2
    px, py = _place(obj.cx * width, side, width), _place(obj.cy * height, side, height)
    x0, x1 = max(0, math.floor(px - half)), min(width, math.ceil(px + half) + 1)
    y0, y1 = max(0, math.floor(py - half)), min(height, math.ceil(py + half) + 1)
    dx = np.arange(x0, x1, dtype=np.float32) + (0.5 - px)
    dy = np.arange(y0, y1, dtype=np.float32) + (0.5 - py)
    if obj.shape == "square":
        mask = (np.abs(dy) <= half)[:, None] & (np.abs(dx) <= half)[None, :]
    elif obj.shape == "circle":
        mask = (dy * dy)[:, None] + (dx * dx)[None, :] <= half * half
    else:  # triangle: apex at the top (bottom when flipped), base the full box width
        depth = (half - dy if obj.flip else dy + half) / side  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1)
        mask = inside[:, None] & (np.abs(dx)[None, :] <= (depth * half)[:, None])
    return y0, x0, mask


def mask(obj: SceneObject, height: int, width: int) -> np.ndarray:
    """Which pixels of a ``height`` x ``width`` frame `render` paints with the object (H x W bool)."""
    y0, x0, box = _object_pixels(obj, height, width)
    full = np.zeros((height, width), dtype=bool)
    full[y0 : y0 + box.shape[0], x0 : x0 + box.shape[1]] = box
    return full


def _bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample a (gh, gw[, c]) grid to (height, width[, c]), corners aligned; for small grids."""
    gh, gw = grid.shape[:2]
    y, x = np.linspace(0.0, gh - 1.0, height), np.linspace(0.0, gw - 1.0, width)
    y0, x0 = np.minimum(y.astype(int), gh - 2), np.minimum(x.astype(int), gw - 2)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    if grid.ndim == 3:
        fy, fx = fy[..., None], fx[..., None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """The standard normal's quantiles at the 65536 midpoints (k + 1/2) / 65536, once per process."""
    normal = statistics.NormalDist()
    return np.array([normal.inv_cdf((k + 0.5) / 65536) for k in range(65536)], dtype=np.float32)


def _noise_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Grey-level noise: a random mean grey plus per-pixel gaussian noise, the same in R, G and B.

    The noise's std is capped near the ends of the grey range so that the frame stays clear of
    pure black and white (the black and white objects) instead of piling up at the clip. Each
    pixel is a random 16-bit number looked up in a table of the grey levels at the normal's
    quantiles: exact gaussian noise (to 1/65536 in probability) at a fraction of the cost.
    """
    lo, hi = BACKGROUND_LEVELS
    mean = float(rng.uniform(70.0, 185.0))
    std = min(float(rng.uniform(5.0, 35.0)), (mean - lo) / 2, (hi - mean) / 2)
    table = np.clip(np.rint(mean + std * _normal_quantiles()), lo, hi).astype(np.uint8)
    draws = np.frombuffer(rng.bytes(2 * height * width), dtype="<u2").reshape(height, width)
    level = np.take(table, draws)
    return np.stack([level, level, level], axis=-1)


def _texture_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A dull random texture: a smooth low-frequency field around a mid-grey, faintly tinted.

    Three octaves of random grids (the coarsest 2-4 cells along the smaller side) are summed on a
    small grid for the brightness, plus a slowly varying tint of at most `TEXTURE_CHROMA` levels per
    channel; PIL upsamples the small image to the frame (bilinear, so nothing overshoots). The low
    saturation keeps it far from every object colour.
    """
    lo, hi = BACKGROUND_LEVELS
    short = min(height, width)
    cells = int(rng.integers(2, 5))
    octaves = 3

    def grid_size(n: int) -> tuple[int, int]:
        return max(2, round(n * height / short) + 1), max(2, round(n * width / short) + 1)

    gh, gw = grid_size(cells * 2 ** (octaves - 1))
    field = np.zeros((gh, gw))
    for k in range(octaves):
        field += 0.5**k * _bilinear(rng.standard_normal(grid_size(cells * 2**k)), gh, gw)
    field /= field.std() + 1e-9
    grey = float(rng.uniform(90.0, 165.0)) + float(rng.uniform(10.0, 30.0)) * field
    tint = rng.uniform(-8.0, 8.0, 3) + 7.0 * _bilinear(rng.standard_normal((3, 3, 3)), gh, gw)
    rgb = grey[:, :, None] + np.clip(tint, -TEXTURE_CHROMA, TEXTURE_CHROMA)
    small = np.rint(np.clip(rgb, lo, hi)).astype(np.uint8)
    big = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(big), lo, hi)  # a writable copy; bilinear never leaves the range


def render_background(
    height: int, width: int, rng: np.random.Generator, background: str | None = None
) -> np.ndarray:
    """A background alone (H x W x 3 uint8 RGB): "noise", "texture", or None for a random one."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame must have positive size, got {height}x{width}")
    if background is None:
        background = _pick(rng, BACKGROUNDS)
    if background == "noise":
        return _noise_background(height, width, rng)
    if background == "texture":
        return _texture_background(height, width, rng)
    raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS} or None")


def render(
    obj: SceneObject,
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    background: str | None = None,
) -> np.ndarray:
    """A frame showing ``obj`` (H x W x 3 uint8 RGB), the same for the same ``rng`` state.

    The background ("noise", "texture", or None for a random one) and the object's slight per-pixel
    noise come from ``rng``; the object's geometry only from ``obj`` and the frame size (see `mask`).
    Its area is clipped to `largest_area` at this frame's aspect, and its centre held so that the
    shape is inside the frame, not touching its edge.
    """
    image = render_background(height, width, rng, background)
    y0, x0, box = _object_pixels(obj, height, width)
    # Painted whole pixels at a time (3-byte items): far faster than per-channel boolean indexing.
    # The noise is a brightness jitter, one random byte per pixel looked up in a 256-entry table.
    table = np.clip(np.array(COLORS[obj.color]) + _JITTER[:, None], 0, 255).astype(np.uint8)
    jitter = np.frombuffer(rng.bytes(box.size), dtype=np.uint8).reshape(box.shape)
    paint = np.take(table.view(_PIXEL)[:, 0], jitter)
    region = image[y0 : y0 + box.shape[0], x0 : x0 + box.shape[1]].view(_PIXEL)[..., 0]
    np.copyto(region, paint, where=box)
    return image


@dataclass(frozen=True)
class Clip:
    """A clip: the object in each frame, the frame size, the background kind and the rendering seed.

    Frame ``i`` is rendered from a generator seeded with ``(seed, i)``, so any frame can be rendered
    alone and always comes out the same; the background (of the clip's kind) and the noise are drawn
    afresh for each frame.
    """

    objects: tuple[SceneObject, ...]
    height: int
    width: int
    background: str
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not self.objects:
            raise ValueError("a clip needs at least one frame")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"frame must have positive size, got {self.height}x{self.width}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {BACKGROUNDS}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def __len__(self) -> int:
        return len(self.objects)

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (negative counts from the end), H x W x 3 uint8 RGB."""
        i = range(len(self.objects))[i]
        rng = np.random.default_rng([self.seed, i])
        return render(self.objects[i], self.height, self.width, rng, background=self.background)

    def frames(self) -> list[np.ndarray]:
        """Every frame, in order."""
        return [self.frame(i) for i in range(len(self.objects))]


def _other_side(rng: np.random.Generator, side: int) -> int:
    """A side giving an aspect between 1:2 and 2:1 with ``side``, within MIN_SIDE..MAX_SIDE if it can."""
    lo, hi = max(MIN_SIDE, math.ceil(side / 2)), min(MAX_SIDE, 2 * side)
    if lo > hi:
        lo, hi = math.ceil(side / 2), 2 * side
    return int(rng.integers(lo, hi + 1))


def _frame_size(rng: np.random.Generator, height: int | None, width: int | None) -> tuple[int, int]:
    if height is None and width is None:
        while True:  # uniform over the allowed sizes, symmetric in height and width
            height, width = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
            if width <= 2 * height and height <= 2 * width:
                return height, width
    if width is None:
        width = _other_side(rng, height)
    elif height is None:
        height = _other_side(rng, width)
    if height <= 0 or width <= 0:
        raise ValueError(f"frame must have positive size, got {height}x{width}")
    return height, width


def random_clip(
    rng: np.random.Generator,
    n_frames: int,
    *,
    height: int | None = None,
    width: int | None = None,
    change_p: float = 0.3,
    move: float = 0.05,
) -> Clip:
    """A random clip of ``n_frames`` frames.

    The frame size is random where not given (sides in 64..640, aspect between 1:2 and 2:1); the
    first object is `random_object`, each next one `step_object` of the one before; the background
    kind is random, fixed for the clip.
    """
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got n_frames={n_frames}")
    height, width = _frame_size(rng, height, width)
    aspect = width / height
    objects = [random_object(rng, aspect=aspect)]
    for _ in range(n_frames - 1):
        objects.append(step_object(objects[-1], rng, move=move, change_p=change_p, aspect=aspect))
    background = _pick(rng, BACKGROUNDS)
    seed = int(rng.integers(2**63 - 1))
    return Clip(tuple(objects), height, width, background, seed)


def answer(question: str, obj: SceneObject) -> str:
    """The answer to one of `QUESTIONS` about ``obj``: "red", "square" or "a red square"."""
    if question == QUESTIONS[0]:
        return obj.color
    if question == QUESTIONS[1]:
        return obj.shape
    if question == QUESTIONS[2]:
        return f"a {obj.phrase()}"
    raise ValueError(f"unknown question {question!r}; expected one of {QUESTIONS}")


def mentions(text: str) -> list[tuple[str | None, str | None]]:
    """The (colour, shape) pairs an answer names, in order.

    "red square. blue circle." -> [("red", "square"), ("blue", "circle")]; "red" -> [("red", None)];
    "square" -> [(None, "square")]. Words are the runs of letters (case ignored); a colour word
    directly followed by a shape word is one pair; other words are skipped.
    """
    words = _WORD.findall(text.lower())
    found: list[tuple[str | None, str | None]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in COLORS:
            if i + 1 < len(words) and words[i + 1] in SHAPES:
                found.append((word, words[i + 1]))
                i += 2
                continue
            found.append((word, None))
        elif word in SHAPES:
            found.append((None, word))
        i += 1
    return found
