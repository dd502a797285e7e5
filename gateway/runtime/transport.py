"""Socket details the runtime needs on every TCP transport (no delay, reset on abort)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from qkd.common.log import get_logger

log = get_logger("qkdgw.gateway")

_LINGER_RST = struct.pack("ii", 1, 0)


def _reset_transport(transport: asyncio.BaseTransport | None) -> None:
    """Abort with a TCP RST so the application sees an error, not a clean end."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()  # type: ignore[attr-defined]


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
