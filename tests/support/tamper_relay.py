"""A man in the middle on the KME-to-KME classical TCP connection, as its own process:

    python _qkd_tamper_relay.py --forward 127.0.0.1:PORT --port-file F --mode-file M

Alice's KME dials it instead of Bob's `[link] listen`; it dials Bob and moves the
u32-length-prefixed frames both ways. Before each frame it reads the mode file, so a
test can switch attacks on one running pair:

    pass       forward everything unchanged (the positive control)
    flip-pp    flip the last bit of Alice's first post-processing frame of each round
    replay     send each ROUND_START to Bob twice
    inject     after each ROUND_START, inject a forged one (nonce changed, next offset)
    drop       drop Bob's TRANSCRIPT frames

Every action is printed as a JSON line on stdout. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
from pathlib import Path

HELLO, ROUND_START, PP, TRANSCRIPT = 1, 2, 3, 4
_LEN = struct.Struct("<I")


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


async def read_frame(r: asyncio.StreamReader) -> bytes:
    (n,) = _LEN.unpack(await r.readexactly(4))
    return await r.readexactly(n)


def write_frame(w: asyncio.StreamWriter, data: bytes) -> None:
    w.write(_LEN.pack(len(data)) + data)


def forge_round_start(frame: bytes) -> bytes:
    """Same frame with the next pad offset and one nonce digit changed: only the tag
    can tell (and it was made for the original)."""
    kind, offset = frame[0], struct.unpack_from("<Q", frame, 1)[0]
    body = bytearray(frame[25:])
    i = body.index(b'"nonce":"') + len(b'"nonce":"')
    body[i] = ord("1") if body[i] != ord("1") else ord("2")
    return bytes([kind]) + struct.pack("<Q", offset + 16) + frame[9:25] + bytes(body)


class Relay:
    def __init__(self, forward: tuple[str, int], mode_file: Path) -> None:
        self.forward = forward
        self.mode_file = mode_file

    def mode(self) -> str:
        try:
            return self.mode_file.read_text().strip() or "pass"
        except OSError:
            return "pass"

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.forward)
        except OSError as exc:
            say(action="forward_failed", error=str(exc))
            w.close()
            return
        say(action="connected")
        state = {"pp_flipped": True}
        await asyncio.gather(self.pump(r, uw, "a2b", state), self.pump(ur, w, "b2a", state),
                             return_exceptions=True)
        w.close()
        uw.close()

    async def pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str,
                   state: dict[str, bool]) -> None:
        try:
            while True:
                frame = await read_frame(r)
                mode, kind = self.mode(), frame[0]
                out = [frame]
                if direction == "a2b" and kind == ROUND_START:
                    state["pp_flipped"] = False
                    if mode == "replay":
                        out = [frame, frame]
                    elif mode == "inject":
                        out = [frame, forge_round_start(frame)]
                elif (mode == "flip-pp" and direction == "a2b" and kind == PP
                      and not state["pp_flipped"] and len(frame) >= 40):
                    state["pp_flipped"] = True
                    bad = bytearray(frame)
                    bad[-1] ^= 0x01
                    out = [bytes(bad)]
                elif mode == "drop" and direction == "b2a" and kind == TRANSCRIPT:
                    out = []
                if out != [frame]:
                    say(action=mode, direction=direction, kind=kind, frames=len(out))
                for f in out:
                    write_frame(w, f)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            say(action="closed", direction=direction)
        finally:
            w.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--forward", required=True)
    p.add_argument("--port-file", required=True, type=Path)
    p.add_argument("--mode-file", required=True, type=Path)
    args = p.parse_args()
    host, _, port = args.forward.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        sys.exit("loopback only")
    relay = Relay((host, int(port)), args.mode_file)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    tmp = args.port_file.with_name(args.port_file.name + f".tmp{os.getpid()}")
    tmp.write_text(str(server.sockets[0].getsockname()[1]))
    os.replace(tmp, args.port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
