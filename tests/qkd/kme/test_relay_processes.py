"""Trusted-node relay between KME processes (issue 11): a line of 3 (A-B-C) and a ring
of 4 with k = 2, ideal links, real TCP on loopback, one process per KME."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.tools.network_compromise import (
    NodeShare,
    Recorded,
    rebuild,
    shares_from_frames,
)
from qkd.etsi014.client import KmeNoKey, KmeRejected
from qkd.kme.relay_service import CRASH_ENV
from qkd.link.ideal import load_link_secret
from qkd.network.constants import AMD_BYTES
from qkd.network.relay import relay_cost_bits
from tests.support.kme_processes import wait_until
from tests.support.network_kmes import Network
from tests.support.relay_tap import (
    ACK,
    RELAY,
    SHARE,
    RelayTap,
    Rule,
    drop_first,
    flip_first,
    replay_first,
)

KEY_BITS = 256


@pytest.fixture
def line(pki: Path, tmp_path: Path) -> Iterator[Network]:
    net = Network(pki, tmp_path, ["site-a", "site-b", "site-c"],
                  [("site-a", "site-b"), ("site-b", "site-c")])
    try:
        yield net
    finally:
        net.stop()


def _link_bits(status: dict[str, Any], nb: str) -> int:
    v = status["network"]["neighbours"][nb]
    return int(v["bits_out"]) + int(v["bits_in"])


async def test_line_of_three_relays_keys_once(line: Network) -> None:
    before = line.status("site-b")["network"]["neighbours"]
    assert before["kme-site-a"]["bits_out"] == before["kme-site-c"]["bits_in"] == 0
    async with line.sae("site-a") as a_gw, line.sae("site-c") as c_gw:
        st = await a_gw.status("site-c-gw")
        assert st["target_KME_ID"] == "kme-site-c"
        assert st["status_extension"]["relay"]["paths"] == [
            ["kme-site-a", "kme-site-b", "kme-site-c"]]
        enc = await a_gw.get_enc_keys("site-c-gw", number=3, size=KEY_BITS)
        assert len({k.key_id for k in enc}) == 3
        dec = await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc], size=KEY_BITS)
        assert dec == enc
    # A second dec_keys of the same ID (a fresh client: no client-side memory) is refused.
    async with line.sae("site-c") as again:
        with pytest.raises(KmeRejected) as err:
            await again.get_dec_keys("site-a-gw", [enc[0].key_id])
        assert err.value.status == 400 and "already delivered" in err.value.message
    # And an SAE the key was not relayed for gets nothing (B's SAE is a neighbour's).
    async with line.sae("site-b") as b_gw:
        with pytest.raises(KmeRejected):
            await b_gw.get_dec_keys("site-a-gw", [enc[1].key_id])
    # B's two pools each paid one hop of every key: tag pad + the pad of a share of
    # E(K) (key, x, t) forward, the ACK's tag pad back (relay_cost_bits over the 2-hop
    # path is both hops).
    per_hop = relay_cost_bits([("a", "b")], KEY_BITS // 8)
    assert per_hop == 8 * (16 + KEY_BITS // 8 + 32 + 16) == 768
    b = line.status("site-b")["network"]
    assert _link_bits(line.status("site-b"), "kme-site-a") == 3 * per_hop
    assert _link_bits(line.status("site-b"), "kme-site-c") == 3 * per_hop
    assert b["neighbours"]["kme-site-a"]["pool_keys_charged"] == 3 * per_hop // KEY_BITS
    assert b["relay"]["relays_failed"] == 0
    # Both ends of each hop agree on what was used.
    a = line.status("site-a")["network"]["neighbours"]["kme-site-b"]
    c = line.status("site-c")["network"]["neighbours"]["kme-site-b"]
    assert a["bits_out"] == b["neighbours"]["kme-site-a"]["bits_in"]
    assert c["bits_in"] == b["neighbours"]["kme-site-c"]["bits_out"]
    assert line.status("site-c")["network"]["relayed_keys"]["delivered_to_slave"] == 3
    metrics = line.metrics("site-b")
    assert (f'qkdgw_kme_relay_link_key_bits_total{{direction="in",neighbour="kme-site-a"}} '
            f'{float(b["neighbours"]["kme-site-a"]["bits_in"])}') in metrics
    assert 'qkdgw_kme_relay_channel_connected{neighbour="kme-site-c"} 1.0' in metrics


RING = (["site-a", "site-b", "site-c", "site-d"],
        [("site-a", "site-b"), ("site-b", "site-c"), ("site-c", "site-d"), ("site-a", "site-d")])


@pytest.fixture
def ring(pki: Path, tmp_path: Path) -> Iterator[Network]:
    net = Network(pki, tmp_path, *RING, network_extra="k = 2\n")
    try:
        yield net
    finally:
        net.stop()


async def test_ring_of_four_splits_each_key_over_two_disjoint_paths(ring: Network) -> None:
    async with ring.sae("site-a") as a_gw, ring.sae("site-c") as c_gw:
        st = await a_gw.status("site-c-gw")
        paths = sorted(st["status_extension"]["relay"]["paths"])
        assert paths == [["kme-site-a", "kme-site-b", "kme-site-c"],
                         ["kme-site-a", "kme-site-d", "kme-site-c"]]
        enc = await a_gw.get_enc_keys("site-c-gw", number=2, size=KEY_BITS)
        assert await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
        # The other direction: C is the source, A the destination.
        back = await c_gw.get_enc_keys("site-a-gw", number=1, size=512)
        assert await a_gw.get_dec_keys("site-c-gw", [back[0].key_id], size=512) == back
    per_hop = relay_cost_bits([("x", "y")], KEY_BITS // 8)
    per_hop_512 = relay_cost_bits([("x", "y")], 512 // 8)
    # Each intermediate carried one share of every key: one hop on each of its links.
    for mid in ("site-b", "site-d"):
        st = ring.status(mid)
        for nb in ("kme-site-a", "kme-site-c"):
            assert _link_bits(st, nb) == 2 * per_hop + per_hop_512, (mid, nb)
    assert ring.status("site-c")["network"]["relayed_keys"]["delivered_to_slave"] == 2
    assert ring.status("site-a")["network"]["relay"]["relays_delivered"] == 2


async def test_ring_fails_closed_when_k_cannot_be_met(pki: Path, tmp_path: Path) -> None:
    net = Network(pki, tmp_path, *RING, network_extra="k = 3\n")
    try:
        async with net.sae("site-a") as a_gw:
            with pytest.raises(KmeNoKey, match=r"2 node-disjoint path\(s\).*3 needed"):
                await a_gw.get_enc_keys("site-c-gw")
        st = net.status("site-a")["network"]
        assert st["relay"]["relays_started"] == 0
        assert all(_link_bits(net.status(s), f"kme-{o}") == 0
                   for s, o in (("site-b", "site-a"), ("site-d", "site-c")))
    finally:
        net.stop()


@pytest.fixture
def tapped_line(pki: Path, tmp_path: Path) -> Iterator[tuple[Network, RelayTap]]:
    """The line with A's relay channel to B running through a tap."""
    taps: list[RelayTap] = []

    def dial(site: str, other: str, port: int) -> int:
        if (site, other) != ("site-a", "site-b"):
            return port
        taps.append(RelayTap(port))
        return taps[0].port

    net = Network(pki, tmp_path, ["site-a", "site-b", "site-c"],
                  [("site-a", "site-b"), ("site-b", "site-c")], dial_port=dial)
    try:
        yield net, taps[0]
    finally:
        net.stop()
        taps[0].close()


