"""The gateway's own PKI credentials, re-read when their files change.

A site certificate is renewed (`qkdgw pki renew`) and a CRL re-signed (`qkdgw pki crl`,
`qkdgw pki revoke`) while gateways run. Each new tunnel connection asks
`CredentialSource.current()`; at most once per `check_interval` that compares every
file's (device, inode, size, mtime) with what was loaded and, on a change, loads and
validates the whole set again:

* the key matches the certificate,
* the certificate chains to the CA, is inside its validity and names this site,
* the CRL (if configured) is signed by the CA and current, and does not list this
  site's own certificate.

A set that fails any check is not used: the previous one stays in force, the failure
is logged at error level and counted (`qkdgw_credential_reload_failures_total`), and
it is tried again when the files change again. Only a source that has never loaded a
valid set raises (at start, so the gateway does not come up with bad credentials).

An expired own certificate cannot be fixed by keeping the old set, and a new CRL that
revokes this site's own certificate is newer information than the set in use: such a
set is installed (logged as OWN_CERTIFICATE_REVOKED) so that its CRL applies, and every
handshake then refuses to present the certificate (`Credentials.own_check`, used by the
handshake core on both sides; `bootstrap_problem` for the dialler). At start, either is
an error naming the file and the fix.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter

from gateway.pki import (
    PeerCertificateError,
    PkiError,
    RevocationList,
    fingerprint,
    load_certificate,
    load_certificates,
    load_private_key,
    revocation_reason,
    site_identity,
    verify_peer_certificate,
)
from gateway.tunnel.handshake import Credentials, OwnCertificateProblem
from qkd.common.log import get_logger

log = get_logger("qkdgw.credentials")

# (st_dev, st_ino, st_size, st_mtime_ns); None when the file is missing or unreadable.
FileStamp = tuple[int, int, int, int] | None

DEFAULT_WARN_BEFORE = dt.timedelta(days=14)


class CredentialError(PkiError):
    """This gateway's own credentials are unusable; the message names the file and fix."""


class OwnCertificateExpired(CredentialError):
    """This site's certificate is outside its validity: no PKI bootstrap with it."""


@dataclass(frozen=True)
class CredentialFiles:
    """Where this gateway's credentials live ([pki] in the gateway config)."""

    key: Path
    cert: Path
    ca: Path
    crl: Path | None = None

    def all(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.key, self.cert, self.ca, self.crl) if p is not None)


@dataclass(frozen=True)
class LoadedCredentials:
    """One validated set, with the file stamps it was read under."""

    credentials: Credentials
    stamps: tuple[FileStamp, ...]
    revocation: RevocationList | None
    own_revoked: str | None = None  # why the CRL of this set revokes our own chain

    @property
    def certificate(self) -> x509.Certificate:
        return self.credentials.chain[0]


