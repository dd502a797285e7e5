"""The CA side: `qkdgw pki init`, `renew`, `revoke` and `crl`.

Everything is generated in memory, written into a staging directory inside the target
(same filesystem) and only then renamed into place, so a failure never leaves a
half-written PKI."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.pki.crl import _pem_crl, _revoked_entry, issue_crl, load_crl, verify_crl
from gateway.pki.files import (
    _BACKDATE,
    _DNS_RE,
    _MAX_DAYS,
    CA_CERT,
    CA_KEY,
    CRL_FILE,
    DEFAULT_ALGORITHM,
    DEFAULT_CRL_DAYS,
    LINK_SECRET,
    PKI_ALGORITHMS,
    SITE_URI_PREFIX,
    TLS_CA_CERT,
    TLS_CA_KEY,
    PkiError,
    _now,
    _signing_hash,
    fingerprint,
    load_certificate,
    load_private_key,
    site_paths,
    validate_site_name,
)
from gateway.pki.verify import site_identity
from pqc import algorithm_of_public_key, generate_private_key
from qkd.common.files import fsync_dir, write_atomic, write_new


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
        write_atomic(pki_dir / CRL_FILE, _pem_crl(crl), 0o644)
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
        write_atomic(paths.gateway_key, _pem_key(key), 0o600)
        write_atomic(paths.gateway_cert, _pem_cert(new), 0o644)
    except OSError as exc:
        raise PkiError(f"{exc.filename or paths.directory}: cannot write the renewed "
                       f"certificate ({exc.strerror}) (fix: check permissions and free space)"
                       ) from None
    if revoke_old:
        write_crl(pki_dir, [old.serial_number], x509.ReasonFlags.superseded)
    return old, new


# --- creating ---------------------------------------------------------------------------






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
            write_new(staging / relative, data, mode)
        # Everything is on disk; now the quick part: one rename per file.
        for site in sites:
            _make_private_dir(out / site)
        for relative in files:
            os.replace(staging / relative, out / relative)
        for site in sites:
            fsync_dir(out / site)
        fsync_dir(out)
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
