"""SKIP (draft-cisco-skip) beside ETSI 014 on the KME's HTTPS port, same mutual TLS.

The handlers only translate: the caller is identified and authorised exactly as for ETSI
014 (client certificate CN = a local SAE; `remoteSystemID` = an SAE of the peer KME), and
keys come from `KmeService.deliver_master` / `deliver_slave`, so a key is delivered once
to each end whichever API each end uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from qkd.etsi014.messages import BAD_REQUEST, EtsiError
from qkd.kme.http import query_lists
from qkd.skip import messages as skip

if TYPE_CHECKING:
    from qkd.kme.service import KmeService


class SkipApi:
    def __init__(self, service: KmeService) -> None:
        self.service = service
        self._remotes = frozenset(service.config.peer.sae_ids)

    async def capabilities(self, request: web.Request) -> web.Response:
        caller = self.service.caller(request)
        if request.query:
            raise EtsiError(BAD_REQUEST, "capabilities takes no query parameters")
        return web.json_response(skip.build_capabilities(
            entity_info=f"qkd-gateway KME {self.service.config.kme_id}", local_id=caller,
            remotes=sorted(self._remotes), limits=self.service.config.limits))

    async def new_key(self, request: web.Request) -> web.Response:
        caller = self.service.caller(request)
        remote, size = skip.parse_new_key(query_lists(request), self.service.config.limits,
                                          self._remotes)
        (key,) = await self.service.deliver_master(caller, remote, 1, size)
        return web.json_response(skip.build_key(key))

    async def key_by_id(self, request: web.Request) -> web.Response:
        caller = self.service.caller(request)
        remote, key_id = skip.parse_key_by_id(request.match_info["key_id"],
                                              query_lists(request), self._remotes)
        try:
            (key,) = await self.service.deliver_slave(remote, caller, [key_id])
        except EtsiError as exc:
            if exc.status != BAD_REQUEST:
                raise
            # Unknown, expired or already delivered: for SKIP, no key by that ID.
            raise EtsiError(skip.NOT_FOUND, f"keyId not available: {exc.message}",
                            exc.details) from None
        return web.json_response(skip.build_key(key))


def add_routes(app: web.Application, service: KmeService) -> None:
    api = SkipApi(service)
    app.router.add_get(skip.CAPABILITIES_PATH, api.capabilities, allow_head=False)
    app.router.add_get(skip.KEY_PATH, api.new_key, allow_head=False)
    app.router.add_get(skip.KEY_PATH + "/{key_id}", api.key_by_id, allow_head=False)
