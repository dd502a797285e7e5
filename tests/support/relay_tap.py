"""A tap on one KME-to-KME relay channel (issue 11 tests): a TCP proxy in its own
thread between the dialling KME and the neighbour's relay listener. It passes the
HELLO through, then cuts the stream into relay frames (u32 length + frame) and, per
`rules`, drops or changes the frames it is told to (byte 1 of a frame is its kind:
1 SHARE, 2 ACK, 3/4 ABORT; link-state adverts start with b"L" and are passed on)."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from qkd.network.constants import RELAY_VERSION

HELLO_NONCE, HELLO_MAC = 16, 32
RELAY = RELAY_VERSION  # first byte of a relay frame
SHARE, ACK = 1, 2

# (direction "fwd" dialler -> listener or "back", frame) -> frames to pass on
Rule = Callable[[str, bytes], list[bytes]]


@dataclass
class RelayTap:
    target_port: int
    rule: Rule | None = None
    seen: list[tuple[str, int]] = field(default_factory=list)  # (direction, kind)
    port: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def cut(self) -> None:
        """The link goes down: close every proxied connection and accept no more."""
        done = threading.Event()

        def do() -> None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            done.set()

        self._loop.call_soon_threadsafe(do)
        done.wait(5)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _conn(self, d_reader: asyncio.StreamReader, d_writer: asyncio.StreamWriter
                    ) -> None:
        try:
            l_reader, l_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            d_writer.close()
            return
        self._writers += [d_writer, l_writer]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       direction: str, hello: Callable[[], object]) -> None:
            try:
                writer.write(await hello())  # type: ignore[misc]
                while True:
                    n = struct.unpack(">I", await reader.readexactly(4))[0]
                    frame = await reader.readexactly(n)
                    self.seen.append((direction, frame[1]))
                    out = self.rule(direction, frame) if self.rule else [frame]
                    for f in out:
                        writer.write(struct.pack(">I", len(f)) + f)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def fwd_hello() -> bytes:
            n = await d_reader.readexactly(1)
            return n + await d_reader.readexactly(n[0] + HELLO_NONCE + HELLO_MAC)

        async def back_hello() -> bytes:
            nonce = await l_reader.readexactly(HELLO_NONCE)
            d_writer.write(nonce)
            return await l_reader.readexactly(HELLO_MAC)

        await asyncio.gather(pipe(d_reader, l_writer, "fwd", fwd_hello),
                             pipe(l_reader, d_writer, "back", back_hello))


def flip_first(kind: int, direction: str, at: int = -1) -> Rule:
    """Change one bit of the first frame of `kind` going `direction` (`at`: byte
    offset from the end; -1 is inside the tag, -20 inside a SHARE's ciphertext)."""
    done = False

    def rule(d: str, frame: bytes) -> list[bytes]:
        nonlocal done
        if not done and d == direction and frame[0] == RELAY and frame[1] == kind:
            done = True
            i = len(frame) + at
            return [frame[:i] + bytes([frame[i] ^ 1]) + frame[i + 1:]]
        return [frame]
    return rule


def drop_first(kind: int, direction: str) -> Rule:
    done = False

    def rule(d: str, frame: bytes) -> list[bytes]:
        nonlocal done
        if not done and d == direction and frame[0] == RELAY and frame[1] == kind:
            done = True
            return []
        return [frame]
    return rule


def replay_first(kind: int, direction: str) -> Rule:
    """Send the first frame of `kind` twice."""
    done = False

    def rule(d: str, frame: bytes) -> list[bytes]:
        nonlocal done
        if not done and d == direction and frame[0] == RELAY and frame[1] == kind:
            done = True
            return [frame, frame]
        return [frame]
    return rule
