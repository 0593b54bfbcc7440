"""Perception: frames in, visual chunks (the model's own embeddings) out.

We run the checkpoint's vision tower ourselves, in a worker thread, instead of letting vLLM do it
inside the engine step: encoding then overlaps decoding, and the memory sees the embeddings. Only
the vision tower's weights are loaded here, never the language model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.engine import ModelInfo
from runtime.layout import GridTokens
from streams.frame import Frame

log = logging.getLogger("speakwatch.perception")

DEFAULT_PIXEL_BUDGET = 448 * 448
MIN_PIXELS = 56 * 56


@dataclass(frozen=True)
class VisualChunk(GridTokens):
    """One visual item ready for vLLM: embeddings in the language model's space, and its grid.

    ``grid`` is (t, h, w) in patches before the spatial merge, as vLLM's ``image_grid_thw``;
    the item holds t*h*w / merge**2 tokens.
    """

    embeds: object  # torch.Tensor (n_tokens, hidden), float32
    grid: tuple[int, int, int]
    merge: int
    timestamps: tuple[float, ...]
    arrivals: tuple[float, ...]
    indices: tuple[int, ...]
    encoded_at: float


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides divisible by ``factor``, area within [min_pixels, max_pixels]."""
    if min(height, width) <= 0:
        raise ValueError(f"frame must have positive size, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame aspect ratio must be below 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class FrameGeometry:
    """Qwen's preprocessing of a checkpoint: resize rule, normalisation and patch layout.

    The runtime's encoder and the trainer both cut frames into patches here, so a model is
    trained on exactly the pixels it is served with.
    """

    patch: int
    merge: int
    temporal_patch: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_checkpoint(cls, info: ModelInfo, pixel_budget: int | None = None) -> FrameGeometry:
        pre = _read_json(info.path / "preprocessor_config.json")
        model_max = int(
            pre.get("max_pixels") or (pre.get("size") or {}).get("longest_edge") or DEFAULT_PIXEL_BUDGET
        )
        max_pixels = int(pixel_budget or min(model_max, DEFAULT_PIXEL_BUDGET))
        return cls(
            patch=info.patch_size,
            merge=info.spatial_merge_size,
            temporal_patch=info.temporal_patch_size,
            mean=tuple(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])),  # type: ignore[arg-type]
            std=tuple(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])),  # type: ignore[arg-type]
            min_pixels=min(MIN_PIXELS, max_pixels),
            max_pixels=max_pixels,
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of one frame of this size (what `patchify` returns with its patches)."""
        target_h, target_w = self.target_size(height, width)
        return 1, target_h // self.patch, target_w // self.patch

    def patchify(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Resize, normalise and cut frames into flat patches (seq, C*tp*p*p), as Qwen's processor does.

        One or ``temporal_patch`` frames make one temporal patch (a single frame is repeated).
        """
        from PIL import Image

        if not 1 <= len(frames) <= self.temporal_patch:
            raise ValueError(f"a visual chunk takes 1..{self.temporal_patch} frames, got {len(frames)}")
        height, width = self.target_size(*frames[0].shape[:2])
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        planes = []
        for rgb in frames:
            if rgb.shape[:2] != (height, width):
                rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))
            x = (rgb.astype(np.float32) / 255.0 - mean) / std
            planes.append(x.transpose(2, 0, 1))  # C, H, W
        while len(planes) < self.temporal_patch:
            planes.append(planes[-1])
        video = np.stack(planes)  # T, C, H, W
        p, m, tp = self.patch, self.merge, self.temporal_patch
        gh, gw = height // p, width // p
        x = video.reshape(1, tp, 3, gh // m, m, p, gw // m, m, p)
        # -> (t, gh/m, gw/m, m, m, C, tp, p, p): merged-cell-major order, as the vision tower expects
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gh * gw, 3 * tp * p * p)), self.grid(*frames[0].shape[:2])


def vision_tower_class(architecture: str) -> type:
    """The Hugging Face vision tower class of a supported architecture."""
    if architecture == "Qwen2_5_VLForConditionalGeneration":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        return Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return Qwen2VisionTransformerPretrainedModel


