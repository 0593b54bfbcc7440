"""The built-in watching checkpoint: a tiny Qwen2-VL fine-tuned on the synthetic seeing task.

`RECIPE` is the whole recipe: `speakwatch finetune --builtin OUT` runs it (the same `finetune`
every user runs, on a generated random checkpoint), deterministically from its seeds. Its result
ships with the package (``runtime/assets/watching-qwen2-vl``, a few MB), so first use costs
nothing; tests/training/test_builtin_training.py trains a smaller run of it from scratch to a stated
accuracy, so the training path is never dead.

Departures from the paper's recipe, all for a model trained from random weights on 2 CPU cores:
lr 1e-3 (not 2e-5), batch 16 (not 64), the vision tower trained too (shape needs it), a fixed
number of steps on freshly drawn synthetic streams instead of one epoch of a dataset.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # finetune imports torch: keep `watching_model` cheap for the runtime's event loop
    from runtime.training.finetune import FinetuneConfig

ASSET = Path(__file__).resolve().parent.parent / "assets" / "watching-qwen2-vl"
BASE = {"arch": "qwen2-vl", "seed": 0, "vocab": "task", "size": "watch"}
RECIPE = {
    "data": "synthetic",
    "positions": "group-decoupled",
    "turn_tokens": 3,
    "lr": 1e-3,
    "warmup": 0.03,
    "per_device_batch": 16,
    "effective_batch": 16,
    "max_steps": 1000,
    "train_vision": True,
    "seed": 0,
    "log_every": 20,
}


def builtin_config(output: str | os.PathLike, base: str | os.PathLike, **overrides: object) -> FinetuneConfig:
    from runtime.training.finetune import FinetuneConfig

    return FinetuneConfig(model=Path(base), output=Path(output), **{**RECIPE, **overrides})  # type: ignore[arg-type]


def train_builtin(output: str | os.PathLike, *, out: TextIO | None = None, **overrides: object) -> Path:
    """Generate the random base checkpoint and fine-tune it with `RECIPE` (plus ``overrides``)."""
    from runtime.tiny_model import make_tiny_model
    from runtime.training.finetune import finetune

    with tempfile.TemporaryDirectory(prefix="speakwatch-base-") as tmp:
        base = make_tiny_model(Path(tmp) / "base", **BASE)  # type: ignore[arg-type]
        config = builtin_config(output, base, **overrides)
        config = replace(config, extra_record={"base": dict(BASE), "recipe": "builtin"})
        finetune(config, out=out)
    return Path(output)


def watching_model() -> Path:
    """The shipped built-in watching checkpoint."""
    if not (ASSET / "config.json").exists():
        raise FileNotFoundError(
            f"the built-in watching checkpoint is missing from {ASSET}; "
            "recreate it with `speakwatch finetune --builtin " + str(ASSET) + "`"
        )
    return ASSET
