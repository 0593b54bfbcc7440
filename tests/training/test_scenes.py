"""Tests of the synthetic scenes: rendering, geometry, motion, clips and the answer helpers."""

from __future__ import annotations

import itertools
import math
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.training.scenes import (
    BACKGROUND_LEVELS,
    BACKGROUNDS,
    COLORS,
    COMMENTARY,
    FIT,
    MAX_SIDE,
    MIN_SIDE,
    OBJECT_NOISE,
    QUESTIONS,
    SHAPES,
    TEXTURE_CHROMA,
    Clip,
    SceneObject,
    answer,
    largest_area,
    mask,
    mentions,
    random_clip,
    random_object,
    render,
    render_background,
    step_object,
)

SIZES = [(32, 32), (120, 160), (480, 640), (1080, 1920), (100, 400)]
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
MATCH = 8  # a pixel "is" a colour within this many levels in every channel


def near(image: np.ndarray, color: str, tol: int = MATCH) -> np.ndarray:
    """The pixels within ``tol`` levels of ``color`` in every channel (H x W bool)."""
    return np.abs(image.astype(np.int16) - np.array(COLORS[color], dtype=np.int16)).max(axis=-1) <= tol


def box_side(obj: SceneObject, height: int, width: int) -> float:
    """The object's bounding box side in pixels, as rendered in this frame."""
    area = min(obj.area, largest_area(obj.shape, width / height))
    return math.sqrt(area * height * width / FILL[obj.shape])


def area_tolerance(obj: SceneObject, height: int, width: int) -> float:
    """Rasterisation can add or drop about one row and one column of the bounding box."""
    return (2 * box_side(obj, height, width) + 2) / (height * width)


def fits(obj: SceneObject, aspect: float) -> bool:
    """Whether the object's bounding box lies inside the frame, in fraction coordinates."""
    side = math.sqrt(obj.area / FILL[obj.shape])
    hx, hy = side / math.sqrt(aspect) / 2, side * math.sqrt(aspect) / 2
    eps = 1e-9
    return hx - eps <= obj.cx <= 1 - hx + eps and hy - eps <= obj.cy <= 1 - hy + eps


def touches_border(m: np.ndarray) -> bool:
    return bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


# --- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_render_shape_dtype_and_determinism(height: int, width: int, background: str) -> None:
    obj = random_object(np.random.default_rng(1), aspect=width / height)
    first = render(obj, height, width, np.random.default_rng(7), background=background)
    again = render(obj, height, width, np.random.default_rng(7), background=background)
    other = render(obj, height, width, np.random.default_rng(8), background=background)
    assert first.shape == (height, width, 3)
    assert first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_render_draws_a_random_background_when_none_is_given() -> None:
    obj = SceneObject("square", "red", 0.5, 0.5, 0.2)
    kinds = set()
    for seed in range(20):
        image = render(obj, 64, 64, np.random.default_rng(seed)).astype(np.int16)
        background = image[~mask(obj, 64, 64)]
        kinds.add("noise" if np.all(background == background[:, :1]) else "texture")
    assert kinds == set(BACKGROUNDS)
    with pytest.raises(ValueError, match="plaid"):
        render(obj, 64, 64, np.random.default_rng(0), background="plaid")


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_object_pixels_are_its_colour_and_cover_its_area(shape: str, background: str) -> None:
    rng = np.random.default_rng(SHAPES.index(shape) * 10 + BACKGROUNDS.index(background))
    colors = itertools.cycle(COLORS)
    for height, width in [(32, 32), (120, 160), (480, 640), (100, 400), (400, 100)]:
        for _ in range(4):
            obj = random_object(rng, shape=shape, color=next(colors), aspect=width / height)
            image = render(obj, height, width, rng, background=background)
            seen = near(image, obj.color)
            # the backgrounds never come near an object colour, so the colour finds exactly the object
            assert np.array_equal(seen, mask(obj, height, width)), (obj, height, width)
            error = abs(seen.mean() - obj.area)
            assert error <= min(area_tolerance(obj, height, width), 0.05), (obj, height, width, error)


def test_object_noise_is_slight() -> None:
    rng = np.random.default_rng(3)
    for color in COLORS:
        obj = random_object(rng, color=color)
        image = render(obj, 200, 200, rng).astype(np.int16)
        pixels = image[mask(obj, 200, 200)]
        deviation = np.abs(pixels - np.array(COLORS[color]))
        assert deviation.max() <= OBJECT_NOISE
        assert deviation.max() > 0  # there is some noise


