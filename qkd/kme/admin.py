"""The KME's admin endpoint (`[admin] listen`): plain-HTTP `/status` (JSON) and
`/metrics` (Prometheus text), separate from the ETSI 014 API.

It shows levels and counters only: pool block counts, link figures (QBER, key rate,
rounds, aborts, authentication failures, pad levels), reservations. Nothing in it is
key material or derived from it beyond counts, so no key ID is listed either. Keep it on
loopback (or a management network): it has no authentication.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qkd.kme.budget import KmeBudget

if TYPE_CHECKING:
    from qkd.kme.service import KmeService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUDGET = web.AppKey("budget", KmeBudget)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def snapshot(service: KmeService, started: float,
                   budget: KmeBudget | None = None,
                   network: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything /status shows; /metrics renders the same numbers."""
    cfg = service.config
    now = time.time()
    out: dict[str, Any] = {
        "kme_id": cfg.kme_id, "peer_kme_id": cfg.peer.kme_id,
        "link_type": cfg.link.type, "uptime_s": round(time.monotonic() - started, 1),
        "max_key_count": cfg.limits.max_key_count, "key_size": cfg.limits.key_size,
    }
    if service.bb84 is not None:
        out["pool"] = await service.store.pool_counts(now)
        link = service.bb84.status()
        lat = service.bb84.reservations.latencies
        link["reservation_latency_p50_s"] = _quantile(lat, 0.5)
        link["reservation_latency_p99_s"] = _quantile(lat, 0.99)
        link["standing_keys"] = service.standing_keys()
        link["reservation_batches"] = service.reservation_batches
        link["reservation_batch_keys"] = service.reservation_batch_keys
        if service.refill is not None:
            link["refill"] = service.refill.snapshot()
        out["link"] = link
    else:
        # The ideal link has no pool, only its token bucket of derivable keys.
        out["pool"] = {"free": service.ideal_level()}
        out["link"] = {"link_type": "ideal", "key_rate": cfg.link.key_rate}
    if budget is not None:
        out["budget"] = budget.snapshot()
    if network is not None:
        # Several links / the relay (qkd.kme.links.network_status): per-neighbour pools.
        out["network"] = network()
    return out


