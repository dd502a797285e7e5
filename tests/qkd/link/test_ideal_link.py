"""Ideal link: deterministic, pair-bound keys and authenticated key IDs; token bucket."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkd.link.ideal import (
    COUNTER_LIMIT,
    IdealLink,
    InvalidKeyId,
    TokenBucket,
    load_link_secret,
)

SECRET = bytes(range(32))
LINK = IdealLink(SECRET)


def test_both_sides_derive_the_same_key_and_id() -> None:
    other_side = IdealLink(bytes(SECRET))
    kid = LINK.key_id("a-gw", "b-gw", 7, 256)
    assert kid == other_side.key_id("a-gw", "b-gw", 7, 256)
    assert other_side.open_key_id(kid, "a-gw", "b-gw") == (7, 256)
    key = LINK.key("a-gw", "b-gw", 7, 256)
    assert key == other_side.key("a-gw", "b-gw", 7, 256) and len(key) == 32


def test_key_ids_are_v8_uuids_and_do_not_show_the_counter() -> None:
    ids = [LINK.key_id("a", "b", i, 256) for i in range(50)]
    assert len(set(ids)) == 50
    for kid in ids:
        u = uuid.UUID(kid)
        assert u.version == 8 and u.variant == uuid.RFC_4122
    # Consecutive counters must not give IDs sharing a visible prefix (counter hidden).
    assert len({kid[:8] for kid in ids}) == 50


def test_keys_differ_by_pair_counter_size_and_secret() -> None:
    base = LINK.key("a", "b", 1, 256)
    assert base != LINK.key("b", "a", 1, 256)
    assert base != LINK.key("a", "b", 2, 256)
    assert base != LINK.key("a", "b", 1, 512)[:32]
    assert base != IdealLink(b"\x01" * 32).key("a", "b", 1, 256)
    # Length-prefixing: moving a character between the two IDs changes the key.
    assert LINK.key("ab", "c", 1, 256) != LINK.key("a", "bc", 1, 256)


def test_open_rejects_other_pair_secret_and_forgery() -> None:
    kid = LINK.key_id("a", "b", 3, 128)
    for master, slave in [("b", "a"), ("a", "c"), ("c", "b")]:
        with pytest.raises(InvalidKeyId):
            LINK.open_key_id(kid, master, slave)
    with pytest.raises(InvalidKeyId):
        IdealLink(b"\x02" * 32).open_key_id(kid, "a", "b")
    with pytest.raises(InvalidKeyId):
        LINK.open_key_id(str(uuid.uuid4()), "a", "b")
    with pytest.raises(InvalidKeyId):
        LINK.open_key_id("garbage", "a", "b")


@given(st.integers(0, 127).filter(lambda b: b not in (48, 49, 50, 51, 64, 65)))
def test_any_flipped_bit_is_detected(bit: int) -> None:
    # Every bit outside the fixed version/variant fields is covered by the tag.
    kid = LINK.key_id("a", "b", 12345, 256)
    flipped = uuid.UUID(int=uuid.UUID(kid).int ^ (1 << (127 - bit)))
    with pytest.raises(InvalidKeyId):
        LINK.open_key_id(str(flipped), "a", "b")


@given(st.integers(0, COUNTER_LIMIT - 1), st.integers(1, 8160))
def test_roundtrip_counter_and_size(counter: int, size_bytes: int) -> None:
    kid = LINK.key_id("m", "s", counter, size_bytes * 8)
    assert LINK.open_key_id(kid, "m", "s") == (counter, size_bytes * 8)


def test_bounds() -> None:
    with pytest.raises(ValueError):
        LINK.key_id("a", "b", COUNTER_LIMIT, 256)
    with pytest.raises(ValueError):
        LINK.key("a", "b", 0, 12)
    with pytest.raises(ValueError):
        IdealLink(b"short")


def test_repr_hides_secret() -> None:
    assert SECRET.hex() not in repr(LINK) and "redacted" in repr(LINK)


def test_load_link_secret(tmp_path: Path) -> None:
    p = tmp_path / "s"
    p.write_text(SECRET.hex() + "\n")
    assert load_link_secret(p) == SECRET
    p.write_text("zz" * 32)
    with pytest.raises(ValueError, match="hex"):
        load_link_secret(p)
    p.write_text("ab" * 16)
    with pytest.raises(ValueError, match="at least"):
        load_link_secret(p)
    with pytest.raises(ValueError, match="cannot read"):
        load_link_secret(tmp_path / "missing")


def test_token_bucket() -> None:
    b = TokenBucket(rate=10, capacity=5, now=0.0)
    assert b.level(0.0) == 0 and not b.take(1, 0.0)
    assert b.level(0.25) == 2
    assert b.take(2, 0.25) and b.level(0.25) == 0
    assert b.level(100.0) == 5            # capped
    assert not b.take(6, 100.0) and b.take(5, 100.0)


def test_token_bucket_zero_and_infinite() -> None:
    zero = TokenBucket(rate=0, capacity=5, now=0.0)
    assert zero.level(1e9) == 0 and not zero.take(1, 1e9)
    inf = TokenBucket(rate=math.inf, capacity=5, now=0.0)
    assert inf.level(0.0) == 5 and inf.take(5, 0.0) and inf.take(5, 0.0)
