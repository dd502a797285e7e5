"""The KME's key budget: samples its pool (and, with the BB84 link, the link's
authentication pads and rounds) on a timer and keeps the forecasts of `qkd.budget`.

Runs beside the admin endpoint (started and stopped with it), because the figures are
only ever read there (`/status`, `/metrics`, the status page).

What is counted, with the BB84 link (one pool per peer KME, label `peer`):
- level: free, unexpired blocks (what `stored_key_count` reports);
- produced: every block the link ever stored (all rows of the pool, whatever state);
- consumed: blocks reserved or delivered to an SAE (blocks that merely expire show in
  the net rate, not in consumption);
- authentication pad: the smaller of the two directions' pad bytes left, consumed =
  pad bytes used;
- the age of the last committed round: the time since `rounds_committed` was last seen
  to grow (so it is known to within one sampling interval).

The ideal link has no counters: its production is its configured `key_rate` while the
bucket is below `max_key_count` (nothing while full), consumption what closes the
balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from qkd.common.budget import BudgetFigures, BudgetForecaster, describe

if TYPE_CHECKING:
    from qkd.kme.service import KmeService

DEFAULT_INTERVAL_S = 2.0
DEFAULT_TAU_S = 30.0


class KmeBudget:
    def __init__(self, service: KmeService, *, interval: float = DEFAULT_INTERVAL_S,
                 tau: float = DEFAULT_TAU_S) -> None:
        self.service = service
        self.interval = interval
        self.pool = BudgetForecaster(tau)
        self.pad = BudgetForecaster(tau)
        self.pool_figures: BudgetFigures | None = None
        self.pad_figures: BudgetFigures | None = None
        self._rounds: int | None = None
        self._round_seen_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.sample_failures = 0

    @property
    def peer(self) -> str:
        return self.service.config.peer.kme_id

    async def sample(self) -> None:
        svc = self.service
        now_m = time.monotonic()
        if svc.bb84 is not None:
            counts = await svc.store.pool_counts(time.time())
            link = svc.bb84.status()
            self.pool_figures = self.pool.observe(
                now_m, counts["free"], produced=sum(counts.values()),
                consumed=counts["reserved"] + counts["delivered"])
            self.pad_figures = self.pad.observe(
                now_m, min(link["auth_pad_bytes_out"], link["auth_pad_bytes_in"]),
                consumed=link["auth_pad_bytes_used"])
            rounds = int(link["rounds_committed"])
            if self._rounds is None or rounds > self._rounds:
                if rounds > 0:
                    self._round_seen_at = now_m
                self._rounds = rounds
        else:
            level = svc.ideal_level()
            fig = self.pool.observe(now_m, level)
            limits = svc.config.limits
            prod = svc.config.link.key_rate if level < limits.max_key_count else 0.0
            if fig.net_rate is not None:
                fig = dataclasses.replace(fig, production_rate=prod,
                                          consumption_rate=max(0.0, prod - fig.net_rate))
            self.pool_figures = fig

    def last_round_age(self, now_m: float | None = None) -> float | None:
        if self._round_seen_at is None:
            return None
        return (time.monotonic() if now_m is None else now_m) - self._round_seen_at

    def snapshot(self) -> dict[str, Any]:
        """The /status "budget" section (figures and the same in words)."""
        out: dict[str, Any] = {"peer": self.peer, "sample_interval_s": self.interval,
                               "tau_s": self.pool.tau}
        if self.pool_figures is not None:
            out["pool"] = self.pool_figures.as_dict() | {"words": describe(self.pool_figures)}
        if self.pad_figures is not None:
            out["auth_pad"] = self.pad_figures.as_dict() | {
                "words": describe(self.pad_figures, unit="bytes", what="auth pad")}
        if self.service.bb84 is not None:
            age = self.last_round_age()
            out["last_round_age_s"] = None if age is None else round(age, 1)
            out["qber_abort_threshold"] = self.service.bb84.s.params.qber_abort
        return out

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except (sqlite3.Error, OSError):
                # The ETSI handlers report store trouble; here it only costs a sample.
                self.sample_failures += 1
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


__all__ = ["KmeBudget"]
