"""qkd.common.tcp_relay on real loopback sockets: pass-through, hooks that change,
record and drop chunks, framed reads, half-close both ways, upstream failures and
bounded buffering."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from qkd.common.tcp_relay import (
    A2B,
    B2A,
    CHUNK,
    Hook,
    RelayConnection,
    TcpRelay,
    frame,
    length_prefixed,
)


class Echo:
    """Upstream: answers each connection's whole input, after its EOF, with its digest."""

    def __init__(self, framed: bool = False) -> None:
        self.received: list[bytes] = []
        self.port = 0
        self.framed = framed

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()
        self.received.append(data)
        answer = hashlib.sha256(data).digest() + data[:8]
        w.write(frame(answer) if self.framed else answer)
        await w.drain()
        w.close()

    async def start(self) -> asyncio.base_events.Server:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    server = await e.start()
    try:
        yield e
    finally:
        server.close()


async def _exchange(port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    await w.drain()
    w.write_eof()  # the relay must carry the half-close, or the echo never answers
    reply = await asyncio.wait_for(r.read(), 10)
    w.close()
    return reply


async def test_pass_through_and_half_close(echo: Echo) -> None:
    relay = TcpRelay(("127.0.0.1", echo.port))
    port = await relay.start()
    payload = bytes(range(256)) * 3000  # several chunks
    try:
        reply = await _exchange(port, payload)
    finally:
        await relay.close()
    assert echo.received == [payload]
    assert reply == hashlib.sha256(payload).digest() + payload[:8]
    assert relay.connections[0].closed.is_set()


async def test_hooks_transform_record_and_drop(echo: Echo) -> None:
    seen: dict[str, bytearray] = {A2B: bytearray(), B2A: bytearray()}

    def hooks(conn: RelayConnection) -> dict[str, Hook]:
        def up(data: bytes) -> list[bytes]:
            seen[A2B] += data
            return [data.replace(b"secret", b"SECRET"), b"!"]

        async def down(data: bytes) -> list[bytes]:
            seen[B2A] += data
            return []  # nothing reaches the client

        return {A2B: up, B2A: down}

    relay = TcpRelay(("127.0.0.1", echo.port), hooks=hooks)
    port = await relay.start()
    try:
        reply = await _exchange(port, b"a secret")
    finally:
        await relay.close()
    assert echo.received == [b"a SECRET!"]
    assert reply == b""
    assert bytes(seen[A2B]) == b"a secret"
    assert bytes(seen[B2A]) == hashlib.sha256(b"a SECRET!").digest() + b"a SECRET"


async def test_framed_reads_hand_whole_frames_and_abort_on_an_oversized_one() -> None:
    echo = Echo(framed=True)
    server = await echo.start()
    units: list[bytes] = []

    def hooks(conn: RelayConnection) -> dict[str, Hook]:
        return {A2B: lambda d: (units.append(d), [d])[1]}

    relay = TcpRelay(("127.0.0.1", echo.port), read=length_prefixed(100), hooks=hooks)
    port = await relay.start()
    try:
        wire = frame(b"x" * 50) + frame(b"") + frame(b"y" * 100)
        reply = await _exchange(port, wire)
        assert units == [frame(b"x" * 50), frame(b""), frame(b"y" * 100)]
        assert echo.received[0] == wire
        assert reply == frame(hashlib.sha256(wire).digest() + wire[:8])
        # A frame above the limit: the connection goes down both ways, nothing passes.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(frame(b"z" * 101))
        await w.drain()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        await asyncio.sleep(0.1)
        assert all(b"z" not in got for got in echo.received)
    finally:
        await relay.close()
        server.close()


async def test_upstream_down_closes_the_client() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    errors: list[OSError] = []
    relay = TcpRelay(("127.0.0.1", dead), on_upstream_error=errors.append)
    port = await relay.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            got = await asyncio.wait_for(r.read(), 10)
            if got == b"":
                raise asyncio.IncompleteReadError(got, 1)
        w.close()
    finally:
        await relay.close()
    assert len(errors) == 1 and relay.connections == []


async def test_backpressure_bounds_what_the_relay_buffers() -> None:
    # An upstream that never reads: the relay must stop reading from the client once
    # its writer is full, so its own buffer stays at about a chunk plus the high-water
    # mark and the client's writes stall, instead of the relay holding everything.
    stalled: list[asyncio.StreamWriter] = []

    async def never_read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        stalled.append(w)
        await asyncio.sleep(30)

    upstream = await asyncio.start_server(never_read, "127.0.0.1", 0)
    relay = TcpRelay(("127.0.0.1", upstream.sockets[0].getsockname()[1]))
    port = await relay.start()
    total = 256 << 20
    sent = 0
    try:
        _r, w = await asyncio.open_connection("127.0.0.1", port)

        async def flood() -> None:
            nonlocal sent
            block = bytes(1 << 20)
            while sent < total:
                w.write(block)
                await w.drain()
                sent += len(block)

        task = asyncio.ensure_future(flood())
        await asyncio.sleep(1.5)
        assert not task.done() and sent < total
        buffered = relay.connections[0].writers[A2B].transport.get_write_buffer_size()
        assert buffered <= CHUNK + (64 << 10)
        task.cancel()
        w.transport.abort()
    finally:
        await relay.close()
        upstream.close()
