"""Trusted-node relay over BB84 links (issue 11, relay link keys from the pools): a
line of 3 KME processes (A-B-C), each hop an emulated BB84 link with small rounds,
real TCP on loopback. The pads are the pools' keys, reserved at both ends of a hop."""

from __future__ import annotations

import socket
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qkd.common.storage_key import Sealer, load_or_create
from qkd.etsi014.client import KmeRejected
from qkd.kme.config import KmeConfig
from qkd.kme.relay_keys import LOW_BYTES
from qkd.kme.relay_service import link_stream
from qkd.link.ideal import load_link_secret
from qkd.network import amd
from qkd.network.constants import AMD_BYTES, PAD_BYTES
from qkd.network.relay import Share, decode_frame, relay_cost_bits
from tests.support.kme_processes import KmeProcess, wait_until
from tests.support.network_kmes import Nb, Network, net_kme_toml, remote_sae_toml
from tests.support.relay_tap import RELAY, SHARE, RelayTap

KEY_BITS = 256
SITES = ["site-a", "site-b", "site-c"]
LINKS = [("site-a", "site-b"), ("site-b", "site-c")]
# 10 km, 1.2e7 pulses: rounds of about two seconds (tests/e2e/test_bb84_link.py).
PULSES = 12_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bb84Network(Network):
    """Network with every link BB84: the larger site of a link is Bob (listening on
    ports picked here), the smaller one Alice."""

    def __init__(self, pki: Path, work: Path, **kw: Any) -> None:
        self.link_ports = {link: (_free_port(), _free_port()) for link in LINKS}
        self.taps: dict[str, RelayTap] = {}
        self.shares: list[bytes] = []  # SHARE frames A sent to B
        super().__init__(pki, work, SITES, LINKS, dial_port=self._tap, **kw)

    def _tap(self, site: str, other: str, port: int) -> int:
        if (site, other) != ("site-a", "site-b"):
            return port

        def record(direction: str, frame: bytes) -> list[bytes]:
            if direction == "fwd" and frame[0] == RELAY and frame[1] == SHARE:
                self.shares.append(frame)
            return [frame]

        self.taps[other] = RelayTap(port, rule=record)
        return self.taps[other].port

    def _link(self, site: str, other: str) -> str:
        link = (min(site, other), max(site, other))
        classical, quantum = self.link_ports[link]
        common = (f'type = "bb84"\nsecret_file = "{self.pki}/link-secret.key"\n'
                  f"distance_km = 10.0\npulses = {PULSES}\n")
        if site > other:
            return common + (f'role = "bob"\nlisten = "127.0.0.1:{classical}"\n'
                             f'quantum_listen = "127.0.0.1:{quantum}"\n')
        return common + (f'role = "alice"\npeer = "127.0.0.1:{classical}"\n'
                         f'quantum = "127.0.0.1:{quantum}"\n')

    def start(self, site: str) -> KmeProcess:
        nbs = []
        for other in self._neighbours(site):
            port = self.relay_ports.get(other) if other > site else None
            if port is not None and self._dial_port is not None:
                port = self._dial_port(site, other, port)
            nbs.append(Nb(other, relay_port=port))
        remote = [s for s in self.sites if s != site and s not in self._neighbours(site)]
        text = net_kme_toml(self.pki, site, self.work / f"{site}.sqlite3", nbs,
                            network=self._topo + remote_sae_toml(remote),
                            relay_listen=self.relay_ports.get(site, True), admin=True)
        # Each [neighbour.link] in order: ideal -> this link's BB84 lines.
        head, *links = text.split("[neighbour.link]\n")
        out = [head]
        for other, part in zip(self._neighbours(site), links, strict=True):
            _ideal, rest = part.split("key_rate = inf\n", 1)
            out.append("[neighbour.link]\n" + self._link(site, other) + rest)
        cfg = self.work / f"{site}.toml"
        cfg.write_text("".join(out))
        import json

        proc = KmeProcess(cfg, self.work, site, env=self.env.get(site))
        self.procs[site] = proc
        port_file = proc.port_file.with_name(proc.port_file.name + ".relay")
        self.relay_ports[site] = json.loads(port_file.read_text())["relay"]
        return proc

    def config(self, site: str) -> KmeConfig:
        return KmeConfig.load(self.work / f"{site}.toml")

    def close(self) -> None:
        self.stop()
        for t in self.taps.values():
            t.close()


@pytest.fixture
def line(pki: Path, tmp_path: Path) -> Iterator[Bb84Network]:
    net = Bb84Network(pki, tmp_path)
    try:
        yield net
    finally:
        net.close()


