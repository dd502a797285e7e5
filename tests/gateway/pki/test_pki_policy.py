"""Certificate policy at bootstrap: revocation lists, expiry, the expected peer identity,
and credentials that follow their files without a restart (gateway/runtime/credentials.py).

Every refusal has a positive control: the same peer is accepted before it is revoked,
with a fresh certificate, with a current CRL, or with the right expected identity."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.cli import main
from gateway.config import GatewayConfig
from gateway.pki import (
    CRL_FILE,
    SITE_URI_PREFIX,
    CrlError,
    PkiError,
    RevocationList,
    issue_crl,
    load_certificate,
    load_crl,
    load_private_key,
    renew,
    revocation_reason,
    revoke,
    site_paths,
    verify_crl,
    write_crl,
)
from gateway.pki.authority import _make_leaf
from gateway.runtime import Gateway, load_credentials
from gateway.runtime.credentials import (
    CredentialFiles,
    CredentialSource,
    OwnCertificateExpired,
)
from gateway.tunnel import events as ev
from gateway.tunnel.handshake import HandshakeParams, HandshakePolicy
from gateway.tunnel.wire import ErrorCode
from pqc import generate_private_key
from qkd.common.confload import ConfigError
from tests.support.tunnel_harness import Pair, make_pair, params

UTC = dt.UTC
REPO = Path(__file__).resolve().parents[3]


class Clock:
    """Wall clock for certificate and CRL checks, moved by hand."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def pki(tmp_path: Path, pki_dir: Path) -> Path:
    """A private copy of the session PKI (with its CA key), free to revoke and renew in."""
    out = tmp_path / "pki"
    shutil.copytree(pki_dir, out)
    return out


def source(pki: Path, site: str, *, crl: bool = True, clock: Clock | None = None,
           **kw: Any) -> CredentialSource:
    paths = site_paths(pki, site)
    files = CredentialFiles(key=paths.gateway_key, cert=paths.gateway_cert,
                            ca=pki / "ca.crt", crl=pki / CRL_FILE if crl else None)
    return CredentialSource(files, site, check_interval=0.0,
                            wall=clock or Clock(), **kw)


def pair_with(pki: Path, a: CredentialSource | None = None,
              b: CredentialSource | None = None, *, peer_of_a: str = "site-b") -> Pair:
    """One bootstrap between site-a (initiator) and site-b, each side's credentials
    taken from its source, as `Gateway.new_connection` does."""
    pa = side_params("site-a", peer_of_a, a) if a else params(pki, "site-a", peer_of_a)
    pb = side_params("site-b", "site-a", b) if b else params(pki, "site-b", "site-a")
    return make_pair(pki, params_a=pa, params_b=pb)


def side_params(local: str, peer: str, src: CredentialSource) -> HandshakeParams:
    return HandshakeParams(local_identity=local, peer_identity=peer,
                           local_sae_id=f"{local}-gw", peer_sae_id=f"{peer}-gw",
                           credentials=src.current(), policy=HandshakePolicy())


def terminated(events: list[ev.Event]) -> ev.ConnectionTerminated | None:
    found = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    return found[-1] if found else None


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def presented(pair: Pair, cert: x509.Certificate, by: str) -> bool:
    wire = b"".join(pair.wire_b2a if by == "b" else pair.wire_a2b)
    return der(cert) in wire