class _KmeCollector(Collector):
    """Renders the snapshot the handler took just before `generate_latest`."""

    def __init__(self) -> None:
        self.snap: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        if not s:
            return
        pool = GaugeMetricFamily("qkdgw_kme_pool_blocks",
                                 "Key blocks in the pool by state (free = stored_key_count)",
                                 labels=["state"])
        for state, n in sorted(s["pool"].items()):
            pool.add_metric([state], n)
        yield pool
        yield GaugeMetricFamily("qkdgw_kme_pool_max_blocks", "max_key_count",
                                value=s["max_key_count"])
        if "budget" in s:
            yield from _budget_metrics(s["budget"])
        if "network" in s:
            yield from _network_metrics(s["network"])
        link = s["link"]
        if link.get("link_type") != "bb84":
            return
        yield GaugeMetricFamily("qkdgw_kme_link_connected",
                                "1 when the peer KME is connected and past HELLO",
                                value=1 if link["connected"] else 0)
        rounds = CounterMetricFamily("qkdgw_kme_link_rounds", "BB84 rounds by outcome",
                                     labels=["outcome"])
        rounds.add_metric(["committed"], link["rounds_committed"])
        rounds.add_metric(["aborted"], link["rounds_aborted"])
        yield rounds
        yield CounterMetricFamily("qkdgw_kme_link_auth_failures",
                                  "Classical-channel frames that failed Wegman-Carter "
                                  "authentication", value=link["auth_failures"])
        yield CounterMetricFamily("qkdgw_kme_link_key_bits", "Secret key bits committed",
                                  value=link["key_bits_total"])
        yield CounterMetricFamily("qkdgw_kme_link_blocks_discarded",
                                  "Key blocks dropped because the pool was at "
                                  "max_key_count", value=link["blocks_discarded"])
        if link["last_qber"] is not None:
            yield GaugeMetricFamily("qkdgw_kme_link_qber",
                                    "Test-basis QBER of the last round that measured one",
                                    value=link["last_qber"])
        yield GaugeMetricFamily("qkdgw_kme_link_secret_key_rate_bps",
                                "Committed key bits per wall-clock second since the "
                                "first round", value=link["secret_key_rate_bps"])
        yield GaugeMetricFamily("qkdgw_kme_link_key_rate_at_source_bps",
                                "Key per pulse times the modelled repetition rate",
                                value=link["key_rate_at_source_bps"])
        pads = GaugeMetricFamily("qkdgw_kme_link_auth_pad_bytes",
                                 "One-time pad bytes left per direction",
                                 labels=["direction"])
        pads.add_metric(["out"], link["auth_pad_bytes_out"])
        pads.add_metric(["in"], link["auth_pad_bytes_in"])
        yield pads
        mode = GaugeMetricFamily("qkdgw_kme_link_auth_mode",
                                 "1 for the classical channel's current key source",
                                 labels=["mode"])
        for m in ("bootstrap", "qkd"):
            mode.add_metric([m], 1 if link["auth_mode"] == m else 0)
        yield mode
        res = CounterMetricFamily("qkdgw_kme_reservations",
                                  "Key reservations between the KMEs", labels=["direction",
                                                                               "outcome"])
        res.add_metric(["sent", "confirmed"], link["reservations_confirmed"])
        res.add_metric(["sent", "failed"], link["reservations_failed"])
        res.add_metric(["received", "applied"], link["reservations_applied"])
        res.add_metric(["received", "refused"], link["reservations_refused"])
        res.add_metric(["received", "lapsed"], link["reservations_lapsed"])
        yield res
        keys = CounterMetricFamily("qkdgw_kme_reservation_keys",
                                   "Keys named in confirmed reservations (sent: ours, "
                                   "received: the peer's recorded here)",
                                   labels=["direction"])
        keys.add_metric(["sent"], link["reservation_keys_confirmed"])
        keys.add_metric(["received"], link["reservation_keys_applied"])
        yield keys
        yield CounterMetricFamily("qkdgw_kme_reservation_batches",
                                  "RESERVE messages enc_keys sent (each covers every "
                                  "request waiting, plus standing top-ups)",
                                  value=link["reservation_batches"])
        yield GaugeMetricFamily("qkdgw_kme_standing_keys",
                                "Keys reserved at both KMEs ahead of enc_keys requests",
                                value=link["standing_keys"])
        if "refill" in link:
            yield GaugeMetricFamily("qkdgw_kme_link_refilling",
                                    "1 while the pool is being refilled (it fell below "
                                    "[link] refill_below, or the draw forecast reached "
                                    "the mark), 0 while rounds wait",
                                    value=int(link["refill"]["refilling"]))
        yield CounterMetricFamily("qkdgw_kme_link_auth_pad_bytes_used",
                                  "One-time pad bytes spent on tags (rounds, reservations, "
                                  "HELLOs), since this link state began",
                                  value=link["auth_pad_bytes_used"])
        yield GaugeMetricFamily("qkdgw_kme_link_reservation_pad_headroom_bytes",
                                "Pad bytes reservations may still spend (smaller "
                                "direction) before they are refused until a round refills",
                                value=link["auth_pad_reservation_headroom_bytes"])
        for name, key, doc in (
                ("state_save_failures", "state_save_failures",
                 "Link state writes that failed (the frames they covered were dropped)"),
                ("connections_refused", "connections_refused",
                 "New classical connections closed without a valid HELLO"),
                ("loop_errors", "loop_errors",
                 "Unexpected errors the link's task loops survived")):
            yield CounterMetricFamily(f"qkdgw_kme_link_{name}", doc, value=link[key])
        lat = GaugeMetricFamily("qkdgw_kme_reservation_latency_seconds",
                                "RESERVE to RESERVE_ACK, over the last 1000 reservations "
                                "sent", labels=["quantile"])
        for q, key in (("0.5", "reservation_latency_p50_s"),
                       ("0.99", "reservation_latency_p99_s")):
            if link[key] is not None:
                lat.add_metric([q], link[key])
        yield lat


def _tte(value: Any) -> float:
    return math.inf if value == "inf" else float(value)


