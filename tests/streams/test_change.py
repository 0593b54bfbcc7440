"""The scene-change filter on synthetic scenes: noise is not change, a real change always passes.

Scenes come from `runtime.training.scenes` (one square, circle or triangle in one of eight colours,
10-40% of the frame, on grey noise or a dull texture, frame sides 64..640). A *static* scene is the
same scene rendered again with fresh per-pixel noise: `SceneRng` draws the scene (background level,
noise strength, texture) from a fixed seed and every per-pixel byte (the background noise, the
object's jitter) from a fresh generator, exactly as a camera watching a still scene would deliver.
Hypothesis runs derandomized (40 examples a property), so every run checks the same scenes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.training import scenes
from streams.change import (
    CHANGED,
    FIRST,
    KEEPALIVE,
    OFF,
    RESIZED,
    UNCHANGED,
    ChangeFilter,
    ChangeFilterSettings,
    thumbnail,
)

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)
NEVER = 1e9  # a keep-alive interval no test reaches


class SceneRng(np.random.Generator):
    """A generator whose scene draws come from ``seed`` and whose raw bytes (all per-pixel noise in
    `scenes.render`) come from ``noise``: the same scene, freshly noisy, for each ``noise``."""

    def __init__(self, seed: int, noise: np.random.Generator) -> None:
        super().__init__(np.random.PCG64(seed))
        self._noise = noise

    def bytes(self, length: int) -> bytes:
        return self._noise.bytes(length)


@dataclass(frozen=True)
class Scene:
    height: int
    width: int
    background: str
    seed: int
    obj: scenes.SceneObject

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def frame(self, noise: int, obj: scenes.SceneObject | None = None) -> np.ndarray:
        """The scene (or ``obj`` in it) with the per-pixel noise drawn from seed ``noise``."""
        rng = SceneRng(self.seed, np.random.default_rng([self.seed, noise]))
        return scenes.render(obj or self.obj, self.height, self.width, rng, background=self.background)


@st.composite
def scene_st(draw: st.DrawFn, max_side: int = scenes.MAX_SIDE) -> Scene:
    """Any frame size (sides 64..max_side, aspect 1:2 to 2:1), background, colour, shape and area
    (10-40% of the frame, clipped to what the shape can cover), anywhere in the frame."""
    height = draw(st.integers(scenes.MIN_SIDE, max_side))
    width = draw(st.integers(max(scenes.MIN_SIDE, math.ceil(height / 2)), min(max_side, 2 * height)))
    background = draw(st.sampled_from(scenes.BACKGROUNDS))
    color = draw(st.sampled_from(tuple(scenes.COLORS)))
    shape = draw(st.sampled_from(scenes.SHAPES))
    area = draw(st.floats(0.10, 0.40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    obj = scenes.random_object(
        rng, min_area=area, max_area=area, shape=shape, color=color, aspect=width / height
    )
    return Scene(height, width, background, seed, obj)


def first_kept(scene: Scene, cfg: ChangeFilterSettings | None = None) -> ChangeFilter:
    """A filter that has taken the scene's first frame (t = 0) as its reference."""
    change = ChangeFilter(cfg or ChangeFilterSettings(keepalive_s=NEVER))
    decision = change.check(scene.frame(0), 0.0)
    assert (decision.keep, decision.reason) == (True, FIRST)
    return change


def moved(a: scenes.SceneObject, b: scenes.SceneObject) -> float:
    """How far the centre went, in fractions of the frame's width and height (as `step_object`)."""
    return math.hypot(b.cx - a.cx, b.cy - a.cy)


def min_move(scene: Scene) -> float:
    """The single step that must pass at every noise level the scenes have: 3 pixels of the smaller
    side, held to 0.02-0.04 of the frame (`step_object(move=0.05)` steps any distance up to 0.05).
    Under the heaviest grey noise (std 35 per pixel) a 2-pixel shift in a 64-pixel frame is too close
    to the noise to promise; smaller steps add up and must pass by then (the drift test)."""
    return min(0.04, max(0.02, 3.0 / min(scene.height, scene.width)))


# (1) noise is not change


@PROPERTY
@given(scene_st())
def test_a_static_scene_with_fresh_noise_is_dropped_as_unchanged(scene: Scene) -> None:
    change = first_kept(scene)
    for i in range(1, 5):
        decision = change.check(scene.frame(i), 0.5 * i)
        assert (decision.keep, decision.reason) == (False, UNCHANGED), (i, decision.score)


# (2)-(4) a real change of an object covering 10-40% of the frame always passes


@PROPERTY
@given(scene_st(), st.data())
def test_a_colour_change_always_passes(scene: Scene, data: st.DataObject) -> None:
    color = data.draw(st.sampled_from([c for c in scenes.COLORS if c != scene.obj.color]))
    obj = scenes.SceneObject(
        scene.obj.shape, color, scene.obj.cx, scene.obj.cy, scene.obj.area, scene.obj.flip
    )
    decision = first_kept(scene).check(scene.frame(1, obj), 0.5)
    assert (decision.keep, decision.reason) == (True, CHANGED), decision.score