# (what the tap does, the node that notices, the failure it counts there, whether the
# destination had stored the key before the relay was aborted)
ATTACKS = [
    ("flip a SHARE ciphertext bit", lambda: flip_first(SHARE, "fwd", -20), "site-b",
     "frames_rejected", False),
    ("replay a SHARE", lambda: replay_first(SHARE, "fwd"), "site-b", "REPLAY", True),
    ("flip an ACK tag bit", lambda: flip_first(ACK, "back"), "site-a", "AUTH", True),
    ("drop an ACK", lambda: drop_first(ACK, "back"), "site-a", "TIMEOUT", True),
]


async def test_tampered_replayed_or_dropped_hop_fails_closed(
        tapped_line: tuple[Network, RelayTap]) -> None:
    net, tap = tapped_line

    def counted(site: str, what: str) -> int:
        st = net.status(site)["network"]
        return int(st["relay"].get(what, st["failures"].get(what, 0)))

    async with net.sae("site-a") as a_gw, net.sae("site-c") as c_gw:
        # Positive control: through the same tap, untouched, the relay works.
        enc = await a_gw.get_enc_keys("site-c-gw")
        assert await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc
        for name, make_rule, where, what, was_stored in ATTACKS:
            before = counted(where, what)
            discarded = counted("site-c", "keys_discarded")
            rule: Rule = make_rule()
            tap.rule = rule
            with pytest.raises(KmeNoKey, match="relays failed"):
                await a_gw.get_enc_keys("site-c-gw")
            tap.rule = None
            assert counted(where, what) == before + 1, name
            # No key usable at either end: the master got none, and the destination
            # holds none (it erased the one it had stored when the abort came).
            wait_until(lambda: net.status("site-c")["network"]["relayed_keys"][
                "stored_for_slave"] == 0, 15, f"{name}: no key left at C")
            assert counted("site-c", "keys_discarded") == discarded + int(was_stored), name
            # A fresh relay over the same hop succeeds.
            enc = await a_gw.get_enc_keys("site-c-gw")
            assert await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc, name
    assert net.status("site-a")["network"]["relay"]["relays_failed"] == len(ATTACKS)


