"""End-to-end integrity of relayed keys: a compromised transit node that forwards a
validly tagged wrong share (or another key check) makes the relay fail with INTEGRITY,
no key at either end; with the check switched off the two ends would hold different
keys (positive control)."""

from __future__ import annotations

import dataclasses

import pytest

from qkd.link.wegman_carter import make_tag
from qkd.network import relay as relay_mod
from qkd.network.constants import PAD_BYTES
from qkd.network.errors import NetErrorCode
from qkd.network.relay import (
    _LABEL,
    KeyAssembled,
    RelayFailed,
    Share,
    decode_frame,
    encode_unsigned,
    key_check,
)
from qkd.network.topology import _name
from tests.support.relay_net import Net, Tap, line, ring

KEY = 32
LINE = [("A", "B", "C")]
RING = [("A", "B", "C"), ("A", "E", "D", "C")]  # ring ABCDE, k = 2
DELTA = bytes([0x5A]) + bytes(KEY - 1)


def compromised(net: Net, node: str, *, share_delta: bytes | None = None,
                check: bytes | None = None) -> Tap:
    """`node` rewrites the SHARE it forwards: it opens it with its own outgoing link key,
    changes the share and/or the key check, re-encrypts and re-tags, all validly (it
    holds the next hop's link key)."""
    def tap(src: str, dst: str, frame: bytes) -> list[bytes]:
        msg, off, _, _ = decode_frame(frame)
        if src != node or not isinstance(msg, Share):
            return [frame]
        out, _ = net.keys[node].material(dst)
        pad, otp = out[off : off + PAD_BYTES], out[off + PAD_BYTES : off + PAD_BYTES + KEY]
        share = bytes(a ^ b for a, b in zip(msg.ciphertext, otp, strict=True))
        if share_delta is not None:
            share = bytes(a ^ b for a, b in zip(share, share_delta, strict=True))
        new = dataclasses.replace(
            msg, check=msg.check if check is None else check,
            ciphertext=bytes(a ^ b for a, b in zip(share, otp, strict=True)))
        unsigned = encode_unsigned(new, off)
        tag = make_tag(net.keys[node].hash_key(dst), pad,
                       _LABEL + _name(node) + _name(dst) + unsigned)
        return [unsigned + tag]

    return tap


def start(net: Net, paths: list[tuple[str, ...]], tap: Tap) -> str:
    key_id = net.nodes["A"].start_relay("sae-m", "sae-s", paths, KEY, 0.0)
    net.pump(0.0, tap)
    return key_id


def assert_integrity_failure(net: Net, key_id: str) -> None:
    assert key_id not in net.delivered["A"] and key_id not in net.stored["C"]
    assert not any(isinstance(e, KeyAssembled) for e in net.events["C"])
    assert net.nodes["C"].failures == {NetErrorCode.INTEGRITY: 1}
    assert any(isinstance(e, RelayFailed) and e.code is NetErrorCode.INTEGRITY
               for e in net.events["C"])
    # The destination's ABORT reached the source, which ends (and never delivers).
    assert any(isinstance(e, RelayFailed) and e.code is NetErrorCode.PEER_ABORT
               and "INTEGRITY" in e.reason for e in net.events["A"])
    assert net.nodes["A"].stats["delivered"] == 0


@pytest.mark.parametrize("paths", [LINE, RING], ids=["k1", "k2"])
def test_wrong_share_from_a_transit_node_fails_with_integrity(
        paths: list[tuple[str, ...]]) -> None:
    net = Net(line("ABC") if len(paths) == 1 else ring("ABCDE"))
    key_id = start(net, paths, compromised(net, "B", share_delta=DELTA))
    assert_integrity_failure(net, key_id)
    # The failure is the key check's alone: every per-hop tag verified.
    assert not any(getattr(e, "code", None) is NetErrorCode.AUTH
                   for evs in net.events.values() for e in evs)
    # And a fresh relay over the same (now honest) nodes succeeds.
    k2 = start(net, paths, lambda s, d, f: [f])
    assert net.delivered["A"][k2] == net.stored["C"][k2]


