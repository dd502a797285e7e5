"""Checking a peer's handshake certificate: parsing inside one guard, chain, usage, validity.

X.509 path validation in `cryptography` does not cover ML-DSA, so the checks are
explicit here (docs/pki.md)."""

from __future__ import annotations

import datetime as dt
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from gateway.pki.files import (
    _LAZY_FIELDS,
    _SITE_RE,
    _WEAK_HASHES,
    SITE_URI_PREFIX,
    PeerCertificateError,
    _exc_text,
    fingerprint,
)
from pqc import PqcError, algorithm_of_public_key


def _describe(cert: x509.Certificate) -> str:
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else cert.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        # Only reached for a certificate that skipped parse_peer_certificate: a log line
        # must not be what raises.
        cn = "(unparsable subject)"
    return f"'{cn}' (sha256 {fingerprint(cert)[:16]})"










def parse_peer_certificate(der: bytes) -> x509.Certificate:
    """Load a DER certificate a peer sent, reading every lazily parsed field once, so that
    any malformed part raises here as PeerCertificateError("malformed") instead of as
    ValueError, InvalidVersion, DuplicateExtension... from whatever reads it later.

    Catching every exception is deliberate: this is the one place where certificate
    bytes from the network meet cryptography's parser, and whatever it raises means
    the certificate is unusable; the exception's type is kept in the message."""
    with warnings.catch_warnings():
        # What cryptography only warns about (a serial number that is not positive) is
        # malformed by RFC 5280: refused here, and a peer cannot fill the log with it.
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        try:
            cert = x509.load_der_x509_certificate(der)
        except Exception as exc:
            raise PeerCertificateError(
                "malformed", f"peer certificate does not parse ({_exc_text(exc)})") from None
        for field_name, read in _LAZY_FIELDS:
            try:
                read(cert)
            except Exception as exc:
                raise PeerCertificateError(
                    "malformed", f"peer certificate field {field_name} does not parse "
                    f"({_exc_text(exc)})") from None
    return cert


