"""Operations view of one gateway: its key budget (what its KME says about the pool it
draws from, forecast with `qkd.budget`), handshake ages, credential and PSK health, as
`/status` fields and Prometheus metrics; plus the admin routes beside `/status` and
`/metrics` (the status page `/`, `/readyz`, `/healthz`).

The gateway sees the pool through ETSI 014 `status` (`stored_key_count`), polled every
`QKDGW_BUDGET_POLL_S` seconds (default 5) while the admin endpoint runs; it knows its own
consumption (QKD keys mixed into sessions), so production is what closes the balance
(net + consumption; other SAEs drawing on the same pool show as lower production).
With this project's KME the Status also carries the link's figures
(`status_extension.qkd_link`: QBER, key rate, pad levels), shown beside the pool; a
vendor KME without them simply leaves those out.

Nothing here is secret: levels, rates, ages, epoch numbers, certificate dates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.runtime.status_page import PAGE_CSP, status_page_html
from qkd.common.budget import BudgetFigures, BudgetForecaster, describe
from qkd.etsi014.client import KmeError

if TYPE_CHECKING:
    from gateway.runtime import Gateway

DEFAULT_POLL_S = 5.0
TAU_S = 30.0
HISTORY_S = 600.0


def _poll_interval() -> float:
    try:
        value = float(os.environ.get("QKDGW_BUDGET_POLL_S", DEFAULT_POLL_S))
    except ValueError:
        return DEFAULT_POLL_S
    return value if value > 0 else DEFAULT_POLL_S


class GatewayOps(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.interval = _poll_interval()
        self.pool = BudgetForecaster(TAU_S)
        self.figures: BudgetFigures | None = None
        self.link: dict[str, Any] | None = None
        self.polls_ok = 0
        self.polls_failed = 0
        self.last_error: str | None = None
        self._last_ok: float | None = None
        self._last_handshake: datetime | None = None
        self.history: deque[tuple[float, float]] = deque(
            maxlen=int(HISTORY_S / self.interval) + 1)
        self._task: asyncio.Task[None] | None = None
        gateway.metrics.registry.register(self)

    # -- sampling ------------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self.gateway.config.peer_site_id

    def consumed_total(self) -> int:
        g = self.gateway
        return g.totals["qkd_keys_consumed"] + sum(
            s.conn.stats.qkd_keys_consumed for s in g.sessions)

    def last_handshake(self) -> datetime | None:
        t = self.gateway.tunnel
        if t is not None and t.last_handshake is not None and (
                self._last_handshake is None or t.last_handshake > self._last_handshake):
            self._last_handshake = t.last_handshake
        return self._last_handshake

    async def poll(self) -> None:
        g = self.gateway
        try:
            status = await g.kme.status(g.config.peer_sae_id)
        except KmeError as exc:
            self.polls_failed += 1
            self.last_error = str(exc)[:200]
            return
        now = time.monotonic()
        self.polls_ok += 1
        self.last_error = None
        self._last_ok = now
        level = status["stored_key_count"]
        if level is not None:
            # None: the key API reports no pool level (SKIP), so there is nothing to
            # forecast from; /status then shows no pool rather than a made-up one.
            self.figures = self.pool.observe(now, level, consumed=self.consumed_total())
            self.history.append((round(time.time(), 1), float(level)))
        ext = status.get("status_extension")
        link = ext.get("qkd_link") if isinstance(ext, dict) else None
        self.link = link if isinstance(link, dict) else None
        self.last_handshake()

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- views ---------------------------------------------------------------------

    def _link_view(self) -> dict[str, Any] | None:
        link = self.link
        if link is None:
            return None
        out = {k: link.get(k) for k in ("connected", "last_qber", "secret_key_rate_bps",
                                         "auth_mode", "rounds_committed", "rounds_aborted")}
        pads = [link.get("auth_pad_bytes_out"), link.get("auth_pad_bytes_in")]
        if all(isinstance(p, int) for p in pads):
            out["auth_pad_bytes"] = min(pads)  # type: ignore[type-var]
        return out

    def status(self) -> dict[str, Any]:
        """The /status "budget" section."""
        now = time.monotonic()
        out: dict[str, Any] = {"peer": self.peer, "poll_interval_s": self.interval,
                               "tau_s": self.pool.tau}
        if self.figures is not None:
            out["pool"] = self.figures.as_dict() | {"words": describe(self.figures)}
        hs = self.last_handshake()
        out["last_handshake_age_s"] = None if hs is None else round(
            (datetime.now(UTC) - hs).total_seconds(), 1)
        out["kme_status"] = {
            "polls_ok": self.polls_ok, "polls_failed": self.polls_failed,
            "last_ok_age_s": None if self._last_ok is None else round(now - self._last_ok, 1),
            "last_error": self.last_error}
        link = self._link_view()
        if link is not None:
            out["link"] = link
        out["history"] = [list(p) for p in self.history]
        return out

    def collect(self) -> Iterator[Metric]:
        peer = [self.peer]

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is None:
                return
            g = GaugeMetricFamily(name, doc, labels=["peer"])
            g.add_metric(peer, float(value))
            yield g

        f = self.figures
        if f is not None:
            yield from gauge("qkdgw_key_pool_keys", "Keys the local KME holds for this "
                             "peer (ETSI 014 stored_key_count)", f.level)
            yield from gauge("qkdgw_key_production_rate", "Keys per second added to the "
                             "pool (EWMA; net + this gateway's consumption)",
                             f.production_rate)
            yield from gauge("qkdgw_key_consumption_rate", "QKD keys per second this "
                             "gateway mixes into sessions (EWMA)", f.consumption_rate)
            yield from gauge("qkdgw_key_pool_net_rate", "Net change of the pool in keys "
                             "per second (EWMA; negative: falling)", f.net_rate)
            yield from gauge("qkdgw_key_pool_exhaustion_seconds", "Forecast seconds until "
                             "the pool is empty (+Inf while steady or growing)",
                             f.seconds_to_empty)
        hs = self.last_handshake()
        if hs is not None:
            yield from gauge("qkdgw_last_handshake_age_seconds", "Seconds since the last "
                             "confirmed handshake with this peer",
                             (datetime.now(UTC) - hs).total_seconds())
        link = self._link_view()
        if link is not None:
            yield from gauge("qkdgw_link_auth_pad_reserve_bytes", "Authentication pad bytes "
                             "the QKD link has left (local KME's view)",
                             link.get("auth_pad_bytes"))
            yield from gauge("qkdgw_link_qber", "QBER of the link's last measured round "
                             "(local KME's view)", link.get("last_qber"))
            yield from gauge("qkdgw_link_secret_key_rate_bps", "The link's committed key "
                             "bits per second (local KME's view)",
                             link.get("secret_key_rate_bps"))
        polls = CounterMetricFamily("qkdgw_kme_status_polls", "ETSI 014 status requests "
                                    "of the budget poller", labels=["outcome"])
        polls.add_metric(["ok"], self.polls_ok)
        polls.add_metric(["failed"], self.polls_failed)
        yield polls
        g = self.gateway
        if g.psk is not None:
            yield GaugeMetricFamily("qkdgw_psk_out_of_step", "1 while this side's PSK epoch "
                                    "is known to differ from the peer's", value=1 if
                                    g.psk.status().out_of_step else 0)
        cert = g.credentials.chain[0] if g.credentials.chain else None
        if cert is not None:
            yield GaugeMetricFamily("qkdgw_certificate_expiry_timestamp_seconds",
                                    "Unix time this site's certificate expires",
                                    value=cert.not_valid_after_utc.timestamp())
        src = g.credential_source
        rev = src.revocation if src is not None else None
        nxt = getattr(getattr(rev, "crl", None), "next_update_utc", None)
        if nxt is not None:
            yield GaugeMetricFamily("qkdgw_crl_next_update_timestamp_seconds",
                                    "Unix time the loaded CRL must be replaced by",
                                    value=nxt.timestamp())


    # -- admin routes --------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Readiness: the tunnel is up (what the site's apps need)."""
        t = self.gateway.tunnel
        if t is not None and t.conn.ready:
            return True, "tunnel up"
        return False, "tunnel down"

    def add_routes(self, app: web.Application) -> None:
        async def readyz(_request: web.Request) -> web.Response:
            ok, why = self.ready()
            return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)

        async def healthz(_request: web.Request) -> web.Response:
            # Answering at all means the event loop runs; a stopping gateway says so.
            alive = not self.gateway._stopping
            return web.json_response({"alive": alive}, status=200 if alive else 503)

        async def page(_request: web.Request) -> web.Response:
            return web.Response(text=status_page_html(), content_type="text/html",
                                charset="utf-8",
                                headers={"Cache-Control": "no-store",
                                         "Content-Security-Policy": PAGE_CSP})

        app.router.add_get("/readyz", readyz)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/", page)


