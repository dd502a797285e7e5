"""Known-answer tags of both polynomial MACs, recorded from the two separate
implementations before they were merged into `qkd.common.polymac` (issue 10): the
merged code must give bit-identical tags, or handshakes and link frames between
old and new builds would stop verifying."""

from __future__ import annotations

import hashlib

import pytest

from gateway.tunnel.otmac import check_one_time_tag, one_time_tag
from qkd.link.wegman_carter import HASH_KEY_BYTES, HashKey, check_tag, make_tag


def _stream(label: bytes, n: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(label + i.to_bytes(4, "big")).digest()
        i += 1
    return out[:n]


# Lengths straddle the 15-byte chunk of the one-time MAC and the 1 KiB NH block
# and 4-byte word of Wegman-Carter, where an encoding slip would show first.
OTMAC_VECTORS = {
    0: "80ec34d79a6098284eb791ac8ec7491d",
    1: "587a3e7082eaa33f4dbd27a6d813f12a",
    14: "1c5f0186271de0fd49a526d02c60d968",
    15: "2e655f66e30c01916384dd51d750b057",
    16: "999d803875febeb0c8ffa4f2b8957a66",
    30: "0e46f92ddbe4be5e340cd202b8034c0a",
    31: "606898fc8b3e0b2ebd89a1a461616831",
    1000: "651584a2405ecc678354541b81d3e75d",
    65536: "682d80d50a8fdaf9b689dc26ae536f3d",
}

WC_VECTORS = {
    0: "e3b2639d231605808aa62d6b80916c57",
    1: "3d8e917856d064c0f53d301112aa0069",
    3: "658148f1d407159be504822f9b6be357",
    4: "e334ccee2dfdbda85b845200ff202755",
    1023: "f8aad55c2e9adb85f214b7bce8cebe55",
    1024: "6e2f78c2698efc586cb26d78d16b6c47",
    1025: "1a36fb25732b1f9f38e7832e37ea7575",
    5000: "e2d74b9bbc2aac17ea42c5059891d941",
    300000: "47bf3409ba75bab418557214219d3f21",
}


@pytest.mark.parametrize(("length", "expected"), sorted(OTMAC_VECTORS.items()))
def test_one_time_mac_known_answers(length: int, expected: str) -> None:
    key = _stream(b"otmac key", 32)
    message = _stream(b"otmac msg", length)
    tag = one_time_tag(key, message)
    assert tag.hex() == expected
    assert check_one_time_tag(key, message, tag)
    # Control: the vectors are sensitive to the message, not constants.
    assert not check_one_time_tag(key, message[:-1] + b"\x00" if message else b"\x00", tag)


@pytest.mark.parametrize(("length", "expected"), sorted(WC_VECTORS.items()))
def test_wegman_carter_known_answers(length: int, expected: str) -> None:
    key = HashKey(_stream(b"wc hash key", HASH_KEY_BYTES))
    pad = _stream(b"wc pad", 16)
    message = _stream(b"wc msg", length)
    tag = make_tag(key, pad, message)
    assert tag.hex() == expected
    assert check_tag(key, pad, message, tag)
    assert (key.hash_reference(message) + int.from_bytes(pad, "little")) % ((1 << 127) - 1) \
        == int.from_bytes(tag, "little")
    assert not check_tag(key, pad, message + b"\x00", tag)
