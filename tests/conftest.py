"""Shared fixtures: one real vLLM engine (the built-in watching model) for every end-to-end test.

Starting an engine costs about a minute on these CPUs, so all tests that need a running runtime
share this one; tests that need other engine options start their own.

The built-in model is a tiny Qwen2-VL fine-tuned on the synthetic seeing task
(runtime/training/scenes.py): frames show one coloured shape, ``scenes.QUESTIONS`` get a short answer
that ends by itself, ``scenes.COMMENTARY`` a running commentary that only stops at ``max_tokens`` (or
a cancel). Tests that need a long answer ask the commentary; tests that need one that completes ask
a question. ``SPEAKWATCH_TEST_MODEL=PATH`` points the shared runtime at another checkpoint (e.g. a
freshly trained built-in, before it is installed).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def test_model() -> str | None:
    """The checkpoint end-to-end tests serve: None (the built-in watching model), or SPEAKWATCH_TEST_MODEL."""
    return os.environ.get("SPEAKWATCH_TEST_MODEL") or None


@pytest.fixture(scope="session")
async def runtime(test_model):
    """A started `Runtime` on the built-in watching checkpoint (float32; its own positions and K)."""
    from runtime import Runtime

    rt = Runtime(test_model, engine_options={"dtype": "float32", "max_model_len": 4096, "kv_cache_gb": 1.0})
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()
