"""What one compromised intermediate node learns (with a positive control), frames a
misbehaving neighbour signs validly but with the wrong hop counter or path, and the
relay decoder under fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from qkd.link.wegman_carter import make_tag
from qkd.network.constants import AMD_BYTES, PAD_BYTES, RELAY_TIMEOUT_S
from qkd.network.errors import NetErrorCode, NetworkError
from qkd.network.relay import (
    _LABEL,
    FrameRejected,
    RelayFailed,
    Share,
    decode_frame,
    encode_unsigned,
)
from qkd.network.topology import _name
from tests.support.relay_net import Net, line, ring

KEY = 32
SHARE_BYTES = KEY + AMD_BYTES  # a share of E(K) = K | x | t
X = bytes(range(80, 96))  # the AMD code's x
RING_PATHS = [("A", "B", "C"), ("A", "E", "D", "C")]


def scripted(chunks: list[bytes]) -> Callable[[int], bytes]:
    """The source's randomness, in the order it draws: key id, key, the AMD code's x,
    k-1 shares of E(K)."""
    queue = list(chunks)

    def rng(n: int) -> bytes:
        out = queue.pop(0)
        assert len(out) == n
        return out

    return rng


def run(pairs: list[tuple[str, str]], paths: list[tuple[str, ...]], key: bytes,
        share0: bytes | None) -> Net:
    chunks = [bytes(range(16)), key, X] + ([share0] if share0 is not None else [])
    net = Net(pairs, link_rng=random.Random(7).randbytes, node_rng={"A": scripted(chunks)})
    key_id = net.nodes["A"].start_relay("sae-m", "sae-s", paths, KEY, 0.0)
    net.pump(0.0)
    assert net.delivered["A"][key_id] == key == net.stored["C"][key_id]
    return net


def view(net: Net, node: str) -> tuple[object, ...]:
    """Everything `node` holds or sees: its link keys and every frame in or out."""
    frames = tuple(f for f in net.wire if node in (f[0], f[1]))
    keys = tuple(net.keys[node].material(n) for n in net.keys[node].neighbours())
    return frames, keys


def reconstruct(net: Net, node: str) -> bytes:
    """The node's best guess: decrypt every share it received, XOR them together, and
    take the key part of E(K)."""
    guess = bytes(SHARE_BYTES)
    for src, dst, frame in net.wire:
        if dst != node:
            continue
        msg, off, _, _ = decode_frame(frame)
        if isinstance(msg, Share):
            pad = net.keys[node].material(src)[1][off + PAD_BYTES :
                                                  off + PAD_BYTES + SHARE_BYTES]
            guess = bytes(a ^ b ^ c for a, b, c in zip(guess, msg.ciphertext, pad, strict=True))
    return guess[:KEY]


def test_k1_intermediate_rebuilds_the_key_positive_control() -> None:
    key = bytes(range(100, 100 + KEY))
    net = run(line("ABC"), [("A", "B", "C")], key, None)
    assert reconstruct(net, "B") == key


def test_k2_intermediate_view_is_independent_of_the_key() -> None:
    k1, k2 = bytes(range(KEY)), bytes(range(200, 200 + KEY))
    r = bytes(range(50, 50 + SHARE_BYTES))
    a = run(ring("ABCDE"), RING_PATHS, k1, r)
    b = run(ring("ABCDE"), RING_PATHS, k2, r)
    assert k1 != k2
    assert view(a, "B") == view(b, "B")  # identical view, different keys
    assert reconstruct(a, "B") != k1 and reconstruct(b, "B") != k2
    # Control: the node on the other path sees a different share for each key.
    assert view(a, "E") != view(b, "E")


def resign(net: Net, frame: bytes, sender: str, receiver: str, **changes: object) -> bytes:
    """A frame the neighbour `sender` signs validly but with changed fields."""
    msg, off, _, _ = decode_frame(frame)
    msg = dataclasses.replace(msg, **changes)  # type: ignore[type-var]
    unsigned = encode_unsigned(msg, off)
    pad = net.keys[sender].material(receiver)[0][off : off + PAD_BYTES]
    tag = make_tag(net.keys[sender].hash_key(receiver), pad,
                   _LABEL + _name(sender) + _name(receiver) + unsigned)
    return unsigned + tag


def test_wrong_path_on_the_ack_fails_the_relay_at_both_ends() -> None:
    net = Net(ring("ABCD"))

    def tap(src: str, dst: str, frame: bytes) -> list[bytes]:
        if (src, dst) == ("C", "B"):
            return [resign(net, frame, "C", "B", path=("A", "B", "C", "D"))]
        return [frame]

    key_id = net.nodes["A"].start_relay("m", "s", [("A", "B", "C")], KEY, 0.0)
    net.pump(0.0, tap)
    assert key_id not in net.delivered["A"] and key_id not in net.stored["C"]
    assert any(isinstance(e, RelayFailed) and e.code is NetErrorCode.PATH
               for e in net.events["B"])
    # Control: the same tap that re-signs without a change lets the relay through.
    net2 = Net(ring("ABCD"))
    k2 = net2.nodes["A"].start_relay("m", "s", [("A", "B", "C")], KEY, 0.0)
    net2.pump(0.0, lambda s, d, f: [resign(net2, f, s, d)] if (s, d) == ("C", "B") else [f])
    assert net2.delivered["A"][k2] == net2.stored["C"][k2]


def test_wrong_hop_counter_is_refused_and_the_relay_times_out() -> None:
    net = Net(line("ABC"))

    def tap(src: str, dst: str, frame: bytes) -> list[bytes]:
        if (src, dst) == ("A", "B"):
            return [resign(net, frame, "A", "B", hop=2)]
        return [frame]

    key_id = net.nodes["A"].start_relay("m", "s", [("A", "B", "C")], KEY, 0.0)
    net.pump(0.0, tap)
    assert any(isinstance(e, FrameRejected) and e.code is NetErrorCode.HOP
               for e in net.events["B"])
    net.timers(RELAY_TIMEOUT_S + 1)
    assert key_id not in net.delivered["A"] and key_id not in net.stored["C"]
    assert any(isinstance(e, RelayFailed) and e.code is NetErrorCode.TIMEOUT
               for e in net.events["A"])


def _valid_frames() -> list[bytes]:
    net = Net(ring("ABCDE"))
    net.nodes["A"].start_relay("sae-m", "sae-s", RING_PATHS, KEY, 0.0)
    net.pump(0.0)
    return [f for _, _, f in net.wire]


VALID = _valid_frames()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_relay_decoder_raises_only_the_layer_error(data: bytes) -> None:
    with contextlib.suppress(NetworkError):
        decode_frame(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 10**6), st.integers(0, 255),
       st.integers(-3, 3))
def test_relay_decoder_on_mutated_valid_frames(frame: bytes, pos: int, byte: int,
                                               cut: int) -> None:
    i = pos % len(frame)
    mutated = frame[:i] + bytes([byte]) + frame[i + 1:]
    mutated = mutated[:len(mutated) + cut] if cut < 0 else mutated + bytes(cut)
    with contextlib.suppress(NetworkError):
        msg, off, tag, _signed = decode_frame(mutated)
        # Canonical: what decodes re-encodes to the same bytes.
        assert encode_unsigned(msg, off) + tag == mutated


def test_a_resent_share_under_fresh_link_key_is_a_replay() -> None:
    """The link-key watermark stops a byte-for-byte replay; this one (a neighbour that
    re-sends under new key) only the seen-message check catches."""
    net = Net(line("ABC"))

    def tap(src: str, dst: str, frame: bytes) -> list[bytes]:
        msg, off, _, _ = decode_frame(frame)
        if (src, dst) != ("A", "B") or not isinstance(msg, Share):
            return [frame]
        old = net.keys["A"].material("B")[0][off + PAD_BYTES : off + PAD_BYTES + SHARE_BYTES]
        off2, fresh = net.keys["A"].take("B", PAD_BYTES + SHARE_BYTES)
        share = bytes(a ^ b for a, b in zip(msg.ciphertext, old, strict=True))
        again = dataclasses.replace(
            msg, ciphertext=bytes(a ^ b for a, b in zip(share, fresh[PAD_BYTES:], strict=True)))
        unsigned = encode_unsigned(again, off2)
        tag = make_tag(net.keys["A"].hash_key("B"), fresh[:PAD_BYTES],
                       _LABEL + _name("A") + _name("B") + unsigned)
        return [frame, unsigned + tag]

    key_id = net.nodes["A"].start_relay("m", "s", [("A", "B", "C")], KEY, 0.0)
    net.pump(0.0, tap)
    assert any(isinstance(e, RelayFailed) and e.code is NetErrorCode.REPLAY
               for e in net.events["B"])
    assert key_id not in net.delivered["A"] and key_id not in net.stored["C"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 10**6), st.integers(0, 255),
       st.sampled_from(["A", "B", "E", "X"]))
def test_receive_data_never_raises(frame: bytes, pos: int, byte: int, neighbour: str) -> None:
    """Whatever a neighbour sends, the core reports it as an event, never an exception."""
    net = Net(ring("ABCDE"))
    net.nodes["A"].start_relay("sae-m", "sae-s", RING_PATHS, KEY, 0.0)
    i = pos % len(frame)
    for target in ("B", "C", "A"):
        net.nodes[target].receive_data(neighbour, frame[:i] + bytes([byte]) + frame[i + 1:],
                                       0.0)
        net.nodes[target].receive_data(neighbour, frame, 0.0)