def _nb(net: Network, site: str, other: str) -> dict[str, int]:
    out: dict[str, int] = net.status(site)["network"]["neighbours"][f"kme-{other}"]
    return out


def _streams_ready(net: Network) -> bool:
    """Every direction of every hop holds reserved pool key (and the far end got it)."""
    for a, b in LINKS:
        for x, y in ((a, b), (b, a)):
            if _nb(net, x, y)["relay_bytes_held_out"] < LOW_BYTES:
                return False
            if _nb(net, y, x)["relay_keys_taken_in"] < _nb(net, x, y)["relay_keys_reserved_out"]:
                return False
    return True


def _stream(net: Bb84Network, site: str, other: str, direction: str
            ) -> dict[int, bytes]:
    """offset -> material of the pool keys still held in `site`'s relay stream, read
    out of its relay store with its storage key (what a full memory dump gives)."""
    cfg = net.config(site)
    sealer = Sealer(load_or_create(cfg.storage_key))
    db = sqlite3.connect(f"file:{cfg.db}.relay?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT offset, key_id, sealed FROM stream_keys WHERE neighbour "
                          "= ? AND direction = ? AND sealed IS NOT NULL",
                          (f"kme-{other}", direction)).fetchall()
    finally:
        db.close()
    return {o: sealer.open(f"relay-stream/kme-{other}/{direction}/{k}", s)
            for o, k, s in rows}


def _bytes_at(stream: dict[int, bytes], offset: int, n: int) -> bytes:
    out = b""
    for o in sorted(stream):
        mat = stream[o]
        lo, hi = max(offset, o), min(offset + n, o + len(mat))
        if lo < hi:
            out += mat[lo - o:hi - o]
    assert len(out) == n, "stream bytes not held"
    return out


def _relay_blocks(db: Path, master: str, slave: str) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute(
            "SELECT block_id FROM pool WHERE master = ? AND slave = ? AND state = "
            "'delivered' AND material IS NULL", (master, slave))}
    finally:
        conn.close()


