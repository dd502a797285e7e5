"""PKI names, file layout and loading: site paths, certificates, private keys, fingerprints."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import GatewayError

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


class PkiError(GatewayError):
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _signing_hash(private_key: Any) -> hashes.SHA256 | None:
    # ML-DSA and Ed25519 sign the message itself; ECDSA needs a digest.
    return hashes.SHA256() if isinstance(private_key, ec.EllipticCurvePrivateKey) else None
