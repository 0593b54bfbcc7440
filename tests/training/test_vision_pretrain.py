"""Stage one of the built-in recipe (runtime/training/vision.py): what it trains, keeps and reports."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from runtime.engine import ModelInfo
from runtime.perception import FrameGeometry, VisionEncoder
from runtime.tiny_model import make_tiny_model
from runtime.training import scenes
from runtime.training.vision import (
    LABELS,
    LabelHeads,
    TowerTrainer,
    VisionPretrainConfig,
    labelled_frame,
    pretrain_vision,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vision") / "base", vocab="task", size="tiny")


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_stage_one_trains_tower_and_merger_and_leaves_the_language_model_alone(base, tmp_path) -> None:
    log = io.StringIO()
    result = pretrain_vision(
        base, tmp_path / "seeing", VisionPretrainConfig(steps=4, batch=4, log_every=2, held_out=8), out=log
    )
    assert result.steps == 4 and len(result.losses) == 4
    assert set(result.accuracy) == set(LABELS) and all(0 <= a <= 1 for a in result.accuracy.values())
    assert "vision step 4/4" in log.getvalue() and "held-out accuracy" in log.getvalue()
    before, after = _weights(base), _weights(result.output)
    assert before.keys() == after.keys(), "the checkpoint keeps every weight and adds none (heads dropped)"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".merger." in k for k in changed) and any(".blocks." in k for k in changed)
    assert all("visual" in k for k in changed), sorted(k for k in changed if "visual" not in k)[:5]
    # the runtime's own vision encoder loads the result: stage two and serving read these weights
    encoder = VisionEncoder(ModelInfo.load(result.output))
    ((embedding, grid),) = encoder.encode([[scenes.random_clip(np.random.default_rng(1), 1).frame(0)]])
    assert embedding.shape[0] == grid[0] * grid[1] * grid[2] // 4


def test_label_heads_pool_each_frame_alone() -> None:
    torch.manual_seed(0)
    heads = LabelHeads(8, LABELS)
    a, b = torch.randn(5, 8), torch.randn(3, 8)
    together = heads([a, b])
    alone = heads([b])
    assert together["shape"].shape == (2, len(scenes.SHAPES)) and together["color"].shape == (
        2,
        len(scenes.COLORS),
    )
    torch.testing.assert_close(together["color"][1], alone["color"][0])


def test_labelled_frames_name_their_object() -> None:
    rng = np.random.default_rng(5)
    for _ in range(5):
        rgb, labels = labelled_frame(rng)
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
        assert 0 <= labels["shape"] < len(scenes.SHAPES) and 0 <= labels["color"] < len(scenes.COLORS)


def test_trainer_fits_a_fixed_batch(base) -> None:
    """A few steps on one repeated batch must lower its loss: gradients reach the tower through the heads."""
    from transformers import Qwen2VLForConditionalGeneration

    info = ModelInfo.load(base)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    trainer = TowerTrainer(
        model.model.visual, FrameGeometry.from_checkpoint(info), 2, model.config.text_config.hidden_size
    )
    batch = [labelled_frame(np.random.default_rng([3, i])) for i in range(6)]
    first = float(trainer.loss(batch).detach())
    trainer.fit(
        lambda rng: batch[int(rng.integers(len(batch)))],
        VisionPretrainConfig(steps=15, batch=6, lr=3e-3, warmup=1),
        lambda _: None,
    )
    assert float(trainer.loss(batch).detach()) < first * 0.8


@pytest.mark.parametrize("bad", [{"steps": 0}, {"batch": 0}, {"lr": 0.0}, {"held_out": 0}])
def test_config_refuses_nonsense(bad) -> None:
    with pytest.raises(ValueError):
        VisionPretrainConfig(**bad)
