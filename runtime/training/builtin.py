"""The built-in watching checkpoint: a tiny Qwen2-VL trained on the synthetic seeing task.

`RECIPE` is the whole recipe, in two stages, run by `speakwatch finetune --builtin OUT`
deterministically from its seeds, on a generated random checkpoint:

1. `runtime.training.vision.pretrain_vision` (`VISION`): the vision tower and merger learn shape
   and colour from single frames, supervised directly. Trained from random weights through the
   answer loss alone, the tower learned colour but never shape (docs/benchmarks.md).
2. `runtime.training.finetune` (`RECIPE`), the same streaming fine-tune every user runs: the
   tower frozen, merger and language model trained on streams laid out as a session sends them.

The result ships with the package (``runtime/assets/watching-qwen2-vl``, a few MB), so first use
costs nothing; tests/training/test_builtin_training.py trains a shorter run of both stages from
scratch to a stated accuracy, so the training path is never dead.

Departures from the paper's recipe, all for a model trained from random weights on 2 CPU cores:
stage one itself (the paper starts from a pretrained tower), lr 1e-3 (not 2e-5), batch 16 (not
64), a fixed number of steps on freshly drawn synthetic streams instead of one epoch of a dataset.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # finetune imports torch: keep `watching_model` cheap for the runtime's event loop
    from runtime.training.finetune import FinetuneConfig
    from runtime.training.vision import VisionPretrainConfig

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
    "max_steps": 1200,
    "train_vision": False,
    "vision_lr_scale": 0.1,  # the merger, already trained in stage one, moves slowly
    "seed": 0,
    "log_every": 20,
}
VISION = {"steps": 1000, "batch": 32, "lr": 1e-3, "seed": 0, "log_every": 100}


def builtin_config(output: str | os.PathLike, base: str | os.PathLike, **overrides: object) -> FinetuneConfig:
    from runtime.training.finetune import FinetuneConfig

    return FinetuneConfig(model=Path(base), output=Path(output), **{**RECIPE, **overrides})  # type: ignore[arg-type]


def vision_config(**overrides: object) -> VisionPretrainConfig:
    from runtime.training.vision import VisionPretrainConfig

    return VisionPretrainConfig(**{**VISION, **overrides})  # type: ignore[arg-type]


def train_builtin(
    output: str | os.PathLike,
    *,
    out: TextIO | None = None,
    vision: dict[str, object] | None = None,
    stage_one: str | os.PathLike | None = None,
    **overrides: object,
) -> Path:
    """Generate the random base checkpoint and train it: `VISION` (plus ``vision``), then `RECIPE`
    (plus ``overrides``). ``threads`` applies to both stages. ``stage_one``: a checkpoint stage one
    wrote before (it does not depend on ``positions``), to start stage two from instead."""
    from runtime.training.finetune import finetune
    from runtime.training.vision import read_result

    with tempfile.TemporaryDirectory(prefix="speakwatch-base-") as tmp:
        if stage_one is None:
            seeing = train_stage_one(
                Path(tmp), out=out, **{"threads": overrides.get("threads"), **(vision or {})}
            )
        else:
            seeing = Path(stage_one)
        config = builtin_config(output, seeing, **overrides)
        record = {"base": dict(BASE), "recipe": "builtin", "vision": read_result(seeing)}
        finetune(replace(config, extra_record=record), out=out)
    return Path(output)


def train_stage_one(directory: Path, *, out: TextIO | None = None, **vision: object) -> Path:
    """Stage one on a freshly generated base checkpoint, into ``directory / "seeing"``."""
    from runtime.tiny_model import make_tiny_model
    from runtime.training.vision import pretrain_vision

    base = make_tiny_model(directory / "base", **BASE)  # type: ignore[arg-type]
    return pretrain_vision(base, directory / "seeing", vision_config(**vision), out=out).output


def watching_model() -> Path:
    """The shipped built-in watching checkpoint."""
    if not (ASSET / "config.json").exists():
        raise FileNotFoundError(
            f"the built-in watching checkpoint is missing from {ASSET}; "
            "recreate it with `speakwatch finetune --builtin " + str(ASSET) + "`"
        )
    return ASSET
