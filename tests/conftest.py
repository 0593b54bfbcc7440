"""Shared fixtures: one real vLLM engine (the built-in watching model) for every end-to-end test.

Starting an engine costs about a minute on these CPUs, so all tests that need a running runtime
share this one; tests that need other engine options start their own.

The built-in model is a tiny Qwen2-VL fine-tuned on the synthetic seeing task
(runtime/training/scenes.py): frames show one coloured shape, ``scenes.QUESTIONS`` get a short answer
that ends by itself, ``scenes.COMMENTARY`` a running commentary that only stops at ``max_tokens`` (or
a cancel). Tests that need a long answer ask the commentary; tests that need one that completes ask
a question. ``SPEAKWATCH_TEST_MODEL=PATH`` points the shared runtime at another checkpoint (e.g. a
freshly trained built-in, before it is installed).

Tests marked ``browser`` drive headless Chromium; they never skip silently: without ``CHROMIUM`` and
``CHROMEDRIVER`` they fail, unless ``SPEAKWATCH_SKIP_BROWSER=1`` opts out explicitly (they are then
reported as skipped). ``make test-fast`` leaves them out by marker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHROMIUM = "/usr/bin/chromium"  # Debian's packages, what `make browser-deps` installs
CHROMEDRIVER = "/usr/bin/chromedriver"
SKIP_BROWSER = "SPEAKWATCH_SKIP_BROWSER"


def browser_gate(environ: Mapping[str, str], needed: Sequence[str]) -> tuple[str, str] | None:
    """What becomes of a ``browser`` test: ``("skip", why)`` when the user opted out,
    ``("fail", why)`` when a needed file is missing, None when it can run."""
    if environ.get(SKIP_BROWSER, "").strip().lower() in ("1", "true", "yes"):
        return "skip", f"{SKIP_BROWSER}={environ[SKIP_BROWSER]}: browser tests opted out"
    missing = [path for path in needed if not Path(path).exists()]
    if missing:
        return "fail", (
            f"browser test needs {' and '.join(missing)} (apt-get install chromium chromium-driver, "
            f"or `make browser-deps`); set {SKIP_BROWSER}=1 to skip the browser tests on purpose"
        )
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("browser") is None:
        return
    gate = browser_gate(os.environ, (CHROMIUM, CHROMEDRIVER))
    if gate is None:
        return
    action, why = gate
    if action == "skip":
        pytest.skip(why)
    pytest.fail(why, pytrace=False)


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
