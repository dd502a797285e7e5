"""The gateway's PKI: `qkdgw pki init`, loading certificates and keys, and checking a
peer's handshake certificate.

Two CAs, because two different TLS stacks consume them (docs/architecture.md):

* the gateway CA (ML-DSA-65 by default) signs each site's handshake identity,
  `<site>/gateway.crt`, with SAN URI `qkdgw://site/<site>`. The gateway verifies these
  itself with `verify_peer_certificate` — X.509 path validation in `cryptography`
  does not cover ML-DSA, so the checks are done here, explicitly.
* the TLS CA (ECDSA P-256) signs the ETSI 014 HTTPS certificates, because Python's
  `ssl` module links a system OpenSSL without ML-DSA.

The gateway CA also signs `crl.pem`, the revocation list gateways check at bootstrap
(`RevocationList`); `qkdgw pki revoke`, `renew` and `crl` maintain it and the site
certificates from the host that keeps ca.key (docs/pki.md).

Files are written so that a failure never leaves a half-written PKI: everything is
generated in memory, written into a staging directory inside the target (same
filesystem), and only then renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from pqc import PqcError, algorithm_of_public_key, generate_private_key
from qkd.common.errors import UserError

# CLI spelling -> pqc.sig algorithm name.
PKI_ALGORITHMS = {
    "ml-dsa-65": "ML-DSA-65",
    "ml-dsa-44": "ML-DSA-44",
    "ml-dsa-87": "ML-DSA-87",
    "ed25519": "Ed25519",
    "ecdsa-p256": "ECDSA-P256",
}
DEFAULT_ALGORITHM = "ml-dsa-65"

CA_CERT, CA_KEY = "ca.crt", "ca.key"
TLS_CA_CERT, TLS_CA_KEY = "tls-ca.crt", "tls-ca.key"
LINK_SECRET = "link-secret.key"
CRL_FILE = "crl.pem"
# Days until a CRL's nextUpdate; after that gateways refuse bootstraps until the list is
# re-signed (`qkdgw pki crl`) or the operator configures a grace.
DEFAULT_CRL_DAYS = 30
SITE_URI_PREFIX = "qkdgw://site/"

# A DNS-label-like name: it ends up in a URI, a CN, file paths and SAE/KME IDs.
_SITE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?")
_DNS_RE = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                     r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
# Tolerate modest clock differences between sites when a fresh PKI is first used.
_BACKDATE = dt.timedelta(hours=1)
_MAX_DAYS = 36500
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)

REASONS = ("untrusted", "expired", "not_yet_valid", "wrong_identity", "bad_usage", "revoked",
           "malformed")


class PkiError(Exception):
    """A PKI file or certificate problem; the message names the file, the problem and the fix."""


class PeerCertificateError(PkiError):
    """The peer's certificate was rejected; `.reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SitePaths:
    """Where `pki init` puts one site's files."""

    directory: Path
    gateway_cert: Path
    gateway_key: Path
    kme_server_cert: Path
    kme_server_key: Path
    sae_client_cert: Path
    sae_client_key: Path


def site_paths(pki_dir: Path, site: str) -> SitePaths:
    d = Path(pki_dir) / site
    return SitePaths(d, d / "gateway.crt", d / "gateway.key", d / "kme-server.crt",
                     d / "kme-server.key", d / "sae-client.crt", d / "sae-client.key")


def validate_site_name(site: str) -> str:
    if not isinstance(site, str) or not _SITE_RE.fullmatch(site):
        raise PkiError(f"invalid site name {site!r}: use 1-48 lowercase letters, digits and "
                       "dashes, not starting or ending with a dash (e.g. 'site-a')")
    return site


