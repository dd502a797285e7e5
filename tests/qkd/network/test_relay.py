"""The relay cores end to end: keys equal at both ends and delivered once; tampering,
replay, reordering and loss end the relay with no key at either end; a fresh relay
then succeeds."""

from __future__ import annotations

import itertools

import pytest

from qkd.network.constants import RELAY_TIMEOUT_S
from qkd.network.errors import NetErrorCode, NetworkError
from qkd.network.relay import KeyDeliverable, RelayFailed, relay_cost_bits
from qkd.network.topology import Topology, disjoint_paths
from tests.support.relay_net import Net, line, ring

KEY = 32


def relay_ok(net: Net, src: str, paths: list[tuple[str, ...]], now: float = 0.0) -> str:
    key_id = net.nodes[src].start_relay("sae-m", "sae-s", paths, KEY, now)
    net.pump(now)
    dst = paths[0][-1]
    assert key_id in net.delivered[src] and key_id in net.stored[dst]
    assert net.delivered[src][key_id] == net.stored[dst][key_id]
    return key_id


def assert_no_key(net: Net, key_id: str, src: str, dst: str) -> None:
    assert key_id not in net.delivered[src]
    assert key_id not in net.stored[dst]
    assert any(isinstance(e, RelayFailed) and e.key_id == key_id for e in net.events[src])


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_single_path_line(hops: int) -> None:
    names = "ABCD"[: hops + 1]
    net = Net(line(names))
    key_id = relay_ok(net, "A", [tuple(names)])
    assert len(net.delivered["A"][key_id]) == KEY
    # Accounting: what the suppliers handed out is what the event reports.
    ev = next(e for e in net.events["A"] if isinstance(e, KeyDeliverable))
    assert ev.link_key_bits == net.bits_taken() == relay_cost_bits([tuple(names)], KEY)
    assert "key=" not in repr(ev) and ev.key.hex() not in repr(net.events)


@pytest.mark.parametrize("names", ["ABCD", "ABCDE"])
def test_two_shares_over_a_ring(names: str) -> None:
    pairs = ring(names)
    topo = Topology.from_config({"nodes": list(names), "links": [
        {"a": a, "b": b, "pool_bits": 10**6} for a, b in pairs]})
    paths = disjoint_paths(topo, "A", "C", 2)
    net = Net(pairs)
    k1 = relay_ok(net, "A", paths)
    k2 = relay_ok(net, "A", paths)
    assert net.delivered["A"][k1] != net.delivered["A"][k2]
    assert net.bits_taken() == 2 * relay_cost_bits(paths, KEY)
    # Per hop per share: each hop's sender spent the share of E(K) (key + x + t) and
    # the tag pad forward, and the receiver a pad for the ACK back, on that path alone.
    for i, p in enumerate(paths):
        for a, b in itertools.pairwise(p):
            assert net.nodes[a].link_key_use(k1)[(i, b)] == 8 * (16 + KEY + 32)
            assert net.nodes[b].link_key_use(k1)[(i, a)] == 8 * 16
    assert sum(sum(n.link_key_use(k1).values()) for n in net.nodes.values()) == \
        relay_cost_bits(paths, KEY)


RING_PATHS = [("A", "B", "C"), ("A", "E", "D", "C")]


def _hops() -> list[tuple[str, str]]:
    hops = []
    for p in RING_PATHS:
        hops += [*itertools.pairwise(p), *zip(p[1:], p, strict=False)]
    return hops


def _first_on(hop: tuple[str, str], action: str):  # type: ignore[no-untyped-def]
    state = {"hit": False}

    def tap(src: str, dst: str, frame: bytes) -> list[bytes]:
        if (src, dst) != hop or state["hit"]:
            return [frame]
        state["hit"] = True
        if action == "tamper":
            return [frame[:-20] + bytes([frame[-20] ^ 1]) + frame[-19:]]
        if action == "tamper_header":
            return [frame[:12] + bytes([frame[12] ^ 1]) + frame[13:]]
        if action == "drop":
            return []
        return [frame, frame]  # replay

    return tap, state


@pytest.mark.parametrize("action", ["tamper", "tamper_header", "drop", "replay"])
@pytest.mark.parametrize("hop", _hops())
def test_attack_on_any_hop_fails_cleanly_then_fresh_relay_succeeds(
        action: str, hop: tuple[str, str]) -> None:
    net = Net(ring("ABCDE"))
    tap, state = _first_on(hop, action)
    key_id = net.nodes["A"].start_relay("sae-m", "sae-s", RING_PATHS, KEY, 0.0)
    net.pump(0.0, tap)
    assert state["hit"]  # the tap really saw a frame on this hop
    later = RELAY_TIMEOUT_S + 1
    net.timers(later)
    net.pump(later)
    forward = hop in [(p[i], p[i + 1]) for p in RING_PATHS for i in range(len(p) - 1)]
    if action == "replay" and not forward:
        # A duplicated ACK may arrive after that node's part is done: then the relay
        # may succeed, but the two ends must agree.
        assert (key_id in net.delivered["A"]) == (key_id in net.stored["C"])
    else:
        assert_no_key(net, key_id, "A", "C")
    relay_ok(net, "A", RING_PATHS, later)


