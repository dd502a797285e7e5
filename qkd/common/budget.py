"""Key-budget forecasting: from (time, level) samples of a key pool to smoothed rates and
the time until the pool runs dry. Pure: no I/O, no clock; the caller passes time in.

Smoothing is a continuous-time EWMA of the pool's net rate: each sample contributes its
instantaneous rate `Δlevel / Δt` with weight `1 - exp(-Δt / tau)`. A jump of N keys
therefore moves the estimate by about N / tau whatever the sampling interval, so sampling
faster does not make the forecast noisier, and samples taken at irregular times (a scrape
here, a timer there) are weighted by the time they cover.

Production and consumption are smoothed the same way from monotone counters when the
source has them (the KME's pool: blocks deposited, blocks handed out). When it has only
one of them (a gateway sees the pool level and its own consumption), the other is what
closes the balance: production = net + consumption. Counters that go backwards (a
restarted source) restart the estimate from the new value instead of reporting a bogus
negative rate.

`describe()` turns the figures into the words `qkdgw status` and `/status` print
("pool 612 keys, falling 3/s, dry in ~3 min").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INF = math.inf

# Below this the net rate counts as steady: a pool losing one key a day is not "falling".
STEADY_RATE = 1e-3


@dataclass(frozen=True)
class BudgetFigures:
    """One forecast. Rates are keys (or bytes, for a pad) per second; None: not known yet
    (fewer than two samples)."""

    level: float
    net_rate: float | None
    production_rate: float | None
    consumption_rate: float | None
    # Seconds until the level reaches zero at the smoothed net rate; +inf when the pool
    # is steady or growing; 0.0 when it is already empty; None before two samples.
    seconds_to_empty: float | None
    samples: int
    # Seconds of samples the estimate rests on; below one time constant the rates still
    # carry the noise of the first few samples (one key taken in the first second reads
    # as "falling 1/s"), and the words say so.
    window_s: float = 0.0
    settled: bool = False

    @property
    def trend(self) -> str:
        """'rising', 'falling', 'steady' or 'unknown'."""
        if self.net_rate is None:
            return "unknown"
        if self.net_rate > STEADY_RATE:
            return "rising"
        if self.net_rate < -STEADY_RATE:
            return "falling"
        return "steady"

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly: +inf becomes the string "inf" (JSON has no infinity)."""
        tte = self.seconds_to_empty
        return {
            "level": self.level,
            "net_rate": _round(self.net_rate),
            "production_rate": _round(self.production_rate),
            "consumption_rate": _round(self.consumption_rate),
            "seconds_to_empty": "inf" if tte == INF else _round(tte),
            "trend": self.trend,
            "samples": self.samples,
            "window_s": round(self.window_s, 1),
            "settled": self.settled,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


class _Ewma:
    """EWMA of a derivative over irregular samples."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.rate: float | None = None
        self._last: tuple[float, float] | None = None

    def update(self, t: float, value: float, monotone: bool = False) -> None:
        last = self._last
        if last is None or t < last[0]:
            # First sample, or time went backwards (never with a monotonic clock): restart.
            self._last = (t, value)
            self.rate = None if last is None else self.rate
            return
        dt = t - last[0]
        if dt <= 0:
            # Same instant: keep the newest value; the rate waits for time to pass.
            self._last = (t, value)
            return
        if monotone and value < last[1]:
            # The counter restarted: this interval says nothing about the rate.
            self._last = (t, value)
            return
        inst = (value - last[1]) / dt
        if self.rate is None:
            self.rate = inst
        else:
            alpha = 1.0 - math.exp(-dt / self.tau)
            self.rate += alpha * (inst - self.rate)
        self._last = (t, value)


class BudgetForecaster:
    """Feed `observe()` samples of one pool; read the figures it returns.

    `tau` (seconds) is the smoothing time constant: the forecast follows a change in
    the consumption rate within a few tau. `produced` / `consumed` are optional
    monotone counters (totals since the source started)."""

    def __init__(self, tau: float = 30.0) -> None:
        if not tau > 0:
            raise ValueError("tau must be positive")
        self.tau = tau
        self._net = _Ewma(tau)
        self._prod = _Ewma(tau)
        self._cons = _Ewma(tau)
        self._samples = 0
        self._level = 0.0
        self._first: float | None = None
        self._latest: float | None = None

    def observe(self, t: float, level: float, *, produced: float | None = None,
                consumed: float | None = None) -> BudgetFigures:
        self._samples += 1
        self._level = float(level)
        if self._first is None or t < self._first:
            self._first = t
        self._latest = t
        self._net.update(t, float(level))
        if produced is not None:
            self._prod.update(t, float(produced), monotone=True)
        if consumed is not None:
            self._cons.update(t, float(consumed), monotone=True)
        return self.figures(have_produced=produced is not None,
                            have_consumed=consumed is not None)

    def figures(self, *, have_produced: bool = True, have_consumed: bool = True
                ) -> BudgetFigures:
        net = self._net.rate
        prod = self._prod.rate if have_produced else None
        cons = self._cons.rate if have_consumed else None
        if net is not None:
            # The one counter the source lacks closes the balance.
            if prod is None and cons is not None:
                prod = max(0.0, net + cons)
            elif cons is None and prod is not None:
                cons = max(0.0, prod - net)
        window = 0.0 if self._first is None or self._latest is None else max(
            0.0, self._latest - self._first)
        return BudgetFigures(level=self._level, net_rate=net, production_rate=prod,
                             consumption_rate=cons,
                             seconds_to_empty=seconds_to_empty(self._level, net),
                             samples=self._samples, window_s=window,
                             settled=window >= self.tau)


def seconds_to_empty(level: float, net_rate: float | None) -> float | None:
    """Time until `level` reaches zero at `net_rate`; +inf unless it is falling."""
    if net_rate is None:
        return None
    if level <= 0:
        return 0.0
    if net_rate >= -STEADY_RATE:
        return INF
    return level / -net_rate


def format_duration(seconds: float) -> str:
    """'~45 s', '~3 min', '~5 h', '~2 d'."""
    if seconds == INF:
        return "never"
    if seconds < 90:
        return f"~{max(0, round(seconds))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"~{round(seconds / 3600)} h"
    return f"~{round(seconds / 86400)} d"


def format_rate(rate: float) -> str:
    """Two significant figures at most: '3', '0.25', '1200'."""
    a = abs(rate)
    if a >= 10:
        return f"{a:.0f}"
    if a >= 1:
        return f"{a:.1f}".rstrip("0").rstrip(".")
    return f"{a:.2g}"


def describe(fig: BudgetFigures, unit: str = "keys", what: str = "pool") -> str:
    """The pool in words: 'pool 612 keys, falling 3/s, dry in ~3 min'."""
    head = f"{what} {fig.level:.0f} {unit}"
    if fig.net_rate is None:
        return f"{head}, trend not known yet"
    if fig.level <= 0:
        return f"{head}, EMPTY"
    trend = fig.trend
    if trend == "steady":
        return f"{head}, steady"
    if trend == "rising":
        return f"{head}, rising {format_rate(fig.net_rate)}/s"
    assert fig.seconds_to_empty is not None
    text = (f"{head}, falling {format_rate(fig.net_rate)}/s, dry in "
            f"{format_duration(fig.seconds_to_empty)}")
    if not fig.settled:
        text += f" (estimate from {fig.window_s:.0f} s of data)"
    return text


__all__ = ["INF", "BudgetFigures", "BudgetForecaster", "describe", "format_duration",
           "format_rate", "seconds_to_empty"]
