"""The built-in recipe, trained from scratch here, learns to see (so the training path is never dead).

Both stages of `runtime.training.builtin` from the same generated base checkpoint and seeds as the
shipped model: stage one in full (1000 steps of labelled frames, ~5-7 min here), then 150 of stage
two's 1200 streaming fine-tune steps. The result must name the colour and the shape of held-out
scenes well above chance (8 colours: 1/8; 3 shapes: 1/3).
"""

from __future__ import annotations

import io
import json

import pytest

from runtime.training.builtin import RECIPE, VISION, train_builtin
from runtime.training.evaluate import checkpoint_accuracy

pytestmark = [pytest.mark.training, pytest.mark.timeout(2400)]

STEPS = 150
COLOR_ACCURACY = 0.6  # 8 colours: chance is 0.125
SHAPE_ACCURACY = 0.6  # 3 shapes: chance is 0.33
STAGE_ONE_SHAPE = 0.8  # stage one's own held-out accuracy of its shape head


def test_builtin_recipe_trains_from_scratch_to_a_stated_accuracy(tmp_path) -> None:
    log = io.StringIO()
    out = train_builtin(tmp_path / "watching", max_steps=STEPS, threads=2, out=log)
    lines = [line for line in log.getvalue().splitlines() if line.startswith("step ")]
    assert lines and lines[-1].startswith(f"step {STEPS}/{STEPS}"), "progress must be shown"
    first, last = (float(line.split("loss ")[1].split()[0]) for line in (lines[0], lines[-1]))
    assert last < first / 4, f"loss must fall: {first} -> {last}"
    record = json.loads((out / "config.json").read_text())["speakwatch"]
    assert record["positions"] == RECIPE["positions"] and record["turn_tokens"] == RECIPE["turn_tokens"]
    assert record["steps"] == STEPS
    vision_steps = VISION["steps"]
    assert f"vision step {vision_steps}/{vision_steps}" in log.getvalue(), "stage one must show progress"
    assert record["vision"]["held_out_accuracy"]["shape"] >= STAGE_ONE_SHAPE, record["vision"]
    accuracy = checkpoint_accuracy(out, n=32)
    assert accuracy.color >= COLOR_ACCURACY and accuracy.shape >= SHAPE_ACCURACY, accuracy
