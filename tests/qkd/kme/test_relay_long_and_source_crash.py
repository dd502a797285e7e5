"""Issue 11 gaps: a relay over three hops (a line of four KME processes), and the
source KME SIGKILLed after every ACK is in but before it answers its master."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from qkd.etsi014.client import KmeRejected, KmeUnavailable
from qkd.kme.relay_service import CRASH_ENV
from qkd.network.relay import relay_cost_bits
from tests.support.network_kmes import Network

KEY_BITS = 256
LINE4 = (["site-a", "site-b", "site-c", "site-d"],
         [("site-a", "site-b"), ("site-b", "site-c"), ("site-c", "site-d")])


def _bits(net: Network, site: str, nb: str) -> tuple[int, int]:
    v = net.status(site)["network"]["neighbours"][f"kme-{nb}"]
    return int(v["bits_out"]), int(v["bits_in"])


async def test_three_hop_relay_delivers_once_and_charges_each_hop(
        pki: Path, tmp_path: Path) -> None:
    net = Network(pki, tmp_path, *LINE4)
    try:
        async with net.sae("site-a") as a_gw, net.sae("site-d") as d_gw:
            st = await a_gw.status("site-d-gw")
            assert st["status_extension"]["relay"]["paths"] == [
                ["kme-site-a", "kme-site-b", "kme-site-c", "kme-site-d"]]
            enc = await a_gw.get_enc_keys("site-d-gw", number=2, size=KEY_BITS)
            assert len({k.key_id for k in enc}) == 2
            assert await d_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
        async with net.sae("site-d") as again:
            with pytest.raises(KmeRejected, match="already delivered"):
                await again.get_dec_keys("site-a-gw", [enc[0].key_id])
        per_hop = relay_cost_bits([("x", "y")], KEY_BITS // 8)
        # Each of the three hops paid exactly one hop's cost per key, and both of its
        # ends agree on it (forward at the sender = in at the receiver, and back).
        for left, right in LINE4[1]:
            out_l, in_l = _bits(net, left, right)
            out_r, in_r = _bits(net, right, left)
            assert out_l + in_l == 2 * per_hop, (left, right)
            assert (out_l, in_l) == (in_r, out_r), (left, right)
        assert net.status("site-a")["network"]["relay"]["relays_delivered"] == 2
        assert net.status("site-d")["network"]["relayed_keys"]["delivered_to_slave"] == 2
        # The relay path's total is the per-hop cost times three (the cost model).
        assert relay_cost_bits(list(zip("abc", "bcd", strict=True)), KEY_BITS // 8) \
            == 3 * per_hop
    finally:
        net.stop()


def _orphans(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(f"{db}.relay") as con:
        return [(str(k), str(m), str(s)) for k, m, s in con.execute(
            "SELECT key_id, master, slave FROM relayed_keys WHERE role = 'slave' "
            "AND delivered IS NULL")]


async def test_source_killed_after_the_acks_never_hands_the_orphan_to_anyone(
        pki: Path, tmp_path: Path) -> None:
    sites, links = LINE4[0][:3], LINE4[1][:2]
    net = Network(pki, tmp_path, sites, links,
                  env={"site-a": {CRASH_ENV: "source_after_acks"}})
    try:
        async with net.sae("site-a") as a_gw:
            # The master gets no answer at all: its KME died before replying.
            with pytest.raises(KmeUnavailable):
                await a_gw.get_enc_keys("site-c-gw", size=KEY_BITS)
        assert net.procs["site-a"].wait_exit(10) == -signal.SIGKILL
        net.env.pop("site-a")
        net.start("site-a")
        for site in sites:
            net.wait_channels(site)
        # The destination holds the key (every ACK went), the source has no record of
        # handing it out: the orphan the docs describe.
        assert net.status("site-a")["network"]["relayed_keys"]["delivered_to_master"] == 0
        held = net.status("site-c")["network"]["relayed_keys"]
        assert held == {"stored_for_slave": 1, "delivered_to_slave": 0,
                        "delivered_to_master": 0}
        [(orphan, master, slave)] = _orphans(tmp_path / "site-c.sqlite3")
        assert (master, slave) == ("site-a-gw", "site-c-gw")
        async with net.sae("site-c") as c_gw:
            # Named under another master SAE (B's: a neighbour's key store): refused.
            with pytest.raises(KmeRejected, match="unknown") as err:
                await c_gw.get_dec_keys("site-b-gw", [orphan])
            assert err.value.status == 400
        # Recovery: the next key is relayed and delivered once, under a new ID, and
        # the orphan stays undelivered (no SAE was ever told its ID).
        async with net.sae("site-a") as a_gw, net.sae("site-c") as c_gw:
            enc = await a_gw.get_enc_keys("site-c-gw", size=KEY_BITS)
            assert enc[0].key_id != orphan
            assert await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc
            with pytest.raises(KmeRejected, match="already delivered"):
                await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id])
        assert net.status("site-a")["network"]["relayed_keys"]["delivered_to_master"] == 1
        assert net.status("site-c")["network"]["relayed_keys"] == {
            "stored_for_slave": 1, "delivered_to_slave": 1, "delivered_to_master": 0}
        assert [o for o, _m, _s in _orphans(tmp_path / "site-c.sqlite3")] == [orphan]
    finally:
        net.stop()