def site_identity(cert: x509.Certificate) -> str | None:
    """The site ID from the SAN URI `qkdgw://site/<id>`; None if absent, malformed, or
    if the certificate names more than one site (ambiguous, so not an identity)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = {uri[len(SITE_URI_PREFIX):]
           for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
           if uri.startswith(SITE_URI_PREFIX)}
    if len(ids) != 1:
        return None
    (site,) = ids
    return site if _SITE_RE.fullmatch(site) else None


def _extension(cert: x509.Certificate, cls: Any) -> Any:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


# Critical extensions this verifier understands; RFC 5280 §4.2 says to reject a
# certificate with any other critical extension rather than ignore it.
_UNDERSTOOD_CRITICAL = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
}


def _check_critical(cert: x509.Certificate) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            raise PeerCertificateError(
                "bad_usage", f"certificate {_describe(cert)} has a critical extension this "
                f"gateway does not process ({ext.oid.dotted_string}) (fix: issue it without)")


# Signatures found valid, keyed by the exact DER of the certificate and its issuer: a
# signature check is a pure function of those bytes, and a peer presents the same chain
# at every PKI handshake (an ML-DSA-65 verify is ~0.15 ms). Only the signature is
# remembered; names, usage, validity, identity and revocation are checked every time.
_VALID_SIGNATURES: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
_VALID_SIGNATURES_MAX = 32


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        if isinstance(cert.signature_hash_algorithm, _WEAK_HASHES):
            return False
        key = (cert.public_bytes(Encoding.DER), issuer.public_bytes(Encoding.DER))
        if key in _VALID_SIGNATURES:
            _VALID_SIGNATURES.move_to_end(key)
            return True
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    _VALID_SIGNATURES[key] = None
    while len(_VALID_SIGNATURES) > _VALID_SIGNATURES_MAX:
        _VALID_SIGNATURES.popitem(last=False)
    return True


def _build_chain(cert: x509.Certificate, anchor: x509.Certificate,
                 pool: list[x509.Certificate], depth: int = 0) -> list[x509.Certificate] | None:
    """[cert, intermediates..., anchor] with every signature checked, or None."""
    if _issued_by(cert, anchor):
        return [cert, anchor]
    if depth >= 8:
        return None
    for i, candidate in enumerate(pool):
        if _issued_by(cert, candidate):
            rest = _build_chain(candidate, anchor, pool[:i] + pool[i + 1:], depth + 1)
            if rest is not None:
                return [cert, *rest]
    return None


def _check_ca(ca: x509.Certificate, intermediates_below: int) -> None:
    constraints = _extension(ca, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise PeerCertificateError(
            "bad_usage", f"certificate {_describe(ca)} signs other certificates but is not a "
            "CA (basicConstraints CA:FALSE or missing) (fix: issue peer certificates from the "
            "CA configured as trusted)")
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        raise PeerCertificateError(
            "bad_usage", f"CA {_describe(ca)} allows {constraints.path_length} intermediate "
            f"CA(s) below it, the chain has {intermediates_below}")
    usage = _extension(ca, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise PeerCertificateError(
            "bad_usage", f"CA {_describe(ca)} is not allowed to sign certificates (keyUsage "
            "lacks keyCertSign)")


def _check_leaf_usage(cert: x509.Certificate) -> None:
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise PeerCertificateError(
            "bad_usage", f"peer certificate {_describe(cert)} is a CA certificate, not a "
            "gateway identity (fix: present the site's gateway.crt)")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise PeerCertificateError(
            "bad_usage", f"peer certificate {_describe(cert)} may not be used for signatures "
            "(keyUsage lacks digitalSignature)")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
                                ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(eku):
        raise PeerCertificateError(
            "bad_usage", f"peer certificate {_describe(cert)} has no serverAuth/clientAuth "
            "extended key usage")
    try:
        algorithm_of_public_key(cert.public_key())
    except (PqcError, UnsupportedAlgorithm, ValueError) as exc:
        raise PeerCertificateError(
            "bad_usage", f"peer certificate {_describe(cert)}: {exc}") from None


def _check_validity(cert: x509.Certificate, now: dt.datetime, role: str) -> None:
    if now < cert.not_valid_before_utc:
        raise PeerCertificateError(
            "not_yet_valid", f"{role} {_describe(cert)} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()} (now {now.isoformat()}) (fix: check "
            "both hosts' clocks)")
    if now > cert.not_valid_after_utc:
        raise PeerCertificateError(
            "expired", f"{role} {_describe(cert)} expired at "
            f"{cert.not_valid_after_utc.isoformat()} (fix: issue a new certificate)")


def verify_peer_certificate(cert: x509.Certificate, trusted_ca: x509.Certificate,
                            expected_identity: str, now: dt.datetime | None = None,
                            intermediates: Sequence[x509.Certificate] = ()) -> None:
    """Accept `cert` as the handshake identity of site `expected_identity`, or raise
    PeerCertificateError with `.reason`:

    malformed       a field of some certificate does not parse (certificates from the
                    network go through parse_peer_certificate first, which says which)
    untrusted       no chain of valid signatures from `cert` to `trusted_ca`
    bad_usage       a certificate in the chain is used beyond its constraints (a non-CA
                    signing, a CA as leaf, wrong key usage, unknown critical extension,
                    unsupported key type)
    expired / not_yet_valid   some certificate in the chain, at `now`
    wrong_identity  the SAN URI is not exactly qkdgw://site/<expected_identity>

    Checks run in that order, so an untrusted certificate reveals nothing else.
    """
    if now is None:
        now = dt.datetime.now(dt.UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    chain = _build_chain(cert, trusted_ca, list(intermediates))
    if chain is None:
        raise PeerCertificateError(
            "untrusted", f"peer certificate {_describe(cert)} is not issued by the trusted CA "
            f"{_describe(trusted_ca)} (fix: give both sites the same ca.crt, and the peer a "
            "certificate issued by it)")
    for position, ca in enumerate(chain[1:], start=1):
        # position - 1 intermediates sit between this CA and the leaf.
        _check_ca(ca, position - 1)
    for c in chain[:-1]:
        _check_critical(c)
    _check_leaf_usage(cert)
    for role, c in zip(["peer certificate"] + ["CA"] * (len(chain) - 1), chain, strict=True):
        _check_validity(c, now, role)
    actual = site_identity(cert)
    if actual != expected_identity:
        found = f"site {actual!r}" if actual else f"no single {SITE_URI_PREFIX}<site> SAN URI"
        raise PeerCertificateError(
            "wrong_identity", f"peer certificate {_describe(cert)} identifies {found}, expected "
            f"site {expected_identity!r} (fix: check the configured peer identity)")


# --- revocation -------------------------------------------------------------------------