# --- loading ----------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: {what} not found (fix: check the path, or create the PKI "
                       "with `qkdgw pki init`)") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read {what} ({exc.strerror}) (fix: check the path "
                       "and its permissions)") from None


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates of a PEM bundle (at least one)."""
    data = _read(path, "certificate file")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        hint = (" — it looks like DER; convert it with `openssl x509 -inform der -in FILE "
                "-out FILE.pem`" if data[:1] == b"\x30" else "")
        raise PkiError(f"{path}: not a PEM certificate{hint} (fix: point to a file "
                       "containing '-----BEGIN CERTIFICATE-----')") from None
    for cert in certs:
        for field_name, read in _LAZY_FIELDS:
            try:
                read(cert)
            except Exception as exc:
                raise PkiError(f"{path}: certificate field {field_name} does not parse "
                               f"({_exc_text(exc)}) (fix: replace the file with the one "
                               "`qkdgw pki init`/`renew` wrote)") from None
    return certs


def load_certificate(path: Path) -> x509.Certificate:
    """Exactly one PEM certificate."""
    certs = load_certificates(path)
    if len(certs) != 1:
        raise PkiError(f"{path}: expected one certificate, found {len(certs)} (fix: point "
                       "to a file with a single certificate)")
    return certs[0]


def load_private_key(path: Path) -> Any:
    """An unencrypted PEM (PKCS#8) private key that only its owner can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PkiError(f"{path}: private key not found (fix: check the path, or create the "
                       "PKI with `qkdgw pki init`)") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read private key ({exc.strerror}) (fix: check the "
                       "path and its permissions)") from None
    if os.name == "posix" and mode & 0o077:
        raise PkiError(f"{path}: private key is accessible by group or others (mode "
                       f"{stat.S_IMODE(mode):04o}) (fix: chmod 600 {path})")
    data = _read(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"{path}: private key is encrypted (fix: qkdgw needs an unencrypted "
                       "PKCS#8 key, e.g. `openssl pkcs8 -topk8 -nocrypt`, kept mode 0600)"
                       ) from None
    except UnsupportedAlgorithm:
        raise PkiError(f"{path}: unsupported private key algorithm (fix: use ML-DSA, "
                       "Ed25519 or ECDSA P-256)") from None
    except ValueError:
        raise PkiError(f"{path}: not a PEM private key (fix: point to a file containing "
                       "'-----BEGIN PRIVATE KEY-----')") from None


# --- inspecting and verifying -----------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex; for logs."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _describe(cert: x509.Certificate) -> str:
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else cert.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        # Only reached for a certificate that skipped parse_peer_certificate: a log line
        # must not be what raises.
        cn = "(unparsable subject)"
    return f"'{cn}' (sha256 {fingerprint(cert)[:16]})"


def _read_names(cert: x509.Certificate) -> None:
    for name in (cert.issuer, cert.subject):
        name.rfc4514_string()
        for attribute in name:
            _ = attribute.value


def _read_extensions(cert: x509.Certificate) -> None:
    for ext in cert.extensions:
        _ = ext.value


# Everything verify_peer_certificate, the CRL check and the logs read, in the order
# they are read. cryptography parses most of these on first access, not at load.
_LAZY_FIELDS: tuple[tuple[str, Callable[[x509.Certificate], object]], ...] = (
    ("version", lambda c: c.version),
    ("serialNumber", lambda c: c.serial_number),
    ("issuer/subject", _read_names),
    ("validity", lambda c: (c.not_valid_before_utc, c.not_valid_after_utc)),
    ("signatureAlgorithm", lambda c: (c.signature_algorithm_oid,
                                      c.signature_algorithm_parameters)),
    ("signatureHashAlgorithm", lambda c: c.signature_hash_algorithm),
    ("subjectPublicKeyInfo", lambda c: c.public_key_algorithm_oid),
    ("extensions", _read_extensions),
    ("tbsCertificate", lambda c: (c.tbs_certificate_bytes, c.signature)),
)


def _exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


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


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        if isinstance(cert.signature_hash_algorithm, _WEAK_HASHES):
            return False
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
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


class CrlError(PkiError):
    """The revocation list cannot be used: unreadable, not from the trusted CA, or out
    of date. Bootstraps are refused while it stands (fail closed)."""


