"""The local listener for one configured service: accepts application connections and
hands them to the tunnel once it is up."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from gateway.runtime.app_stream import AppStream
from qkd.common.log import get_logger

log = get_logger("qkdgw.gateway")


if TYPE_CHECKING:
    from gateway.runtime.gateway import Gateway



class LocalListener(asyncio.Protocol):
    """Accepts an application connection and attaches it to the tunnel when ready."""

    def __init__(self, gateway: Gateway, service: str) -> None:
        self.gateway = gateway
        self.service = service
        self.app: AppStream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        g = self.gateway
        tunnel = g.tunnel
        app = AppStream(tunnel, None)
        app.connection_made(transport)
        self.app = app
        if tunnel is not None and tunnel.attach_local(app, self.service):
            return
        transport.pause_reading()
        app._reading_paused = True
        g.spawn(self._wait_for_tunnel(app))

    async def _wait_for_tunnel(self, app: AppStream) -> None:
        g = self.gateway
        deadline = asyncio.get_running_loop().time() + g.config.connect_wait
        while not app._done:
            tunnel = g.tunnel
            if tunnel is not None and tunnel.attach_local(app, self.service):
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await g.wait_tunnel(min(remaining, 1.0))
        log.warning("stream.no_tunnel", service=self.service,
                    detail="the tunnel is not up; the application connection is reset")
        app.reset()

    def data_received(self, data: bytes) -> None:
        if self.app is not None:
            self.app.data_received(data)

    def eof_received(self) -> bool:
        return self.app.eof_received() if self.app is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()


# ----------------------------------------------------------------------- the gateway
