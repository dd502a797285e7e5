"""What a compromised trusted node gives an attacker (issue 11's rndl scenario).

The attacker records the relay frames on the node's hops and takes the node's files as
its KME process left them (config, link secrets, key store, relay store). The node's
link keys open every SHARE it received; a key relayed over one path is that share (the
AMD-encoded key E(K) = K | x | t, decoded here), a key split over k node-disjoint paths
needs the other shares, which never reach it.
Used by `qkdgw demo --topology ... --compromise NODE` and the relay process tests.
Key material is only ever shown as `fingerprint()`: the first 8 hex of its SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import struct
import sys
import threading
import tomllib
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkd.common.tcp_relay import A2B, B2A, RelayConnection, TcpRelay
from qkd.kme.relay_service import link_stream
from qkd.link.ideal import load_link_secret
from qkd.network import amd
from qkd.network.constants import AMD_BYTES, PAD_BYTES, RELAY_VERSION
from qkd.network.relay import Kind, Share, decode_frame

# The relay channel's opening (see tests/support/relay_tap.py): the dialler's HELLO
# (u8 n, n bytes of name, nonce, MAC), the listener's nonce then its MAC; then frames
# of u32 big-endian length + body.
_HELLO_NONCE, _HELLO_MAC = 16, 32
_LEN = struct.Struct(">I")


def fingerprint(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


@dataclass(frozen=True)
class Recorded:
    """One relay frame seen on a hop: who sent it to whom (KME ids) and its body."""

    sender: str
    receiver: str
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class NodeShare:
    """One share of a relayed key that a node could open."""

    index: int
    count: int
    share: bytes = field(repr=False)


def shares_from_frames(link_secret: Callable[[str], bytes], node: str,
                       frames: Iterable[Recorded]) -> dict[str, list[NodeShare]]:
    """key id -> the shares `node` can open: each SHARE frame it received, decrypted
    with the pad of that hop, which `link_secret(neighbour)` (the node's own link key
    material) gives."""
    out: dict[str, list[NodeShare]] = {}
    for rec in frames:
        if rec.receiver != node or len(rec.body) < 2 or rec.body[1] != Kind.SHARE:
            continue
        msg, offset, _tag, _signed = decode_frame(rec.body)
        assert isinstance(msg, Share)
        # The hop's pad stream: the tag pad first, then the share's pad.
        pad = link_stream(link_secret(rec.sender), rec.sender, node, offset + PAD_BYTES,
                          len(msg.ciphertext))
        share = bytes(x ^ y for x, y in zip(msg.ciphertext, pad, strict=True))
        out.setdefault(str(uuid.UUID(bytes=msg.key_id)), []).append(
            NodeShare(msg.share_index, msg.share_count, share))
    return out


def rebuild(shares: list[NodeShare]) -> bytes | None:
    """The key, if every one of its shares is there and their XOR is a valid AMD
    encoding E(K) (as the destination checks it), else None."""
    if not shares or {s.index for s in shares} != set(range(shares[0].count)):
        return None
    encoded = bytes(len(shares[0].share))
    seen: set[int] = set()
    for s in shares:
        if s.index not in seen:
            seen.add(s.index)
            encoded = bytes(x ^ y for x, y in zip(encoded, s.share, strict=True))
    if len(encoded) <= AMD_BYTES or not amd.tag_matches(encoded):
        return None
    return amd.split(encoded)[0]


# --------------------------------------------------------------- the recorder


class HopRecorder:
    """TCP relays (own thread and event loop) put in front of relay listeners: each
    passes the channel on untouched and keeps every frame it carries."""

    def __init__(self) -> None:
        self.frames: list[Recorded] = []
        self._relays: list[TcpRelay] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def tap(self, dialler: str, listener: str, port: int) -> int:
        """A recording relay to 127.0.0.1:`port`; returns the port to dial instead.
        `dialler` and `listener` are KME ids (the frames' senders and receivers)."""
        phases: dict[int, list[int]] = {}  # id(reader) -> the hello parts still to read

        def on_connect(conn: RelayConnection) -> None:
            phases[id(conn.readers[A2B])] = [-1]  # the dialler's HELLO, its size in it
            phases[id(conn.readers[B2A])] = [_HELLO_NONCE, _HELLO_MAC]

        async def read(reader: asyncio.StreamReader) -> bytes:
            try:
                todo = phases.get(id(reader), [])
                if todo:
                    n = todo.pop(0)
                    if n == -1:
                        head = await reader.readexactly(1)
                        return head + await reader.readexactly(head[0] + _HELLO_NONCE
                                                               + _HELLO_MAC)
                    return await reader.readexactly(n)
                head = await reader.readexactly(_LEN.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return b""
            return head + await reader.readexactly(_LEN.unpack(head)[0])

        def hooks(conn: RelayConnection) -> dict[str, Any]:
            started = {A2B: False, B2A: False}

            def keep(direction: str, sender: str, receiver: str) -> Any:
                def hook(unit: bytes) -> list[bytes]:
                    body = unit[_LEN.size:]
                    # Hello parts are not frames; every unit after them is one.
                    if started[direction] and body[:1] == bytes([RELAY_VERSION]):
                        self.frames.append(Recorded(sender, receiver, body))
                    if not phases.get(id(conn.readers[direction])):
                        started[direction] = True
                    return [unit]
                return hook

            return {A2B: keep(A2B, dialler, listener), B2A: keep(B2A, listener, dialler)}

        relay = TcpRelay(("127.0.0.1", port), read=read, hooks=hooks, on_connect=on_connect)
        asyncio.run_coroutine_threadsafe(relay.start(), self._loop).result(10)
        self._relays.append(relay)
        return relay.port

    def close(self) -> None:
        for relay in self._relays:
            asyncio.run_coroutine_threadsafe(relay.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# ---------------------------------------------------------- the node's files


def take_node_state(config: Path, into: Path) -> Path:
    """Copy a (stopped or running) KME's files as they are: its config, every
    neighbour link's secret file, its key store and relay store (SQLite with any
    -wal/-shm). Returns the copy's manifest."""
    into.mkdir(parents=True, exist_ok=True)
    os.chmod(into, 0o700)
    cfg = tomllib.loads(config.read_text())
    shutil.copy2(config, into / "kme.toml")
    secrets = {}
    for nb in cfg.get("neighbour", []):
        src = Path(nb["link"]["secret_file"])
        dst = into / f"link-{nb['kme_id']}.key"
        shutil.copy2(src, dst)
        secrets[nb["kme_id"]] = dst.name
    db = Path(cfg["kme"]["db"])
    stores = []
    for base in (db, db.with_name(db.name + ".relay")):
        for suffix in ("", "-wal", "-shm"):
            src = base.with_name(base.name + suffix)
            if src.exists():
                shutil.copy2(src, into / src.name)
                stores.append(src.name)
    manifest = into / "manifest.json"
    manifest.write_text(json.dumps({"kme_id": cfg["kme"]["id"], "link_secrets": secrets,
                                    "stores": stores}, indent=2))
    return manifest


def attack(manifest: Path, frames: Sequence[Recorded]) -> dict[str, list[NodeShare]]:
    """The node's view from its copied files and the recorded hops."""
    m = json.loads(manifest.read_text())
    secrets = {nb: load_link_secret(manifest.parent / name)
               for nb, name in m["link_secrets"].items()}

    def link_secret(neighbour: str) -> bytes:
        return secrets[neighbour]

    return shares_from_frames(link_secret, m["kme_id"], frames)


def verdict(view: dict[str, list[NodeShare]], used: dict[str, str]) -> dict[str, Any]:
    """Compare the node's view with `used` (key id -> fingerprint of the key the
    gateways used): which keys it rebuilt, which it holds one share of only."""
    rebuilt, partial, unseen = [], [], []
    for key_id, fp in sorted(used.items()):
        shares = view.get(key_id)
        if not shares:
            unseen.append(key_id)
            continue
        key = rebuild(shares)
        if key is None:
            partial.append({"key_id": key_id, "used": fp,
                            "shares_held": len({s.index for s in shares}),
                            "shares": shares[0].count,
                            "share_fingerprint": fingerprint(shares[0].share)})
        else:
            rebuilt.append({"key_id": key_id, "used": fp, "rebuilt": fingerprint(key),
                            "match": fingerprint(key) == fp})
    return {"keys_used": len(used), "rebuilt": rebuilt, "partial": partial,
            "not_through_node": unseen,
            "all_rebuilt": bool(used) and len(rebuilt) == len(used)
            and all(r["match"] for r in rebuilt),
            "none_rebuilt": not rebuilt}


# ------------------------------------------- the gateways' key fingerprints


def record_fingerprints(path: Path) -> None:
    """Make this process's ETSI 014 client append (key id, fingerprint) of every key
    it gets to `path`: the demo's witness of which keys the gateways really used."""
    from qkd.etsi014 import client

    def wrap(name: str) -> None:
        orig = getattr(client.EtsiClient, name)

        async def wrapped(self: Any, *args: Any, **kw: Any) -> Any:
            keys = await orig(self, *args, **kw)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as out:
                for k in keys:
                    out.write(json.dumps({"key_id": k.key_id,
                                          "sha256_8": fingerprint(k.key)}) + "\n")
            return keys

        setattr(client.EtsiClient, name, wrapped)

    wrap("get_enc_keys")
    wrap("get_dec_keys")


def read_fingerprints(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key_id"]: r["sha256_8"] for r in rows}


def main(argv: list[str]) -> int:
    """`python -m gateway.tools.network_compromise FILE qkdgw-args...`: run qkdgw with
    the fingerprint witness on (the demo starts its gateways this way)."""
    from gateway.cli import main as qkdgw

    record_fingerprints(Path(argv[0]))
    return qkdgw(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