def leaf(pki: Path, site: str, *, now: dt.datetime | None = None, days: int = 30,
         key: Any = None) -> tuple[x509.Certificate, Any]:
    ca, ca_key = load_certificate(pki / "ca.crt"), load_private_key(pki / "ca.key")
    key = key or generate_private_key("ML-DSA-65")
    cert = _make_leaf(site, key, ca, ca_key, days,
                      [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                      [x509.UniformResourceIdentifier(f"{SITE_URI_PREFIX}{site}")], now=now)
    return cert, key


def install(pki: Path, site: str, cert: x509.Certificate, key: Any) -> None:
    paths = site_paths(pki, site)
    paths.gateway_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths.gateway_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --- revocation at bootstrap --------------------------------------------------------------


def test_revoked_responder_is_refused_by_the_initiator(pki: Path) -> None:
    a = source(pki, "site-a")
    # Positive control: the same certificate is accepted while it is not listed.
    assert pair_with(pki, a).a.ready
    serials, _ = revoke(pki, site="site-b", reason=x509.ReasonFlags.key_compromise)
    assert serials == [load_certificate(site_paths(pki, "site-b").gateway_cert).serial_number]
    pair = pair_with(pki, a)  # same source, no restart: the re-signed CRL is picked up
    assert not pair.a.ready and not pair.b.ready
    term = terminated(pair.events_a)
    assert term is not None and term.code == ErrorCode.BAD_CERTIFICATE
    assert "revoked" in term.reason and "key_compromise" in term.reason
    assert a.reloads == 1 and a.reload_failures == 0


def test_revoked_initiator_is_refused_by_the_responder(pki: Path) -> None:
    b = source(pki, "site-b")
    assert pair_with(pki, b=b).b.ready
    revoke(pki, site="site-a")
    pair = pair_with(pki, b=b)
    assert not pair.b.ready
    term = terminated(pair.events_b)
    assert term is not None and term.code == ErrorCode.BAD_CERTIFICATE
    assert "revoked" in term.reason


def test_without_a_crl_the_revoked_peer_gets_through(pki: Path) -> None:
    # Positive control for the whole mechanism: switch the CRL off and the revoked
    # certificate is accepted, so the refusal above is the CRL's doing.
    revoke(pki, site="site-b")
    assert pair_with(pki, source(pki, "site-a", crl=False)).a.ready


def test_revocation_list_checks_intermediates_too(pki: Path) -> None:
    ca, ca_key = load_certificate(pki / "ca.crt"), load_private_key(pki / "ca.key")
    peer = load_certificate(site_paths(pki, "site-b").gateway_cert)
    other = load_certificate(site_paths(pki, "site-c").gateway_cert)
    entry = x509.RevokedCertificateBuilder().serial_number(other.serial_number) \
        .revocation_date(dt.datetime.now(UTC)).build()
    rl = RevocationList(pki / CRL_FILE, issue_crl(ca, ca_key, [entry], 2, 1), ca)
    assert rl.check_chain([peer]) is None
    reason = rl.check_chain([peer, other])
    assert reason is not None and f"{other.serial_number:x}" in reason
    # A certificate from another issuer is not covered by this CA's list.
    assert revocation_reason(rl.crl, ca) is None


# --- the CRL itself ------------------------------------------------------------------------


def test_init_writes_an_empty_crl_signed_by_the_ca(pki: Path) -> None:
    crl = load_crl(pki / CRL_FILE)
    verify_crl(crl, load_certificate(pki / "ca.crt"))
    assert len(list(crl)) == 0
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(UTC)


def test_crl_with_a_bad_signature_fails_closed(pki: Path, other_pki_dir: Path) -> None:
    good = (pki / CRL_FILE).read_bytes()
    # 1. the right issuer name, signed by another CA's key.
    forged = issue_crl(load_certificate(pki / "ca.crt"), load_private_key(other_pki_dir / "ca.key"),
                       [], 7, 30)
    (pki / CRL_FILE).write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CrlError, match="not signed by the trusted CA"):
        source(pki, "site-a")
    # 2. one flipped bit in the signature of the real list (DER, to reach the bytes).
    real = x509.load_pem_x509_crl(good)
    raw = bytearray(real.public_bytes(serialization.Encoding.DER))
    raw[-5] ^= 0x01
    (pki / CRL_FILE).write_bytes(bytes(raw))
    with pytest.raises(CrlError, match="not signed by the trusted CA"):
        source(pki, "site-a")
    # Positive control: the untouched list is accepted (in DER form too).
    (pki / CRL_FILE).write_bytes(real.public_bytes(serialization.Encoding.DER))
    assert source(pki, "site-a").revocation is not None
    (pki / CRL_FILE).write_bytes(good)
    assert source(pki, "site-a").revocation is not None


def test_stale_crl_fails_closed_unless_a_grace_is_configured(pki: Path) -> None:
    ca, ca_key = load_certificate(pki / "ca.crt"), load_private_key(pki / "ca.key")
    long_ago = dt.datetime.now(UTC) - dt.timedelta(days=3)
    stale = issue_crl(ca, ca_key, [], 9, 1, now=long_ago)  # nextUpdate two days ago
    (pki / CRL_FILE).write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CrlError, match=r"expired at .*qkdgw pki crl.*crl_grace_s"):
        source(pki, "site-a")
    # The operator's explicit grace lets it through...
    a = source(pki, "site-a", crl_grace=dt.timedelta(days=3))
    assert pair_with(pki, a).a.ready
    # ...but a grace too short for its age does not.
    with pytest.raises(CrlError, match="expired"):
        source(pki, "site-a", crl_grace=dt.timedelta(days=1))


