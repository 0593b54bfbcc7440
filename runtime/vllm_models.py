"""vLLM model classes that place tokens with our position schemes.

vLLM computes M-RoPE positions for a prompt by calling the model's ``get_mrope_input_positions``
with the prompt's token ids and its multimodal placeholder ranges, again over the whole prompt at
every streamed chunk; decode tokens then get ``index + delta``. Overriding that one method is the
whole integration. This module is imported inside every engine process (through vLLM's
``model_class_overrides``), so it must stay importable on its own and cheap to import.

The scheme reaches the engine process through the model config (``hf_overrides``):
``speakwatch_positions``, ``speakwatch_gap``, ``speakwatch_assistant_header`` (token ids of
``<|im_start|>assistant\\n``) and ``speakwatch_im_end`` (id of ``<|im_end|>``).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

import positional
from runtime.layout import classify_tokens


class SchemePositionsMixin:
    """Replaces native M-RoPE numbering with a ``positional`` scheme chosen in the model config."""

    config: object

    def _speakwatch_settings(self) -> tuple[str, int, list[int], int]:
        config = self.config
        scheme = getattr(config, "speakwatch_positions", None) or "sequential"
        gap = int(getattr(config, "speakwatch_gap", positional.DEFAULT_GAP))
        header = list(getattr(config, "speakwatch_assistant_header", None) or [])
        im_end = int(getattr(config, "speakwatch_im_end", -1))
        return scheme, gap, header, im_end

    def get_mrope_input_positions(self, input_tokens, mm_features) -> tuple[torch.Tensor, int]:
        scheme, gap, header, im_end = self._speakwatch_settings()
        items = []
        factors = set()
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):  # type: ignore[attr-defined]
            items.append((offset, t, h, w))
            if t > 1:
                factors.add(float(t_factor))
        if len(factors) > 1:
            raise ValueError(f"one session cannot mix temporal strides {sorted(factors)}")
        tau = factors.pop() if factors else 1.0
        config = self.config
        markers = [config.vision_start_token_id, getattr(config, "vision_end_token_id", -1)]
        segments = classify_tokens(
            input_tokens, items, assistant_header=header, im_end=im_end, vision_markers=markers
        )
        positions = positional.assign(scheme, segments, tau=tau, gap=gap)
        nxt = positional.next_position(scheme, segments, tau=tau, gap=gap)
        return torch.from_numpy(np.ascontiguousarray(positions)), int(nxt - len(input_tokens))


class SpeakwatchQwen2VL(SchemePositionsMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with speakwatch position schemes."""


class SpeakwatchQwen2_5_VL(SchemePositionsMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with speakwatch position schemes."""


MODEL_CLASS_OVERRIDES = {
    "Qwen2VLForConditionalGeneration": f"{__name__}:SpeakwatchQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": f"{__name__}:SpeakwatchQwen2_5_VL",
}