def test_backgrounds_keep_clear_of_every_object_colour() -> None:
    rng = np.random.default_rng(11)
    colors = np.array(list(COLORS.values()), dtype=np.int16)  # (8, 3)
    nearest = np.full(len(colors), 255)
    lo, hi = BACKGROUND_LEVELS
    for i in range(1000):
        kind = BACKGROUNDS[i % 2]
        image = render_background(24, 32, rng, kind).astype(np.int16)
        assert image.min() >= lo and image.max() <= hi
        saturation = image.max(axis=-1) - image.min(axis=-1)
        if kind == "noise":
            assert saturation.max() == 0  # grey levels only
        else:
            assert saturation.max() <= 2 * TEXTURE_CHROMA
        distance = np.abs(image.reshape(-1, 1, 3) - colors[None]).max(axis=-1).min(axis=0)
        nearest = np.minimum(nearest, distance)
    # no background pixel comes within 25 levels of any colour, pure white and black included
    assert nearest.min() >= 25, dict(zip(COLORS, nearest.tolist(), strict=True))
    # and larger frames, whose textures have the same structure at a larger scale
    for kind in BACKGROUNDS:
        image = render_background(480, 640, rng, kind).astype(np.int16)
        for color in COLORS:
            assert not near(image, color, tol=25).any()


def test_noise_background_is_noisy_and_texture_is_smooth() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        noise = render_background(120, 160, rng, "noise")[..., 0].astype(np.float64)
        texture = render_background(120, 160, rng, "texture").astype(np.float64).mean(axis=-1)
        assert 70 - 5 <= noise.mean() <= 185 + 5
        assert 3 <= noise.std() <= 37
        # neighbouring pixels: independent in the noise, nearly equal in the texture
        assert np.abs(np.diff(noise, axis=1)).mean() > 2
        assert np.abs(np.diff(texture, axis=1)).mean() < 2
        assert texture.std() > 3  # but not flat


def test_palette_is_clearly_distinct() -> None:
    assert len(COLORS) == 8
    assert set(COLORS) == {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"}
    for (a, ca), (b, cb) in itertools.combinations(COLORS.items(), 2):
        assert max(abs(x - y) for x, y in zip(ca, cb, strict=True)) >= 60, (a, b)


@pytest.mark.parametrize(
    ("shape", "fill", "tol"), [("square", 1.0, 0.0), ("circle", math.pi / 4, 0.02), ("triangle", 0.5, 0.02)]
)
def test_shape_fills_its_bounding_box_as_it_should(shape: str, fill: float, tol: float) -> None:
    rng = np.random.default_rng(2)
    for height, width in [(120, 160), (480, 640)]:
        for area in (0.12, 0.25, 0.38):
            obj = random_object(rng, min_area=area, max_area=area, shape=shape, aspect=width / height)
            seen = near(render(obj, height, width, rng), obj.color)
            rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
            box_h, box_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            assert abs(box_h - box_w) <= 1  # every bounding box is square
            ratio = seen.sum() / (box_h * box_w)
            assert abs(ratio - fill) <= tol, (obj, ratio)


def test_triangle_points_up_or_down() -> None:
    flips = set()
    rng = np.random.default_rng(4)
    for _ in range(20):
        obj = random_object(rng, shape="triangle")
        flips.add(obj.flip)
        m = mask(obj, 200, 200)
        rows = np.flatnonzero(m.any(axis=1))
        widths = m[rows].sum(axis=1)
        # the apex row is narrow, the base row is the full width of the box
        wide, narrow = (widths[0], widths[-1]) if obj.flip else (widths[-1], widths[0])
        assert wide > 5 * narrow
    assert flips == {True, False}
    assert not random_object(np.random.default_rng(0), shape="square").flip


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(32, 1080),
    aspect=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(SHAPES),
)
def test_random_objects_lie_inside_any_frame(height: int, aspect: float, seed: int, shape: str) -> None:
    width = max(32, min(1920, round(height * aspect)))
    aspect = width / height
    rng = np.random.default_rng(seed)
    obj = random_object(rng, shape=shape, aspect=aspect)
    assert fits(obj, aspect)
    assert obj.area <= largest_area(shape, aspect) + 1e-12
    m = mask(obj, height, width)
    assert not touches_border(m)
    assert abs(m.mean() - obj.area) <= area_tolerance(obj, height, width)
    # drawn where the object says, give or take the pixel of margin rendering keeps from the edge
    ys, xs = np.nonzero(m)
    assert abs(xs.mean() + 0.5 - obj.cx * width) <= 2.0
    assert abs((ys.min() + ys.max() + 1) / 2 - obj.cy * height) <= 2.0
    # an object made for another aspect still lies inside, its area clipped to fit
    square = random_object(rng, shape=shape, min_area=0.35, max_area=0.40)
    m = mask(square, height, width)
    assert not touches_border(m)
    expected = min(square.area, largest_area(shape, aspect))
    assert abs(m.mean() - expected) <= area_tolerance(square, height, width)


