"""A man in the middle on the KME-to-KME classical TCP connection, as its own process:

    python _qkd_tamper_relay.py --forward 127.0.0.1:PORT --port-file F --mode-file M

Alice's KME dials it instead of Bob's `[link] listen`; it dials Bob and moves the
u32-length-prefixed frames both ways (through qkd.common.tcp_relay). Before each
frame it reads the mode file, so a test can switch attacks on one running pair:

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

from qkd.common.tcp_relay import (
    A2B,
    B2A,
    Hook,
    RelayConnection,
    TcpRelay,
    length_prefixed,
)
from qkd.common.tcp_relay import frame as framed

HELLO, ROUND_START, PP, TRANSCRIPT = 1, 2, 3, 4
_FRAME_LIMIT = 64 << 20  # the KME reader has its own, smaller limit


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def forge_round_start(frame: bytes) -> bytes:
    """Same frame with the next pad offset and one nonce digit changed: only the tag
    can tell (and it was made for the original)."""
    kind, offset = frame[0], struct.unpack_from("<Q", frame, 1)[0]
    body = bytearray(frame[25:])
    i = body.index(b'"nonce":"') + len(b'"nonce":"')
    body[i] = ord("1") if body[i] != ord("1") else ord("2")
    return bytes([kind]) + struct.pack("<Q", offset + 16) + frame[9:25] + bytes(body)


class TamperConnection(RelayConnection):
    def on_eof(self, direction: str) -> None:
        say(action="closed", direction=direction)
        super().on_eof(direction)


class Relay:
    def __init__(self, forward: tuple[str, int], mode_file: Path) -> None:
        self.forward = forward
        self.mode_file = mode_file

    def mode(self) -> str:
        try:
            return self.mode_file.read_text().strip() or "pass"
        except OSError:
            return "pass"

    def hooks(self, conn: RelayConnection) -> dict[str, Hook]:
        say(action="connected")
        state = {"pp_flipped": True}  # shared by both directions of this connection

        def tamper(direction: str) -> Hook:
            def hook(data: bytes) -> list[bytes]:
                f = data[4:]
                mode, kind = self.mode(), f[0]
                out = [f]
                if direction == A2B and kind == ROUND_START:
                    state["pp_flipped"] = False
                    if mode == "replay":
                        out = [f, f]
                    elif mode == "inject":
                        out = [f, forge_round_start(f)]
                elif (mode == "flip-pp" and direction == A2B and kind == PP
                      and not state["pp_flipped"] and len(f) >= 40):
                    state["pp_flipped"] = True
                    bad = bytearray(f)
                    bad[-1] ^= 0x01
                    out = [bytes(bad)]
                elif mode == "drop" and direction == B2A and kind == TRANSCRIPT:
                    out = []
                if out != [f]:
                    say(action=mode, direction=direction, kind=kind, frames=len(out))
                return [framed(x) for x in out]

            return hook

        return {A2B: tamper(A2B), B2A: tamper(B2A)}

    def relay(self) -> TcpRelay:
        return TcpRelay(self.forward, read=length_prefixed(_FRAME_LIMIT), hooks=self.hooks,
                        connection_class=TamperConnection,
                        on_upstream_error=lambda exc: say(action="forward_failed",
                                                          error=str(exc)))


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--forward", required=True)
    p.add_argument("--port-file", required=True, type=Path)
    p.add_argument("--mode-file", required=True, type=Path)
    args = p.parse_args()
    host, _, port = args.forward.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        sys.exit("loopback only")
    relay = Relay((host, int(port)), args.mode_file).relay()
    bound = await relay.start()
    tmp = args.port_file.with_name(args.port_file.name + f".tmp{os.getpid()}")
    tmp.write_text(str(bound))
    os.replace(tmp, args.port_file)
    await relay.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
