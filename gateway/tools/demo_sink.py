"""The demo's service at site B: reads each connection to its end, answers with a digest.

Reply per connection: 8-byte big-endian byte count, then the SHA-256 of everything
received. The sender compares both with what it sent, so every byte is checked end to
end through the tunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import signal
from pathlib import Path

from qkd.common.files import write_atomic


class SinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._count = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._hash.update(data)
        self._count += len(data)

    def eof_received(self) -> bool:
        assert self._transport is not None
        self._transport.write(self._count.to_bytes(8, "big") + self._hash.digest())
        self._transport.close()
        return True


async def serve(host: str, port: int, port_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, port)
    bound = server.sockets[0].getsockname()[1]
    if port_file is not None:
        write_atomic(port_file, f"{bound}\n", 0o644)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="qkdgw demo sink service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.port_file))


if __name__ == "__main__":
    main()