@pytest.mark.parametrize("paths", [LINE, RING], ids=["k1", "k2"])
def test_positive_control_without_the_check_the_ends_hold_different_keys(
        paths: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_mod, "_check_matches", lambda expected, got: True)
    net = Net(line("ABC") if len(paths) == 1 else ring("ABCDE"))
    key_id = start(net, paths, compromised(net, "B", share_delta=DELTA))
    master, slave = net.delivered["A"][key_id], net.stored["C"][key_id]
    assert master != slave
    assert bytes(a ^ b for a, b in zip(master, slave, strict=True)) == DELTA


@pytest.mark.parametrize("paths", [LINE, RING], ids=["k1", "k2"])
def test_a_transit_node_changing_the_key_check_fails_too(
        paths: list[tuple[str, ...]]) -> None:
    net = Net(line("ABC") if len(paths) == 1 else ring("ABCDE"))
    key_id = start(net, paths, compromised(net, "B", check=bytes(16)))
    assert_integrity_failure(net, key_id)
    # Control: the same rewrite that keeps share and check lets the relay through.
    net2 = Net(line("ABC") if len(paths) == 1 else ring("ABCDE"))
    k2 = start(net2, paths, compromised(net2, "B"))
    assert net2.delivered["A"][k2] == net2.stored["C"][k2]


def test_shares_disagreeing_on_the_check_fail_whatever_arrives_first() -> None:
    # k = 2: B's path is shorter, so its (changed) share arrives first; the honest
    # share on the other path then disagrees. Reverse too: D changes the later one.
    for node in ("B", "D"):
        net = Net(ring("ABCDE"))
        key_id = start(net, RING, compromised(net, node, check=bytes(range(16))))
        assert_integrity_failure(net, key_id)
        reasons = [e.reason for e in net.events["C"] if isinstance(e, RelayFailed)]
        assert reasons == ["shares disagree on the key check"]


def test_key_check_binds_key_ids_saes_and_paths() -> None:
    key, kid = bytes(range(KEY)), bytes(16)
    base = key_check(key, kid, "m", "s", LINE)
    assert len(base) == 16 and base == key_check(key, kid, "m", "s", LINE)
    for other in (key_check(bytes(KEY), kid, "m", "s", LINE),
                  key_check(key, bytes([1]) + bytes(15), "m", "s", LINE),
                  key_check(key, kid, "s", "m", LINE),
                  key_check(key, kid, "m", "s", [("A", "D", "C")]),
                  key_check(key, kid, "m", "s", RING)):
        assert other != base


def test_known_limit_k1_node_that_knows_the_key_can_forge_a_consistent_check() -> None:
    """With k = 1 the transit node holds the key itself, so it can send another key
    with that key's check: the check cannot catch a node that knows every share (k = 1,
    or colluding nodes on every path). Pinned so the docs' claim stays true."""
    net = Net(line("ABC"))
    seen: dict[str, bytes] = {}

    def forge(src: str, dst: str, frame: bytes) -> list[bytes]:
        msg, off, _, _ = decode_frame(frame)
        if (src, dst) == ("A", "B") and isinstance(msg, Share):
            pad = net.keys["B"].material("A")[1][off + PAD_BYTES : off + PAD_BYTES + KEY]
            seen["key"] = bytes(a ^ b for a, b in zip(msg.ciphertext, pad, strict=True))
        if (src, dst) == ("B", "C") and isinstance(msg, Share):
            wrong = bytes(a ^ b for a, b in zip(seen["key"], DELTA, strict=True))
            c = key_check(wrong, msg.key_id, msg.master_sae, msg.slave_sae, [msg.path])
            return compromised(net, "B", share_delta=DELTA, check=c)(src, dst, frame)
        return [frame]

    key_id = start(net, LINE, forge)
    assert net.delivered["A"][key_id] != net.stored["C"][key_id]
