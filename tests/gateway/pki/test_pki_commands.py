"""`qkdgw pki init`, certificate/key loading, and peer certificate verification."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import gateway.pki as pki
import gateway.pki.authority as pki_authority
from gateway.cli import main
from gateway.pki import (
    PeerCertificateError,
    PkiError,
    fingerprint,
    init_pki,
    load_certificate,
    load_certificates,
    load_private_key,
    site_identity,
    site_paths,
    verify_peer_certificate,
)
from pqc import algorithm_of_public_key, generate_private_key, sign, verify

SITES = ["site-a", "site-b"]
UTC = dt.UTC


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "pki"
    init_pki(out, SITES, kme_hosts=["kme.example.net", "10.0.0.5", "site-a=kme-a"])
    return out


@pytest.fixture(scope="module")
def other_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("other") / "pki"
    init_pki(out, SITES)
    return out


@pytest.fixture(scope="module")
def ca(pki_dir: Path) -> x509.Certificate:
    return load_certificate(pki_dir / "ca.crt")


@pytest.fixture(scope="module")
def ca_key(pki_dir: Path) -> Any:
    return load_private_key(pki_dir / "ca.key")


@pytest.fixture(scope="module")
def site_b_cert(pki_dir: Path) -> x509.Certificate:
    return load_certificate(site_paths(pki_dir, "site-b").gateway_cert)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _build(issuer: x509.Certificate | None, issuer_key: Any, *, subject: str = "forged",
           key: Any = None, ca: bool = False, path_length: int | None = None,
           site: str | None = "site-b", not_before: dt.datetime | None = None,
           not_after: dt.datetime | None = None,
           extra: list[tuple[x509.ExtensionType, bool]] = ()) -> tuple[x509.Certificate, Any]:
    """A certificate with chosen properties, signed by `issuer_key` (self-signed when
    `issuer` is None)."""
    key = key or generate_private_key("ML-DSA-44")
    now = dt.datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    if site is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"qkdgw://site/{site}")]), critical=False)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    digest = hashes.SHA256() if isinstance(issuer_key, ec.EllipticCurvePrivateKey) else None
    return builder.sign(issuer_key, digest), key


def _reason(cert: x509.Certificate, ca: x509.Certificate, identity: str = "site-b",
            **kwargs: Any) -> str:
    with pytest.raises(PeerCertificateError) as info:
        verify_peer_certificate(cert, ca, identity, **kwargs)
    assert info.value.reason in pki.REASONS
    return info.value.reason


# --- init ------------------------------------------------------------------------------


def test_init_writes_exactly_the_layout(pki_dir: Path) -> None:
    written = sorted(str(p.relative_to(pki_dir)) for p in pki_dir.rglob("*") if p.is_file())
    assert written == sorted(pki_authority._layout(SITES))
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o700
    for site in SITES:
        assert stat.S_IMODE((pki_dir / site).stat().st_mode) == 0o700
    for path in pki_dir.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.suffix == ".key":
            assert mode == 0o600, path
        elif path.suffix == ".crt":
            assert mode == 0o644, path
    secret = (pki_dir / "link-secret.key").read_text()
    assert secret.endswith("\n") and len(bytes.fromhex(secret.strip())) == 32


def test_private_keys_are_pkcs8_and_match_certs(pki_dir: Path) -> None:
    pairs = [("ca.crt", "ca.key"), ("tls-ca.crt", "tls-ca.key")]
    for site in SITES:
        pairs += [(f"{site}/{leaf}.crt", f"{site}/{leaf}.key")
                  for leaf in ("gateway", "kme-server", "sae-client")]
    for cert_name, key_name in pairs:
        assert (pki_dir / key_name).read_text().startswith("-----BEGIN PRIVATE KEY-----")
        cert = load_certificate(pki_dir / cert_name)
        key = load_private_key(pki_dir / key_name)
        assert key.public_key() == cert.public_key(), key_name


def test_gateway_certificates(pki_dir: Path, ca: x509.Certificate) -> None:
    assert algorithm_of_public_key(ca.public_key()) == "ML-DSA-65"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca.verify_directly_issued_by(ca)
    for site in SITES:
        cert = load_certificate(site_paths(pki_dir, site).gateway_cert)
        cert.verify_directly_issued_by(ca)
        assert _cn(cert) == site
        assert site_identity(cert) == site
        assert algorithm_of_public_key(cert.public_key()) == "ML-DSA-65"
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
        assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc
        verify_peer_certificate(cert, ca, site)


def test_tls_certificates(pki_dir: Path) -> None:
    tls_ca = load_certificate(pki_dir / "tls-ca.crt")
    assert algorithm_of_public_key(tls_ca.public_key()) == "ECDSA-P256"
    for site in SITES:
        paths = site_paths(pki_dir, site)
        server = load_certificate(paths.kme_server_cert)
        client = load_certificate(paths.sae_client_cert)
        for cert in (server, client):
            cert.verify_directly_issued_by(tls_ca)
            assert algorithm_of_public_key(cert.public_key()) == "ECDSA-P256"
        assert _cn(server) == f"kme-{site}" and _cn(client) == f"{site}-gw"
        assert _eku(server) == {ExtendedKeyUsageOID.SERVER_AUTH}
        assert _eku(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(san.get_values_for_type(x509.DNSName))
        ips = set(san.get_values_for_type(x509.IPAddress))
        assert {"localhost", "kme.example.net"} <= dns
        assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5")} == ips
        # SITE=HOST only lands in that site's certificate.
        assert ("kme-a" in dns) == (site == "site-a")


@pytest.mark.parametrize("algorithm", list(pki.PKI_ALGORITHMS))
def test_each_algorithm(tmp_path: Path, algorithm: str) -> None:
    init_pki(tmp_path / "pki", ["alpha", "beta"], algorithm=algorithm, days=30)
    ca = load_certificate(tmp_path / "pki" / "ca.crt")
    expected = pki.PKI_ALGORITHMS[algorithm]
    assert algorithm_of_public_key(ca.public_key()) == expected
    cert = load_certificate(tmp_path / "pki" / "alpha" / "gateway.crt")
    key = load_private_key(tmp_path / "pki" / "alpha" / "gateway.key")
    assert algorithm_of_public_key(cert.public_key()) == expected
    verify_peer_certificate(cert, ca, "alpha")
    assert _reason(cert, ca, "beta") == "wrong_identity"
    signature = sign(key, b"transcript")
    assert verify(cert.public_key(), signature, b"transcript")
    assert not verify(cert.public_key(), signature, b"transcript!")
    # The TLS side stays ECDSA whatever the gateway algorithm.
    tls_ca = load_certificate(tmp_path / "pki" / "tls-ca.crt")
    assert algorithm_of_public_key(tls_ca.public_key()) == "ECDSA-P256"
    assert dt.timedelta(days=29) < ca.not_valid_after_utc - dt.datetime.now(UTC) \
        <= dt.timedelta(days=30)


def test_one_site_is_enough(tmp_path: Path) -> None:
    init_pki(tmp_path / "solo", ["solo"])
    assert (tmp_path / "solo" / "solo" / "gateway.crt").exists()


@pytest.mark.parametrize("sites, match", [
    ([], "no sites"),
    (["Site-A"], "invalid site name 'Site-A'"),
    (["site_a"], "invalid site name"),
    (["-site"], "invalid site name"),
    (["a" * 49], "invalid site name"),
    (["../etc"], "invalid site name"),
    (["site-a", "site-a"], "given twice"),
])
def test_init_rejects_bad_sites(tmp_path: Path, sites: list[str], match: str) -> None:
    with pytest.raises(PkiError, match=match):
        init_pki(tmp_path / "pki", sites)
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"algorithm": "rsa-2048"}, "unknown algorithm 'rsa-2048'"),
    ({"days": 0}, "out of range"),
    ({"kme_hosts": ["bad host!"]}, "neither an IP address nor a DNS name"),
    ({"kme_hosts": ["site-z=kme-z"]}, "names site 'site-z'"),
])
def test_init_rejects_bad_options(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(PkiError, match=match):
        init_pki(tmp_path / "pki", SITES, **kwargs)
    assert not (tmp_path / "pki").exists()


def test_init_refuses_overwrite_then_force_replaces(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    init_pki(out, SITES)
    (out / "README").write_text("operator notes\n")
    before = fingerprint(load_certificate(out / "ca.crt"))
    with pytest.raises(PkiError, match=r"already exists.*--force"):
        init_pki(out, SITES)
    assert fingerprint(load_certificate(out / "ca.crt")) == before
    init_pki(out, SITES, force=True)
    assert fingerprint(load_certificate(out / "ca.crt")) != before
    assert (out / "README").read_text() == "operator notes\n"  # not ours, left alone
    assert not list(out.glob(".pki-init-*"))


def test_init_failure_leaves_no_partial_pki(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "pki"
    init_pki(out, SITES)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_write = pki_authority.write_new
    calls = 0

    def failing_write(path: Path, data: bytes, mode: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 7:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data, mode)

    monkeypatch.setattr(pki_authority, "write_new", failing_write)
    with pytest.raises(PkiError, match="No space left on device"):
        init_pki(out, SITES, force=True)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not list(out.glob(".pki-init-*"))
    # And a fresh directory is not left behind half-made.
    calls = 0
    with pytest.raises(PkiError):
        init_pki(tmp_path / "fresh", SITES)
    assert not (tmp_path / "fresh").exists()


# --- verify_peer_certificate -----------------------------------------------------------


def test_verify_accepts_the_right_peer(ca: x509.Certificate, site_b_cert: x509.Certificate) -> None:
    verify_peer_certificate(site_b_cert, ca, "site-b")
    naive_now = dt.datetime.now(UTC).replace(tzinfo=None)
    verify_peer_certificate(site_b_cert, ca, "site-b", now=naive_now)


def test_verify_rejects_other_ca(other_pki_dir: Path, ca: x509.Certificate) -> None:
    foreign = load_certificate(site_paths(other_pki_dir, "site-b").gateway_cert)
    assert site_identity(foreign) == "site-b"
    assert _reason(foreign, ca) == "untrusted"
    with pytest.raises(PeerCertificateError) as info:
        verify_peer_certificate(foreign, ca, "site-b")
    assert "not issued by the trusted CA" in str(info.value) and "fix:" in str(info.value)


def test_verify_rejects_tampered_signature(ca: x509.Certificate,
                                           site_b_cert: x509.Certificate) -> None:
    der = bytearray(site_b_cert.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature value
    tampered = x509.load_der_x509_certificate(bytes(der))
    assert _reason(tampered, ca) == "untrusted"


def test_verify_rejects_wrong_identity(pki_dir: Path, ca: x509.Certificate) -> None:
    site_a = load_certificate(site_paths(pki_dir, "site-a").gateway_cert)
    assert _reason(site_a, ca, "site-b") == "wrong_identity"
    assert _reason(site_a, ca, "site-a2") == "wrong_identity"
    assert _reason(site_a, ca, "") == "wrong_identity"


def test_verify_rejects_missing_or_ambiguous_identity(ca: x509.Certificate, ca_key: Any) -> None:
    no_san, _ = _build(ca, ca_key, site=None)
    assert site_identity(no_san) is None
    assert _reason(no_san, ca) == "wrong_identity"
    two = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("qkdgw://site/site-b"),
                                       x509.UniformResourceIdentifier("qkdgw://site/site-c")])
    ambiguous, _ = _build(ca, ca_key, site=None, extra=[(two, False)])
    assert site_identity(ambiguous) is None
    assert _reason(ambiguous, ca) == "wrong_identity"


def test_verify_rejects_expired_and_not_yet_valid(ca: x509.Certificate, ca_key: Any,
                                                   site_b_cert: x509.Certificate) -> None:
    now = dt.datetime.now(UTC)
    expired, _ = _build(ca, ca_key, not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1))
    assert _reason(expired, ca) == "expired"
    future, _ = _build(ca, ca_key, not_before=now + dt.timedelta(days=1),
                       not_after=now + dt.timedelta(days=30))
    assert _reason(future, ca) == "not_yet_valid"
    # The CA's own validity counts too.
    assert _reason(site_b_cert, ca, now=ca.not_valid_after_utc + dt.timedelta(seconds=1)) \
        == "expired"
    assert _reason(site_b_cert, ca, now=ca.not_valid_before_utc - dt.timedelta(seconds=1)) \
        == "not_yet_valid"


def test_verify_checks_ca_validity_separately() -> None:
    now = dt.datetime.now(UTC)
    root, root_key = _build(None, generate_private_key("Ed25519"), subject="short-lived root",
                            ca=True, site=None, not_after=now + dt.timedelta(days=1))
    leaf, _ = _build(root, root_key, not_after=now + dt.timedelta(days=30))
    verify_peer_certificate(leaf, root, "site-b", now=now)
    assert _reason(leaf, root, now=now + dt.timedelta(days=2)) == "expired"


def test_verify_rejects_leaf_acting_as_ca(pki_dir: Path, ca: x509.Certificate,
                                          site_b_cert: x509.Certificate) -> None:
    # site-a's gateway key "issues" a site-b certificate, presented with site-a's
    # genuine certificate as the intermediate.
    site_a = load_certificate(site_paths(pki_dir, "site-a").gateway_cert)
    site_a_key = load_private_key(site_paths(pki_dir, "site-a").gateway_key)
    forged, _ = _build(site_a, site_a_key, site="site-b")
    assert _reason(forged, ca, intermediates=[site_a]) == "bad_usage"
    assert _reason(forged, ca) == "untrusted"  # no path at all without the intermediate
    # The CA certificate itself is not a peer identity.
    assert _reason(ca, ca) == "bad_usage"


def test_verify_rejects_ca_flagged_leaf(ca: x509.Certificate, ca_key: Any) -> None:
    leaf_ca, _ = _build(ca, ca_key, ca=True, path_length=0)
    assert _reason(leaf_ca, ca) == "bad_usage"


def test_verify_rejects_unknown_critical_extension(ca: x509.Certificate, ca_key: Any) -> None:
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    cert, _ = _build(ca, ca_key, extra=[(odd, True)])
    assert _reason(cert, ca) == "bad_usage"
    cert, _ = _build(ca, ca_key, extra=[(odd, False)])  # non-critical: ignorable
    verify_peer_certificate(cert, ca, "site-b")


def test_verify_rejects_wrong_key_usage(ca: x509.Certificate, ca_key: Any) -> None:
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=True, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False)
    cert, _ = _build(ca, ca_key, extra=[(usage, True)])
    assert _reason(cert, ca) == "bad_usage"
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
    cert, _ = _build(ca, ca_key, extra=[(eku, False)])
    assert _reason(cert, ca) == "bad_usage"


def test_verify_with_intermediate() -> None:
    root, root_key = _build(None, generate_private_key("ML-DSA-65"), subject="root", ca=True,
                            site=None)
    inter, inter_key = _build(root, root_key, subject="intermediate", ca=True, path_length=0,
                              site=None)
    leaf, _ = _build(inter, inter_key, subject="site-b")
    verify_peer_certificate(leaf, root, "site-b", intermediates=[inter])
    assert _reason(leaf, root) == "untrusted"
    # A root limited to path length 0 may not have an intermediate below it.
    strict_root, strict_key = _build(None, generate_private_key("Ed25519"), subject="strict",
                                     ca=True, path_length=0, site=None)
    inter2, inter2_key = _build(strict_root, strict_key, subject="intermediate", ca=True,
                                site=None)
    leaf2, _ = _build(inter2, inter2_key, subject="site-b")
    assert _reason(leaf2, strict_root, intermediates=[inter2]) == "bad_usage"


def test_fingerprint(site_b_cert: x509.Certificate) -> None:
    value = fingerprint(site_b_cert)
    assert len(value) == 64 and int(value, 16) >= 0
    assert value == site_b_cert.fingerprint(hashes.SHA256()).hex()


# --- loading ---------------------------------------------------------------------------


def test_load_certificate_errors(tmp_path: Path, pki_dir: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(PkiError, match=f"{missing}: certificate file not found"):
        load_certificate(missing)
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"hello\n")
    with pytest.raises(PkiError, match="not a PEM certificate"):
        load_certificate(garbage)
    der = tmp_path / "ca.der"
    der.write_bytes(load_certificate(pki_dir / "ca.crt").public_bytes(serialization.Encoding.DER))
    with pytest.raises(PkiError, match="looks like DER"):
        load_certificate(der)
    with pytest.raises(PkiError, match="cannot read certificate file"):
        load_certificate(tmp_path)  # a directory
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((pki_dir / "ca.crt").read_bytes() + (pki_dir / "tls-ca.crt").read_bytes())
    assert len(load_certificates(bundle)) == 2
    with pytest.raises(PkiError, match="expected one certificate, found 2"):
        load_certificate(bundle)


def test_load_private_key_errors(tmp_path: Path, pki_dir: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(PkiError, match="private key not found"):
        load_private_key(missing)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(PkiError, match="not a PEM private key"):
        load_private_key(garbage)
    encrypted = tmp_path / "encrypted.key"
    key = generate_private_key("ECDSA-P256")
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    encrypted.chmod(0o600)
    with pytest.raises(PkiError, match="encrypted"):
        load_private_key(encrypted)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_private_key_refuses_loose_permissions(tmp_path: Path, pki_dir: Path,
                                                    mode: int) -> None:
    key_file = tmp_path / "gateway.key"
    key_file.write_bytes((pki_dir / "site-a" / "gateway.key").read_bytes())
    key_file.chmod(mode)
    with pytest.raises(PkiError) as info:
        load_private_key(key_file)
    message = str(info.value)
    assert f"chmod 600 {key_file}" in message and f"{mode:04o}" in message
    assert "PRIVATE KEY" not in message
    key_file.chmod(0o600)
    assert load_private_key(key_file) is not None


# --- the TLS certificates in Python's ssl module (what the KME and client use) ---------


def _tls_contexts(pki_dir: Path, site: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    paths = site_paths(pki_dir, site)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki_dir / "tls-ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(paths.kme_server_cert, paths.kme_server_key)
    client = ssl.create_default_context(cafile=pki_dir / "tls-ca.crt")
    client.load_cert_chain(paths.sae_client_cert, paths.sae_client_key)
    for ctx in (server, client):
        # Python 3.13 turns this on by default; the certificates must pass it already.
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return server, client


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
               hostname: str) -> dict[str, Any]:
    """A full TLS handshake over memory BIOs; returns the client cert the server saw."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, conn in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate on the client's last flight.
            server.write(b"ping")
            c_in.write(s_out.read())
            assert client.read() == b"ping"
            return server.getpeercert()
    raise AssertionError("TLS handshake did not finish")


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "kme.example.net", "kme-a"])
def test_tls_certs_work_in_python_ssl(pki_dir: Path, hostname: str) -> None:
    server_ctx, client_ctx = _tls_contexts(pki_dir, "site-a")
    peer = _handshake(server_ctx, client_ctx, hostname)
    subject = dict(item for rdn in peer["subject"] for item in rdn)
    assert subject["commonName"] == "site-a-gw"  # the SAE ID the KME will read