def _connected(net: Network, site: str, nb: str) -> bool:
    return bool(net.status(site)["network"]["neighbours"][f"kme-{nb}"]["connected"])


async def test_restarts_keep_keys_once_and_never_reuse_link_key(line: Network) -> None:
    async with line.sae("site-a") as a_gw:
        enc = await a_gw.get_enc_keys("site-c-gw", number=2)
    # SIGKILL the destination after it stored (and acked) the keys: they survive it.
    line.procs["site-c"].kill()
    line.start("site-c")
    line.wait_channels("site-c")
    async with line.sae("site-c") as c_gw:
        assert await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc[:1]
    async with line.sae("site-c") as c_gw:  # a fresh client: no client-side memory
        with pytest.raises(KmeRejected, match="already delivered"):
            await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id])
        assert await c_gw.get_dec_keys("site-a-gw", [enc[1].key_id]) == enc[1:]

    # The trusted node dies: relays fail closed at once (A's only route is down).
    line.procs["site-b"].kill()
    wait_until(lambda: not _connected(line, "site-a", "site-b"), 15, "A sees B gone")
    async with line.sae("site-a") as a_gw:
        with pytest.raises(KmeNoKey, match="no relay route"):
            await a_gw.get_enc_keys("site-c-gw")
    # B comes back: its link-key offsets continue past everything it used before.
    line.start("site-b")
    for site in ("site-a", "site-b", "site-c"):
        line.wait_channels(site)
    async with line.sae("site-a") as a_gw, line.sae("site-c") as c_gw:
        enc = await a_gw.get_enc_keys("site-c-gw")
        assert await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc

    # Control: B restarted *without* its relay state would send under pads from offset
    # 0 again; C's persisted watermark refuses them and the relay fails closed.
    line.procs["site-b"].kill()
    for suffix in ("", "-wal", "-shm"):
        (line.work / f"site-b.sqlite3.relay{suffix}").unlink(missing_ok=True)
    assert "LINK_KEY" not in line.status("site-c")["network"]["rejected"]
    line.start("site-b")
    for site in ("site-a", "site-b", "site-c"):
        line.wait_channels(site)
    async with line.sae("site-a") as a_gw:
        with pytest.raises(KmeNoKey, match="relays failed"):
            await a_gw.get_enc_keys("site-c-gw")
    st = line.status("site-c")["network"]
    # The SHARE (and the ABORT after it, if it has arrived) under reused pads.
    assert st["rejected"]["LINK_KEY"] >= 1
    assert st["relayed_keys"]["stored_for_slave"] == 0