@PROPERTY
@given(scene_st(), st.data())
def test_a_shape_change_always_passes(scene: Scene, data: st.DataObject) -> None:
    shape = data.draw(st.sampled_from([s for s in scenes.SHAPES if s != scene.obj.shape]))
    area = min(scene.obj.area, scenes.largest_area(shape, scene.aspect))
    obj = scenes.SceneObject(
        shape, scene.obj.color, scene.obj.cx, scene.obj.cy, area, data.draw(st.booleans())
    )
    decision = first_kept(scene).check(scene.frame(1, obj), 0.5)
    assert (decision.keep, decision.reason) == (True, CHANGED), decision.score


@PROPERTY
@given(scene_st())
def test_a_move_by_step_object_passes(scene: Scene) -> None:
    rng = np.random.default_rng([scene.seed, 1])
    steps = (scenes.step_object(scene.obj, rng, move=0.05, aspect=scene.aspect) for _ in range(200))
    obj = next(s for s in steps if moved(scene.obj, s) >= min_move(scene))
    change = first_kept(scene)
    decision = change.check(scene.frame(1, obj), 0.5)
    assert (decision.keep, decision.reason) == (True, CHANGED), (moved(scene.obj, obj), decision.score)
    # and the moved object, now the reference, is still once it stays put
    assert change.check(scene.frame(2, obj), 1.0).reason == UNCHANGED


# (5) a slow drift adds up, because the comparison is with the last frame that went in


@PROPERTY
@given(scene_st(), st.floats(0.0, 2 * math.pi), st.floats(0.002, 0.006))
def test_a_slow_drift_passes_within_a_bounded_number_of_frames(
    scene: Scene, angle: float, step: float
) -> None:
    obj, change = scene.obj, first_kept(scene)
    # held well inside the frame (the box of the least filling shape, plus a margin), so that the
    # rendered object moves exactly as its centre does
    side = math.sqrt(obj.area / 0.5)
    hx, hy = side / math.sqrt(scene.aspect) / 2 + 0.01, side * math.sqrt(scene.aspect) / 2 + 0.01
    kept_at, kept = obj, 1
    for i in range(1, 30):
        cx = min(max(obj.cx + step * math.cos(angle), hx), 1 - hx)
        cy = min(max(obj.cy + step * math.sin(angle), hy), 1 - hy)
        obj = scenes.SceneObject(obj.shape, obj.color, cx, cy, obj.area, obj.flip)
        decision = change.check(scene.frame(i, obj), 0.5 * i)
        if decision.keep:
            assert decision.reason == CHANGED
            kept_at, kept = obj, kept + 1
        # a frame this far from the last one that went in always goes in itself
        assert moved(kept_at, obj) < min_move(scene), (i, moved(kept_at, obj), decision.score)
    if moved(scene.obj, obj) >= min_move(scene):
        assert kept >= 2


# (6) keep-alive


@PROPERTY
@given(
    scene_st(max_side=160),
    st.floats(0.5, 5.0),
    st.lists(st.floats(0.05, 1.5), min_size=1, max_size=30),
)
def test_the_keepalive_interval_is_honoured(scene: Scene, keepalive: float, gaps: list[float]) -> None:
    change = first_kept(scene, ChangeFilterSettings(keepalive_s=keepalive))
    t, last = 0.0, 0.0
    for i, gap in enumerate(gaps, 1):
        t += gap
        decision = change.check(scene.frame(i), t)
        if t - last >= keepalive:  # due: goes in even though nothing changed
            assert (decision.keep, decision.reason) == (True, KEEPALIVE)
            last = t
        else:
            assert (decision.keep, decision.reason) == (False, UNCHANGED)


def test_time_going_back_counts_as_a_keepalive_and_restarts_the_clock() -> None:
    scene = Scene(96, 128, "noise", 7, scenes.random_object(np.random.default_rng(7), aspect=128 / 96))
    change = first_kept(scene, ChangeFilterSettings(keepalive_s=5.0))
    change.check(scene.frame(1), 100.0)  # a keep-alive at 100 s
    assert change.check(scene.frame(2), 3.0).reason == KEEPALIVE  # the source restarted its clock
    assert change.check(scene.frame(3), 4.0).reason == UNCHANGED


