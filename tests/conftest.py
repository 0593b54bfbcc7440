"""Shared fixtures: one real vLLM engine (the built-in tiny model) for every end-to-end test.

Starting an engine costs about a minute on these CPUs, so all tests that need a running runtime
share this one; tests that need other engine options start their own.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
async def runtime():
    """A started `Runtime` on the tiny Qwen2-VL checkpoint (float32, group-decoupled, parallel)."""
    from runtime import Runtime

    rt = Runtime(engine_options={"dtype": "float32", "max_model_len": 4096, "kv_cache_gb": 1.0})
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()
