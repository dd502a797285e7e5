"""Socket details the runtime needs on every TCP transport (no delay, reset on abort,
one large read buffer per event-loop thread)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading

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


# Bytes a protocol asks the loop to read at once (asyncio.BufferedProtocol). uvloop's own
# reads stop at 256 KiB; larger reads mean fewer callbacks, and more records per tunnel
# write and per application write, for the same one copy out of the buffer per byte.
READ_SIZE = 1 << 20
_local = threading.local()


def read_buffer() -> memoryview:
    """The read buffer of this thread's event loop, shared by all its protocols: a
    protocol copies what arrived out of it in `buffer_updated`, before the loop can
    read the next socket into it."""
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(READ_SIZE))
    return buf
