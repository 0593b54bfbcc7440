"""A checkpoint is served with the scheme (and K) it was fine-tuned for; stock ones with native positions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import runtime.runtime as runtime_module
from runtime import Runtime
from runtime.engine import ModelInfo
from runtime.tiny_model import make_tiny_model
from runtime.training.builtin import RECIPE, watching_model


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("stock") / "m", vocab="task")


@pytest.fixture(scope="module")
def tuned(stock: Path, tmp_path_factory) -> Path:
    import shutil

    path = tmp_path_factory.mktemp("tuned") / "m"
    shutil.copytree(stock, path)
    config = json.loads((path / "config.json").read_text())
    config["speakwatch"] = {"positions": "gap-isolated", "gap": 5000, "turn_tokens": 5}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_stock_checkpoints_default_to_native_positions(stock: Path, caplog) -> None:
    info = ModelInfo.load(stock)
    assert info.trained_for is None and info.default_positions == "sequential"
    with caplog.at_level(logging.WARNING, "speakwatch.engine"):
        assert info.positions_for(None) == "sequential"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, "speakwatch.engine"):
        assert info.positions_for("group-decoupled") == "group-decoupled"
    assert "stock checkpoint" in caplog.text and "sequential" in caplog.text


def test_fine_tuned_checkpoints_default_to_their_record(tuned: Path, caplog) -> None:
    info = ModelInfo.load(tuned)
    assert info.default_positions == "gap-isolated" and info.trained_turn_tokens == 5
    with caplog.at_level(logging.WARNING, "speakwatch.engine"):
        assert info.positions_for(None) == "gap-isolated"
        assert info.positions_for("gap-isolated") == "gap-isolated"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, "speakwatch.engine"):
        assert info.positions_for("sequential") == "sequential"
    assert "fine-tuned for gap-isolated" in caplog.text
    with pytest.raises(ValueError, match="unknown position scheme"):
        info.positions_for("rotary")


def test_the_builtin_records_its_recipe() -> None:
    info = ModelInfo.load(watching_model())
    assert info.default_positions == RECIPE["positions"]
    assert info.trained_turn_tokens == RECIPE["turn_tokens"]
    assert info.chat.im_end < 64 and info.chat.image_pad < 64, "the small vocabulary names its own ids"


class _NoEngine:
    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize(
    ("positions", "turn_tokens", "expected"),
    [(None, None, ("gap-isolated", 5)), ("sequential", 7, ("sequential", 7))],
)
async def test_runtime_resolves_scheme_and_k_from_the_checkpoint(
    tuned: Path, monkeypatch, positions, turn_tokens, expected
) -> None:
    seen = []
    monkeypatch.setattr(
        runtime_module, "build_async_llm", lambda info, options: seen.append(options) or _NoEngine()
    )
    rt = Runtime(tuned, positions=positions, turn_tokens=turn_tokens)
    assert rt.positions == positions
    await rt.start()
    try:
        assert (rt.positions, rt.settings.turn_tokens) == expected
        assert seen[0].positions == expected[0], "the engine gets the resolved scheme"
    finally:
        await rt.close()
