"""The one asyncio TCP relay (issue 10): eve, the rndl recorder and the test attackers.

Listen, dial the upstream for each accepted connection, pump both directions. A
per-direction hook sees every chunk (or every frame, with a framed `read`) and returns
what to send on: the chunk, a changed one, several, or nothing. Backpressure: one
read of at most `CHUNK` bytes (or one frame) is in flight per direction and the relay
waits for the writer to drain before reading again, so a slow side never makes it
buffer more than that. An EOF is passed on as a half-close; a socket error or a
hook's exception aborts both sides (fail closed: nothing half-forwarded lingers).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import struct
from collections.abc import Awaitable, Callable, Iterable

A2B = "a2b"  # from the client that dialled the relay to the upstream
B2A = "b2a"
CHUNK = 1 << 16

# A hook returns the chunks to send on (possibly none), directly or as an awaitable.
Hook = Callable[[bytes], "Iterable[bytes] | Awaitable[Iterable[bytes]]"]
# Reads one unit from a stream; b"" means a clean end of stream.
Reader = Callable[[asyncio.StreamReader], Awaitable[bytes]]
Upstream = tuple[str, int] | Callable[[], tuple[str, int]]


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    return await reader.read(CHUNK)


_LEN = struct.Struct("<I")


def length_prefixed(limit: int) -> Reader:
    """A `read` for u32-little-endian-length-prefixed frames (the KME link's framing):
    each unit is one whole frame, prefix included, so a hook-less direction passes it
    on unchanged. A frame above `limit` or cut short aborts the connection."""

    async def read(reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readexactly(_LEN.size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return b""
        (n,) = _LEN.unpack(head)
        if n > limit:
            raise ValueError(f"frame of {n} bytes above the limit {limit}")
        return head + await reader.readexactly(n)

    return read


def frame(body: bytes) -> bytes:
    """`body` with its length prefix, as `length_prefixed` reads it."""
    return _LEN.pack(len(body)) + body


class RelayConnection:
    """One accepted connection and its upstream. Subclasses override `on_chunk` /
    `on_eof` to see the traffic as something other than chunks to pass on."""

    def __init__(self, relay: TcpRelay, number: int,
                 client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.relay = relay
        self.number = number
        self.readers = {A2B: client[0], B2A: upstream[0]}
        self.writers = {A2B: upstream[1], B2A: client[1]}  # where each direction goes
        self.hooks: dict[str, Hook] = {}
        self.closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(#{self.number})"

    def send(self, direction: str, data: bytes) -> None:
        w = self.writers[direction]
        if not w.is_closing():
            w.write(data)

    def send_eof(self, direction: str) -> None:
        w = self.writers[direction]
        with contextlib.suppress(OSError, RuntimeError):
            if not w.is_closing() and w.can_write_eof():
                w.write_eof()

    def abort(self) -> None:
        for w in self.writers.values():
            w.transport.abort()

    async def on_chunk(self, direction: str, chunk: bytes) -> None:
        hook = self.hooks.get(direction)
        out: Iterable[bytes] = (chunk,) if hook is None else hook(chunk)  # type: ignore[assignment]
        if inspect.isawaitable(out):
            out = await out
        for data in out:
            self.send(direction, data)

    def on_eof(self, direction: str) -> None:
        self.send_eof(direction)

    async def pump(self, direction: str) -> None:
        reader, writer = self.readers[direction], self.writers[direction]
        try:
            while data := await self.relay.read(reader):
                await self.on_chunk(direction, data)
                await writer.drain()
            self.on_eof(direction)
        except Exception:
            # A reset, a malformed frame or a failing hook: both sides go down together.
            self.abort()

    async def run(self) -> None:
        try:
            await asyncio.gather(self.pump(A2B), self.pump(B2A))
        finally:
            for w in self.writers.values():
                w.close()
            self.closed.set()


class TcpRelay:
    """TCP relay listen_host:port -> upstream, one `connection_class` per connection.

    `upstream` is an address or a function giving one per new connection (a test may
    send the next connection elsewhere). `hooks(conn)` gives the per-direction hooks
    of a new connection (state shared by both directions lives in its closure)."""

    def __init__(self, upstream: Upstream, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, read: Reader = read_chunk,
                 hooks: Callable[[RelayConnection], dict[str, Hook]] | None = None,
                 connection_class: type[RelayConnection] = RelayConnection,
                 on_connect: Callable[[RelayConnection], None] | None = None,
                 on_upstream_error: Callable[[OSError], None] | None = None) -> None:
        self.upstream = upstream
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.read = read
        self.hooks = hooks
        self.connection_class = connection_class
        self.on_connect = on_connect
        self.on_upstream_error = on_upstream_error
        self.connections: list[RelayConnection] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def upstream_address(self) -> tuple[str, int]:
        return self.upstream() if callable(self.upstream) else self.upstream

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.listen_host,
                                                  self.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            upstream = await asyncio.open_connection(*self.upstream_address())
        except OSError as exc:
            if self.on_upstream_error is not None:
                self.on_upstream_error(exc)
            writer.transport.abort()
            return
        conn = self.connection_class(self, len(self.connections) + 1, (reader, writer),
                                     upstream)
        if self.hooks is not None:
            conn.hooks = self.hooks(conn)
        self.connections.append(conn)
        if self.on_connect is not None:
            self.on_connect(conn)
        await conn.run()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in self.connections:
            if not c.closed.is_set():
                c.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