# ------------------------------------------------------------- compromised node


def _recording_taps(targets: set[tuple[str, str]]
                    ) -> tuple[Callable[[str, str, int], int], dict[str, RelayTap],
                               dict[str, list[bytes]]]:
    """A dial hook putting a tap on each (dialler, neighbour) channel in `targets`,
    recording the SHARE frames that go to the neighbour (what that node receives)."""
    taps: dict[str, RelayTap] = {}
    frames: dict[str, list[bytes]] = {}

    def dial(site: str, other: str, port: int) -> int:
        if (site, other) not in targets:
            return port
        got = frames.setdefault(other, [])

        def record(direction: str, frame: bytes) -> list[bytes]:
            if direction == "fwd" and frame[0] == RELAY and frame[1] == SHARE:
                got.append(frame)
            return [frame]

        taps[other] = RelayTap(port, rule=record)
        return taps[other].port

    return dial, taps, frames


def _node_shares(pki: Path, node: str, frames: list[bytes]) -> dict[str, list[NodeShare]]:
    """What a compromised `node` opens with its memory (the link secret its pads come
    from) in the SHARE frames it received from A (gateway.tools.network_compromise,
    which the demo's --compromise run uses too)."""
    secret = load_link_secret(pki / "link-secret.key")
    return shares_from_frames(lambda _nb: secret, f"kme-{node}",
                              [Recorded("kme-site-a", f"kme-{node}", f) for f in frames])


def _node_view(pki: Path, node: str, frames: list[bytes]) -> dict[str, bytes]:
    """key id -> the one share `node` holds of it."""
    view = _node_shares(pki, node, frames)
    assert all(len(v) == 1 for v in view.values())
    return {key_id: v[0].share for key_id, v in view.items()}


async def test_compromised_trusted_node_single_path_gives_the_key(pki: Path,
                                                                  tmp_path: Path) -> None:
    dial, taps, frames = _recording_taps({("site-a", "site-b")})
    net = Network(pki, tmp_path, ["site-a", "site-b", "site-c"],
                  [("site-a", "site-b"), ("site-b", "site-c")], dial_port=dial)
    try:
        async with net.sae("site-a") as a_gw:
            enc = await a_gw.get_enc_keys("site-c-gw", number=3)
        view = _node_view(pki, "site-b", frames["site-b"])
        # k = 1 (control): B's state and traffic are every key (its one share is the
        # whole AMD encoding E(K) = K | x | t, which decodes and verifies).
        assert {k.key_id: k.key for k in enc} == {
            kid: share[:-AMD_BYTES] for kid, share in view.items()}
        b_shares = _node_shares(pki, "site-b", frames["site-b"])
        assert {k.key_id: k.key for k in enc} == {
            kid: rebuild(shares) for kid, shares in b_shares.items()}
    finally:
        net.stop()
        for t in taps.values():
            t.close()


async def test_compromised_trusted_node_learns_nothing_with_k2(pki: Path,
                                                               tmp_path: Path) -> None:
    dial, taps, frames = _recording_taps({("site-a", "site-b"), ("site-a", "site-d")})
    net = Network(pki, tmp_path, *RING, network_extra="k = 2\n", dial_port=dial)
    try:
        async with net.sae("site-a") as a_gw:
            enc = await a_gw.get_enc_keys("site-c-gw", number=3)
        b = _node_view(pki, "site-b", frames["site-b"])
        d = _node_view(pki, "site-d", frames["site-d"])
        assert set(b) == set(d) == {k.key_id for k in enc}
        for k in enc:
            # One node's share alone is not the key (it is independent of it) ...
            assert len(b[k.key_id]) == len(k.key) + AMD_BYTES
            assert b[k.key_id][:-AMD_BYTES] != k.key and d[k.key_id][:-AMD_BYTES] != k.key
            # ... and both nodes together (control) have it: the shares XOR to E(K).
            both = bytes(x ^ y for x, y in zip(b[k.key_id], d[k.key_id], strict=True))
            assert both[:-AMD_BYTES] == k.key
        # The shared reconstruction agrees: one node's shares rebuild nothing, both do.
        b_shares = _node_shares(pki, "site-b", frames["site-b"])
        d_shares = _node_shares(pki, "site-d", frames["site-d"])
        for k in enc:
            assert rebuild(b_shares[k.key_id]) is None and rebuild(d_shares[k.key_id]) is None
            assert rebuild(b_shares[k.key_id] + d_shares[k.key_id]) == k.key
    finally:
        net.stop()
        for t in taps.values():
            t.close()


