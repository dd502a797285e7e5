"""The revocation list: load, verify, look up, issue."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from gateway.pki.files import _WEAK_HASHES, CRL_FILE, PkiError, _now, _read, _signing_hash
from gateway.pki.verify import _describe, _extension


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