def _stamp(path: Path) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CredentialSource:
    """The current, validated credentials of one gateway; see the module docstring.

    `monotonic` paces the file checks, `wall` is the time certificates and CRLs are
    judged at; both injectable for tests."""

    def __init__(self, files: CredentialFiles, local_identity: str, *,
                 crl_grace: dt.timedelta = dt.timedelta(0),
                 warn_before: dt.timedelta = DEFAULT_WARN_BEFORE,
                 check_interval: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], dt.datetime] = _utc_now,
                 registry: CollectorRegistry | None = None) -> None:
        self.files = files
        self.local_identity = local_identity
        self.crl_grace = crl_grace
        self.warn_before = warn_before
        self.check_interval = check_interval
        self._monotonic = monotonic
        self._wall = wall
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        self._failed_stamps: tuple[FileStamp, ...] | None = None
        self._warned: set[tuple[str, str]] = set()
        registry = registry if registry is not None else CollectorRegistry()
        self._m_reloads = Counter("qkdgw_credential_reloads",
                                  "Credential sets loaded after a file change", registry=registry)
        self._m_failures = Counter("qkdgw_credential_reload_failures",
                                   "Changed credential files that failed validation (the "
                                   "previous set stays in use)", registry=registry)
        self._m_own_revoked = Counter("qkdgw_credential_own_revoked",
                                      "Reloads whose revocation list revokes this site's own "
                                      "certificate (installed; the certificate is no longer "
                                      "presented)", registry=registry)
        # Raises: a gateway must not start without one valid set.
        self._loaded = self._load(self._stamps(), initial=True)
        self._checked_at = self._monotonic()
        self._warn_expiry(self._loaded)

    # -- public ----------------------------------------------------------------------

    def current(self) -> Credentials:
        """The credentials to give a new connection, reloaded first if a file changed
        (checked at most every `check_interval` seconds)."""
        self.maybe_reload()
        return self._loaded.credentials

    @property
    def certificate(self) -> x509.Certificate:
        return self._loaded.certificate

    @property
    def revocation(self) -> RevocationList | None:
        return self._loaded.revocation

    def maybe_reload(self, force: bool = False) -> bool:
        """Reload if due and a file changed; True when a new set was installed."""
        now = self._monotonic()
        if not force and now - self._checked_at < self.check_interval:
            return False
        self._checked_at = now
        stamps = self._stamps()
        if stamps == self._loaded.stamps or stamps == self._failed_stamps:
            return False
        try:
            loaded = self._load(stamps)
        except PkiError as exc:
            if self._stamps() != stamps:
                # Files are being replaced right now (renew writes key, then cert):
                # not a failure yet, look again at the next check.
                return False
            self._failed_stamps = stamps
            self.reload_failures += 1
            self._m_failures.inc()
            self.last_error = str(exc)
            log.error("credentials.RELOAD_REJECTED", error=str(exc),
                      keeping=fingerprint(self.certificate)[:16],
                      detail="the changed credential files do not form a valid set; the "
                             "previous certificate, key and CRL stay in use")
            return False
        old = self.certificate
        self._loaded = loaded
        self._failed_stamps = None
        self.last_error = None
        self.reloads += 1
        self._m_reloads.inc()
        if loaded.own_revoked is not None:
            self._m_own_revoked.inc()
            log.error("credentials.OWN_CERTIFICATE_REVOKED", reason=loaded.own_revoked,
                      path=str(self.files.cert),
                      detail="the new revocation list revokes this site's own certificate: "
                             "it is no longer presented, so PKI handshakes fail until it is "
                             "replaced",
                      fix=f"qkdgw pki renew --pki DIR --site {self.local_identity}, then copy "
                          "gateway.crt and gateway.key here (no restart needed)")
        log.info("credentials.reloaded", cert_sha256=fingerprint(loaded.certificate)[:16],
                 previous=fingerprint(old)[:16],
                 not_after=loaded.certificate.not_valid_after_utc.isoformat(),
                 crl_next_update=None if loaded.revocation is None
                 else _iso(loaded.revocation.next_update))
        self._warn_expiry(loaded)
        return True

    def bootstrap_problem(self) -> str | None:
        """Why a PKI bootstrap must not start now with these credentials, or None."""
        self.maybe_reload()
        self._warn_expiry(self._loaded)
        problem = self._own_problem(self._loaded, self._wall())
        return None if problem is None else problem.detail

    def _renew_fix(self) -> str:
        return (f"`qkdgw pki renew --pki DIR --site {self.local_identity}` on the CA host and "
                "copy gateway.crt and gateway.key here; no restart needed")

    def _own_problem(self, loaded: LoadedCredentials,
                     now: dt.datetime) -> OwnCertificateProblem | None:
        """Whether this site may present its own chain at `now`: inside its validity and
        not revoked by the CRL it was loaded with."""
        cert = loaded.certificate
        if now > cert.not_valid_after_utc:
            return OwnCertificateProblem(
                "expired", f"this site's certificate {self.files.cert} expired at "
                f"{cert.not_valid_after_utc.isoformat()}; the peer would refuse it (fix: "
                f"{self._renew_fix()})")
        if now < cert.not_valid_before_utc:
            return OwnCertificateProblem(
                "not_yet_valid", f"this site's certificate {self.files.cert} is not valid "
                f"before {cert.not_valid_before_utc.isoformat()} (fix: check this host's "
                "clock)")
        for ca in loaded.credentials.chain[1:]:
            if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
                return OwnCertificateProblem(
                    "expired", f"a CA certificate in {self.files.cert} is outside its "
                    f"validity (valid {ca.not_valid_before_utc.isoformat()} to "
                    f"{ca.not_valid_after_utc.isoformat()}) (fix: install a current chain)")
        if loaded.own_revoked is not None:
            return OwnCertificateProblem(
                "revoked", f"this site's own {loaded.own_revoked} in {self.files.crl}; it is "
                f"not presented (fix: {self._renew_fix()})")
        return None

    def bootstrap_credentials(self) -> Credentials:
        """`current()`, or OwnCertificateExpired when a PKI bootstrap must not start."""
        credentials = self.current()
        problem = self.bootstrap_problem()
        if problem is not None:
            raise OwnCertificateExpired(problem)
        return credentials

    # -- loading -----------------------------------------------------------------------

    def _stamps(self) -> tuple[FileStamp, ...]:
        return tuple(_stamp(p) for p in self.files.all())

    def _load(self, stamps: tuple[FileStamp, ...], initial: bool = False) -> LoadedCredentials:
        files, now = self.files, self._wall()
        ca = load_certificate(files.ca)
        chain = load_certificates(files.cert)
        key = load_private_key(files.key)
        leaf = chain[0]
        if _public_der(key.public_key()) != _public_der(leaf.public_key()):
            raise CredentialError(
                f"{files.key}: this private key does not belong to the certificate "
                f"{files.cert} (fix: install the key and certificate of the same "
                "`qkdgw pki init`/`renew` together)")
        try:
            verify_peer_certificate(leaf, ca, self.local_identity, now,
                                    intermediates=chain[1:])
        except PeerCertificateError as exc:
            if exc.reason == "wrong_identity":
                raise CredentialError(
                    f"{files.cert}: is for site {site_identity(leaf)!r}, but this gateway is "
                    f"site {self.local_identity!r} (fix: install this site's own gateway.crt "
                    "and gateway.key)") from None
            if exc.reason == "expired":
                raise OwnCertificateExpired(
                    f"{files.cert}: this site's own certificate has expired and is not "
                    f"presented: {exc} (fix: {self._renew_fix()})") from None
            raise CredentialError(f"{files.cert}: this site's own certificate is not usable "
                                  f"with CA {files.ca}: {exc}") from None
        revocation = None
        crl_check = None
        own_revoked = None
        if files.crl is not None:
            revocation = RevocationList.load(files.crl, ca, grace=self.crl_grace, now=now)
            for cert in chain:
                reason = revocation_reason(revocation.crl, cert)
                if reason is not None and initial:
                    raise CredentialError(
                        f"{files.cert}: this site's own {reason} in {files.crl}; peers "
                        "refuse it and this gateway will not present it (fix: `qkdgw pki "
                        f"renew --pki DIR --site {self.local_identity}` and install the new "
                        "key and certificate)")
                own_revoked = own_revoked or reason
            crl_check = self._crl_check(revocation)
        holder: list[LoadedCredentials] = []
        credentials = Credentials(private_key=key, chain=tuple(chain), trust_anchor=ca,
                                  crl_check=crl_check,
                                  own_check=lambda when: self._own_problem(holder[0], when))
        loaded = LoadedCredentials(credentials, stamps, revocation, own_revoked)
        holder.append(loaded)
        return loaded

    def _crl_check(self, revocation: RevocationList) -> Callable[[x509.Certificate], str | None]:
        def check(cert: x509.Certificate) -> str | None:
            # Judged at the time of use: a list that expires while the gateway runs
            # refuses bootstraps from that moment on.
            return revocation.check_chain([cert], self._wall())
        return check

    def _warn_expiry(self, loaded: LoadedCredentials) -> None:
        """Warn once per certificate / CRL when it is within `warn_before` of its end."""
        now = self._wall()
        cert = loaded.certificate
        ends = [("certificate", fingerprint(cert), cert.not_valid_after_utc, self.files.cert)]
        if loaded.revocation is not None and loaded.revocation.next_update is not None:
            ends.append(("crl", _iso(loaded.revocation.next_update),
                         loaded.revocation.next_update, loaded.revocation.source))
        for what, ident, end, path in ends:
            if now + self.warn_before < end or (what, ident) in self._warned:
                continue
            self._warned.add((what, ident))
            fix = (f"qkdgw pki renew --pki DIR --site {self.local_identity}"
                   if what == "certificate" else "qkdgw pki crl --pki DIR")
            log.warning(f"credentials.{what}_expires_soon" if now <= end
                        else f"credentials.{what.upper()}_EXPIRED",
                        path=str(path), at=end.isoformat(),
                        days_left=round((end - now).total_seconds() / 86400, 1),
                        fix=f"run `{fix}` and copy the result here (no restart needed)")


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.isoformat()


__all__ = ["CredentialError", "CredentialFiles", "CredentialSource", "OwnCertificateExpired"]