def test_decide_does_not_move_the_reference_until_commit() -> None:
    scene = Scene(120, 160, "texture", 3, scenes.random_object(np.random.default_rng(3), aspect=160 / 120))
    obj = scenes.SceneObject(
        scene.obj.shape,
        "red" if scene.obj.color != "red" else "blue",
        scene.obj.cx,
        scene.obj.cy,
        scene.obj.area,
    )
    change = first_kept(scene)
    decision = change.decide(scene.frame(1, obj), 1.0)
    assert decision.keep and decision.reason == CHANGED
    assert change.decide(scene.frame(2, obj), 1.5).reason == CHANGED  # not committed: still the old view
    change.commit(decision)
    assert change.decide(scene.frame(3, obj), 2.0).reason == UNCHANGED
    change.reset()
    assert change.decide(scene.frame(4, obj), 2.5).reason == FIRST


def test_a_new_frame_size_goes_in() -> None:
    scene = Scene(120, 160, "noise", 4, scenes.random_object(np.random.default_rng(4), aspect=160 / 120))
    change = first_kept(scene)
    bigger = Scene(240, 320, "noise", 4, scene.obj)
    assert change.check(bigger.frame(1), 0.5).reason == RESIZED
    assert change.check(bigger.frame(2), 1.0).reason == UNCHANGED


def test_a_cut_to_another_scene_passes() -> None:
    a = Scene(240, 320, "noise", 5, scenes.random_object(np.random.default_rng(5), aspect=320 / 240))
    b = Scene(240, 320, "texture", 6, a.obj)  # the same object, in front of another background
    change = first_kept(a)
    assert change.check(b.frame(1), 0.5).reason == CHANGED


# (7) off


@PROPERTY
@given(scene_st(max_side=200))
def test_off_lets_everything_through_and_on_again_starts_afresh(scene: Scene) -> None:
    change = ChangeFilter(ChangeFilterSettings(enabled=False))
    for i in range(4):
        decision = change.check(scene.frame(i), 0.5 * i)
        assert (decision.keep, decision.reason) == (True, OFF)
    change.configure(ChangeFilterSettings(keepalive_s=NEVER))
    assert change.check(scene.frame(4), 2.0).reason == FIRST  # frames went in uncompared while off
    assert change.check(scene.frame(5), 2.5).reason == UNCHANGED


# (8) bad settings and bad frames


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", -1.0),
        ("threshold", 255.0),
        ("threshold", math.nan),
        ("threshold", "6"),
        ("threshold", True),
        ("keepalive_s", 0.0),
        ("keepalive_s", -3),
        ("keepalive_s", math.inf),
        ("keepalive_s", None),
        ("enabled", "yes"),
        ("enabled", 1),
    ],
)
def test_bad_settings_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ChangeFilterSettings(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        ChangeFilterSettings().updated({field: value})


def test_settings_defaults_and_updates() -> None:
    cfg = ChangeFilterSettings()
    assert (cfg.enabled, cfg.threshold, cfg.keepalive_s) == (True, 6.0, 10.0)
    assert cfg.updated({"threshold": 10, "keepalive_s": 2}) == ChangeFilterSettings(True, 10.0, 2.0)
    with pytest.raises(ValueError, match="bogus"):
        cfg.updated({"bogus": 1})


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((48, 64, 3), np.float32), "uint8"),
        (np.zeros((48, 64), np.uint8), "shape"),
        (np.zeros((48, 64, 4), np.uint8), "shape"),
        (np.zeros((1, 64, 3), np.uint8), "too small"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
@pytest.mark.parametrize("enabled", [True, False])
def test_bad_frames_raise_a_clear_error(frame: np.ndarray, message: str, enabled: bool) -> None:
    change = ChangeFilter(ChangeFilterSettings(enabled=enabled))
    with pytest.raises(ValueError, match=message):
        change.check(frame, 0.0)


# the thumbnail, and what the filter costs


@pytest.mark.parametrize("timestamp", [math.nan, math.inf])
def test_a_timestamp_that_is_not_a_number_of_seconds_is_refused(timestamp: float) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        ChangeFilter().check(np.zeros((48, 64, 3), np.uint8), timestamp)


def test_the_thumbnail_is_the_area_mean_per_channel() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (100, 130, 3), dtype=np.uint8)  # block 4: 25 x 32 cells, 2 columns cut
    thumb = thumbnail(rgb)
    assert (thumb.block, thumb.size, thumb.cells.shape) == (4, (100, 130), (3, 25, 32))
    expected = rgb[:, 1:129].reshape(25, 4, 32, 4, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    np.testing.assert_allclose(thumb.cells, expected, rtol=1e-6)


def test_cost_per_640x480_frame() -> None:
    scene = Scene(480, 640, "noise", 11, scenes.random_object(np.random.default_rng(11), aspect=640 / 480))
    frames = [scene.frame(i) for i in range(8)]
    change = first_kept(scene)
    n = 200
    start = time.perf_counter()
    for i in range(n):
        change.check(frames[i % 8], 0.5 * (i + 1))
    per_frame = (time.perf_counter() - start) / n
    print(f"change filter: {per_frame * 1e3:.3f} ms per 640x480 frame")
    assert per_frame < 0.02  # generous: a loaded CI machine; about 1 ms here
