"""Stage one of the built-in recipe: the vision tower and merger learn the scene labels directly.

Why a stage of its own: trained from random weights through the answer loss alone, the tower learns
colour but not shape (docs/benchmarks.md, "Does the model watch?"): the shape word is one target
among many, and the gradient that reaches the tower through a random language model is faint.
Supervised directly on single frames of the synthetic task, the same tower learns shape in 600-1200
steps (benchmarks/vision_probe.py). Here each label (shape, colour) gets an attention-pooled linear
head over a frame's merged tokens, the tokens the language model will read; the heads are thrown
away afterwards, and the checkpoint keeps the trained tower and merger. The streaming fine-tune
(`runtime.training.finetune`, stage two) then starts from it with the tower frozen, as the paper's
recipe has it.

Frames are cut into patches by the runtime's own `FrameGeometry`, at the sizes the camera sends.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from runtime.engine import ModelInfo
from runtime.perception import FrameGeometry, merged_embeddings
from runtime.training import scenes

LABELS: dict[str, tuple[str, ...]] = {"shape": scenes.SHAPES, "color": tuple(scenes.COLORS)}
RESULT_FILE = "vision_pretrain.json"  # beside the checkpoint: what stage one reached
HELD_OUT_SEED = 10**9 + 7  # stage one's test frames: seeds its training never draws


@dataclass(frozen=True)
class VisionPretrainConfig:
    """Stage one's knobs (defaults: the built-in recipe's)."""

    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50  # steps of linear warm-up, then cosine to zero
    seed: int = 0
    log_every: int = 100
    held_out: int = 240  # frames in the final accuracy check
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.held_out < 1:
            raise ValueError("steps, batch and held_out must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class VisionPretrainResult:
    output: Path
    steps: int
    losses: tuple[float, ...]
    accuracy: dict[str, float]  # held-out accuracy of each label's head
    seconds: float

    def summary(self) -> dict[str, object]:
        return {"steps": self.steps, "held_out_accuracy": self.accuracy}


class LabelHeads(torch.nn.Module):
    """One attention-pooled linear classifier per label over each frame's merged tokens."""

    def __init__(self, hidden: int, labels: dict[str, tuple[str, ...]]):
        super().__init__()
        self.scale = hidden**-0.5
        self.queries = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(torch.randn(hidden) * 0.02) for name in labels}
        )
        self.heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(hidden, len(values)) for name, values in labels.items()}
        )

    def forward(self, frames: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        logits: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            query = self.queries[name]
            pooled = [
                (torch.softmax(tokens @ query * self.scale, 0)[:, None] * tokens).sum(0) for tokens in frames
            ]
            logits[name] = head(torch.stack(pooled))
        return logits


LabelledFrame = tuple[np.ndarray, dict[str, int]]


def labelled_frame(rng: np.random.Generator) -> LabelledFrame:
    """A single synthetic frame (random size, background, object) and its label indices."""
    clip = scenes.random_clip(rng, 1)
    obj = clip.objects[0]
    return clip.frame(0), {
        "shape": LABELS["shape"].index(obj.shape),
        "color": LABELS["color"].index(obj.color),
    }


class TowerTrainer:
    """Trains a vision tower (with its merger) and `LabelHeads` on labelled frames."""

    def __init__(self, tower: torch.nn.Module, geometry: FrameGeometry, merge: int, hidden: int):
        self.tower = tower
        self.geometry = geometry
        self.merge = merge
        self.heads = LabelHeads(hidden, LABELS)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.tower.parameters(), *self.heads.parameters()]

    def logits(self, frames: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        patches, grids = [], []
        for rgb in frames:
            flat, grid = self.geometry.patchify([rgb])
            patches.append(torch.from_numpy(flat))
            grids.append(grid)
        grid_thw = torch.tensor(grids, dtype=torch.long)
        merged = merged_embeddings(self.tower(torch.cat(patches), grid_thw=grid_thw))
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        return self.heads(torch.split(merged, sizes))

    def loss(self, batch: Sequence[LabelledFrame]) -> torch.Tensor:
        logits = self.logits([rgb for rgb, _ in batch])
        return sum(
            torch.nn.functional.cross_entropy(out, torch.tensor([labels[name] for _, labels in batch]))
            for name, out in logits.items()
        ) / len(logits)

    def accuracy(self, frames: Sequence[LabelledFrame], chunk: int = 40) -> dict[str, float]:
        right = dict.fromkeys(LABELS, 0)
        with torch.no_grad():
            for i in range(0, len(frames), chunk):
                part = frames[i : i + chunk]
                for name, out in self.logits([rgb for rgb, _ in part]).items():
                    want = torch.tensor([labels[name] for _, labels in part])
                    right[name] += int((out.argmax(-1) == want).sum())
        return {name: count / len(frames) for name, count in right.items()}

    def fit(
        self,
        draw: Callable[[np.random.Generator], LabelledFrame],
        config: VisionPretrainConfig,
        say: Callable[[str], None],
    ) -> list[float]:
        """AdamW with warm-up and cosine decay on freshly drawn frames; returns the loss of each step."""
        params = self.parameters()
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

        def rate(step: int) -> float:
            if step < config.warmup:
                return (step + 1) / config.warmup
            done = (step - config.warmup) / max(1, config.steps - config.warmup)
            return 0.5 * (1 + math.cos(math.pi * done))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        rng = np.random.default_rng([config.seed, 11])
        losses: list[float] = []
        started = time.monotonic()
        for step in range(1, config.steps + 1):
            loss = self.loss([draw(rng) for _ in range(config.batch)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if step % config.log_every == 0 or step in (1, config.steps):
                elapsed = time.monotonic() - started
                say(
                    f"vision step {step}/{config.steps}  loss {np.mean(losses[-config.log_every :]):.4f}  "
                    f"{elapsed:.0f}s elapsed, ~{elapsed / step * (config.steps - step):.0f}s left"
                )
        return losses


def held_out_frames(n: int) -> list[LabelledFrame]:
    return [labelled_frame(np.random.default_rng([HELD_OUT_SEED, i])) for i in range(n)]


def pretrain_vision(
    model: str | Path,
    output: str | Path,
    config: VisionPretrainConfig | None = None,
    *,
    out: TextIO | None = None,
) -> VisionPretrainResult:
    """Train ``model``'s vision tower and merger on the scene labels; write the checkpoint to ``output``."""
    import transformers

    from runtime.training.finetune import copy_checkpoint_files

    config = config or VisionPretrainConfig()
    model, output = Path(model), Path(output)
    stream = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    info = ModelInfo.load(model)
    say(f"loading {model} ({info.architecture}) for vision pre-training ...")
    full = getattr(transformers, info.architecture).from_pretrained(str(model), dtype=torch.float32)
    tower = full.model.visual if hasattr(full, "model") and hasattr(full.model, "visual") else full.visual
    hidden = int(
        full.config.text_config.hidden_size
        if hasattr(full.config, "text_config")
        else full.config.hidden_size
    )
    trainer = TowerTrainer(
        tower.train(), FrameGeometry.from_checkpoint(info), info.spatial_merge_size, hidden
    )
    n_params = sum(p.numel() for p in tower.parameters())
    say(
        f"vision pre-training {n_params / 1e6:.2f}M parameters (tower + merger) on {', '.join(LABELS)} "
        f"for {config.steps} steps of {config.batch} frames, lr {config.lr}"
    )
    started = time.monotonic()
    losses = trainer.fit(labelled_frame, config, say)
    tower.eval()
    accuracy = trainer.accuracy(held_out_frames(config.held_out))
    say(
        "vision held-out accuracy on "
        f"{config.held_out} frames: " + ", ".join(f"{name} {value:.0%}" for name, value in accuracy.items())
    )
    output.mkdir(parents=True, exist_ok=True)
    full.eval().save_pretrained(output, safe_serialization=True)
    copy_checkpoint_files(model, output)
    result = VisionPretrainResult(output, config.steps, tuple(losses), accuracy, time.monotonic() - started)
    (output / RESULT_FILE).write_text(json.dumps(result.summary(), indent=2))
    return result


def read_result(path: str | Path) -> dict[str, object]:
    """What stage one wrote beside a checkpoint it trained (`VisionPretrainResult.summary`)."""
    file = Path(path) / RESULT_FILE
    if not file.exists():
        raise FileNotFoundError(f"{path}: not a stage-one checkpoint (no {RESULT_FILE})")
    return json.loads(file.read_text())
