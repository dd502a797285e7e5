"""Malformed peer certificates before any authentication (issue 16.1).

A real site certificate from `qkdgw pki init`, one byte changed, sent in the Certificate
message after a valid hello, from either side. Each must end in a handshake failure
with an alert (BAD_CERTIFICATE) at the receiver, seen by the sender as the peer's
abort, and never escape as ValueError or cryptography.x509.InvalidVersion. The same
through real gateways and the relay: counted, logged, no traceback.

The fuzz targets over mutated certificates inside real flights are in test_fuzz.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.pki import PeerCertificateError, parse_peer_certificate
from gateway.pki.verify import _describe
from gateway.tunnel import events as ev
from gateway.tunnel import handshake as hs_mod
from gateway.tunnel.wire import ErrorCode
from tests.support.bad_certificates import (
    MUTATIONS,
    RAW_ERRORS,
    der_of,
    ends,
    mutate,
    pair_with_bad_cert,
)
from tests.support.handshake_attacks import wait_failure
from tests.support.mitm_relay import B2A, Sites, TamperHandshake
from tests.support.tunnel_harness import make_pair


@pytest.mark.parametrize("which", MUTATIONS)
def test_the_mutations_are_the_reported_ones(pki_dir: Path, which: str) -> None:
    """Positive control: each mutated certificate does make cryptography raise the
    exception the issue reported, when its lazily parsed field is read."""
    read: dict[str, Callable[[x509.Certificate], Any]] = {
        "issuer": lambda c: c.issuer, "subject": lambda c: c.subject,
        "version": lambda c: c.version}
    with pytest.raises(RAW_ERRORS[which]):  # at load (version) or on first read (names)
        read[which](x509.load_der_x509_certificate(mutate(der_of(pki_dir, "site-b"), which)))
    with pytest.raises(PeerCertificateError) as exc:
        parse_peer_certificate(mutate(der_of(pki_dir, "site-b"), which))
    assert exc.value.reason == "malformed"
    assert "does not parse" in str(exc.value)


@pytest.mark.parametrize("which", MUTATIONS)
@pytest.mark.parametrize("sender", ["initiator", "responder"])
def test_malformed_certificate_ends_in_an_alert(pki_dir: Path, which: str, sender: str) -> None:
    site = "site-a" if sender == "initiator" else "site-b"
    pair = pair_with_bad_cert(pki_dir, sender, (mutate(der_of(pki_dir, site), which),))
    end_a, end_b = ends(pair)
    receiver, other = (end_b, end_a) if sender == "initiator" else (end_a, end_b)
    assert receiver is not None and receiver.code == ErrorCode.BAD_CERTIFICATE
    assert not receiver.by_peer and "does not parse" in receiver.reason
    # The alert reached the sender: it saw the peer abort with that code.
    assert other is not None and other.by_peer and other.code == ErrorCode.BAD_CERTIFICATE
    assert not pair.a.ready and not pair.b.ready
    assert not any(isinstance(e, ev.UnexpectedError) for e in pair.events_a + pair.events_b)


@pytest.mark.parametrize("sender", ["initiator", "responder"])
def test_unmodified_certificate_still_works(pki_dir: Path, sender: str) -> None:
    site = "site-a" if sender == "initiator" else "site-b"
    pair = pair_with_bad_cert(pki_dir, sender, (der_of(pki_dir, site),))
    assert pair.a.ready and pair.b.ready


def test_malformed_intermediate_is_caught_too(pki_dir: Path) -> None:
    der = der_of(pki_dir, "site-b")
    pair = pair_with_bad_cert(pki_dir, "responder", (der, mutate(der_of(pki_dir, "site-c"),
                                                                 "version")))
    end_a, _ = ends(pair)
    assert end_a is not None and end_a.code == ErrorCode.BAD_CERTIFICATE


def test_describe_never_raises(pki_dir: Path) -> None:
    cert = x509.load_der_x509_certificate(mutate(der_of(pki_dir, "site-b"), "subject"))
    assert "unparsable subject" in _describe(cert)


def test_unexpected_exception_becomes_an_internal_error_alert(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection's last guard: an exception no layer expected (here a bug planted
    in the certificate check) closes the connection with INTERNAL_ERROR and an alert,
    and says what and where in an UnexpectedError event."""
    def buggy(self: Any, msg: bytes) -> None:
        raise KeyError("planted bug")

    monkeypatch.setattr(hs_mod.Handshake, "_on_certificate", buggy)
    pair = make_pair(pki_dir)
    end_a, end_b = ends(pair)
    assert end_a is not None and end_a.code == ErrorCode.INTERNAL_ERROR and not end_a.by_peer
    assert end_b is not None and end_b.by_peer and end_b.code == ErrorCode.INTERNAL_ERROR
    bugs = [e for e in pair.events_a if isinstance(e, ev.UnexpectedError)]
    assert len(bugs) == 1 and bugs[0].exc_type == "KeyError" and bugs[0].where == "receive"
    assert "buggy" in bugs[0].location


# -------------------------------------------------------- through real gateways


@pytest.mark.parametrize("which", MUTATIONS)
async def test_relayed_malformed_certificate_is_counted_and_alerted(
        sites: Sites, which: str) -> None:
    """The relay changes one byte of B's certificate in B's first flight; A answers with
    a BAD_CERTIFICATE alert, counts and logs it, and nothing escapes as a traceback."""
    done = {"n": 0}

    def corrupt(d: str, m: bytes) -> bytes:
        if d == B2A and m[0] == hs_mod.MSG_CERTIFICATE and not done["n"]:
            done["n"] += 1
            (der,) = hs_mod.decode_certificate(m)
            return hs_mod.encode_certificate([mutate(der, which)])
        return m

    await sites.start(strategy=lambda: TamperHandshake(corrupt))
    await wait_failure(sites, "site-a", ErrorCode.BAD_CERTIFICATE)
    await wait_failure(sites, "site-b", ErrorCode.BAD_CERTIFICATE)  # the alert arrived
    assert not sites.log_events("tunnel.UNEXPECTED_ERROR")
    assert await sites.counter("site-a", "qkdgw_unexpected_errors_total") == 0
    assert not [e for e in sites.logs if e.get("exc_info") or "Traceback" in str(e)]
    await sites.recover()


def test_non_positive_serial_is_refused_not_warned_about(pki_dir: Path) -> None:
    """cryptography only warns about a serial number that is not positive (found by the
    long fuzz run); RFC 5280 forbids it, and a peer must not be able to fill the log."""
    import warnings

    der = der_of(pki_dir, "site-b")
    pos = der.find(b"\x02\x14")  # the 20-byte serial INTEGER
    negative = der[:pos + 2] + b"\x80" + der[pos + 3:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PeerCertificateError, match="serial number"):
            parse_peer_certificate(negative)
        assert parse_peer_certificate(der).serial_number > 0  # positive control
