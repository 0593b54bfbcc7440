"""Admission by KV without an engine: the arithmetic of `runtime.admission`, the capacity read from a
vLLM-shaped engine, and `Runtime.open_session` reserving, refusing and releasing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest

from runtime import runtime as runtime_module
from runtime.admission import (
    KVCapacity,
    blocks_for,
    decide,
    session_blocks,
    sessions_that_fit,
)
from runtime.engine import EngineOptions, kv_capacity
from runtime.errors import SessionLimitReached
from runtime.runtime import Runtime, RuntimeSettings


def test_blocks_round_up_and_a_session_reserves_its_budget_plus_slack() -> None:
    assert [blocks_for(n, 128) for n in (0, 1, 128, 129, 256)] == [0, 1, 1, 2, 2]
    assert session_blocks(768, 128) == 6 + 1  # 6 blocks of budget, one of slack
    assert session_blocks(769, 128) == 7 + 1
    with pytest.raises(ValueError):
        session_blocks(0, 128)
    with pytest.raises(ValueError):
        blocks_for(10, 0)


def test_capacity_leaves_out_the_null_block_and_the_watermark() -> None:
    assert KVCapacity.from_engine(21, 128) == KVCapacity(20, 128)
    assert KVCapacity.from_engine(100, 16, watermark=0.05) == KVCapacity(94, 16)
    assert KVCapacity(20, 128).tokens == 2560
    with pytest.raises(ValueError):
        KVCapacity.from_engine(0, 128)


def test_decide_admits_while_every_reservation_fits_and_says_why_not() -> None:
    capacity = KVCapacity(20, 128)  # 2560 tokens; a 768-token budget reserves 7 blocks (896 tokens)
    assert sessions_that_fit(capacity, 768) == 2
    first = decide(capacity, reserved_blocks=0, sessions=0, budget_tokens=768)
    second = decide(capacity, reserved_blocks=7, sessions=1, budget_tokens=768)
    third = decide(capacity, reserved_blocks=14, sessions=2, budget_tokens=768)
    assert first.admitted and second.admitted and not third.admitted
    assert (third.capacity_tokens, third.reserved_tokens, third.asked_tokens) == (2560, 1792, 896)
    for number in ("2560", "1792", "896", "2 open sessions", "768-token budget"):
        assert number in third.reason, number
    # exactly full is still admitted: the reservation is the worst case, not a target
    assert decide(KVCapacity(14, 128), 7, 1, 768).admitted
    # one budget larger than the whole cache never fits
    assert not decide(KVCapacity(5, 128), 0, 0, 768).admitted


def test_capacity_is_read_from_the_engine_config() -> None:
    engine = SimpleNamespace(
        vllm_config=SimpleNamespace(
            cache_config=SimpleNamespace(num_gpu_blocks=5462, block_size=128),
            scheduler_config=SimpleNamespace(watermark=0.0),
        )
    )
    assert kv_capacity(engine) == KVCapacity(5461, 128)  # type: ignore[arg-type]
    engine.vllm_config.cache_config.num_gpu_blocks = None  # not profiled / not reported
    assert kv_capacity(engine) is None  # type: ignore[arg-type]
    assert kv_capacity(object()) is None  # type: ignore[arg-type]


class _Session:
    """What `Runtime.open_session` builds, without perception or an engine."""

    count = 0

    def __init__(self, runtime: Runtime, **_: object) -> None:
        _Session.count += 1
        self.id = f"sess_{_Session.count}"
        self.session_tokens = 0
        self.rollovers = self.frames_received = self.frames_ingested = self.frames_dropped = 0

    def stats(self) -> _Session:
        return self


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A runtime that believes its engine is up: a 2560-token cache, 768-token budgets."""
    monkeypatch.setattr(runtime_module, "Session", _Session)
    rt = Runtime(engine_options=EngineOptions(max_model_len=1024), budget_tokens=768)
    rt.kv_capacity = KVCapacity(20, 128)
    rt.ready = True
    yield rt
    rt.executor.shutdown()


def test_open_session_reserves_refuses_and_releases(started: Runtime) -> None:
    rt = started
    a, b = rt.open_session(), rt.open_session()
    assert rt.stats()["kv_tokens_reserved"] == 2 * 896 and rt.stats()["kv_capacity_tokens"] == 2560
    with pytest.raises(SessionLimitReached, match="capacity 2560 tokens, 1792 reserved by 2 open sessions"):
        rt.open_session()
    assert len(rt.sessions) == 2  # the refused one left nothing behind
    rt._forget(a)  # what Session.close does once its request is aborted
    assert rt.stats()["kv_tokens_reserved"] == 896
    c = rt.open_session()
    assert set(rt.sessions) == {b.id, c.id}


def test_admission_off_admits_past_the_capacity_but_still_counts(started: Runtime) -> None:
    rt = started
    rt.settings = replace(rt.settings, admission="off")
    for _ in range(3):
        rt.open_session()
    assert rt.stats()["kv_tokens_reserved"] == 3 * 896 > rt.stats()["kv_capacity_tokens"]  # type: ignore[operator]


def test_no_reported_capacity_admits_unchecked(started: Runtime) -> None:
    rt = started
    rt.kv_capacity = None
    for _ in range(5):
        rt.open_session()
    assert rt.stats()["kv_tokens_reserved"] == 0 and rt.stats()["kv_capacity_tokens"] is None


def test_admission_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="admission"):
        RuntimeSettings(admission="maybe")  # type: ignore[arg-type]
