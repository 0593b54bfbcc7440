"""MemoryConfig: defaults by model width, on/off switches, and the memories it builds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.memory import MemoryConfig, SlotMemory, TitansMemory


@pytest.mark.parametrize(
    ("hidden", "grid", "rank"),
    [(64, (4, 4), 64), (1536, (6, 6), 256), (2048, (6, 6), 256), (3584, (8, 8), 512), (8192, (8, 8), 512)],
)
def test_defaults_by_hidden_size(hidden, grid, rank):
    cfg = MemoryConfig.for_hidden_size(hidden)
    assert cfg.slot_grid == grid and cfg.num_slots == grid[0] * grid[1]
    assert cfg.titans_rank == rank and cfg.beta == pytest.approx(math.sqrt(hidden))
    assert cfg.use_slots and cfg.use_titans and cfg.mode == "spatial"
    assert cfg.decay == pytest.approx(math.log(2) / 600)


def test_overrides_and_switches():
    cfg = MemoryConfig.for_hidden_size(64, mode="prototype", slot_grid=(2, 2), decay=0.0)
    assert (cfg.mode, cfg.slot_grid, cfg.decay) == ("prototype", (2, 2), 0.0)
    off = MemoryConfig.for_hidden_size(64, enabled=False)
    assert not off.use_slots and not off.use_titans
    assert off.build_slots(64) is None and off.build_titans(64) is None
    only_titans = MemoryConfig(slots_enabled=False)
    assert only_titans.build_slots(8) is None and isinstance(only_titans.build_titans(8), TitansMemory)
    with pytest.raises(ValueError):
        MemoryConfig(mode="nearest")
    with pytest.raises(ValueError):
        MemoryConfig(slot_grid=(0, 4))


def test_built_memories_carry_the_config_and_work_together():
    """Titans surprise of each step as the slot score bonus: the surprising step dominates its slots."""
    cfg = MemoryConfig.for_hidden_size(32, slot_grid=(1, 1), decay=0.0, surprise_weight=4.0, titans_rank=16)
    slots, titans = cfg.build_slots(32), cfg.build_titans(32)
    assert isinstance(slots, SlotMemory) and isinstance(titans, TitansMemory)
    assert (slots.slot_grid, slots.decay, titans.rank) == ((1, 1), 0.0, 16)
    rng = np.random.default_rng(0)
    calm, event = rng.standard_normal((2, 32)) * 3
    steps = [calm + 0.01 * rng.standard_normal((4, 32)) for _ in range(8)]
    steps.append(event + 0.01 * rng.standard_normal((4, 32)))
    for i, step in enumerate(steps):
        bonus = cfg.surprise_weight * titans.observe(step)
        slots.write(step, float(i), bonus=bonus, grid=(1, 2, 2))
    out = slots.read()[0]
    plain_mean = np.concatenate(steps).mean(axis=0)
    assert np.linalg.norm(out - event) < 0.5 * np.linalg.norm(plain_mean - event)
