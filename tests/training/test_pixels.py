"""Parity starts at the pixels: the runtime's resize and vision encoder equal the checkpoint's own
Hugging Face image processor and vision tower, for frames of sizes other than the model's target.

The runtime (and the trainer, through the same `FrameGeometry`) resizes with PIL bicubic, which is
exactly the processor's PIL backend. Its torchvision backend resizes slightly differently; the
difference is bounded and stated here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from runtime.engine import ModelInfo
from runtime.perception import VisionEncoder, merged_embeddings
from runtime.training import scenes
from runtime.training.builtin import watching_model

SIZES = [(120, 160), (480, 640), (168, 168), (100, 300), (1080, 1920)]
TORCHVISION_PIXEL_TOLERANCE = 0.05  # normalised units (~3 grey levels of 255); observed <= 0.044


@pytest.fixture(scope="module")
def checkpoint():
    path = watching_model()
    info = ModelInfo.load(path)
    model = getattr(transformers, info.architecture).from_pretrained(str(path), dtype=torch.float32).eval()
    return info, VisionEncoder(info), model


def _frame(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return scenes.render(scenes.random_object(rng, aspect=width / height), height, width, rng)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_runtime_embeddings_equal_the_hf_processor_and_tower(checkpoint, height: int, width: int) -> None:
    info, encoder, model = checkpoint
    frame = _frame(height, width, seed=height + width)
    processor = transformers.AutoImageProcessor.from_pretrained(str(info.path), backend="pil")
    hf = processor(images=[frame], return_tensors="pt")
    ours, grid = encoder.patchify([frame])
    assert grid == tuple(hf["image_grid_thw"][0].tolist())
    np.testing.assert_array_equal(ours, hf["pixel_values"].numpy())
    ((embeds, _),) = encoder.encode([[frame]])
    with torch.inference_mode():
        reference = merged_embeddings(model.model.visual(hf["pixel_values"], grid_thw=hf["image_grid_thw"]))
    assert embeds.shape == reference.shape == (grid[1] * grid[2] // 4, info.hidden_size)
    torch.testing.assert_close(embeds, reference.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), SIZES[:2])
def test_torchvision_backend_differs_by_a_bounded_resize_error(checkpoint, height: int, width: int) -> None:
    info, encoder, _ = checkpoint
    frame = _frame(height, width, seed=7)
    processor = transformers.AutoImageProcessor.from_pretrained(str(info.path), backend="torchvision")
    hf = processor(images=[frame], return_tensors="pt")["pixel_values"].numpy()
    ours, _ = encoder.patchify([frame])
    assert ours.shape == hf.shape
    assert np.abs(ours - hf).max() < TORCHVISION_PIXEL_TOLERANCE
