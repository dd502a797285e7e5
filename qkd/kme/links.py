"""A KME with several links (issue 11): one `KmeService` per neighbour, one HTTPS port.

Each neighbour keeps what a one-link KME has: its own link (ideal or BB84, with its
own authenticated classical channel), its own SQLite file (pool, deliveries), its own
pool level. `NetworkRouter` sends an ETSI 014 request to the service of the neighbour
behind whose KME the request's other SAE sits, or to the relay (qkd.kme.relay_service)
when that KME is not a neighbour. SKIP stays on the first neighbour only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from qkd.common.log import get_logger
from qkd.etsi014 import messages as etsi014
from qkd.etsi014.messages import BAD_REQUEST, EtsiError, QkdKey
from qkd.kme import skip_api
from qkd.kme.config import KmeConfig, NeighbourConfig

if TYPE_CHECKING:
    from qkd.kme.relay_service import RelayService
    from qkd.kme.service import KmeService

log = get_logger("qkd.kme.links")
Middleware = Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]],
                      Awaitable[web.StreamResponse]]


def neighbour_config(config: KmeConfig, nb: NeighbourConfig) -> KmeConfig:
    """The one-link view of `config` that a neighbour's KmeService runs on."""
    return dataclasses.replace(config, peer=nb.peer, link=nb.link, db=nb.db,
                               neighbours=(nb,), network=None)


class NetworkRouter:
    """The ETSI 014 handlers of a KME with several links: pick the link by SAE."""

    def __init__(self, config: KmeConfig, services: list[KmeService],
                 relay: RelayService | None) -> None:
        self.config = config
        self.services = services
        self.primary = services[0]
        self.relay = relay
        self._by_sae = {sae: svc for svc in services for sae in svc.config.peer.sae_ids}

    def caller(self, request: web.Request) -> str:
        return self.primary.caller(request)

    def service_for(self, sae_id: str) -> KmeService | None:
        return self._by_sae.get(sae_id)

    def _unknown(self, sae_id: str, role: str) -> EtsiError:
        return EtsiError(BAD_REQUEST, f"unknown {role} SAE {sae_id!r}: not behind a "
                         f"neighbour of KME {self.config.kme_id!r} nor in its [network]",
                         [{"parameter": f"{role}_SAE_ID", "reason": "unknown SAE"}])

    async def _dispatch(self, request: web.Request, role: str, name: str
                        ) -> web.StreamResponse:
        caller = self.caller(request)  # 401 before anything about the path's SAE
        sae_id = request.match_info["sae_id"]
        svc = self.service_for(sae_id)
        if svc is not None:
            handler: Callable[[web.Request], object] = getattr(svc, name)
            return await handler(request)  # type: ignore[misc, no-any-return]
        if self.relay is not None and self.relay.serves(sae_id):
            return await getattr(self.relay, name)(request, caller)  # type: ignore[no-any-return]
        raise self._unknown(sae_id, role)

    async def status(self, request: web.Request) -> web.StreamResponse:
        return await self._dispatch(request, "slave", "status")

    async def enc_keys(self, request: web.Request) -> web.StreamResponse:
        return await self._dispatch(request, "slave", "enc_keys")

    async def dec_keys(self, request: web.Request) -> web.StreamResponse:
        return await self._dispatch(request, "master", "dec_keys")

    async def deliver_master(self, caller: str, slave: str, number: int,
                             size: int) -> list[QkdKey]:
        svc = self.service_for(slave)
        if svc is not None:
            return await svc.deliver_master(caller, slave, number, size)
        if self.relay is not None and self.relay.serves(slave):
            return await self.relay.deliver_master(caller, slave, number, size)
        raise self._unknown(slave, "slave")

    async def deliver_slave(self, master: str, caller: str,
                            key_ids: list[str]) -> list[QkdKey]:
        svc = self.service_for(master)
        if svc is not None:
            return await svc.deliver_slave(master, caller, key_ids)
        if self.relay is not None and self.relay.serves(master):
            return await self.relay.deliver_slave(master, caller, key_ids)
        raise self._unknown(master, "master")

    def pools(self) -> dict[str, int]:
        """Keys each link's pool could hand out now, by neighbour KME."""
        return {svc.config.peer.kme_id: svc.ideal_level() if svc.bb84 is None
                else -1 for svc in self.services}


def build_network_app(router: NetworkRouter, errors: Middleware) -> web.Application:
    """Like qkd.kme.service.build_app, with the router's handlers (`errors`: that
    module's ETSI error middleware)."""
    app = web.Application(middlewares=[errors], client_max_size=256 * 1024)
    base = etsi014.API_PREFIX + "/{sae_id}"
    app.router.add_get(base + "/status", router.status, allow_head=False)
    app.router.add_get(base + "/enc_keys", router.enc_keys, allow_head=False)
    app.router.add_post(base + "/enc_keys", router.enc_keys)
    app.router.add_get(base + "/dec_keys", router.dec_keys, allow_head=False)
    app.router.add_post(base + "/dec_keys", router.dec_keys)
    skip_api.add_routes(app, router.primary)
    return app


def network_status(services: list[KmeService], relay: RelayService | None
                   ) -> dict[str, Any]:
    """The admin /status `network` section: every link's pool, and the relay's view."""
    out: dict[str, Any] = relay.snapshot() if relay is not None else {}
    nbs = out.setdefault("neighbours", {})
    for svc in services:
        entry = nbs.setdefault(svc.config.peer.kme_id, {})
        entry["link_type"] = svc.config.link.type
        if svc.bb84 is None:
            rate = svc.config.link.key_rate
            entry["key_rate"] = "inf" if math.isinf(rate) else rate
        entry["saes"] = list(svc.config.peer.sae_ids)
        entry.setdefault("pool_keys", svc.ideal_level() if svc.bb84 is None
                         else svc.bb84.status().get("pool_free_blocks", -1))
    return out


__all__ = ["NetworkRouter", "build_network_app", "neighbour_config", "network_status"]