def budget_lines(status: dict[str, Any]) -> list[str]:
    """`qkdgw status` lines for the budget section (the same words as /status)."""
    b = status.get("budget")
    if not isinstance(b, dict):
        return []
    lines = []
    pool = b.get("pool")
    if isinstance(pool, dict):
        lines.append(f"  key budget           {pool.get('words')}")
        rates = [f"{name} {pool[key]:.3g}/s" for name, key in
                 (("production", "production_rate"), ("consumption", "consumption_rate"))
                 if isinstance(pool.get(key), int | float)]
        if rates:
            lines.append(f"                       {', '.join(rates)}")
    else:
        kme = b.get("kme_status", {})
        lines.append("  key budget           not known yet"
                     + (f" (KME status failed: {kme['last_error']})"
                        if kme.get("last_error") else ""))
    link = b.get("link")
    if isinstance(link, dict):
        qber = link.get("last_qber")
        lines.append(f"  qkd link             {'up' if link.get('connected') else 'DOWN'}, "
                     f"QBER {'-' if qber is None else f'{qber:.2%}'}, key rate "
                     f"{link.get('secret_key_rate_bps')} bit/s, auth pad "
                     f"{link.get('auth_pad_bytes')} bytes ({link.get('auth_mode')})")
    age = b.get("last_handshake_age_s")
    lines.append(f"  last handshake       {'never' if age is None else f'{age:.0f} s ago'}")
    return lines


__all__ = ["GatewayOps", "budget_lines"]