# A CA host's clock a little ahead of ours must not make a fresh CRL unusable.
_CRL_SKEW = dt.timedelta(minutes=5)
_CRL_FIX = ("fix: re-sign it on the CA host with `qkdgw pki crl --pki DIR` and copy crl.pem "
            "to the gateways")


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """An X.509 CRL from a PEM or DER file (not yet verified: see `verify_crl`)."""
    data = _read(path, "revocation list")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise CrlError(f"{path}: not an X.509 revocation list (fix: point [pki] crl at a PEM "
                       "file containing '-----BEGIN X509 CRL-----' or a DER CRL, e.g. the "
                       f"{CRL_FILE} written by `qkdgw pki init`)") from None


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if crl.issuer != ca.subject:
        return False
    try:
        if isinstance(crl.signature_hash_algorithm, _WEAK_HASHES):
            return False
        return bool(crl.is_signature_valid(ca.public_key()))
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def verify_crl(crl: x509.CertificateRevocationList, trust_anchor: x509.Certificate, *,
               source: str | Path = "revocation list", now: dt.datetime | None = None,
               grace: dt.timedelta = dt.timedelta(0), check_time: bool = True) -> None:
    """Raise CrlError unless `crl` is signed by `trust_anchor`, has no critical extension
    we would have to act on, and (with `check_time`) is current at `now`: thisUpdate not
    in the future, nextUpdate not passed by more than `grace`."""
    if not _crl_signed_by(crl, trust_anchor):
        raise CrlError(f"{source}: not signed by the trusted CA {_describe(trust_anchor)} "
                       "(fix: use the crl.pem of the same PKI as [pki] ca; never edit it by "
                       "hand)")
    usage = _extension(trust_anchor, x509.KeyUsage)
    if usage is not None and not usage.crl_sign:
        raise CrlError(f"{source}: the CA {_describe(trust_anchor)} may not sign revocation "
                       "lists (keyUsage lacks cRLSign) (fix: issue the CA with cRLSign)")
    # Delta CRLs, partitioned CRLs (issuingDistributionPoint) and indirect entries change
    # what the list covers; we handle none of them, so a critical one is refused.
    for ext in crl.extensions:
        if ext.critical:
            raise CrlError(f"{source}: has a critical extension this gateway does not "
                           f"process ({ext.oid.dotted_string}) (fix: issue a full CRL "
                           "without it)")
    for entry in crl:
        for ext in entry.extensions:
            if ext.critical:
                raise CrlError(f"{source}: entry for serial {entry.serial_number:x} has a "
                               f"critical extension ({ext.oid.dotted_string}) this gateway "
                               "does not process (fix: issue the CRL without it)")
    if not check_time:
        return
    now = _aware(now)
    if crl.last_update_utc > now + _CRL_SKEW:
        raise CrlError(f"{source}: issued in the future ({crl.last_update_utc.isoformat()}, "
                       f"now {now.isoformat()}) (fix: check both hosts' clocks)")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CrlError(f"{source}: has no nextUpdate, so its age cannot be judged ({_CRL_FIX})")
    if now > next_update + grace:
        extra = f" plus the configured grace of {grace}" if grace else ""
        raise CrlError(f"{source}: expired at {next_update.isoformat()}{extra}, so revoked "
                       f"certificates could pass; bootstraps are refused ({_CRL_FIX}, or set "
                       "[pki] crl_grace_s to tolerate a late list)")


def _aware(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def revocation_reason(crl: x509.CertificateRevocationList,
                      cert: x509.Certificate) -> str | None:
    """Why `cert` is revoked by `crl` (a sentence for the log), or None. Only certificates
    the CRL's issuer issued are covered (no indirect CRLs)."""
    if cert.issuer != crl.issuer:
        return None
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return None
    reason = ""
    with contextlib.suppress(x509.ExtensionNotFound):
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        reason = f" ({flag.name})"
    return (f"certificate {_describe(cert)} serial {cert.serial_number:x} was revoked at "
            f"{entry.revocation_date_utc.isoformat()}{reason}")


@dataclass(frozen=True)
class RevocationList:
    """A CRL verified against the trust anchor at load, checked for freshness at each use."""

    source: Path
    crl: x509.CertificateRevocationList
    trust_anchor: x509.Certificate
    grace: dt.timedelta = dt.timedelta(0)

    @classmethod
    def load(cls, path: Path, trust_anchor: x509.Certificate, *,
             grace: dt.timedelta = dt.timedelta(0),
             now: dt.datetime | None = None) -> RevocationList:
        crl = load_crl(path)
        verify_crl(crl, trust_anchor, source=path, now=now, grace=grace)
        return cls(Path(path), crl, trust_anchor, grace)

    @property
    def next_update(self) -> dt.datetime | None:
        return self.crl.next_update_utc

    def check_chain(self, chain: Sequence[x509.Certificate],
                    now: dt.datetime | None = None) -> str | None:
        """None if no certificate of `chain` is revoked and the list is current; else
        the reason to refuse (an out-of-date list refuses everything: fail closed)."""
        try:
            verify_crl(self.crl, self.trust_anchor, source=self.source, now=now,
                       grace=self.grace)
        except CrlError as exc:
            return str(exc)
        for cert in chain:
            reason = revocation_reason(self.crl, cert)
            if reason is not None:
                return f"{reason} (listed in {self.source})"
        return None

    def __call__(self, cert: x509.Certificate) -> str | None:
        """`Credentials.crl_check`: the handshake passes each certificate the peer sent."""
        return self.check_chain([cert])


def _pem_crl(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def issue_crl(ca_cert: x509.Certificate, ca_key: Any,
              revoked: Sequence[x509.RevokedCertificate], number: int, days: int,
              now: dt.datetime | None = None) -> x509.CertificateRevocationList:
    """A full CRL signed by the CA, valid from `now` for `days` (at most until the CA
    itself expires)."""
    now = now or _now()
    next_update = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(max(next_update, now))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, _signing_hash(ca_key))


def _revoked_entry(serial: int, when: dt.datetime,
                   reason: x509.ReasonFlags | None) -> x509.RevokedCertificate:
    builder = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
    if reason is not None:
        builder = builder.add_extension(x509.CRLReason(reason), critical=False)
    return builder.build()


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write `path` so a reader sees the old content or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, Any]:
    ca_key_path = Path(pki_dir) / CA_KEY
    if not ca_key_path.exists():
        raise PkiError(f"{ca_key_path}: the CA key is not here (fix: run this on the host "
                       "that keeps the CA, with --pki pointing at the directory made by "
                       "`qkdgw pki init`)")
    ca_cert = load_certificate(Path(pki_dir) / CA_CERT)
    ca_key = load_private_key(ca_key_path)
    if _pem_key_public(ca_key) != _pem_key_public(ca_cert.public_key()):
        raise PkiError(f"{ca_key_path}: does not match {Path(pki_dir) / CA_CERT} (fix: restore "
                       "the CA key and certificate of the same `pki init`)")
    return ca_cert, ca_key


