"""Wegman–Carter authentication of the KME link: tags, one-time pads, accounting."""

from __future__ import annotations

import os

import pytest

from qkd.link.wegman_carter import (
    HASH_KEY_BYTES,
    PAD_BYTES,
    AuthError,
    AuthKeys,
    HashKey,
    bootstrap_material,
    check_tag,
    make_tag,
)


def pair(pads: int = 100, reserve: int = 0) -> tuple[AuthKeys, AuthKeys]:
    hk = os.urandom(HASH_KEY_BYTES)
    stream = os.urandom(2 * pads * PAD_BYTES)
    a = AuthKeys("alice", HashKey(hk), reserve=reserve)
    b = AuthKeys("bob", HashKey(hk), reserve=reserve)
    a.refill(stream)
    b.refill(stream)
    return a, b


def test_tag_verifies_and_any_change_fails() -> None:
    key = HashKey(os.urandom(HASH_KEY_BYTES))
    pad = os.urandom(PAD_BYTES)
    for msg in (b"", b"x", os.urandom(1024), os.urandom(5000)):
        tag = make_tag(key, pad, msg)
        assert check_tag(key, pad, msg, tag)  # positive control
        if msg:
            for bit in (0, len(msg) * 8 - 1, len(msg) * 4):
                bad = bytearray(msg)
                bad[bit // 8] ^= 1 << (bit % 8)
                assert not check_tag(key, pad, bytes(bad), tag)
        # Zero padding is not a free extension: the length is hashed.
        assert not check_tag(key, pad, msg + b"\x00", tag)
        assert not check_tag(key, os.urandom(PAD_BYTES), msg, tag)


def test_channel_accounting_and_replay() -> None:
    a, b = pair(10)
    off, tag = a.sign(b"hello", for_round=True)
    b.verify(off, b"hello", tag)
    with pytest.raises(AuthError, match="reused"):
        b.verify(off, b"hello", tag)          # replay of an accepted frame
    off2, tag2 = a.sign(b"world", for_round=True)
    with pytest.raises(AuthError, match="authentication failed"):
        b.verify(off2, b"worle", tag2)        # forged content
    assert b.status().failures == 2
    # Reverse direction uses its own stream.
    off3, tag3 = b.sign(b"ack", for_round=True)
    a.verify(off3, b"ack", tag3)
    assert a.status().pad_bytes_used == 3 * PAD_BYTES


def test_reserve_is_kept_for_control_traffic() -> None:
    a, _ = pair(4, reserve=2 * PAD_BYTES)
    a.sign(b"1", for_round=True)
    a.sign(b"2", for_round=True)
    with pytest.raises(AuthError, match="reserve"):
        a.sign(b"3", for_round=True)
    a.sign(b"restart", for_round=False)
    a.sign(b"restart", for_round=False)
    with pytest.raises(AuthError, match="exhausted"):
        a.sign(b"x", for_round=False)


def test_repr_hides_keys_and_bootstrap_is_deterministic() -> None:
    a, _ = pair()
    assert "redacted" in repr(a) and "redacted" in repr(HashKey(bytes(HASH_KEY_BYTES)))
    k = os.urandom(32)
    assert bootstrap_material(k, b"x", 9000) == bootstrap_material(k, b"x", 9000)
    assert bootstrap_material(k, b"x", 64) != bootstrap_material(k, b"y", 64)
