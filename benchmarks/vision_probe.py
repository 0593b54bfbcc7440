"""Can the built-in checkpoint's vision tower learn what the answers need? A direct probe.

Trained through the answer loss alone, the built-in model named colours but not shapes
(docs/benchmarks.md); the finding here is why the built-in recipe now has a stage one
(`runtime.training.vision`), whose trainer this probe uses. This script asks
whether the vision tower alone can learn the label when supervised directly, without the language
model in between: a fresh Qwen2-VL vision tower (the ``watch`` size of `runtime.tiny_model`, or a
variant), the runtime's own patching (`FrameGeometry`), an attention-pooled linear head, AdamW,
trained on single synthetic frames (`runtime.training.scenes`) and tested on held-out ones. A small
CNN on the same frames is the reference for "learnable at this budget".

    python benchmarks/vision_probe.py [--label shape|color] [--steps 400] [--variants base,p7,cnn]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.perception import FrameGeometry
from runtime.tiny_model import make_tiny_model
from runtime.training import scenes
from runtime.training.vision import TowerTrainer

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Variant:
    """A vision tower setting (what differs from the built-in checkpoint's)."""

    lr: float = 1e-3
    warmup: int = 0
    init_std: float = 0.08
    patch: int = 14
    max_pixels: int = 168 * 168
    depth: int = 3
    width: int = 96


VARIANTS = {
    "base": Variant(),
    "std02": Variant(init_std=0.02),
    "lr3e-4": Variant(lr=3e-4),
    "warm": Variant(lr=5e-4, warmup=200),
    "p7": Variant(patch=7, max_pixels=112 * 112),
    "wide": Variant(width=128),
}


def label_of(obj: scenes.SceneObject, label: str) -> int:
    return scenes.SHAPES.index(obj.shape) if label == "shape" else list(scenes.COLORS).index(obj.color)


def frames(n: int, seed: int) -> list[tuple[np.ndarray, scenes.SceneObject]]:
    rng = np.random.default_rng(seed)
    clips = [scenes.random_clip(rng, 1) for _ in range(n)]
    return [(clip.frame(0), clip.objects[0]) for clip in clips]


def train_tower(variant: Variant, train, test, label: str, steps: int, batch: int, base: Path) -> list[dict]:
    """The built-in recipe's stage one (`runtime.training.vision.TowerTrainer`) on a variant's tower."""
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = copy.deepcopy(AutoConfig.from_pretrained(base).vision_config)
    config.depth, config.embed_dim, config.patch_size = variant.depth, variant.width, variant.patch
    config.initializer_range = variant.init_std
    geometry = FrameGeometry(
        variant.patch, 2, 2, MEAN, STD, min(56 * 56, variant.max_pixels), variant.max_pixels
    )
    torch.manual_seed(0)
    tower = Qwen2VisionTransformerPretrainedModel(config).float()
    trainer = TowerTrainer(tower, geometry, 2, config.hidden_size)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=variant.lr, weight_decay=0.0)

    def logits(items) -> torch.Tensor:
        return trainer.logits([rgb for rgb, _, _ in items])[label]

    def labelled(items):
        return [(rgb, None, label_of(obj, label)) for rgb, obj in items]

    return _fit(logits, optimizer, labelled(train), labelled(test), steps, batch, variant)


def train_cnn(train, test, label: str, steps: int, batch: int) -> list[dict]:
    from PIL import Image

    def tensor(items):
        out = []
        for rgb, obj in items:
            small = np.asarray(Image.fromarray(rgb).resize((112, 112), Image.BICUBIC), dtype=np.float32)
            out.append((torch.from_numpy(small).permute(2, 0, 1) / 255 - 0.5, None, label_of(obj, label)))
        return out

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for c_in, c_out, k in ((3, 32, 5), (32, 64, 3), (64, 64, 3), (64, 64, 3)):
        layers += [torch.nn.Conv2d(c_in, c_out, k, 2, k // 2), torch.nn.ReLU()]
    classes = len(scenes.SHAPES) if label == "shape" else len(scenes.COLORS)
    net = torch.nn.Sequential(
        *layers, torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, classes)
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    return _fit(
        lambda items: net(torch.stack([x for x, _, _ in items])),
        optimizer,
        tensor(train),
        tensor(test),
        steps,
        batch,
        Variant(),
    )


def _fit(logits, optimizer, train, test, steps: int, batch: int, variant: Variant) -> list[dict]:
    rng = np.random.default_rng(3)
    log, start = [], time.monotonic()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = variant.lr * min(1.0, step / variant.warmup) if variant.warmup else variant.lr
        items = [train[i] for i in rng.integers(len(train), size=batch)]
        loss = torch.nn.functional.cross_entropy(logits(items), torch.tensor([y for _, _, y in items]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            entry = {"step": step, "loss": round(loss.item(), 3), "accuracy": _accuracy(logits, test)}
            log.append(entry)
            print(
                f"    step {step}: loss {entry['loss']}, held-out accuracy {entry['accuracy']:.2f} "
                f"({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    return log


def _accuracy(logits, test) -> float:
    right = 0
    with torch.no_grad():
        for i in range(0, len(test), 50):
            items = test[i : i + 50]
            right += int((logits(items).argmax(-1) == torch.tensor([y for _, _, y in items])).sum())
    return right / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", choices=("shape", "color"), default="shape")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", default="base,cnn", help=f"comma-separated: cnn, {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print("rendering frames", flush=True)
    train, test = frames(args.steps * args.batch // 4, 1), frames(300, 2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_model(Path(tmp) / "base", "qwen2-vl", 0, vocab="task", size="watch")
        for name in args.variants.split(","):
            print(f"{name}: {args.label}, {args.steps} steps of {args.batch}", flush=True)
            if name == "cnn":
                results[name] = train_cnn(train, test, args.label, args.steps, args.batch)
            else:
                results[name] = train_tower(
                    VARIANTS[name], train, test, args.label, args.steps, args.batch, base
                )
    for name, log in results.items():
        print(
            f"{name:>8}: held-out {args.label} accuracy {log[-1]['accuracy']:.2f} "
            f"after {log[-1]['step']} steps"
        )
    if args.json:
        args.json.write_text(json.dumps({"label": args.label, "results": results}, indent=2))


if __name__ == "__main__":
    main()