def test_reordered_frames_on_a_hop_fail_the_overtaken_relay() -> None:
    net = Net(line("ABC"))
    held: list[bytes] = []

    def swap(src: str, dst: str, frame: bytes) -> list[bytes]:
        if (src, dst) == ("A", "B") and not held:
            held.append(frame)
            return []
        return [frame]

    k1 = net.nodes["A"].start_relay("sae-m", "sae-s", [("A", "B", "C")], KEY, 0.0)
    net.pump(0.0, swap)  # k1's first frame is held back
    k2 = relay_ok(net, "A", [("A", "B", "C")])  # overtakes it
    net.nodes["B"].receive_data("A", held[0], 0.0)
    net.pump(0.0)
    net.timers(RELAY_TIMEOUT_S + 1)
    net.pump(RELAY_TIMEOUT_S + 1)
    assert_no_key(net, k1, "A", "C")
    assert k2 in net.delivered["A"]
    assert any(getattr(e, "code", None) is NetErrorCode.LINK_KEY for e in net.events["B"])


def test_destination_acks_only_after_storing() -> None:
    net = Net(line("ABC"))
    key_id = net.nodes["A"].start_relay("sae-m", "sae-s", [("A", "B", "C")], KEY, 0.0)
    net.pump(0.0, store=False)
    assert key_id in net.stored["C"] and key_id not in net.delivered["A"]
    net.nodes["C"].key_stored(key_id, 0.0)
    net.pump(0.0)
    assert net.delivered["A"][key_id] == net.stored["C"][key_id]


def test_start_refuses_paths_that_share_a_node() -> None:
    net = Net(ring("ABCD"))
    with pytest.raises(NetworkError) as exc:
        net.nodes["A"].start_relay("m", "s", [("A", "B", "C"), ("A", "B", "C")], KEY, 0.0)
    assert exc.value.code is NetErrorCode.PATH


def test_link_down_reroutes_and_the_relay_uses_the_new_path() -> None:
    from qkd.network.topology import LinkReport, LinkStateAd, LinkStateDb

    pairs = ring("ABCDE")
    db = LinkStateDb(Topology.from_config({"nodes": list("ABCDE"), "links": [
        {"a": a, "b": b, "pool_bits": 10**6} for a, b in pairs]}))
    assert db.watch("A", "C", 1) == (("A", "B", "C"),)
    events = db.receive(LinkStateAd("B", 1, (LinkReport("A", True, 10**6),
                                             LinkReport("C", False, 10**6))).encode())
    (paths,) = [e.paths for e in events]  # type: ignore[union-attr]
    assert paths == (("A", "E", "D", "C"),)
    net = Net(pairs)
    key_id = relay_ok(net, "A", list(paths))
    assert not any("B" in (s, d) for s, d, _ in net.wire) and key_id


def test_next_hop_out_of_link_key_fails_the_relay_without_raising() -> None:
    net = Net(line("ABC"))
    # Drain B's key towards C so the share cannot go on.
    left = len(net.keys["B"].material("C")[0])
    net.keys["B"].take("C", left - 8)
    key_id = net.nodes["A"].start_relay("m", "s", [("A", "B", "C")], KEY, 0.0)
    net.pump(0.0)
    assert any(isinstance(e, RelayFailed) and e.code is NetErrorCode.LINK_KEY
               for e in net.events["B"])
    assert_no_key(net, key_id, "A", "C")


def test_finished_relays_are_forgotten_when_the_timer_says() -> None:
    net = Net(line("ABC"))
    relay_ok(net, "A", [("A", "B", "C")])
    for node in net.nodes.values():
        when = node.get_timer()
        assert when is not None  # a finished relay is still due to be forgotten
        node.handle_timer(when)
        assert node.get_timer() is None and "relays=0" in repr(node)


def test_relay_cost_per_hop_counts_the_amd_tail() -> None:
    # Per hop: tag pad 16 + share of E(K) (key_bytes + 32 for x and t) forward, ACK
    # tag pad 16 back. 256-bit key: 8 * (16 + 32 + 32 + 16) = 768 bits.
    assert relay_cost_bits([("A", "B")], 32) == 768
    assert relay_cost_bits([("A", "B", "C"), ("A", "D", "E", "C")], 32) == 5 * 768
    assert relay_cost_bits([("A", "B")], 128) == 8 * (16 + 128 + 32 + 16) == 1536
