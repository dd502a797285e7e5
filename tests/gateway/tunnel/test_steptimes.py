"""The optional per-step timing hook: a no-op when off, names and counts when on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from gateway.tunnel import steptimes


@pytest.fixture(autouse=True)
def off_afterwards() -> Iterator[None]:
    yield
    steptimes.disable()


def test_off_records_nothing() -> None:
    assert not steptimes.enabled()
    with steptimes.step("x"):
        pass
    assert steptimes.take() == {}


def test_on_sums_per_name_and_take_resets() -> None:
    steptimes.enable()
    for _ in range(3):
        with steptimes.step("a"):
            time.sleep(0.001)
    with steptimes.during("ETSI 014"), steptimes.step("b"):
        pass
    with steptimes.step("b"):
        pass
    got = steptimes.take()
    assert set(got) == {"a", "b (during ETSI 014)", "b"}
    assert got["a"][1] == 3 and got["a"][0] >= 0.003
    assert got["b"][1] == 1 and got["b (during ETSI 014)"][1] == 1
    assert steptimes.take() == {}


def test_disabled_while_a_step_runs_is_harmless() -> None:
    steptimes.enable()
    with steptimes.step("a"):
        steptimes.disable()
    assert steptimes.take() == {}