def _pem_key_public(key: Any) -> bytes:
    public = key.public_key() if hasattr(key, "private_bytes") else key
    return bytes(public.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo))


def _existing_entries(pki_dir: Path, ca_cert: x509.Certificate
                      ) -> tuple[list[x509.RevokedCertificate], int]:
    """The entries and CRL number of DIR/crl.pem (none if the file is absent). The list
    must be this CA's; its age does not matter, it is about to be re-signed."""
    path = Path(pki_dir) / CRL_FILE
    if not path.exists():
        return [], 0
    crl = load_crl(path)
    verify_crl(crl, ca_cert, source=path, check_time=False)
    number = 0
    with contextlib.suppress(x509.ExtensionNotFound):
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return list(crl), number


def write_crl(pki_dir: Path, add_serials: Sequence[int] = (),
              reason: x509.ReasonFlags | None = None,
              days: int = DEFAULT_CRL_DAYS) -> x509.CertificateRevocationList:
    """Re-sign DIR/crl.pem with the CA key: the existing entries, plus `add_serials`,
    with a fresh thisUpdate/nextUpdate and the next CRL number. Atomic replace."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise PkiError(f"CRL validity of {days!r} days is out of range (fix: use 1..{_MAX_DAYS})")
    pki_dir = Path(pki_dir)
    ca_cert, ca_key = _load_ca(pki_dir)
    entries, number = _existing_entries(pki_dir, ca_cert)
    listed = {e.serial_number for e in entries}
    now = _now()
    for serial in add_serials:
        if serial not in listed:
            entries.append(_revoked_entry(serial, now, reason))
            listed.add(serial)
    crl = issue_crl(ca_cert, ca_key, entries, number + 1, days, now)
    try:
        _replace_file(pki_dir / CRL_FILE, _pem_crl(crl), 0o644)
    except OSError as exc:
        raise PkiError(f"{pki_dir / CRL_FILE}: cannot write the revocation list "
                       f"({exc.strerror}) (fix: check the directory's permissions and free "
                       "space)") from None
    return crl


def parse_serial(text: str) -> int:
    """A certificate serial as printed by openssl (hex, optionally with colons), with an
    explicit 0x, or in decimal with a leading 'd:'."""
    raw = text.strip().lower()
    try:
        if raw.startswith("d:"):
            value = int(raw[2:], 10)
        else:
            value = int(raw.removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise PkiError(f"--serial {text!r} is not a certificate serial (fix: give it in hex "
                       "as `openssl x509 -noout -serial` prints it, or as d:DECIMAL)"
                       ) from None
    if not 0 < value < 1 << 160:
        raise PkiError(f"--serial {text!r} is out of range (fix: a serial is 1..20 bytes)")
    return value


def revoke(pki_dir: Path, *, site: str | None = None, serials: Sequence[int] = (),
           reason: x509.ReasonFlags | None = None,
           days: int = DEFAULT_CRL_DAYS) -> tuple[list[int], x509.CertificateRevocationList]:
    """Add a site's current gateway certificate and/or explicit serials to DIR/crl.pem."""
    pki_dir = Path(pki_dir)
    _load_ca(pki_dir)  # the CA key is needed anyway: say so before anything else
    targets = list(serials)
    if site is not None:
        cert = load_certificate(site_paths(pki_dir, validate_site_name(site)).gateway_cert)
        targets.append(cert.serial_number)
    if not targets:
        raise PkiError("nothing to revoke (fix: pass --site NAME or --serial HEX)")
    return targets, write_crl(pki_dir, targets, reason, days)


