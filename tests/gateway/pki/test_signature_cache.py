"""The cache of valid certificate signatures in `gateway.pki.verify` only ever skips a
check whose exact bytes passed before: a forged or altered certificate is refused
however often the genuine one was seen."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.pki import (
    PeerCertificateError,
    load_certificate,
    load_private_key,
    verify_peer_certificate,
)
from gateway.pki import verify as verify_mod


@pytest.fixture(autouse=True)
def empty_cache() -> None:
    verify_mod._VALID_SIGNATURES.clear()


def flipped_signature(cert: x509.Certificate) -> x509.Certificate:
    raw = bytearray(cert.public_bytes(Encoding.DER))
    raw[-5] ^= 0x01  # inside the signature BIT STRING, the last field of the DER
    return x509.load_der_x509_certificate(bytes(raw))


def test_cached_signature_never_vouches_for_other_bytes(pki_dir: Path,
                                                        other_pki_dir: Path) -> None:
    ca = load_certificate(pki_dir / "ca.crt")
    leaf = load_certificate(pki_dir / "site-a" / "gateway.crt")
    now = dt.datetime.now(dt.UTC)
    verify_peer_certificate(leaf, ca, "site-a", now)
    key = (leaf.public_bytes(Encoding.DER), ca.public_bytes(Encoding.DER))
    assert key in verify_mod._VALID_SIGNATURES  # the check is cached...
    verify_peer_certificate(leaf, ca, "site-a", now)  # ...and a hit still passes
    # Same TBS, one bit of the signature changed: refused, every time.
    forged = flipped_signature(leaf)
    assert forged.tbs_certificate_bytes == leaf.tbs_certificate_bytes
    for _ in range(2):
        with pytest.raises(PeerCertificateError) as exc:
            verify_peer_certificate(forged, ca, "site-a", now)
        assert exc.value.reason == "untrusted"
    # The same certificate re-signed by another CA's key under this CA's name: refused.
    builder = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(ca.subject)
               .public_key(leaf.public_key()).serial_number(leaf.serial_number)
               .not_valid_before(leaf.not_valid_before_utc)
               .not_valid_after(leaf.not_valid_after_utc))
    for ext in leaf.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    other = builder.sign(load_private_key(other_pki_dir / "ca.key"), None)
    assert other.issuer == ca.subject and other.tbs_certificate_bytes == leaf.tbs_certificate_bytes
    for _ in range(2):
        with pytest.raises(PeerCertificateError) as exc:
            verify_peer_certificate(other, ca, "site-a", now)
        assert exc.value.reason == "untrusted"
    assert len(verify_mod._VALID_SIGNATURES) == 1
    # Only the signature is cached: identity and validity are checked on every hit.
    with pytest.raises(PeerCertificateError) as exc:
        verify_peer_certificate(leaf, ca, "site-b", now)
    assert exc.value.reason == "wrong_identity"
    with pytest.raises(PeerCertificateError) as exc:
        verify_peer_certificate(leaf, ca, "site-a", now + dt.timedelta(days=36500))
    assert exc.value.reason == "expired"


def test_cache_is_bounded(pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_mod, "_VALID_SIGNATURES_MAX", 2)
    ca = load_certificate(pki_dir / "ca.crt")
    for site in ("site-a", "site-b", "site-c", "site-a"):
        verify_peer_certificate(load_certificate(pki_dir / site / "gateway.crt"), ca, site)
    assert len(verify_mod._VALID_SIGNATURES) == 2
    newest = [load_certificate(pki_dir / s / "gateway.crt").public_bytes(Encoding.DER)
              for s in ("site-c", "site-a")]
    assert [k[0] for k in verify_mod._VALID_SIGNATURES] == newest
