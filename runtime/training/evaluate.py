"""Held-out accuracy of a checkpoint on the seeing task, with Hugging Face transformers (no vLLM).

Each probe is a fresh scene (seeds the trainer never draws) laid out exactly as a live session
sends it: a few frames (the object may change between them), a question, the assistant header;
then greedy decoding token by token with the scheme's positions. Used by the built-in training
test and as a quick check after `speakwatch finetune`; the served accuracy (real vLLM, both
schedules) is measured by benchmarks/watching.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import positional
from runtime import layout
from runtime.engine import ModelInfo
from runtime.layout import Piece, StreamBuilder
from runtime.perception import FrameGeometry
from runtime.training import scenes
from runtime.training.data import FrameRef

HELD_OUT_SEED = 10**9  # trainer seeds are small integers; probes draw from here on


@dataclass(frozen=True)
class Accuracy:
    color: float
    shape: float
    both: float  # "What do you see?" names colour and shape right
    n: int


class GreedyProbe:
    """Greedy answers of a Hugging Face model to streams laid out as the runtime sends them."""

    def __init__(self, model, info: ModelInfo, positions: str, *, gap: int = positional.DEFAULT_GAP):
        self.model = model.eval()
        self.info = info
        self.chat = info.chat
        self.positions = positions
        self.gap = gap
        self.geometry = FrameGeometry.from_checkpoint(info)

    def answer(self, frames: list[np.ndarray], question: str, max_tokens: int = 6) -> str:
        patched = [self.geometry.patchify([f]) for f in frames]
        refs = [FrameRef(i, grid, self.info.spatial_merge_size) for i, (_, grid) in enumerate(patched)]
        builder = StreamBuilder(self.chat)
        if len(refs) > 1:
            builder.idle_frames(refs[:-1])
        builder.ask(question, frames=refs[-1:])
        pixels = torch.from_numpy(np.concatenate([p for p, _ in patched]))
        grids = torch.tensor([g for _, g in patched], dtype=torch.long)
        generated: list[int] = []
        with torch.inference_mode():
            for _ in range(max_tokens):
                token = self._next(builder.pieces, generated, pixels, grids)
                if token == self.chat.im_end:
                    break
                generated.append(token)
        return self.chat.tokenizer.decode(generated, skip_special_tokens=True)

    def _next(self, pieces: list[Piece], generated: list[int], pixels, grids) -> int:
        stream = [*pieces, *generated]
        ids = torch.tensor([layout.expanded_ids(self.chat, stream)])
        segments = layout.segments_of(self.chat, stream)
        position_ids = torch.from_numpy(
            np.asarray(positional.assign(self.positions, segments, tau=1.0, gap=self.gap), dtype=np.int64)
        )[:, None, :]
        out = self.model.model(
            input_ids=ids,
            position_ids=position_ids,
            pixel_values=pixels,
            image_grid_thw=grids,
            use_cache=False,
        )
        return int(self.model.lm_head(out.last_hidden_state[0, -1]).argmax())


def probe_scenes(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[list[np.ndarray], scenes.SceneObject]]:
    """``n`` held-out streams of 1-3 frames and the object latest in view."""
    probes = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        clip = scenes.random_clip(rng, int(rng.integers(1, 4)), change_p=0.5)
        probes.append((clip.frames(), clip.objects[-1]))
    return probes


def accuracy(probe: GreedyProbe, n: int = 48, seed: int = HELD_OUT_SEED) -> Accuracy:
    """Colour, shape and both-right rates over ``n`` held-out streams per question."""
    color = shape = both = 0
    for frames, obj in probe_scenes(n, seed):
        said_color = scenes.mentions(probe.answer(frames, scenes.QUESTIONS[0]))
        said_shape = scenes.mentions(probe.answer(frames, scenes.QUESTIONS[1]))
        said_both = scenes.mentions(probe.answer(frames, scenes.QUESTIONS[2]))
        color += bool(said_color) and said_color[0][0] == obj.color
        shape += bool(said_shape) and said_shape[0][1] == obj.shape
        both += bool(said_both) and said_both[0] == (obj.color, obj.shape)
    return Accuracy(color / n, shape / n, both / n, n)


def checkpoint_accuracy(path, n: int = 48, positions: str | None = None) -> Accuracy:
    """`accuracy` of a checkpoint directory (its recorded scheme unless ``positions`` is given)."""
    import transformers

    from runtime.training.finetune import read_record

    info = ModelInfo.load(path)
    record = read_record(path) or {}
    scheme = positions or str(record.get("positions", "sequential"))
    model = getattr(transformers, info.architecture).from_pretrained(str(path), dtype=torch.float32)
    return accuracy(GreedyProbe(model, info, scheme, gap=int(record.get("gap", positional.DEFAULT_GAP))), n)