async def test_network_status_command(line: Network) -> None:
    async with line.sae("site-a") as a_gw:
        await a_gw.get_enc_keys("site-c-gw")
    p = line.procs["site-a"]
    admin = json.loads(p.port_file.with_name(p.port_file.name + ".admin").read_text())
    url = f"http://127.0.0.1:{admin['admin']}"
    run = [sys.executable, "-m", "gateway.cli", "network", "status", "--admin", url]
    text = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "topology: 3 nodes, 2 links" in text
    assert "kme-site-b" in text and "connected" in text and "key rate inf/s" in text
    assert "site-a-gw->site-c-gw: kme-site-a > kme-site-b > kme-site-c" in text
    raw = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True,
                                    timeout=60, check=True).stdout)
    assert raw["relay"]["relays_delivered"] == 1
    # A KME that is not there: a clear error, exit code 2.
    bad = subprocess.run([*run[:-1], "http://127.0.0.1:9"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "cannot read http://127.0.0.1:9/status" in bad.stderr


async def test_a_link_going_down_moves_relays_to_the_other_path(pki: Path,
                                                               tmp_path: Path) -> None:
    taps: list[RelayTap] = []

    def dial(site: str, other: str, port: int) -> int:
        if (site, other) != ("site-a", "site-b"):
            return port
        taps.append(RelayTap(port))
        return taps[0].port

    net = Network(pki, tmp_path, *RING, dial_port=dial)
    try:
        async with net.sae("site-a") as a_gw, net.sae("site-c") as c_gw:
            before = (await a_gw.status("site-c-gw"))["status_extension"]["relay"]["paths"]
            assert before == [["kme-site-a", "kme-site-b", "kme-site-c"]]  # k = 1
            enc = await a_gw.get_enc_keys("site-c-gw")
            assert await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc
            taps[0].cut()  # the A-B link goes down
            wait_until(lambda: not _connected(net, "site-a", "site-b"), 15, "A-B down")
            after = (await a_gw.status("site-c-gw"))["status_extension"]["relay"]["paths"]
            assert after == [["kme-site-a", "kme-site-d", "kme-site-c"]]
            b_bits = _link_bits(net.status("site-b"), "kme-site-a")
            enc = await a_gw.get_enc_keys("site-c-gw", number=2)
            assert await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
            assert _link_bits(net.status("site-b"), "kme-site-a") == b_bits
            assert _link_bits(net.status("site-d"), "kme-site-a") > 0
    finally:
        net.stop()
        for t in taps:
            t.close()


async def test_far_link_down_is_learnt_from_adverts(pki: Path, tmp_path: Path) -> None:
    """B's link to C goes down: A's own links are all up, so only B's link-state
    advert (flooded, authenticated per channel) can move A's relays to A-D-C."""
    taps: list[RelayTap] = []

    def dial(site: str, other: str, port: int) -> int:
        if (site, other) != ("site-b", "site-c"):
            return port
        taps.append(RelayTap(port))
        return taps[0].port

    net = Network(pki, tmp_path, *RING, dial_port=dial)
    try:
        # A changed advert on the B-C channel is refused (counted), not applied.
        rejected = net.status("site-c")["network"]["relay"]["lsa_rejected"]

        def flip_lsa(d: str, frame: bytes) -> list[bytes]:
            if d == "fwd" and frame[:1] == b"L":
                taps[0].rule = None
                return [frame[:-1] + bytes([frame[-1] ^ 1])]
            return [frame]

        taps[0].rule = flip_lsa
        wait_until(lambda: net.status("site-c")["network"]["relay"]["lsa_rejected"]
                   > rejected, 15, "C refuses the changed advert")
        async with net.sae("site-a") as a_gw, net.sae("site-c") as c_gw:
            st = await a_gw.status("site-c-gw")
            assert st["status_extension"]["relay"]["paths"] == [
                ["kme-site-a", "kme-site-b", "kme-site-c"]]
            taps[0].cut()  # the B-C link goes down, two hops away from A

            def via_d() -> bool:
                links = net.status("site-a")["network"]["topology"]["links"]
                bc = next(x for x in links if (x["a"], x["b"]) == ("kme-site-b",
                                                                   "kme-site-c"))
                return not bc["up"]

            wait_until(via_d, 15, "A learns that B-C is down")
            st = await a_gw.status("site-c-gw")
            assert st["status_extension"]["relay"]["paths"] == [
                ["kme-site-a", "kme-site-d", "kme-site-c"]]
            assert all(v["connected"] for v in
                       net.status("site-a")["network"]["neighbours"].values())
            enc = await a_gw.get_enc_keys("site-c-gw", number=2)
            assert await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
        assert net.status("site-a")["network"]["relay"]["relays_failed"] == 0
    finally:
        net.stop()
        for t in taps:
            t.close()


# (crash point, the node that is SIGKILLed there, whether the destination ends up
# holding the key the master never got: an orphan no SAE can name, purged after
# key_lifetime_s)
# Two steps in the default run, the other two with -m slow (15 s each: three processes).
CRASHES = [
    pytest.param("transit_on_share", "site-b", (0,), id="transit_on_share"),
    # 1 orphan if C got the share before B died
    pytest.param("transit_after_forward", "site-b", (0, 1), id="transit_after_forward",
                 marks=pytest.mark.slow),
    pytest.param("dest_before_store", "site-c", (0,), id="dest_before_store",
                 marks=pytest.mark.slow),
    pytest.param("dest_after_store", "site-c", (1,), id="dest_after_store"),
]


@pytest.mark.parametrize(("point", "victim", "orphans"), CRASHES)
async def test_sigkill_at_a_relay_step_never_gives_the_master_a_key_alone(
        pki: Path, tmp_path: Path, point: str, victim: str, orphans: tuple[int, ...]
        ) -> None:
    net = Network(pki, tmp_path, ["site-a", "site-b", "site-c"],
                  [("site-a", "site-b"), ("site-b", "site-c")],
                  env={victim: {CRASH_ENV: point}})
    try:
        async with net.sae("site-a") as a_gw:
            with pytest.raises(KmeNoKey, match="relays failed"):
                await a_gw.get_enc_keys("site-c-gw")
        assert net.procs[victim].wait_exit(10) == -signal.SIGKILL
        assert net.status("site-a")["network"]["relayed_keys"]["delivered_to_master"] == 0
        net.env.pop(victim)
        net.start(victim)
        for site in ("site-a", "site-b", "site-c"):
            net.wait_channels(site)
        held = net.status("site-c")["network"]["relayed_keys"]
        assert held["stored_for_slave"] in orphans and held["delivered_to_slave"] == 0
        # The network recovers: a fresh relay is delivered, once, to both ends.
        async with net.sae("site-a") as a_gw, net.sae("site-c") as c_gw:
            enc = await a_gw.get_enc_keys("site-c-gw")
            assert await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc
        async with net.sae("site-c") as c_gw:
            with pytest.raises(KmeRejected, match="already delivered"):
                await c_gw.get_dec_keys("site-a-gw", [enc[0].key_id])
        assert net.status("site-a")["network"]["relayed_keys"]["delivered_to_master"] == 1
    finally:
        net.stop()