def test_tls_hostname_outside_san_is_rejected(pki_dir: Path) -> None:
    server_ctx, client_ctx = _tls_contexts(pki_dir, "site-b")
    with pytest.raises(ssl.SSLCertVerificationError, match="kme-a"):
        _handshake(server_ctx, client_ctx, "kme-a")  # only site-a's KME carries it


def test_tls_rejects_other_pki(pki_dir: Path, other_pki_dir: Path) -> None:
    server_ctx, _ = _tls_contexts(pki_dir, "site-a")
    _, foreign_client = _tls_contexts(other_pki_dir, "site-a")
    with pytest.raises(ssl.SSLError):
        _handshake(server_ctx, foreign_client, "localhost")


# --- CLI -------------------------------------------------------------------------------


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    argv = ["pki", "init", "--out", str(out), "--site", "site-a", "--site", "site-b",
            "--algorithm", "ED25519", "--days", "10",
            "--kme-host", "kme.example", "site-b=10.9.8.7"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out and "site-b/kme-server.crt" in printed.out
    assert "10.9.8.7" in printed.out and "Ed25519" in printed.out
    # No secret material in what a terminal or CI log would keep.
    secret = (out / "link-secret.key").read_text().strip()
    assert secret not in printed.out + printed.err
    for key_file in out.rglob("*.key"):
        if key_file.name == "link-secret.key":
            continue
        body = "".join(key_file.read_text().splitlines()[1:-1])
        assert len(body) > 60
        # The tail: the DER prefix is the same fixed ASN.1 header in every key.
        assert body[-40:] not in printed.out + printed.err
    assert algorithm_of_public_key(load_certificate(out / "ca.crt").public_key()) == "Ed25519"

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkdgw pki: error: ") and "--force" in err and err.count("\n") == 1
    assert main([*argv, "--force"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--site", "Bad_Name"], "invalid site name"),
    (["--site", "site-a", "--site", "site-a"], "given twice"),
    (["--site", "site-a", "--days", "0"], "out of range"),
    (["--site", "site-a", "--kme-host", "site-q=kme"], "names site 'site-q'"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 extra: list[str], message: str) -> None:
    assert main(["pki", "init", "--out", str(tmp_path / "pki"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_requires_site_and_action(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pki", "init", "--out", str(tmp_path / "pki")])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["pki"])
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_modes_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        init_pki(tmp_path / "pki", ["site-a"])
    finally:
        os.umask(old)
    for path in (tmp_path / "pki").rglob("*"):
        expected = {".key": 0o600, ".crt": 0o644, ".pem": 0o644, "": 0o700}[path.suffix]
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
