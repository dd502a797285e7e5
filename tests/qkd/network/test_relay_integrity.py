"""End-to-end integrity of relayed keys: a compromised transit node that forwards a
validly tagged but changed share of E(K) (the AMD-encoded key) makes the relay fail
with INTEGRITY, no key at either end; with the AMD check switched off the two ends would
hold different keys (positive control). The k = 1 limit is pinned too."""

from __future__ import annotations

import dataclasses
import random

import pytest

from qkd.link.wegman_carter import make_tag
from qkd.network import amd
from qkd.network import relay as relay_mod
from qkd.network.constants import AMD_BYTES, PAD_BYTES
from qkd.network.errors import NetErrorCode
from qkd.network.relay import (
    _LABEL,
    KeyAssembled,
    RelayFailed,
    Share,
    decode_frame,
    encode_unsigned,
)
from qkd.network.topology import _name
from tests.support.relay_net import Net, Tap, line, ring

KEY = 32
SHARE_BYTES = KEY + AMD_BYTES  # a share of E(K) = K | x | t
LINE = [("A", "B", "C")]
RING = [("A", "B", "C"), ("A", "E", "D", "C")]  # ring ABCDE, k = 2
DELTA_K = bytes([0x5A]) + bytes(KEY - 1)
DELTA = DELTA_K + bytes(AMD_BYTES)  # changes the key part only


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(p ^ q for p, q in zip(a, b, strict=True))


def compromised(net: Net, node: str, *, share_delta: bytes | None = None,
                replace: bytes | None = None) -> Tap:
    """`node` rewrites the SHARE it forwards: it opens it with its own outgoing link key,
    XORs `share_delta` into the share (or puts `replace` in its place), re-encrypts and
    re-tags, all validly (it holds the next hop's link key)."""
    def tap(src: str, dst: str, frame: bytes) -> list[bytes]:
        msg, off, _, _ = decode_frame(frame)
        if src != node or not isinstance(msg, Share):
            return [frame]
        out, _ = net.keys[node].material(dst)
        pad = out[off : off + PAD_BYTES]
        otp = out[off + PAD_BYTES : off + PAD_BYTES + SHARE_BYTES]
        share = xor(msg.ciphertext, otp)
        if share_delta is not None:
            share = xor(share, share_delta)
        if replace is not None:
            share = replace
        new = dataclasses.replace(msg, ciphertext=xor(share, otp))
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
    # The failure is the AMD check's alone: every per-hop tag verified.
    assert not any(getattr(e, "code", None) is NetErrorCode.AUTH
                   for evs in net.events.values() for e in evs)
    # And a fresh relay over the same (now honest) nodes succeeds.
    k2 = start(net, paths, lambda s, d, f: [f])
    assert net.delivered["A"][k2] == net.stored["C"][k2]
    # Control: the same rewrite with no change (open, re-encrypt, re-tag) goes through.
    net2 = Net(line("ABC") if len(paths) == 1 else ring("ABCDE"))
    k3 = start(net2, paths, compromised(net2, "B", share_delta=bytes(SHARE_BYTES)))
    assert net2.delivered["A"][k3] == net2.stored["C"][k3]


@pytest.mark.parametrize("paths", [LINE, RING], ids=["k1", "k2"])
def test_positive_control_without_the_check_the_ends_hold_different_keys(
        paths: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_mod, "_amd_accepts", lambda encoded: True)
    net = Net(line("ABC") if len(paths) == 1 else ring("ABCDE"))
    key_id = start(net, paths, compromised(net, "B", share_delta=DELTA))
    master, slave = net.delivered["A"][key_id], net.stored["C"][key_id]
    assert master != slave
    assert xor(master, slave) == DELTA_K  # decoding unchecked gives K xor Delta_K


@pytest.mark.parametrize("paths", [LINE, RING], ids=["k1", "k2"])
def test_every_single_bit_flip_of_a_share_is_detected(paths: list[tuple[str, ...]]) -> None:
    """Each of the 8 * (key_bytes + 32) bits of B's share, key part, x and t alike."""
    for bit in range(8 * SHARE_BYTES):
        flip = bytearray(SHARE_BYTES)
        flip[bit // 8] = 1 << (bit % 8)
        net = Net(line("ABC") if len(paths) == 1 else ring("ABCDE"), link_bytes=1 << 10)
        key_id = start(net, paths, compromised(net, "B", share_delta=bytes(flip)))
        assert key_id not in net.delivered["A"] and key_id not in net.stored["C"], bit
        assert net.nodes["C"].failures == {NetErrorCode.INTEGRITY: 1}, bit


@pytest.mark.parametrize("node", ["B", "D"])
def test_random_deltas_on_either_path_are_detected(node: str) -> None:
    # k = 2: B's path is shorter (its share arrives first), D's the longer one.
    rnd = random.Random(node)
    for _ in range(40):
        delta = rnd.randbytes(SHARE_BYTES)
        net = Net(ring("ABCDE"), link_bytes=1 << 10)
        key_id = start(net, RING, compromised(net, node, share_delta=delta))
        assert_integrity_failure(net, key_id)


def test_known_limit_k1_node_on_the_only_path_can_re_encode_a_key_of_its_choice() -> None:
    """With k = 1 the transit node holds E(K) whole, so it can send E(K') for a K' of
    its choice, with a fresh x and a valid t: the AMD code catches changes made without
    the key, not a node that holds every share (k = 1, or colluding nodes on every
    path). Pinned so the docs' claim stays true."""
    net = Net(line("ABC"))
    chosen = bytes(range(KEY))
    forged = amd.encode(chosen)
    key_id = start(net, LINE, compromised(net, "B", replace=forged))
    assert net.stored["C"][key_id] == chosen != net.delivered["A"][key_id]
    # Control: the same node blindly XORing a change in (no re-encoding) is caught.
    net2 = Net(line("ABC"))
    k2 = start(net2, LINE, compromised(net2, "B", share_delta=forged))
    assert_integrity_failure(net2, k2)


@pytest.mark.parametrize("key_bytes", [16, 20, 33, 128])
def test_key_lengths_off_the_block_size_round_trip_and_are_checked(key_bytes: int) -> None:
    net = Net(ring("ABCDE"))
    ok = net.nodes["A"].start_relay("sae-m", "sae-s", RING, key_bytes, 0.0)
    net.pump(0.0)
    assert len(net.stored["C"][ok]) == key_bytes and net.delivered["A"][ok] == \
        net.stored["C"][ok]
    # Control: the last key byte flipped on B's path is caught at any length.
    flip = bytearray(key_bytes + AMD_BYTES)
    flip[key_bytes - 1] = 0x80
    bad = net.nodes["A"].start_relay("sae-m", "sae-s", RING, key_bytes, 0.0)

    def tap(src: str, dst: str, frame: bytes) -> list[bytes]:
        msg, off, _, _ = decode_frame(frame)
        if src != "B" or not isinstance(msg, Share):
            return [frame]
        out, _ = net.keys["B"].material(dst)
        # XOR under a one-time pad is XOR on the share; only the re-tag needs the key.
        new = dataclasses.replace(msg, ciphertext=xor(msg.ciphertext, bytes(flip)))
        unsigned = encode_unsigned(new, off)
        return [unsigned + make_tag(net.keys["B"].hash_key(dst), out[off : off + PAD_BYTES],
                                    _LABEL + _name("B") + _name(dst) + unsigned)]

    net.pump(0.0, tap)
    assert bad not in net.stored["C"] and bad not in net.delivered["A"]
    assert net.nodes["C"].failures == {NetErrorCode.INTEGRITY: 1}
