"""The built-in recipe, trained from scratch here, learns to see (so the training path is never dead).

A short run of `runtime.training.builtin.RECIPE` (same base checkpoint, seeds and settings as the
shipped model, fewer steps) must name the colour of held-out scenes; shape takes the shipped
model's full run (see docs/benchmarks.md), so it is only required to beat chance here.
"""

from __future__ import annotations

import io
import json

import pytest

from runtime.training.builtin import RECIPE, train_builtin
from runtime.training.evaluate import checkpoint_accuracy

pytestmark = [pytest.mark.training, pytest.mark.timeout(1200)]

STEPS = 150
COLOR_ACCURACY = 0.9  # 8 colours: chance is 0.125
SHAPE_ACCURACY = 0.4  # 3 shapes: chance is 0.33


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
    accuracy = checkpoint_accuracy(out, n=32)
    assert accuracy.color >= COLOR_ACCURACY, accuracy
    assert accuracy.shape >= SHAPE_ACCURACY, accuracy
