"""The KME freezes its startup heap out of the cyclic GC (QKDGW_KME_GC_FREEZE=0: not)."""

from __future__ import annotations

import gc

import pytest

from qkd.kme.service import GC_FREEZE_ENV, freeze_startup_heap


@pytest.fixture
def unfrozen() -> object:
    gc.unfreeze()
    yield None
    gc.unfreeze()


def test_freeze_moves_live_objects_out_of_the_collector(unfrozen: object,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.delenv(GC_FREEZE_ENV, raising=False)
    held = [{"n": i} for i in range(1000)]  # tracked containers, alive at "startup"
    assert gc.get_freeze_count() == 0
    assert freeze_startup_heap() is True
    assert gc.get_freeze_count() >= len(held)
    # Still collectable by reference counting, and new cycles are still found.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


def test_env_zero_leaves_the_collector_alone(unfrozen: object,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GC_FREEZE_ENV, "0")
    assert freeze_startup_heap() is False
    assert gc.get_freeze_count() == 0
