"""The optional information-theoretic mode: one-time MACs over the whole handshake
transcript, keyed by two extra QKD keys per handshake."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tunnel_harness import FakeKmePair, make_pair, params, traffic_secrets

from gateway import events as ev
from gateway.handshake import HandshakePolicy
from gateway.otmac import P127, check_one_time_tag, one_time_tag
from gateway.wire import ErrorCode

ITS = HandshakePolicy(its_mac=True)


def test_one_time_mac_detects_changes_and_needs_its_key() -> None:
    key = os.urandom(32)
    msg = os.urandom(3000)
    tag = one_time_tag(key, msg)
    assert check_one_time_tag(key, msg, tag)
    for changed in (msg[:-1], msg + b"\x00", b"\x01" + msg[1:], msg[:1500] + b"\xff" + msg[1501:]):
        assert not check_one_time_tag(key, changed, tag)
    assert not check_one_time_tag(os.urandom(32), msg, tag)
    # Positive control: whoever holds the key forges any message's tag, which is why
    # each key makes exactly one tag and comes fresh from QKD.
    forged = b"attacker's transcript"
    assert check_one_time_tag(key, forged, one_time_tag(key, forged))


def test_one_time_mac_is_the_polynomial_plus_pad() -> None:
    """Recompute one tag by hand: Horner over 15-byte chunks with 0x01 appended, then
    the length, then the pad, all mod 2^127 - 1."""
    r, s = 12345678901234567890, 98765432109876543210
    key = r.to_bytes(16, "little") + s.to_bytes(16, "little")
    msg = bytes(range(40))
    h = 0
    for i in range(0, 40, 15):
        h = (h + int.from_bytes(msg[i:i + 15] + b"\x01", "little")) * r % P127
    h = (h + 40) * r % P127
    assert one_time_tag(key, msg) == ((h + s) % P127).to_bytes(16, "little")


def test_its_handshake_completes_and_takes_two_more_qkd_keys(pki_dir: Path) -> None:
    kme = FakeKmePair()
    pair = make_pair(pki_dir, policy_a=ITS, policy_b=ITS, kme=kme)
    assert pair.a.ready and pair.b.ready
    assert kme.consumed == 3
    done = [e for e in pair.events_a if isinstance(e, ev.HandshakeCompleted)]
    assert done and done[0].its_mac
    assert traffic_secrets(pair.a)[0] == traffic_secrets(pair.b)[1]
    # Without the mode, one key per handshake.
    plain = FakeKmePair()
    make_pair(pki_dir, kme=plain)
    assert plain.consumed == 1


def test_wrong_one_time_tag_fails_the_handshake(pki_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.handshake as hs

    real = hs.encode_finished
    calls = {"n": 0}

    def bad_tag(mac: bytes, its_tag: bytes = b"") -> bytes:
        calls["n"] += 1
        if calls["n"] == 1 and its_tag:  # the responder's Finished
            its_tag = bytes([its_tag[0] ^ 1]) + its_tag[1:]
        return real(mac, its_tag)

    monkeypatch.setattr(hs, "encode_finished", bad_tag)
    pair = make_pair(pki_dir, policy_a=ITS, policy_b=ITS)
    assert not pair.a.ready
    term = [e for e in pair.events_a if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.HANDSHAKE_FAILURE
    assert "one-time MAC" in term[0].reason


def test_its_mode_on_one_side_only_is_a_policy_mismatch(pki_dir: Path) -> None:
    pair = make_pair(pki_dir, params_a=params(pki_dir, "site-a", "site-b", ITS),
                     params_b=params(pki_dir, "site-b", "site-a"))
    term = [e for e in pair.events_b if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.POLICY_MISMATCH and "its_mac" in term[0].reason


def test_its_mode_needs_256_bit_keys() -> None:
    with pytest.raises(ValueError, match="256 bits"):
        HandshakePolicy(its_mac=True, qkd_key_size_bits=128)
