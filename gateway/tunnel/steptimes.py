"""Optional per-step timing of handshakes (ML-KEM, ML-DSA, ETSI 014, SQLite commits).

Off unless a benchmark calls `enable()` (benchmarks/handshake_latency.py): `step()`
then hands back one shared no-op context manager, so the real code path pays a global
read and a no-op `with` per step, a few per handshake. On, each step adds its wall time
and a count under its name; `take()` returns the totals since the last `take()` and
starts again. Process-wide on purpose: a benchmark running both gateways in one process
sums the steps of both sides of a handshake. Names and times only, never data.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from time import perf_counter
from types import TracebackType

__all__ = ["disable", "during", "enable", "enabled", "step", "take"]

# name -> [seconds, count]; None when off.
_totals: dict[str, list[float]] | None = None
_NULL: AbstractContextManager[None] = nullcontext()
_suffix = ""  # " (...)" while `during` is active


class _Step:
    __slots__ = ("name", "t0")

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        totals = _totals
        if totals is None:  # switched off while the step ran
            return
        slot = totals.get(self.name)
        if slot is None:
            totals[self.name] = [perf_counter() - self.t0, 1.0]
        else:
            slot[0] += perf_counter() - self.t0
            slot[1] += 1


def step(name: str) -> AbstractContextManager[None]:
    """Time the `with` body under `name` when timing is on; a no-op otherwise."""
    return _NULL if _totals is None else _Step(name + _suffix)


class during:
    """Steps inside run beside another step (work done while a KME request is out):
    they are named "<name> (during <what>)", so a breakdown does not count them twice."""

    __slots__ = ("previous", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.previous = ""

    def __enter__(self) -> None:
        global _suffix
        self.previous = _suffix
        _suffix = f" (during {self.what})"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _suffix
        _suffix = self.previous


def enable() -> None:
    global _totals
    _totals = {}


def disable() -> None:
    global _totals
    _totals = None


def enabled() -> bool:
    return _totals is not None


def take() -> dict[str, tuple[float, int]]:
    """{name: (seconds, count)} since the last take (empty when off); resets the totals."""
    global _totals
    if _totals is None:
        return {}
    out = {name: (v[0], int(v[1])) for name, v in _totals.items()}
    _totals = {}
    return out