def merged_embeddings(output: object) -> object:
    """The merged (language-model space) embeddings from a vision tower's forward output."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class VisionEncoder:
    """The checkpoint's vision tower (weights loaded alone) and Qwen's preprocessing.

    Thread-safe for one caller at a time; `Perception` serialises calls through one worker thread.
    """

    def __init__(self, info: ModelInfo, *, pixel_budget: int | None = None, threads: int | None = None):
        import torch
        import transformers

        self.info = info
        self.geometry = FrameGeometry.from_checkpoint(info, pixel_budget)
        self.merge = info.spatial_merge_size
        self.patch = info.patch_size
        self.temporal_patch = info.temporal_patch_size
        self.max_pixels = self.geometry.max_pixels
        self.min_pixels = self.geometry.min_pixels
        if threads:
            torch.set_num_threads(threads)
        config = transformers.AutoConfig.from_pretrained(str(info.path))
        vision_config = config.vision_config
        vision_config._attn_implementation = "sdpa"
        self.model = (
            vision_tower_class(info.architecture)._from_config(vision_config, dtype=torch.float32).eval()
        )
        state = _load_vision_weights(info.path)
        missing, _unexpected = self.model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{info.path}: vision tower weights missing: {missing[:5]}...")
        self._torch = torch

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return self.geometry.target_size(height, width)

    def patchify(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, tuple[int, int, int]]:
        return self.geometry.patchify(frames)

    def encode(self, groups: Sequence[Sequence[np.ndarray]]) -> list[tuple[object, tuple[int, int, int]]]:
        """Embeddings (n_tokens, hidden) and grid for each group of frames, in one batched forward."""
        torch = self._torch
        patches, grids = [], []
        for frames in groups:
            flat, grid = self.patchify(frames)
            patches.append(flat)
            grids.append(grid)
        with torch.inference_mode():
            pixel_values = torch.from_numpy(np.concatenate(patches))
            grid_thw = torch.tensor(grids, dtype=torch.long)
            merged = merged_embeddings(self.model(pixel_values, grid_thw=grid_thw))
            sizes = [t * h * w // (self.merge**2) for t, h, w in grids]
            pieces = torch.split(merged.float().contiguous(), sizes)
        return [(piece.clone(), grid) for piece, grid in zip(pieces, grids, strict=True)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _load_vision_weights(path: Path) -> dict:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in path.glob("*.safetensors")]
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as handle:
            for key in handle.keys():
                for prefix in ("visual.", "model.visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = handle.get_tensor(key).float()
    if not state:
        raise ValueError(f"{path}: no vision tower weights (keys starting with 'visual.')")
    return state


@dataclass
class PerceptionStats:
    received: int = 0
    encoded: int = 0
    dropped: int = 0
    failed: int = 0  # of the dropped: the encoder raised
    chunks: int = 0
    encode_seconds: float = 0.0


class Perception:
    """One session's perception stage: a bounded frame queue and batched encoding off the loop.

    When encoding falls behind, the oldest unencoded frames are dropped (and counted): the model
    should see what is happening now, not a growing backlog.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        executor: ThreadPoolExecutor,
        on_chunks: Callable[[list[VisualChunk]], None],
        *,
        queue_size: int = 8,
        frames_per_chunk: int = 1,
        max_batch: int = 8,
    ):
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if not 1 <= frames_per_chunk <= encoder.temporal_patch:
            raise ValueError(f"frames_per_chunk must be 1..{encoder.temporal_patch}")
        self.encoder = encoder
        self.executor = executor
        self.on_chunks = on_chunks
        self.frames_per_chunk = frames_per_chunk
        self.max_batch = max_batch
        self.queue: deque[Frame] = deque()
        self.queue_size = queue_size
        self.stats = PerceptionStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.paused = False
        self.encoding = False
        self._encoding_first = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="speakwatch-perception")

    def submit(self, frame: Frame) -> None:
        if self._closed:
            raise RuntimeError("perception is closed")
        self.stats.received += 1
        self.queue.append(frame)
        while len(self.queue) > self.queue_size:
            self.queue.popleft()
            self.stats.dropped += 1
        self._wake.set()

    def settled(self, before: int) -> bool:
        """Every frame with an index below ``before`` is encoded (or dropped): none is queued or encoding."""
        if self.encoding and self._encoding_first < before:
            return False
        if len(self.queue) < self.frames_per_chunk:
            return True  # a lone frame waits for its temporal partner: nothing to wait for yet
        return not any(frame.index < before for frame in self.queue)

    def pause(self) -> None:
        """Hold encoding (the sequential schedule's classic cycle: nothing is perceived mid-answer)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while len(self.queue) >= self.frames_per_chunk and not self._closed and not self.paused:
                groups: list[list[Frame]] = []
                while len(self.queue) >= self.frames_per_chunk and len(groups) < self.max_batch:
                    groups.append([self.queue.popleft() for _ in range(self.frames_per_chunk)])
                started = time.perf_counter()
                self.encoding = True
                self._encoding_first = groups[0][0].index
                try:
                    results = await loop.run_in_executor(
                        self.executor, self.encoder.encode, [[f.rgb for f in g] for g in groups]
                    )
                except Exception:  # a frame the tower cannot take must not stop perception
                    log.exception("perception: encoding %d frames failed; they are dropped", len(groups))
                    self.stats.dropped += sum(len(g) for g in groups)
                    self.stats.failed += sum(len(g) for g in groups)
                    if not self._closed:
                        self.on_chunks([])  # wakes the session: a question may wait for these frames
                    continue
                finally:
                    self.encoding = False
                self.stats.encode_seconds += time.perf_counter() - started
                now = time.monotonic()
                chunks = [
                    VisualChunk(
                        embeds=embeds,
                        grid=grid,
                        merge=self.encoder.merge,
                        timestamps=tuple(f.timestamp for f in group),
                        arrivals=tuple(f.arrival for f in group),
                        indices=tuple(f.index for f in group),
                        encoded_at=now,
                    )
                    for group, (embeds, grid) in zip(groups, results, strict=True)
                ]
                self.stats.encoded += sum(len(g) for g in groups)
                self.stats.chunks += len(chunks)
                if not self._closed:
                    self.on_chunks(chunks)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.stats.dropped += len(self.queue)
        self.queue.clear()