def test_crl_that_expires_while_running_refuses_bootstraps(pki: Path) -> None:
    clock = Clock()
    a = source(pki, "site-a", clock=clock)
    assert pair_with(pki, a).a.ready  # positive control, same files
    next_update = load_crl(pki / CRL_FILE).next_update_utc
    assert next_update is not None
    clock.now = next_update + dt.timedelta(seconds=1)
    pair = pair_with(pki, a)
    term = terminated(pair.events_a)
    assert not pair.a.ready and term is not None and term.code == ErrorCode.BAD_CERTIFICATE
    assert "expired" in term.reason and "qkdgw pki crl" in term.reason
    # Re-signing the list on the CA host and copying it over fixes it, no restart.
    write_crl(pki, days=400)
    assert pair_with(pki, a).a.ready


def test_crl_with_unknown_critical_extension_is_refused(pki: Path) -> None:
    ca, ca_key = load_certificate(pki / "ca.crt"), load_private_key(pki / "ca.key")
    now = dt.datetime.now(UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
           .next_update(now + dt.timedelta(days=1))
           .add_extension(x509.DeltaCRLIndicator(1), critical=True)
           .sign(ca_key, None))
    with pytest.raises(CrlError, match="critical extension"):
        verify_crl(crl, ca)


# --- expiry and identity -----------------------------------------------------------------


def test_expired_peer_is_refused_at_bootstrap(pki: Path) -> None:
    key = load_private_key(site_paths(pki, "site-b").gateway_key)
    past = dt.datetime.now(UTC) - dt.timedelta(days=10)
    expired, _ = leaf(pki, "site-b", now=past, days=2, key=key)
    pb = params(pki, "site-b", "site-a")
    assert pb.credentials is not None
    pair = make_pair(pki, params_b=replace(pb, credentials=replace(pb.credentials,
                                                                    chain=(expired,))))
    term = terminated(pair.events_a)
    assert not pair.a.ready and term is not None and term.code == ErrorCode.BAD_CERTIFICATE
    assert "expired" in term.reason
    # Positive control: the same key with a current certificate is accepted.
    fresh, _ = leaf(pki, "site-b", key=key)
    assert make_pair(pki, params_b=replace(pb, credentials=replace(pb.credentials,
                                                                    chain=(fresh,)))).a.ready


def test_wrong_expected_identity_is_refused(pki: Path) -> None:
    a = source(pki, "site-a")
    pair = pair_with(pki, a, peer_of_a="site-c")
    assert not pair.a.ready
    term = terminated(pair.events_a) or terminated(pair.events_b)
    assert term is not None and term.code in (ErrorCode.BAD_CERTIFICATE,
                                              ErrorCode.ACCESS_DENIED)
    assert pair_with(pki, a, peer_of_a="site-b").a.ready


def test_own_expired_certificate_refuses_to_bootstrap(pki: Path) -> None:
    clock = Clock()
    a = source(pki, "site-a", clock=clock)
    assert a.bootstrap_problem() is None
    assert a.bootstrap_credentials().chain[0] == a.certificate
    clock.now = a.certificate.not_valid_after_utc + dt.timedelta(seconds=1)
    problem = a.bootstrap_problem()
    assert problem is not None and "expired" in problem and "qkdgw pki renew" in problem
    with pytest.raises(OwnCertificateExpired, match="site-a"):
        a.bootstrap_credentials()


def test_own_certificate_that_expired_before_start_is_a_startup_error(pki: Path) -> None:
    past = dt.datetime.now(UTC) - dt.timedelta(days=10)
    install(pki, "site-a", *leaf(pki, "site-a", now=past, days=2))
    with pytest.raises(PkiError, match="expired"):
        source(pki, "site-a")


def test_own_revoked_certificate_is_not_loaded(pki: Path) -> None:
    revoke(pki, site="site-a")
    with pytest.raises(PkiError, match=r"revoked.*qkdgw pki renew"):
        source(pki, "site-a")
    renew(pki, "site-a")  # the fix the message names
    assert source(pki, "site-a").certificate.serial_number != 0


# --- rotation without restart ----------------------------------------------------------------


