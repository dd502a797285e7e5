"""The optional information-theoretic mode: one-time MACs over the whole handshake
transcript, keyed by two extra QKD keys per handshake."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.tunnel import events as ev
from gateway.tunnel.handshake import HandshakePolicy
from gateway.tunnel.otmac import P127, check_one_time_tag, one_time_tag
from gateway.tunnel.wire import ErrorCode
from tests.support.tunnel_harness import FakeKmePair, make_pair, params, traffic_secrets

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
    import gateway.tunnel.handshake as hs

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


# ------------------------------------ the forgery bound at the real transcript sizes


def _transcript_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, int]]:
    """(auth, initiator, bytes) of each transcript a one-time tag is made over."""
    import gateway.tunnel.handshake as hs

    sizes: list[tuple[str, bool, int]] = []
    send_finished = hs.Handshake._send_finished

    def spy(self: object, key: bytes) -> None:
        sizes.append((self.auth, self.initiator, len(self._transcript)))  # type: ignore[attr-defined]
        send_finished(self, key)  # type: ignore[arg-type]

    monkeypatch.setattr(hs.Handshake, "_send_finished", spy)
    return sizes


def test_forgery_bound_is_computed_for_the_real_transcripts(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PKI transcripts with ML-DSA-65 are about 20 KB (the old 3 KB figure held for
    re-handshakes only); every one is inside the documented cap, and the bound at the
    cap, 2^-114.9, is the figure docs/protocol.md states."""
    import math

    from gateway.tunnel import otmac
    from gateway.tunnel.connection import ConnectionSettings

    sizes = _transcript_sizes(monkeypatch)
    pair = make_pair(pki_dir, policy_a=ITS, policy_b=ITS,
                     settings=ConnectionSettings(rekey_interval=10.0))
    pair.advance(11.0)
    assert pair.a.epoch == 1
    pki = [n for auth, _, n in sizes if auth == "pki"]
    chain = [n for auth, _, n in sizes if auth == "chain"]
    assert len(pki) == len(chain) == 2
    assert 18_000 < max(pki) < 24_000 and max(chain) < 4_000
    assert max(pki) <= otmac.MAX_MESSAGE_BYTES
    # The bound, recomputed from its definition, for the largest real transcript.
    n = -(-max(pki) // 15)
    assert otmac.forgery_bound(max(pki)) == (n + 1) / otmac.P127 + 2.0 ** -126
    assert math.log2(otmac.forgery_bound(max(pki))) < -116.5
    assert math.log2(otmac.MAX_FORGERY_BOUND) < -114.9
    doc = (Path(__file__).resolve().parents[3] / "docs" / "protocol.md").read_text()
    assert "2⁻¹¹⁴·⁹" in doc and f"{otmac.MAX_MESSAGE_BYTES} bytes" in doc


def test_one_time_tag_refuses_messages_the_bound_does_not_cover() -> None:
    from gateway.tunnel.otmac import MAX_MESSAGE_BYTES, OneTimeMacError

    key = os.urandom(32)
    at_cap = os.urandom(MAX_MESSAGE_BYTES)
    assert check_one_time_tag(key, at_cap, one_time_tag(key, at_cap))  # positive control
    with pytest.raises(OneTimeMacError, match="forgery bound"):
        one_time_tag(key, at_cap + b"x")
    with pytest.raises(OneTimeMacError):
        check_one_time_tag(key, at_cap + b"x", bytes(16))


def _padding_certificate(pki: Path, size: int) -> object:
    """A certificate from the site CA carrying `size` bytes of a private extension:
    valid, just big (an operator's chain with bulky intermediates looks like this)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.pki import load_certificate, load_private_key

    ca, ca_key = load_certificate(pki / "ca.crt"), load_private_key(pki / "ca.key")
    now = dt.datetime.now(dt.UTC)
    body = b"\x04\x82" + size.to_bytes(2, "big") + bytes(size)  # an OCTET STRING
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "pad")]))
            .issuer_name(ca.subject)
            .public_key(ed25519.Ed25519PrivateKey.generate().public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), body), critical=False)
            .sign(ca_key, None))


def _padded_initiator(pki: Path, policy: HandshakePolicy) -> object:
    import dataclasses

    p = params(pki, "site-a", "site-b", policy)
    assert p.credentials is not None
    chain = (*p.credentials.chain, _padding_certificate(pki, 26_000),
             _padding_certificate(pki, 24_000))
    return dataclasses.replace(p, credentials=dataclasses.replace(p.credentials, chain=chain))


def test_transcript_beyond_the_bound_is_refused(pki_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.tunnel.handshake as hs

    # Positive control: without the one-time MACs the big (valid) chain is fine.
    plain = make_pair(pki_dir, params_a=_padded_initiator(pki_dir, HandshakePolicy()),  # type: ignore[arg-type]
                      params_b=params(pki_dir, "site-b", "site-a"))
    assert plain.a.ready and plain.b.ready
    # With them, the initiator refuses to make a tag over ~75 KB.
    pair = make_pair(pki_dir, params_a=_padded_initiator(pki_dir, ITS),  # type: ignore[arg-type]
                     params_b=params(pki_dir, "site-b", "site-a", ITS))
    assert not pair.a.ready and not pair.b.ready
    term = [e for e in pair.events_a if isinstance(e, ev.ConnectionTerminated)]
    assert term and not term[0].by_peer and "forgery bound" in term[0].reason
    # And a peer that would send it anyway (its own check off) is refused by the
    # receiver, before any tag is checked.
    check = hs.Handshake._check_its_transcript

    def initiator_unchecked(self: hs.Handshake, size: int) -> None:
        if not self.initiator:
            check(self, size)

    def unchecked_tag(key: bytes, message: bytes) -> bytes:
        # The shared arithmetic without the handshake's length limit.
        from qkd.common.polymac import chunk_coefficients, pad_tag, poly_hash

        r = int.from_bytes(key[:16], "little") % P127
        return pad_tag(poly_hash(chunk_coefficients(message), len(message), r), key[16:])

    monkeypatch.setattr(hs.Handshake, "_check_its_transcript", initiator_unchecked)
    monkeypatch.setattr(hs, "one_time_tag", unchecked_tag)  # only the sender uses it
    pair = make_pair(pki_dir, params_a=_padded_initiator(pki_dir, ITS),  # type: ignore[arg-type]
                     params_b=params(pki_dir, "site-b", "site-a", ITS))
    assert not pair.b.ready
    term = [e for e in pair.events_b if isinstance(e, ev.ConnectionTerminated)]
    assert term and not term[0].by_peer and "forgery bound" in term[0].reason