def _budget_metrics(b: dict[str, Any]) -> Iterator[Metric]:
    """Per-peer key budget (qkd/kme/budget.py); a figure not known yet is left out, so
    an alert never sees a 0 "seconds to exhaustion" that only means "no data"."""
    peer = [b["peer"]]

    def gauge(name: str, doc: str, value: Any) -> Metric | None:
        if value is None:
            return None
        g = GaugeMetricFamily(name, doc, labels=["peer"])
        g.add_metric(peer, float(value))
        return g

    pool = b.get("pool", {})
    pad = b.get("auth_pad", {})
    tte = pool.get("seconds_to_empty")
    pad_tte = pad.get("seconds_to_empty")
    for m in (
        gauge("qkdgw_kme_pool_keys", "Free keys in the pool shared with this peer",
              pool.get("level")),
        gauge("qkdgw_kme_key_production_rate", "Keys per second the link adds to the "
              "pool (EWMA)", pool.get("production_rate")),
        gauge("qkdgw_kme_key_consumption_rate", "Keys per second handed to SAEs (EWMA)",
              pool.get("consumption_rate")),
        gauge("qkdgw_kme_pool_net_rate", "Net change of the pool in keys per second "
              "(EWMA; negative: falling)", pool.get("net_rate")),
        gauge("qkdgw_kme_pool_exhaustion_seconds", "Forecast seconds until the pool is "
              "empty at the smoothed net rate (+Inf while steady or growing)",
              None if tte is None else _tte(tte)),
        gauge("qkdgw_kme_link_auth_pad_reserve_bytes", "One-time authentication pad bytes "
              "left (the smaller direction)", pad.get("level")),
        gauge("qkdgw_kme_link_auth_pad_exhaustion_seconds", "Forecast seconds until the "
              "authentication pad runs out (+Inf while steady or refilled)",
              None if pad_tte is None else _tte(pad_tte)),
        gauge("qkdgw_kme_link_last_round_age_seconds", "Seconds since the link last "
              "committed a round (to within the sampling interval)",
              b.get("last_round_age_s")),
        gauge("qkdgw_kme_link_qber_abort_threshold", "QBER above which a round aborts",
              b.get("qber_abort_threshold")),
    ):
        if m is not None:
            yield m


def _network_metrics(n: dict[str, Any]) -> Iterator[Metric]:
    pool = GaugeMetricFamily("qkdgw_kme_neighbour_pool_keys",
                             "Keys in each link's pool, by neighbour KME", labels=["neighbour"])
    bits = CounterMetricFamily("qkdgw_kme_relay_link_key_bits",
                               "Link-key bits the relay used, by neighbour and direction",
                               labels=["neighbour", "direction"])
    up = GaugeMetricFamily("qkdgw_kme_relay_channel_connected",
                           "1 when the neighbour's relay channel is up", labels=["neighbour"])
    for nb, v in sorted(n["neighbours"].items()):
        pool.add_metric([nb], v["pool_keys"])
        if "bits_out" in v:
            bits.add_metric([nb, "out"], v["bits_out"])
            bits.add_metric([nb, "in"], v["bits_in"])
            up.add_metric([nb], 1 if v["connected"] else 0)
    yield pool
    if "relay" in n:
        yield bits
        yield up
        relays = CounterMetricFamily("qkdgw_kme_relay_events", "Relay events at this KME",
                                     labels=["event"])
        for name, value in sorted(n["relay"].items()):
            relays.add_metric([name], value)
        yield relays
        fails = CounterMetricFamily("qkdgw_kme_relay_failures", "Failed relays by reason",
                                    labels=["code"])
        for code, value in sorted(n["failures"].items()):
            fails.add_metric([code], value)
        yield fails
        if n["latency_p50_s"] is not None:
            yield GaugeMetricFamily("qkdgw_kme_relay_latency_p50_s",
                                    "End-to-end relay latency, median of the last 1000",
                                    value=n["latency_p50_s"])


async def ready(service: KmeService) -> tuple[bool, str]:
    """Readiness: the KME can serve keys now (a key in the pool), or is about to (the
    BB84 link is connected and making them; the ideal link produces at a positive rate)."""
    if service.bb84 is not None:
        free = await service.store.free_blocks(time.time())
        if free > 0:
            return True, f"{free} keys in the pool"
        if service.bb84.status()["connected"]:
            return True, "pool empty, link connected"
        return False, "pool empty and the link is not connected"
    if service.ideal_level() > 0 or service.config.link.key_rate > 0:
        return True, "ideal link producing"
    return False, "ideal link with key_rate 0 and an empty bucket"


def build_admin_app(service: KmeService, budget: KmeBudget | None = None,
                    network: Callable[[], dict[str, Any]] | None = None
                    ) -> web.Application:
    started = time.monotonic()
    registry = CollectorRegistry()
    collector = _KmeCollector()
    registry.register(collector)
    budget = budget if budget is not None else KmeBudget(service)

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(await snapshot(service, started, budget, network))

    async def metrics(_request: web.Request) -> web.Response:
        collector.snap = await snapshot(service, started, budget, network)
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE})

    async def on_startup(_app: web.Application) -> None:
        budget.start()

    async def on_cleanup(_app: web.Application) -> None:
        await budget.stop()

    async def readyz(_request: web.Request) -> web.Response:
        ok, why = await ready(service)
        return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    app = web.Application()
    app[BUDGET] = budget
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


__all__ = ["BUDGET", "build_admin_app", "ready", "snapshot"]