def test_renewed_certificate_is_used_by_the_next_connection(pki: Path) -> None:
    b = source(pki, "site-b")
    old = b.certificate
    first = pair_with(pki, b=b)
    assert first.a.ready and presented(first, old, "b")
    renewed_old, new = renew(pki, "site-b")
    assert renewed_old == old and new != old
    second = pair_with(pki, b=b)  # the same source: no restart
    assert second.a.ready
    assert presented(second, new, "b") and not presented(second, old, "b")
    assert b.reloads == 1 and b.certificate == new


def test_invalid_replacement_keeps_the_old_credentials(pki: Path, other_pki_dir: Path) -> None:
    b = source(pki, "site-b")
    old = b.certificate
    paths = site_paths(pki, "site-b")
    cases: list[tuple[str, Callable[[], None]]] = [
        # a certificate whose key is not the one on disk
        ("does not belong", lambda: install(pki, "site-b", leaf(pki, "site-b")[0],
                                            load_private_key(paths.gateway_key))),
        # another site's certificate and key
        ("site-c", lambda: install(pki, "site-b", load_certificate(
            site_paths(pki, "site-c").gateway_cert), load_private_key(
            site_paths(pki, "site-c").gateway_key))),
        # a certificate and key from another CA
        ("not issued by the trusted CA", lambda: install(pki, "site-b", load_certificate(
            site_paths(other_pki_dir, "site-b").gateway_cert), load_private_key(
            site_paths(other_pki_dir, "site-b").gateway_key))),
        # garbage
        ("not a PEM certificate", lambda: paths.gateway_cert.write_bytes(b"junk\n")),
    ]
    for failures, (expected, damage) in enumerate(cases, start=1):
        damage()
        assert b.maybe_reload() is False
        assert b.reload_failures == failures and b.last_error is not None
        assert expected in b.last_error
        assert b.current().chain[0] == old
        pair = pair_with(pki, b=b)
        assert pair.a.ready and presented(pair, old, "b")
    # Positive control: a valid replacement is then picked up.
    new_cert, new_key = leaf(pki, "site-b")
    install(pki, "site-b", new_cert, new_key)
    assert b.maybe_reload() is True and b.certificate == new_cert
    assert presented(pair_with(pki, b=b), new_cert, "b")


def test_reload_checks_are_paced(pki: Path) -> None:
    ticks = [0.0]
    b = source(pki, "site-b")
    b.check_interval = 1.0
    b._monotonic = lambda: ticks[0]  # type: ignore[method-assign]
    b._checked_at = 0.0
    _, new = renew(pki, "site-b")
    assert b.current().chain[0] != new  # within the interval: no file checks
    ticks[0] = 1.5
    assert b.current().chain[0] == new


# --- wiring into the gateway and the config ---------------------------------------------


@pytest.fixture
def site_config(tmp_path: Path, pki: Path) -> Path:
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "site-b.toml"
    cfg.write_text((REPO / "configs" / "site-b.toml").read_text())
    return cfg


def test_gateway_gives_each_new_connection_the_current_credentials(
        site_config: Path, pki: Path) -> None:
    config = GatewayConfig.load(site_config)
    assert config.crl_file is not None and config.crl_file.resolve() == (pki / CRL_FILE).resolve()
    gateway = Gateway(config)
    assert gateway.credential_source is not None
    before = gateway.new_connection(initiator=False, now=0.0).params.credentials
    assert before is not None and before.crl_check is not None
    _, new = renew(pki, "site-b")
    gateway.credential_source.check_interval = 0.0
    after = gateway.new_connection(initiator=False, now=0.0).params.credentials
    assert after is not None and after.chain[0] == new and before.chain[0] != new
    # The responder side of a real handshake uses it.
    revoke(pki, site="site-a")
    creds = gateway.new_connection(initiator=False, now=0.0).params.credentials
    assert creds is not None and creds.crl_check is not None
    assert creds.crl_check(load_certificate(site_paths(pki, "site-a").gateway_cert))
    metrics = gateway.metrics.render().decode()
    assert "qkdgw_credential_reloads_total 2.0" in metrics


def test_gateway_dial_refuses_bootstrap_with_expired_own_cert(
        site_config: Path, pki: Path) -> None:
    gateway = Gateway(GatewayConfig.load(site_config))
    assert gateway.credential_source is not None
    gateway._check_bootstrap()  # positive control: current certificate
    gateway.credential_source._wall = lambda: dt.datetime.now(UTC) + dt.timedelta(days=4000)
    with pytest.raises(OwnCertificateExpired, match="qkdgw pki renew"):
        gateway._check_bootstrap()


