"""A KME with several links (issue 11): one `KmeService` per neighbour, one HTTPS port.

Each neighbour keeps what a one-link KME has: its own link (ideal or BB84, with its
own authenticated classical channel), its own SQLite file (pool, deliveries), its own
pool level. `NetworkRouter` sends an ETSI 014 request to the service of the neighbour
behind whose KME the request's other SAE sits, or to the relay (qkd.kme.relay_service)
when that KME is not a neighbour. SKIP stays on the first neighbour only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from qkd.common.errors import UserError
from qkd.common.log import get_logger
from qkd.etsi014 import messages as etsi014
from qkd.etsi014.messages import BAD_REQUEST, EtsiError, QkdKey
from qkd.kme import skip_api
from qkd.kme.config import KmeConfig, NeighbourConfig
from qkd.kme.service import (
    KmeService,
    RunningKme,
    _bind,
    _etsi_errors,
    _purge_loop,
    _start_admin,
    _warn_ideal,
    open_service,
    server_ssl_context,
)

if TYPE_CHECKING:
    from qkd.kme.relay_service import RelayService

log = get_logger("qkd.kme.links")


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


def build_network_app(router: NetworkRouter) -> web.Application:
    app = web.Application(middlewares=[_etsi_errors], client_max_size=256 * 1024)
    base = etsi014.API_PREFIX + "/{sae_id}"
    app.router.add_get(base + "/status", router.status, allow_head=False)
    app.router.add_get(base + "/enc_keys", router.enc_keys, allow_head=False)
    app.router.add_post(base + "/enc_keys", router.enc_keys)
    app.router.add_get(base + "/dec_keys", router.dec_keys, allow_head=False)
    app.router.add_post(base + "/dec_keys", router.dec_keys)
    skip_api.add_routes(app, router.primary)
    return app


@dataclass
class RunningNetworkKme(RunningKme):
    """A KME with several links and/or a relay; `service` is the first link's."""

    router: NetworkRouter | None = None
    services: list[KmeService] = field(default_factory=list)
    relay: RelayService | None = None

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            if self.relay is not None:
                await self.relay.close()
            for svc in self.services:
                if svc.bb84 is not None:
                    await svc.bb84.close()
            if self.admin_runner is not None:
                await self.admin_runner.cleanup()
            await self._runner.cleanup()
        finally:
            await _close_stores(self.services)


async def _close_stores(services: list[KmeService]) -> None:
    for svc in services:
        with contextlib.suppress(Exception):
            await svc.store.close()


async def start_network_kme(config: KmeConfig, *,
                            clock: Callable[[], float] = time.monotonic) -> RunningNetworkKme:
    """Open every link's store and link, the relay, then serve ETSI 014 on one port."""
    try:
        ssl_ctx = server_ssl_context(config)
    except (OSError, ValueError) as exc:
        raise config.error("[tls] cert", f"cannot load TLS files ({exc})",
                           "check [tls] cert, key and client_ca") from None
    services: list[KmeService] = []
    relay: RelayService | None = None
    runner: web.AppRunner | None = None
    try:
        for nb in config.neighbours:
            sub = neighbour_config(config, nb)
            if nb.link.type == "ideal":
                _warn_ideal(sub)
            services.append(await open_service(sub, clock))
        if config.network is not None:
            from qkd.kme.relay_service import RelayService

            relay = RelayService(config, {s.config.peer.kme_id: s for s in services})
            await relay.start()
        for i, svc in enumerate(services):
            if svc.bb84 is not None:
                try:
                    await svc.bb84.start()
                except OSError as exc:
                    raise UserError(f"{config.source}: [neighbour][{i}] link listen: cannot "
                                    f"listen ({exc.strerror or exc}) (fix: choose free "
                                    "ports for listen and quantum_listen)") from None
        router = NetworkRouter(config, services, relay)
        runner = web.AppRunner(build_network_app(router), access_log=None,
                               shutdown_timeout=5.0)
        await runner.setup()
        try:
            sock = _bind(config.listen.host, config.listen.port)
        except OSError as exc:
            raise UserError(f"{config.source}: [kme] listen: cannot listen on "
                            f"{config.listen} ({exc.strerror or exc}) (fix: choose a free "
                            "port or stop the other process)") from None
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock, ssl_context=ssl_ctx).start()
    except BaseException:
        if relay is not None:
            await relay.close()
        for svc in services:
            if svc.bb84 is not None:
                await svc.bb84.close()
        if runner is not None:
            await runner.cleanup()
        await _close_stores(services)
        raise
    running = RunningNetworkKme(config, config.listen.host, port, services[0], runner,
                                link=services[0].bb84, router=router, services=services,
                                relay=relay)
    running.relay_port = relay.port if relay is not None else None
    for svc in services:
        running.tasks.append(asyncio.create_task(
            _purge_loop(svc.store, config.key_lifetime_s)))
    if config.admin_listen is not None:
        try:
            await _start_admin(running)
        except BaseException:
            await running.close()
            raise
    log.info("kme_started", kme_id=config.kme_id, listen=f"{config.listen.host}:{port}",
             url=running.url, local_saes=list(config.local_sae_ids),
             neighbours={nb.peer.kme_id: {"link_type": nb.link.type,
                                          "saes": list(nb.peer.sae_ids)}
                         for nb in config.neighbours},
             relay_port=running.relay_port,
             remote_saes=dict(config.network.remote_saes) if config.network else {})
    return running


__all__ = ["NetworkRouter", "RunningNetworkKme", "build_network_app", "neighbour_config",
           "start_network_kme"]