async def test_relay_over_bb84_links_spends_the_pools_keys(line: Bb84Network,
                                                           pki: Path) -> None:
    wait_until(lambda: _streams_ready(line), 240, "relay link keys reserved on every hop",
               list(line.procs.values()))
    before = {(x, y): _nb(line, x, y) for a, b in LINKS for x, y in ((a, b), (b, a))}
    # What A's and B's stores hold for the A -> B stream, read before the relay.
    a_out, b_in = _stream(line, "site-a", "site-b", "out"), _stream(line, "site-b",
                                                                     "site-a", "in")
    async with line.sae("site-a") as a_gw, line.sae("site-c") as c_gw:
        enc = await a_gw.get_enc_keys("site-c-gw", number=3, size=KEY_BITS)
        assert len({k.key_id for k in enc}) == 3
        dec = await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc], size=KEY_BITS)
        assert dec == enc
    async with line.sae("site-c") as again:  # once only
        with pytest.raises(KmeRejected) as err:
            await again.get_dec_keys("site-a-gw", [enc[0].key_id])
        assert err.value.status == 400 and "already delivered" in err.value.message
    # Every hop, both ends: the relay cost in link-key bits, sent one way, received
    # the other (tag pad + the pad of a share of E(K) = key | x | t forward, the ACK's
    # tag pad back).
    fwd = 3 * 8 * (PAD_BYTES + KEY_BITS // 8 + AMD_BYTES)
    back = 3 * 8 * PAD_BYTES
    assert fwd + back == relay_cost_bits([("x", "y")], KEY_BITS // 8) * 3
    for a, b in LINKS:
        for x, y, bits in ((a, b, fwd), (b, a, back)):
            sent = _nb(line, x, y)["bits_out"] - before[(x, y)]["bits_out"]
            got = _nb(line, y, x)["bits_in"] - before[(y, x)]["bits_in"]
            assert sent == got == bits, (x, y)
    assert line.status("site-b")["network"]["relay"]["relays_failed"] == 0
    # Control: the Share A sent decrypts with the pool keys both stores held for the
    # A -> B stream, and not with the ideal link's secret-file derivation.
    secret = load_link_secret(pki / "link-secret.key")
    assert len(line.shares) == 3
    keys = {k.key_id: k.key for k in enc}
    for frame in line.shares:
        msg, offset, _tag, _signed = decode_frame(frame)
        assert isinstance(msg, Share)
        kid = str(uuid.UUID(bytes=msg.key_id))
        n = len(msg.ciphertext)  # a share of E(K): the key, then x and t
        pad_a = _bytes_at(a_out, offset + PAD_BYTES, n)
        assert pad_a == _bytes_at(b_in, offset + PAD_BYTES, n)
        share = bytes(x ^ y for x, y in zip(msg.ciphertext, pad_a, strict=True))
        assert share[:-AMD_BYTES] == keys[kid] and amd.tag_matches(share)
        wrong = link_stream(secret, "kme-site-a", "kme-site-b", offset + PAD_BYTES, n)
        assert bytes(x ^ y for x, y in zip(msg.ciphertext, wrong,
                                           strict=True))[:-AMD_BYTES] != keys[kid]
    # The used keys are gone from both relay stores.
    first = min(decode_frame(f)[1] for f in line.shares)
    assert first not in _stream(line, "site-a", "site-b", "out")
    assert not [o for o in _stream(line, "site-b", "site-a", "in") if o <= first]
    # Both pools of each hop gave the same blocks to the relay's pseudo SAEs (once any
    # top-up in flight has reached the far end).
    wait_until(lambda: all(
        _nb(line, y, x)["relay_keys_taken_in"] == _nb(line, x, y)["relay_keys_reserved_out"]
        for a, b in LINKS for x, y in ((a, b), (b, a))), 60, "top-ups settled",
        list(line.procs.values()))
    line.stop()
    cfgs = {s: line.config(s) for s in SITES}

    def pool(site: str, other: str) -> Path:
        (nb,) = [n for n in cfgs[site].neighbours if n.peer.kme_id == f"kme-{other}"]
        return nb.db

    for a, b in LINKS:
        for x, y in ((a, b), (b, a)):
            sent = _relay_blocks(pool(x, y), f"relay:kme-{x}", f"relay:kme-{y}")
            got = _relay_blocks(pool(y, x), f"relay:kme-{x}", f"relay:kme-{y}")
            assert sent and sent == got, (x, y)


async def test_sigkill_of_the_middle_kme_reuses_no_pool_key(line: Bb84Network) -> None:
    """B is SIGKILLed after a relay and restarted: the next relay goes on past the used
    stream bytes at both of its hops (no pad twice), and a replay of the first Share
    after the restart is refused by B's persisted watermark."""
    wait_until(lambda: _streams_ready(line), 240, "relay link keys reserved on every hop",
               list(line.procs.values()))
    async with line.sae("site-a") as a_gw, line.sae("site-c") as c_gw:
        first = await a_gw.get_enc_keys("site-c-gw", number=1, size=KEY_BITS)
        assert await c_gw.get_dec_keys("site-a-gw", [first[0].key_id]) == first
    old = [decode_frame(f)[1] for f in line.shares]
    mark = _nb(line, "site-b", "site-a")["bits_in"]
    line.procs["site-b"].kill()
    line.start("site-b")
    for site in SITES:
        line.wait_channels(site)
    assert _nb(line, "site-b", "site-a")["bits_in"] == mark  # persisted over the kill
    wait_until(lambda: _streams_ready(line), 120, "streams topped up after the restart",
               list(line.procs.values()))
    # The first Share replayed into B ahead of the next relay's (over B's new channel).
    replayed = line.shares[0]
    tap = line.taps["site-b"]
    record = tap.rule
    assert record is not None
    sent_replay: list[bool] = []

    def replay_once(direction: str, frame: bytes) -> list[bytes]:
        out = record(direction, frame)
        if direction == "fwd" and frame[:2] == bytes([RELAY, SHARE]) and not sent_replay:
            sent_replay.append(True)
            return [replayed, *out]
        return out

    tap.rule = replay_once
    rejected = line.status("site-b")["network"]["relay"]["frames_rejected"]
    async with line.sae("site-a") as a_gw, line.sae("site-c") as c_gw:
        enc = await a_gw.get_enc_keys("site-c-gw", number=2, size=KEY_BITS)
        assert await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
    new = [decode_frame(f)[1] for f in line.shares[len(old):]]
    # A share frame uses its tag pad and the share pad of A -> B (the ACK: B -> A).
    assert len(new) == 2 and min(new) >= max(old) + PAD_BYTES + KEY_BITS // 8 + AMD_BYTES
    b = line.status("site-b")["network"]
    assert sent_replay and b["relay"]["frames_rejected"] == rejected + 1
    assert b["relay"]["relays_failed"] == 0
    assert line.status("site-c")["network"]["relayed_keys"]["stored_for_slave"] == 0