@pytest.mark.parametrize(("line", "field"), [
    ('crl = "../pki/crl.pem"', "[pki] crl"),
    ("# crl_grace_s = 0", "[pki] crl_grace_s"),
])
def test_config_crl_fields_are_named(site_config: Path, line: str, field: str) -> None:
    text = site_config.read_text()
    bad = {'crl = "../pki/crl.pem"': 'crl = "../pki/nope.pem"',
           "# crl_grace_s = 0": "crl_grace_s = -1"}[line]
    site_config.write_text(text.replace(line, bad))
    with pytest.raises(ConfigError) as info:
        GatewayConfig.load(site_config)
    assert field in str(info.value) and "fix:" in str(info.value)


def test_config_bad_crl_content_is_a_startup_error(site_config: Path, pki: Path) -> None:
    (pki / CRL_FILE).write_text("not a crl\n")
    with pytest.raises(ConfigError, match=r"\[pki\] crl: .*not an X.509 revocation list"):
        load_credentials(GatewayConfig.load(site_config))


# --- CLI ------------------------------------------------------------------------------------


def test_cli_revoke_renew_crl(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    number = load_crl(pki / CRL_FILE).extensions.get_extension_for_class(x509.CRLNumber)
    serial = load_certificate(site_paths(pki, "site-c").gateway_cert).serial_number
    assert main(["pki", "revoke", "--pki", str(pki), "--serial", f"{serial:X}",
                 "--reason", "superseded"]) == 0
    assert f"{serial:x}" in capsys.readouterr().out
    crl = load_crl(pki / CRL_FILE)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number \
        == number.value.crl_number + 1
    old = load_certificate(site_paths(pki, "site-b").gateway_cert)
    assert main(["pki", "renew", "--pki", str(pki), "--site", "site-b", "--revoke-old"]) == 0
    out = capsys.readouterr().out
    assert "now revoked" in out and "BEGIN" not in out
    crl = load_crl(pki / CRL_FILE)
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert len(list(crl)) == 2
    assert main(["pki", "crl", "--pki", str(pki), "--crl-days", "2"]) == 0
    refreshed = load_crl(pki / CRL_FILE)
    assert len(list(refreshed)) == 2 and refreshed.next_update_utc is not None
    assert refreshed.next_update_utc < dt.datetime.now(UTC) + dt.timedelta(days=3)
    # Errors are one line naming the fix.
    assert main(["pki", "revoke", "--pki", str(pki)]) == 2
    assert "--site" in capsys.readouterr().err
    (pki / "ca.key").unlink()
    assert main(["pki", "revoke", "--pki", str(pki), "--site", "site-a"]) == 2
    err = capsys.readouterr().err
    assert "CA key" in err and err.count("\n") == 1


# --- the listening side never presents an expired or revoked own certificate (9.5) ---------


def test_listener_with_expired_own_certificate_refuses_to_start(
        site_config: Path, pki: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The command would point structlog at this test's captured stderr for good.
    monkeypatch.setattr("gateway.runtime.startup.configure_logging", lambda *a, **kw: None)
    past = dt.datetime.now(UTC) - dt.timedelta(days=10)
    install(pki, "site-b", *leaf(pki, "site-b", now=past, days=2))
    assert main(["gateway", "--config", str(site_config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[pki] cert" in err
    assert "gateway.crt" in err and "expired" in err and "qkdgw pki renew" in err


def test_listener_with_revoked_own_certificate_refuses_to_start(
        site_config: Path, pki: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The command would point structlog at this test's captured stderr for good.
    monkeypatch.setattr("gateway.runtime.startup.configure_logging", lambda *a, **kw: None)
    revoke(pki, site="site-b")
    assert main(["gateway", "--config", str(site_config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "revoked" in err and "qkdgw pki renew" in err
    renew(pki, "site-b")  # the fix it names; then the config loads
    assert load_credentials(GatewayConfig.load(site_config)).chain[0].serial_number


def test_responder_whose_certificate_expired_while_running_does_not_present_it(
        pki: Path) -> None:
    b = source(pki, "site-b")
    cert = b.certificate
    pb = side_params("site-b", "site-a", b)
    ok = make_pair(pki, params_b=pb)  # positive control: presented while valid
    assert ok.a.ready and presented(ok, cert, "b")
    later = cert.not_valid_after_utc + dt.timedelta(seconds=1)
    pair = make_pair(pki, params_b=pb, wallclock_b=lambda: later)
    assert not pair.a.ready and not pair.b.ready
    assert not presented(pair, cert, "b")
    refused = [e for e in pair.events_b if isinstance(e, ev.OwnCertificateRefused)]
    assert [e.kind for e in refused] == ["expired"]
    assert str(b.files.cert) in refused[0].detail and "qkdgw pki renew" in refused[0].detail
    term = terminated(pair.events_a)  # the initiator got an alert saying why
    assert term is not None and term.by_peer and term.code == ErrorCode.BAD_CERTIFICATE
    assert "own certificate is expired" in term.reason


def test_new_crl_revoking_the_own_certificate_stops_its_presentation(pki: Path) -> None:
    b = source(pki, "site-b")
    old = b.certificate
    assert presented(make_pair(pki, params_b=side_params("site-b", "site-a", b)), old, "b")
    revoke(pki, site="site-b")
    with structlog.testing.capture_logs() as logs:
        # The set is installed (the new CRL is newer information than the old set), not
        # rejected as before, when the old CRL kept the revoked certificate presentable.
        assert b.maybe_reload() is True and b.reload_failures == 0
    assert any(e["event"] == "credentials.OWN_CERTIFICATE_REVOKED" for e in logs)
    problem = b.bootstrap_problem()
    assert problem is not None and "revoked" in problem and "qkdgw pki renew" in problem
    pair = make_pair(pki, params_b=side_params("site-b", "site-a", b))
    assert not pair.a.ready and not presented(pair, old, "b")
    assert [e.kind for e in pair.events_b if isinstance(e, ev.OwnCertificateRefused)] \
        == ["revoked"]
    # The fix the message names: a renewed certificate is presented without a restart.
    _, new = renew(pki, "site-b")
    assert b.maybe_reload() is True
    after = make_pair(pki, params_b=side_params("site-b", "site-a", b))
    assert after.a.ready and presented(after, new, "b")


def test_positive_control_old_reload_rule_kept_presenting_a_revoked_certificate(
        pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix a CRL revoking our own certificate was a rejected reload: the old
    set (with the old CRL) stayed, and the revoked certificate was still presented."""
    b = source(pki, "site-b")
    old = b.certificate
    load = CredentialSource._load

    def old_rule(self: CredentialSource, stamps: Any, initial: bool = False) -> Any:
        return load(self, stamps, initial=True)  # revoked own certificate: raise

    monkeypatch.setattr(CredentialSource, "_load", old_rule)
    revoke(pki, site="site-b")
    assert b.maybe_reload() is False and b.reload_failures == 1
    pair = make_pair(pki, params_b=side_params("site-b", "site-a", b))
    assert pair.a.ready and presented(pair, old, "b")


async def test_gateway_refuses_to_present_revoked_certificate_counted_and_logged(
        pki: Path, tmp_path: Path) -> None:
    """Through real gateways and KMEs: B's certificate is revoked while the tunnel runs;
    the next connection gets a BAD_CERTIFICATE alert, B logs and counts the refusal."""
    from tests.support.mitm_relay import Sites

    sites = Sites(pki, tmp_path)
    try:
        await sites.start(b={"crl_file": pki / CRL_FILE})
        old = await sites.wait_tunnel()
        assert sites.b.credential_source is not None
        sites.b.credential_source.check_interval = 0.0
        revoke(pki, site="site-b")
        assert sites.relay is not None and sites.relay.live is not None
        sites.relay.live.abort()
        await sites.wait_for(lambda: bool(sites.log_events("tunnel.OWN_CERTIFICATE_REFUSED",
                                                           kind="revoked")), 15,
                             "B to refuse its revoked certificate")
        assert await sites.counter("site-b", "qkdgw_own_certificate_refused_total",
                                   kind="revoked") >= 1
        assert sites.log_events("credentials.OWN_CERTIFICATE_REVOKED")
        await sites.wait_for(lambda: any("own certificate is revoked" in e.get("reason", "")
                                         for e in sites.log_events("tunnel.closed")), 10,
                             "A to see the alert")
        assert sites.tunnel_of("site-a") is None
        renew(pki, "site-b")
        await sites.wait_tunnel(not_=old, timeout=20)
    finally:
        await sites.close()