def renew(pki_dir: Path, site: str, days: int = 365,
          revoke_old: bool = False) -> tuple[x509.Certificate, x509.Certificate]:
    """Issue `site` a fresh gateway key and certificate (same identity, same key
    algorithm), replacing DIR/<site>/gateway.key and .crt atomically. Returns (old, new).

    The key is replaced first and the certificate second: a gateway that reads between
    the two sees a mismatched pair, rejects it and keeps its current credentials until
    the next check, when both are new."""
    validate_site_name(site)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise PkiError(f"validity of {days!r} days is out of range (fix: use 1..{_MAX_DAYS})")
    pki_dir = Path(pki_dir)
    paths = site_paths(pki_dir, site)
    ca_cert, ca_key = _load_ca(pki_dir)
    old = load_certificate(paths.gateway_cert)
    if site_identity(old) != site:
        raise PkiError(f"{paths.gateway_cert}: is not the gateway certificate of site "
                       f"{site!r} (fix: check --site and --pki)")
    key = generate_private_key(algorithm_of_public_key(old.public_key()))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    new = _make_leaf(site, key, ca_cert, ca_key, days, usages,
                     [x509.UniformResourceIdentifier(f"{SITE_URI_PREFIX}{site}")])
    try:
        _replace_file(paths.gateway_key, _pem_key(key), 0o600)
        _replace_file(paths.gateway_cert, _pem_cert(new), 0o644)
    except OSError as exc:
        raise PkiError(f"{exc.filename or paths.directory}: cannot write the renewed "
                       f"certificate ({exc.strerror}) (fix: check permissions and free space)"
                       ) from None
    if revoke_old:
        write_crl(pki_dir, [old.serial_number], x509.ReasonFlags.superseded)
    return old, new


# --- creating ---------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _signing_hash(private_key: Any) -> hashes.SHA256 | None:
    # ML-DSA and Ed25519 sign the message itself; ECDSA needs a digest.
    return hashes.SHA256() if isinstance(private_key, ec.EllipticCurvePrivateKey) else None


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


_NO_USAGE = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=False,
                 crl_sign=False, encipher_only=False, decipher_only=False)


def _make_ca(common_name: str, key: Any, days: int,
             now: dt.datetime | None = None) -> x509.Certificate:
    now = now or _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_cn(common_name))
        .issuer_name(_cn(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(**{**_NO_USAGE, "key_cert_sign": True, "crl_sign": True}),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, _signing_hash(key))
    )


def _make_leaf(common_name: str, key: Any, ca_cert: x509.Certificate, ca_key: Any, days: int,
               usages: list[x509.ObjectIdentifier],
               san: list[x509.GeneralName] | None,
               now: dt.datetime | None = None) -> x509.Certificate:
    # `now` lets tests issue certificates that have already expired.
    now = now or _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_cn(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        # A leaf never outlives its CA.
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**{**_NO_USAGE, "digital_signature": True}),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value),
            critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, _signing_hash(ca_key))


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _parse_host(text: str) -> x509.GeneralName:
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.fullmatch(host):
        raise PkiError(f"--kme-host {text!r} is neither an IP address nor a DNS name (fix: "
                       "use e.g. 'kme-a.example.net', '10.0.0.5' or 'site-a=kme-a')")
    return x509.DNSName(host)


def _kme_hosts_by_site(kme_hosts: Sequence[str], sites: Sequence[str]
                       ) -> dict[str, list[x509.GeneralName]]:
    """`HOST` goes into every site's KME certificate; `SITE=HOST` only into that site's
    (so one site's KME cannot pass as another's under a site-specific name)."""
    extra: dict[str, list[x509.GeneralName]] = {site: [] for site in sites}
    for entry in kme_hosts:
        site, sep, host = entry.partition("=")
        if sep:
            if site not in extra:
                raise PkiError(f"--kme-host {entry!r} names site {site!r}, which is not one of "
                               f"the --site values ({', '.join(sites)})")
            targets = [site]
        else:
            host, targets = entry, list(sites)
        name = _parse_host(host)
        for target in targets:
            if name not in extra[target]:
                extra[target].append(name)
    return extra