def test_largest_area_follows_the_aspect() -> None:
    for shape in SHAPES:
        assert largest_area(shape, 1.0) == pytest.approx(FIT**2 * FILL[shape])
        assert largest_area(shape, 4.0) == pytest.approx(largest_area(shape, 1.0) / 4)
        assert largest_area(shape, 0.5) == largest_area(shape, 2.0)
    # at 1:1 every shape can cover the whole default range
    assert min(largest_area(shape) for shape in SHAPES) >= 0.40
    obj = SceneObject("circle", "red", 0.5, 0.5, 0.40)
    m = mask(obj, 100, 400)
    assert not touches_border(m)
    assert abs(m.mean() - largest_area("circle", 4.0)) <= area_tolerance(obj, 100, 400)


def test_render_is_fast() -> None:
    obj = SceneObject("circle", "blue", 0.4, 0.6, 0.3)
    for background in BACKGROUNDS:
        rng = np.random.default_rng(0)
        render(obj, 480, 640, rng, background=background)  # warm up: the noise table is built once
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            render(obj, 480, 640, rng, background=background)
            best = min(best, time.perf_counter() - start)
        assert best < 0.030, (background, best)


# --- objects and motion ----------------------------------------------------------------------


def test_scene_object_validates_and_names_itself() -> None:
    obj = SceneObject("triangle", "purple", 0.3, 0.7, 0.2, flip=True)
    assert obj.phrase() == "purple triangle"
    with pytest.raises(ValueError, match="hexagon"):
        SceneObject("hexagon", "red", 0.5, 0.5, 0.2)
    with pytest.raises(ValueError, match="pink"):
        SceneObject("square", "pink", 0.5, 0.5, 0.2)
    with pytest.raises(ValueError):
        SceneObject("square", "red", 1.5, 0.5, 0.2)
    with pytest.raises(ValueError):
        SceneObject("square", "red", 0.5, 0.5, 0.0)
    with pytest.raises(ValueError):
        random_object(np.random.default_rng(0), min_area=0.5, max_area=0.2)


def test_random_object_honours_what_it_is_given() -> None:
    rng = np.random.default_rng(6)
    objects = [random_object(rng, aspect=1.5) for _ in range(300)]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert all(0.10 <= o.area <= 0.40 for o in objects)
    given_ = random_object(rng, shape="circle", color="green", min_area=0.2, max_area=0.2)
    assert (given_.shape, given_.color, given_.area) == ("circle", "green", pytest.approx(0.2))
    assert random_object(np.random.default_rng(9)) == random_object(np.random.default_rng(9))


def test_step_object_without_change_only_drifts() -> None:
    rng = np.random.default_rng(7)
    for aspect in (0.5, 1.0, 2.0, 4.0):
        obj = random_object(rng, aspect=aspect)
        for _ in range(200):
            nxt = step_object(obj, rng, move=0.05, aspect=aspect)
            assert (nxt.shape, nxt.color, nxt.area, nxt.flip) == (obj.shape, obj.color, obj.area, obj.flip)
            assert math.hypot(nxt.cx - obj.cx, nxt.cy - obj.cy) <= 0.05 + 1e-9
            assert fits(nxt, aspect)
            obj = nxt
    still = step_object(obj, rng, move=0.0)
    assert (still.cx, still.cy) == (obj.cx, obj.cy)


def test_step_object_always_changes_with_change_p_one() -> None:
    rng = np.random.default_rng(8)
    aspect = 2.0
    obj = random_object(rng, aspect=aspect)
    kinds = set()
    for _ in range(300):
        nxt = step_object(obj, rng, move=0.2, change_p=1.0, aspect=aspect)
        kind = (nxt.color != obj.color, nxt.shape != obj.shape)
        assert any(kind), (obj, nxt)
        kinds.add(kind)
        assert fits(nxt, aspect)  # a new, bigger-boxed shape is kept inside too
        assert nxt.area <= largest_area(nxt.shape, aspect) + 1e-12
        assert nxt.flip is False or nxt.shape == "triangle"
        obj = nxt
    assert kinds == {(True, False), (False, True), (True, True)}


def test_step_object_keeps_long_fast_walks_inside() -> None:
    rng = np.random.default_rng(9)
    for aspect in (0.25, 1.0, 3.0):
        obj = random_object(rng, min_area=0.3, max_area=0.4, aspect=aspect)
        for _ in range(300):
            obj = step_object(obj, rng, move=0.3, change_p=0.3, aspect=aspect)
            assert fits(obj, aspect)
        assert not touches_border(mask(obj, 100, round(100 * aspect)))