def _validate(out: Path, sites: Sequence[str], algorithm: str, days: int) -> str:
    if isinstance(sites, str):
        raise PkiError("sites must be a list of site names, not a single string")
    if not sites:
        raise PkiError("no sites given (fix: pass --site NAME, usually twice: --site site-a "
                       "--site site-b)")
    for site in sites:
        validate_site_name(site)
    duplicates = sorted({s for s in sites if list(sites).count(s) > 1})
    if duplicates:
        raise PkiError(f"site {duplicates[0]!r} is given twice (fix: list each site once)")
    key = algorithm.lower() if isinstance(algorithm, str) else algorithm
    if key not in PKI_ALGORITHMS:
        raise PkiError(f"unknown algorithm {algorithm!r} (fix: use one of "
                       f"{', '.join(PKI_ALGORITHMS)})")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise PkiError(f"validity of {days!r} days is out of range (fix: use 1..{_MAX_DAYS})")
    if out.exists() and not out.is_dir():
        raise PkiError(f"{out}: exists and is not a directory (fix: choose another --out)")
    return PKI_ALGORITHMS[key]


def _layout(sites: Sequence[str]) -> list[str]:
    names = [CA_CERT, CA_KEY, TLS_CA_CERT, TLS_CA_KEY, LINK_SECRET, CRL_FILE]
    for site in sites:
        names += [f"{site}/{leaf}.{ext}" for leaf in ("gateway", "kme-server", "sae-client")
                  for ext in ("crt", "key")]
    return names