# --- clips -----------------------------------------------------------------------------------


def test_random_clip_is_deterministic() -> None:
    a = random_clip(np.random.default_rng(10), 8)
    b = random_clip(np.random.default_rng(10), 8)
    assert a == b
    frames = a.frames()
    assert len(frames) == len(a) == 8
    for i, frame in enumerate(frames):
        assert np.array_equal(frame, b.frame(i))
    assert np.array_equal(a.frame(-1), frames[-1])
    assert not np.array_equal(frames[0], frames[1])  # the noise is drawn per frame
    assert a != random_clip(np.random.default_rng(11), 8)
    with pytest.raises(IndexError):
        a.frame(8)


def test_random_clip_sizes_and_objects() -> None:
    rng = np.random.default_rng(12)
    backgrounds = set()
    for _ in range(100):
        clip = random_clip(rng, 5, change_p=0.5)
        assert MIN_SIDE <= clip.height <= MAX_SIDE and MIN_SIDE <= clip.width <= MAX_SIDE
        assert 0.5 <= clip.width / clip.height <= 2.0
        assert len(clip.objects) == 5
        assert all(fits(o, clip.width / clip.height) for o in clip.objects)
        backgrounds.add(clip.background)
    assert backgrounds == set(BACKGROUNDS)
    assert (random_clip(rng, 1, height=1080, width=1920).height, 1920) == (1080, 1920)
    tall = random_clip(rng, 1, height=300)
    assert tall.height == 300 and 150 <= tall.width <= 600
    wide = random_clip(rng, 1, width=1000)
    assert wide.width == 1000 and 500 <= wide.height <= 2000
    with pytest.raises(ValueError):
        random_clip(rng, 0)


def test_random_clip_changes_and_moves() -> None:
    clip = random_clip(np.random.default_rng(13), 200, change_p=0.3)
    changes = sum((a.color, a.shape) != (b.color, b.shape) for a, b in itertools.pairwise(clip.objects))
    assert 30 <= changes <= 90  # about 0.3 * 199
    still = random_clip(np.random.default_rng(13), 50, change_p=0.0, move=0.0)
    assert len(set(still.objects)) == 1


def test_clip_frames_show_their_objects() -> None:
    clip = random_clip(np.random.default_rng(14), 6, height=90, width=150, change_p=0.5)
    for obj, frame in zip(clip.objects, clip.frames(), strict=True):
        assert np.array_equal(near(frame, obj.color), mask(obj, clip.height, clip.width))


def test_clip_validates() -> None:
    obj = SceneObject("square", "red", 0.5, 0.5, 0.2)
    assert Clip([obj, obj], 32, 32, "noise", 0).objects == (obj, obj)  # a list is kept as a tuple
    with pytest.raises(ValueError):
        Clip((), 32, 32, "noise", 0)
    with pytest.raises(ValueError, match="plaid"):
        Clip((obj,), 32, 32, "plaid", 0)


# --- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("color", COLORS)
@pytest.mark.parametrize("shape", SHAPES)
def test_answer_and_mentions_round_trip(color: str, shape: str) -> None:
    obj = SceneObject(shape, color, 0.5, 0.5, 0.2)
    color_q, shape_q, see_q = QUESTIONS
    assert answer(color_q, obj) == color
    assert answer(shape_q, obj) == shape
    assert answer(see_q, obj) == f"a {color} {shape}"
    assert mentions(answer(color_q, obj)) == [(color, None)]
    assert mentions(answer(shape_q, obj)) == [(None, shape)]
    assert mentions(answer(see_q, obj)) == [(color, shape)]
    assert mentions(f"{obj.phrase()}.") == [(color, shape)]


def test_mentions_reads_commentary() -> None:
    assert mentions("red square. blue circle.") == [("red", "square"), ("blue", "circle")]
    assert mentions("Now: a WHITE triangle!\nthen black,square") == [
        ("white", "triangle"),
        ("black", "square"),
    ]
    assert mentions("red and blue circle") == [("red", None), ("blue", "circle")]
    assert mentions("a square that was red") == [(None, "square"), ("red", None)]
    assert mentions("squares reddish nothing here") == []
    assert mentions("") == []


def test_answer_rejects_an_unknown_question() -> None:
    obj = SceneObject("square", "red", 0.5, 0.5, 0.2)
    with pytest.raises(ValueError, match=re.escape("How big is it?")):
        answer("How big is it?", obj)
    with pytest.raises(ValueError, match=re.escape(COMMENTARY)):
        answer(COMMENTARY, obj)