def _generate(sites: Sequence[str], algorithm: str, days: int,
              kme_hosts: dict[str, list[x509.GeneralName]]) -> dict[str, tuple[bytes, int]]:
    """Every file of the PKI as relative path -> (content, mode), all in memory."""
    files: dict[str, tuple[bytes, int]] = {}
    tag = secrets.token_hex(4)  # tells two PKIs' CAs apart by name, too

    ca_key = generate_private_key(algorithm)
    ca_cert = _make_ca(f"qkdgw gateway CA {tag}", ca_key, days)
    files[CA_CERT] = (_pem_cert(ca_cert), 0o644)
    files[CA_KEY] = (_pem_key(ca_key), 0o600)

    tls_key = generate_private_key("ECDSA-P256")
    tls_cert = _make_ca(f"qkdgw ETSI 014 TLS CA {tag}", tls_key, days)
    files[TLS_CA_CERT] = (_pem_cert(tls_cert), 0o644)
    files[TLS_CA_KEY] = (_pem_key(tls_key), 0o600)

    files[LINK_SECRET] = ((secrets.token_bytes(32).hex() + "\n").encode(), 0o600)
    # An empty but signed list, so gateways can enforce revocation from day one and
    # `pki revoke` only ever adds to a list the CA already vouches for.
    files[CRL_FILE] = (_pem_crl(issue_crl(ca_cert, ca_key, [], 1, DEFAULT_CRL_DAYS)), 0o644)

    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    for site in sites:
        # The handshake has an initiator and a responder; either site can be either.
        key = generate_private_key(algorithm)
        cert = _make_leaf(site, key, ca_cert, ca_key, days, [server, client],
                          [x509.UniformResourceIdentifier(f"{SITE_URI_PREFIX}{site}")])
        files[f"{site}/gateway.crt"] = (_pem_cert(cert), 0o644)
        files[f"{site}/gateway.key"] = (_pem_key(key), 0o600)

        key = generate_private_key("ECDSA-P256")
        san: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        san += [name for name in kme_hosts[site] if name not in san]
        cert = _make_leaf(f"kme-{site}", key, tls_cert, tls_key, days, [server], san)
        files[f"{site}/kme-server.crt"] = (_pem_cert(cert), 0o644)
        files[f"{site}/kme-server.key"] = (_pem_key(key), 0o600)

        key = generate_private_key("ECDSA-P256")
        cert = _make_leaf(f"{site}-gw", key, tls_cert, tls_key, days, [client], None)
        files[f"{site}/sae-client.crt"] = (_pem_cert(cert), 0o644)
        files[f"{site}/sae-client.key"] = (_pem_key(key), 0o600)
    return files


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + the final mode from the start: a key file is never readable by others,
    # not even between open and chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits from certificates
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _install(out: Path, files: dict[str, tuple[bytes, int]], sites: Sequence[str]) -> None:
    created_out = not out.exists()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    if created_out:
        os.chmod(out, 0o700)
    staging = Path(tempfile.mkdtemp(prefix=".pki-init-", dir=out))
    try:
        for site in sites:
            (staging / site).mkdir(mode=0o700)
        for relative, (data, mode) in files.items():
            _write_new(staging / relative, data, mode)
        # Everything is on disk; now the quick part: one rename per file.
        for site in sites:
            _make_private_dir(out / site)
        for relative in files:
            os.replace(staging / relative, out / relative)
        for site in sites:
            _fsync_dir(out / site)
        _fsync_dir(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty
        raise
    shutil.rmtree(staging, ignore_errors=True)


def init_pki(out: Path, sites: list[str], algorithm: str = DEFAULT_ALGORITHM, days: int = 365,
             kme_hosts: Sequence[str] = (), force: bool = False) -> None:
    """Create the PKI described in docs/architecture.md under `out`.

    Refuses to touch an existing PKI unless `force`; other files in `out` are left alone.
    """
    out = Path(out)
    sig_algorithm = _validate(out, sites, algorithm, days)
    hosts = _kme_hosts_by_site(kme_hosts, sites)
    existing = [name for name in _layout(sites) if (out / name).exists()]
    if existing and not force:
        raise PkiError(f"{out}: a PKI already exists here ({out / existing[0]}); refusing to "
                       "overwrite it (fix: choose another --out, or pass --force to replace it "
                       "— certificates and keys issued from the old CA stop being trusted)")
    files = _generate(sites, sig_algorithm, days, hosts)
    try:
        _install(out, files, sites)
    except OSError as exc:
        where = exc.filename or out
        raise PkiError(f"{where}: cannot write the PKI ({exc.strerror}) (fix: check the "
                       "directory's permissions and free space, then run again)") from None


# --- CLI --------------------------------------------------------------------------------


def _summary(out: Path, sites: Sequence[str]) -> str:
    ca = load_certificate(out / CA_CERT)
    tls = load_certificate(out / TLS_CA_CERT)
    rows = [
        (f"{CA_CERT} {CA_KEY}", f"gateway CA, {algorithm_of_public_key(ca.public_key())}, "
         f"valid until {ca.not_valid_after_utc:%Y-%m-%d}, sha256 {fingerprint(ca)[:16]}…"),
        (f"{TLS_CA_CERT} {TLS_CA_KEY}", f"ETSI 014 TLS CA, ECDSA-P256, "
         f"sha256 {fingerprint(tls)[:16]}…"),
        (LINK_SECRET, "the ideal link's shared secret (copy it to both KMEs)"),
        (CRL_FILE, f"revocation list, empty, signed by the gateway CA, re-sign within "
                   f"{DEFAULT_CRL_DAYS} days (`qkdgw pki crl`)"),
    ]
    for site in sites:
        kme = load_certificate(site_paths(out, site).kme_server_cert)
        san = kme.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        rows += [
            (f"{site}/gateway.crt .key", f"handshake identity {SITE_URI_PREFIX}{site}"),
            (f"{site}/kme-server.crt .key",
             f"KME kme-{site}, serves {', '.join(str(n.value) for n in san)}"),
            (f"{site}/sae-client.crt .key", f"ETSI 014 client, SAE ID {site}-gw"),
        ]
    width = max(len(name) for name, _ in rows)
    lines = [f"Wrote a new PKI to {out}"]
    lines += [f"  {name:<{width}}  {what}" for name, what in rows]
    lines.append("Private keys are PKCS#8 PEM, mode 0600. Give each site ca.crt, tls-ca.crt, "
                 "link-secret.key and its own directory; keep ca.key and tls-ca.key off the "
                 "gateways.")
    return "\n".join(lines)


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        init_pki(args.out, args.sites, args.algorithm, args.days, args.kme_hosts, args.force)
        print(_summary(Path(args.out), args.sites))
    except PkiError as exc:
        raise UserError(str(exc)) from None
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    try:
        serials = [parse_serial(text) for text in args.serials]
        reason = x509.ReasonFlags[args.reason] if args.reason else None
        targets, crl = revoke(args.pki, site=args.site, serials=serials, reason=reason,
                              days=args.crl_days)
    except PkiError as exc:
        raise UserError(str(exc)) from None
    assert crl.next_update_utc is not None
    print(f"Revoked serial(s) {', '.join(f'{s:x}' for s in targets)}; "
          f"{Path(args.pki) / CRL_FILE} now lists {len(list(crl))} certificate(s), next "
          f"update due {crl.next_update_utc:%Y-%m-%d %H:%M} UTC. Copy it to every gateway; "
          "they pick it up without a restart.")
    return 0


def _cmd_renew(args: argparse.Namespace) -> int:
    try:
        old, new = renew(args.pki, args.site, args.days, args.revoke_old)
    except PkiError as exc:
        raise UserError(str(exc)) from None
    paths = site_paths(Path(args.pki), args.site)
    print(f"Renewed {paths.gateway_cert} and {paths.gateway_key}: {SITE_URI_PREFIX}{args.site}, "
          f"serial {new.serial_number:x}, valid until {new.not_valid_after_utc:%Y-%m-%d} "
          f"(was serial {old.serial_number:x}"
          f"{', now revoked' if args.revoke_old else ''}). A running gateway picks the new "
          "pair up at its next tunnel connection.")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    try:
        crl = write_crl(args.pki, days=args.crl_days)
    except PkiError as exc:
        raise UserError(str(exc)) from None
    assert crl.next_update_utc is not None
    print(f"Re-signed {Path(args.pki) / CRL_FILE}: {len(list(crl))} revoked certificate(s), "
          f"next update due {crl.next_update_utc:%Y-%m-%d %H:%M} UTC.")
    return 0


def _register_maintenance(actions: Any) -> None:
    reasons = [r.name for r in x509.ReasonFlags if r.name not in ("unspecified", "remove_from_crl")]
    pki_help = "the directory made by `qkdgw pki init` (holds ca.key)"
    crl_days = dict(type=int, default=DEFAULT_CRL_DAYS, metavar="N",
                    help="days until the list's nextUpdate (default: %(default)s)")

    rev = actions.add_parser(
        "revoke", help="add a site's gateway certificate (or a serial) to the CRL",
        description=f"Add certificates to DIR/{CRL_FILE} and re-sign it with the gateway CA. "
                    "Gateways configured with [pki] crl refuse revoked peers at bootstrap.")
    rev.add_argument("--pki", required=True, type=Path, metavar="DIR", help=pki_help)
    rev.add_argument("--site", metavar="NAME", help="revoke this site's current gateway.crt")
    rev.add_argument("--serial", action="append", dest="serials", default=[], metavar="HEX",
                     help="revoke this serial (hex as openssl prints it); repeatable")
    rev.add_argument("--reason", choices=reasons, help="CRL reason code")
    rev.add_argument("--crl-days", **crl_days)  # type: ignore[arg-type]
    rev.set_defaults(handler=_cmd_revoke)

    ren = actions.add_parser(
        "renew", help="issue a site a fresh gateway key and certificate",
        description="Replace DIR/SITE/gateway.key and gateway.crt atomically with a new key "
                    "and certificate for the same identity, signed by the gateway CA.")
    ren.add_argument("--pki", required=True, type=Path, metavar="DIR", help=pki_help)
    ren.add_argument("--site", required=True, metavar="NAME", help="the site, e.g. site-a")
    ren.add_argument("--days", type=int, default=365,
                     help="certificate validity in days (default: %(default)s)")
    ren.add_argument("--revoke-old", action="store_true",
                     help=f"also add the replaced certificate to {CRL_FILE}")
    ren.set_defaults(handler=_cmd_renew)

    crl = actions.add_parser(
        "crl", help="re-sign the CRL with a fresh nextUpdate",
        description=f"Re-sign DIR/{CRL_FILE} with the same entries and a new nextUpdate. "
                    "Run it (e.g. from cron) well before the current one is due.")
    crl.add_argument("--pki", required=True, type=Path, metavar="DIR", help=pki_help)
    crl.add_argument("--crl-days", **crl_days)  # type: ignore[arg-type]
    crl.set_defaults(handler=_cmd_crl)


def register_cli(subparsers: Any) -> None:
    pki = subparsers.add_parser(
        "pki", help="create the gateway and ETSI 014 TLS certificates",
        description="Manage the certificates and keys of a qkdgw deployment.")
    actions = pki.add_subparsers(dest="pki_command", metavar="ACTION")
    actions.required = True
    init = actions.add_parser(
        "init", help="create CAs, per-site certificates and keys, and the link secret",
        description="Create a new PKI in DIR: a gateway CA and each site's handshake "
                    "certificate, an ECDSA P-256 TLS CA with each site's KME server and SAE "
                    "client certificates, and the ideal link's shared secret.")
    init.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="directory to write (created with mode 0700)")
    init.add_argument("--site", required=True, action="extend", nargs="+", dest="sites",
                      metavar="NAME", help="site name, e.g. site-a; repeat for each site")
    init.add_argument("--algorithm", type=str.lower, choices=list(PKI_ALGORITHMS),
                      default=DEFAULT_ALGORITHM,
                      help="gateway CA and handshake key algorithm (default: %(default)s)")
    init.add_argument("--days", type=int, default=365,
                      help="certificate validity in days (default: %(default)s)")
    init.add_argument("--kme-host", action="extend", nargs="+", dest="kme_hosts", default=[],
                      metavar="[SITE=]HOST",
                      help="extra DNS name or IP for the KME server certificates; "
                           "SITE=HOST adds it to that site's KME only")
    init.add_argument("--force", action="store_true",
                      help="replace an existing PKI in DIR")
    init.set_defaults(handler=_cmd_init)
    _register_maintenance(actions)
