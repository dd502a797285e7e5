"""The gateway's config file (`qkdgw gateway --config site-a.toml`).

`GatewayFile` is its schema: every table a model, every key one field with its default,
bounds and description (docs/config.md is generated from it; configs/site-*.toml spell
out every field). Loading checks everything a typo could break before any socket
opens: types and ranges, that files exist, and that the policy makes sense.
`GatewayConfig` is the flat view the runtime reads, built from the validated file.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, model_validator

from gateway.tunnel.admission import AdmissionConfig, AdmissionSettings
from gateway.tunnel.connection import ConnectionSettings
from gateway.tunnel.record import RecordLimits
from gateway.tunnel.streams import MuxSettings
from qkd.common.confload import ConfigError, HostPort
from qkd.common.schema import (
    Bool,
    ConfPath,
    ExistingFile,
    Float,
    HostPortT,
    Int,
    IpHostPort,
    Problem,
    Schema,
    Str,
    default_of,
    load_model,
    section,
    setting,
    tables,
)

Kem = Literal["ML-KEM-768", "ML-KEM-1024"]
Backend = Literal["auto", "openssl", "liboqs"]
KEMS: tuple[str, ...] = typing.get_args(Kem)
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _check_name(value: str) -> str:
    if not value or len(value) > 64 or not set(value) <= _NAME_CHARS:
        raise Problem(f"{value[:60]!r} is not a valid name",
                      "use 1-64 lowercase letters, digits, '-', '_' or '.'")
    return value


def _check_url(value: str) -> str:
    if not value.startswith("https://"):
        raise Problem(f"{value[:60]!r} is not an https:// URL",
                      "ETSI 014 runs over HTTPS with client certificates: use https://")
    return value


Name = Annotated[Str, AfterValidator(_check_name)]


# --------------------------------------------------------------------------- schema


class GatewaySection(Schema):
    site_id: Name = setting(
        doc="This site's identity; must equal the site in the SAN URI (qkdgw://site/<id>) "
        "of [pki] cert.", fix='set it to a name such as "site-a"')
    sae_id: Name = setting(
        doc="This gateway's ETSI GS QKD 014 SAE ID: the CN of its KME client certificate.",
        fix='set it to a name such as "site-a-gw"')
    state_dir: ConfPath | None = setting(
        None, doc="Directory for the gateway's persistent state (created if missing). "
        "Default: state/<site_id> next to the config file.",
        fix='set it to a directory, e.g. "../state/site-a"')


# The tunnel core's own defaults (gateway/tunnel); the soft key-update limits stay at
# most half the hard limits, which no setting moves.
_CORE, _RECORDS, _MUX = ConnectionSettings(), RecordLimits(), MuxSettings()


class TunnelSection(Schema):
    listen: IpHostPort | None = setting(
        None, doc="Accept the tunnel here ('ip:port'); exactly one of listen/connect.",
        fix="write it as 'ip:port', e.g. '127.0.0.1:7500'")
    connect: HostPortT | None = setting(
        None, doc="Dial the peer gateway's tunnel address ('host:port'); exactly one of "
        "listen/connect.", fix="write it as 'host:port', e.g. '127.0.0.1:7500'")
    handshake_timeout_s: Float = setting(
        _CORE.handshake_timeout, ge=1.0, le=300.0, unit="s",
        doc="How long a handshake (including the KME round trips) may take before it is "
        "abandoned.")
    rekey_interval_s: Float = setting(
        _CORE.rekey_interval, ge=1.0, le=86400.0, unit="s",
        doc="Time between full hybrid re-handshakes inside the live tunnel; keep both "
        "sites' values equal.")
    key_update_records: Int = setting(
        _RECORDS.update_after_records, ge=16, le=_RECORDS.hard_max_records // 2,
        unit="records", doc="AES-GCM key update after this many records under one key.")
    key_update_bytes: Int = setting(
        _RECORDS.update_after_bytes, ge=1 << 16, le=_RECORDS.hard_max_bytes // 2,
        unit="bytes", doc="AES-GCM key update after this many bytes under one key.")
    stream_window: Int = setting(
        _MUX.recv_window, ge=1 << 14, le=1 << 30, unit="bytes",
        doc="Per-stream receive window (flow control), announced to the peer.")
    max_streams: Int = setting(
        _MUX.max_streams, ge=1, le=65536,
        doc="Most concurrent streams the peer may open towards this gateway.")
    connect_wait_s: Float = setting(
        10.0, ge=0.0, le=300.0, unit="s", doc="How long a new application connection waits "
        "for the tunnel before it is reset.")
    reconnect_min_s: Float = setting(
        0.5, ge=0.05, le=60.0, unit="s", doc="First reconnect delay after the tunnel "
        "drops (doubling up to reconnect_max_s).")
    reconnect_max_s: Float = setting(
        30.0, ge=0.1, le=3600.0, unit="s", doc="Longest reconnect delay; at least "
        "reconnect_min_s.")
    admission: AdmissionConfig = section(
        AdmissionConfig, doc="Denial-of-service protection of the tunnel listener.")

    @model_validator(mode="after")
    def _consistent(self) -> TunnelSection:
        if self.listen is None and self.connect is None:
            raise Problem("neither listen nor connect is set",
                          "set connect on the site that dials and listen on the one that "
                          "accepts", at="listen")
        if self.listen is not None and self.connect is not None:
            raise Problem("both listen and connect are set",
                          "one site dials (connect), the other accepts (listen)", at="connect")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise Problem("is below reconnect_min_s",
                          "make reconnect_max_s at least reconnect_min_s", at="reconnect_max_s")
        first = self.admission.first_record_timeout_s
        if first > self.handshake_timeout_s and (
                "first_record_timeout_s" in self.admission.model_fields_set):
            raise Problem(f"{first} s is longer than [tunnel] handshake_timeout_s "
                          f"({self.handshake_timeout_s} s)",
                          "make it at most handshake_timeout_s",
                          at=("admission", "first_record_timeout_s"))
        return self


class PeerSection(Schema):
    site_id: Name = setting(
        doc="The identity the peer must prove (its certificate's SAN URI and its hello).",
        fix='set it to a name such as "site-b"')
    sae_id: Name = setting(
        doc="The peer gateway's SAE ID: the slave SAE for enc_keys at our KME.",
        fix='set it to a name such as "site-b-gw"')


class PkiSection(Schema):
    ca: ExistingFile = setting(
        doc="CA that issued both sites' gateway certificates.",
        fix="point it at the gateway CA certificate (ca.crt)")
    cert: ExistingFile = setting(
        doc="This site's gateway certificate (PEM).", fix="point it at this site's gateway.crt")
    key: ExistingFile = setting(
        doc="This site's gateway signing key (PKCS#8 PEM, mode 0600).",
        fix="point it at this site's gateway.key")
    crl: ExistingFile | None = setting(
        None, doc="Revocation list signed by the gateway CA; a revoked peer is refused at "
        "bootstrap. Unset: no revocation checks.",
        fix="point it at the gateway CA's revocation list (crl.pem), or remove the line to "
        "turn revocation checks off")
    crl_grace_s: Float = setting(
        0.0, ge=0.0, le=30 * 86400.0, unit="s", doc="How long a revocation list may be past "
        "its nextUpdate and still be used; 0 refuses bootstraps at once.",
        fix="seconds a revocation list may be past its nextUpdate and still be used; 0 "
        "(default) refuses bootstraps at once")

    @model_validator(mode="after")
    def _consistent(self) -> PkiSection:
        if self.crl_grace_s and self.crl is None:
            raise Problem("is set but [pki] crl is not",
                          "set crl to the revocation list, or remove crl_grace_s",
                          at="crl_grace_s")
        return self


class KmeSection(Schema):
    url: Annotated[Str, AfterValidator(_check_url)] = setting(
        doc="The local KME's ETSI GS QKD 014 base URL (HTTPS only).",
        fix='set it to the KME base URL, e.g. "https://127.0.0.1:8701"')
    ca: ExistingFile = setting(
        doc="CA of the KME's TLS certificate.",
        fix="point it at the CA that signed the KME's TLS certificate")
    cert: ExistingFile = setting(
        doc="This gateway's TLS client certificate for the KME.",
        fix="point it at this site's sae-client.crt")
    key: ExistingFile = setting(
        doc="The private key of [kme] cert.", fix="point it at this site's sae-client.key")
    timeout_s: Float = setting(5.0, ge=0.1, le=120.0, unit="s", doc="Time per KME request.")
    id: Name | None = setting(
        None, doc="The KME's own name, pinned against its TLS certificate (commonName or DNS "
        'subjectAltName). Default "kme-<site_id>".', fix='set it to a name such as "kme-site-a"')
    tls_min_version: Literal["1.3", "1.2"] = setting(
        "1.3", doc='Lowest TLS version spoken to the KME: "1.3" or "1.2".')
    api: Literal["etsi014", "skip"] = setting(
        "etsi014", doc='Key API of the KME: "etsi014" (ETSI GS QKD 014) or "skip" (Cisco '
        "SKIP).")


class PolicySection(Schema):
    kem: Kem = setting("ML-KEM-768", doc="ML-KEM parameter set this site proposes when it "
                       "dials.")
    accept_kems: tuple[Kem, ...] = setting(
        (), doc="Further parameter sets a dialling peer may choose, after kem in preference.",
        fix=f"list KEMs from {', '.join(typing.get_args(Kem))}")
    allow_degraded: Bool = setting(
        False, doc="true: while the QKD link is down, sessions may run on ML-KEM alone (only "
        "if the peer allows it too). false: the tunnel fails closed.")
    qkd_key_bits: Int = setting(
        256, ge=128, le=4096, unit="bits", doc="Size of the QKD key mixed into each session "
        "(multiple of 8).")
    pqc_backend: Backend = setting(
        "auto", doc='ML-KEM implementation: "auto", "openssl" (the cryptography package) or '
        '"liboqs".')

    @model_validator(mode="after")
    def _consistent(self) -> PolicySection:
        if self.qkd_key_bits % 8:
            raise Problem(f"{self.qkd_key_bits} is not a multiple of 8",
                          "use a multiple of 8 such as 256", at="qkd_key_bits")
        return self


class ListenEntry(Schema):
    listen: IpHostPort = setting(
        doc="Where local applications connect ('ip:port').",
        fix="write it as 'ip:port', e.g. '127.0.0.1:7001'")
    service: Name = setting(doc="The peer's service each connection becomes a stream to.",
                            fix='set it to a name such as "sink"')


class ServiceEntry(Schema):
    name: Name = setting(doc="The name the peer asks for.", fix='set it to a name such as '
                         '"sink"')
    target: HostPortT = setting(doc="Where a stream for this service is connected "
                                "('host:port').",
                                fix="write it as 'host:port', e.g. '127.0.0.1:9000'")


class AuthSection(Schema):
    psk: Bool = setting(
        True, doc="true: after the first PKI-authenticated tunnel, later tunnels "
        "authenticate with a PSK chained from each session; both sites must agree.")
    pki_rebootstrap: Bool = setting(
        False, doc="true: allow a PKI-authenticated tunnel once the sites share a PSK "
        "(logged as PKI_REBOOTSTRAP).")
    its_mac: Bool = setting(
        False, doc="true: also authenticate each handshake with Wegman-Carter one-time MACs "
        "keyed by two extra QKD keys (needs qkd_key_bits >= 256).")


class LoggingSection(Schema):
    level: Literal["debug", "info", "warning", "error"] = setting("info", doc="Log level.")
    format: Literal["console", "json"] = setting(
        "console", doc='"console" (readable) or "json" (one JSON object per line).')
    keylog_file: ConfPath | None = setting(
        None, doc="DANGEROUS, debugging only: write every session's ML-KEM secret and QKD "
        "key to this file. Leave unset.", fix="set it to a file path, or remove the line")


class AdminSection(Schema):
    listen: IpHostPort | None = setting(
        None, doc="Plain-HTTP /status and /metrics ('ip:port'); keep it on loopback. Unset: "
        "no admin listener.", fix="write it as 'ip:port', e.g. '127.0.0.1:9101'")


class GatewayFile(Schema):
    """The whole gateway config file."""

    gateway: GatewaySection = section(GatewaySection, doc="This site.", required=True)
    tunnel: TunnelSection = section(TunnelSection, doc="The tunnel to the peer gateway.",
                                    required=True)
    peer: PeerSection = section(PeerSection, doc="The peer gateway.", required=True)
    pki: PkiSection = section(PkiSection, doc="Gateway certificates.", required=True)
    kme: KmeSection = section(KmeSection, doc="The local KME.", required=True)
    policy: PolicySection = section(PolicySection, doc="Key exchange policy.")
    listen: tuple[ListenEntry, ...] = tables(
        doc="Local listeners: each connection becomes a stream to the named service at the "
        "peer.")
    service: tuple[ServiceEntry, ...] = tables(doc="Services the peer may reach, by name.")
    auth: AuthSection = section(AuthSection, doc="How tunnels are authenticated.")
    logging: LoggingSection = section(LoggingSection, doc="Logging.")
    admin: AdminSection = section(AdminSection, doc="Status and metrics listener.")

    @model_validator(mode="after")
    def _consistent(self) -> GatewayFile:
        if self.peer.site_id == self.gateway.site_id:
            raise Problem("is this site's own identity", "set it to the other site's identity",
                          at=("peer", "site_id"))
        seen: set[str] = set()
        for i, svc in enumerate(self.service):
            if svc.name in seen:
                raise Problem(f"service {svc.name!r} is defined twice",
                              "give each a unique name", at=("service", i, "name"))
            seen.add(svc.name)
        its_mac, bits = self.auth.its_mac, self.policy.qkd_key_bits
        if its_mac and bits < 256:
            raise Problem(f"needs QKD keys of at least 256 bits, [policy] qkd_key_bits is "
                          f"{bits}", "set [policy] qkd_key_bits = 256 or turn its_mac off",
                          at=("auth", "its_mac"))
        if its_mac and self.policy.allow_degraded:
            raise Problem("cannot work in the ML-KEM-only mode that [policy] allow_degraded "
                          "permits: there are no QKD keys for the MACs", "turn one of them off",
                          at=("auth", "its_mac"))
        return self


# --------------------------------------------------------------------------- runtime view


@dataclass(frozen=True)
class ListenerConfig:
    listen: HostPort
    service: str


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    target: HostPort


@dataclass(frozen=True)
class GatewayConfig:
    """What the runtime reads. Defaults (for code that builds one directly, such as test
    harnesses) are the schema's."""

    source: Path
    site_id: str
    sae_id: str
    state_dir: Path
    tunnel_listen: HostPort | None
    tunnel_connect: HostPort | None
    handshake_timeout: float
    rekey_interval: float
    key_update_records: int
    key_update_bytes: int
    stream_window: int
    max_streams: int
    connect_wait: float
    reconnect_min: float
    reconnect_max: float
    peer_site_id: str
    peer_sae_id: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    kme_url: str
    kme_ca: Path
    kme_cert: Path
    kme_key: Path
    kme_timeout: float
    kem: str
    allow_degraded: bool
    qkd_key_bits: int
    pqc_backend: str
    listeners: tuple[ListenerConfig, ...] = field(default_factory=tuple)
    services: tuple[ServiceConfig, ...] = field(default_factory=tuple)
    log_level: str = default_of(LoggingSection, "level")
    log_format: str = default_of(LoggingSection, "format")
    keylog_file: Path | None = None
    admin_listen: HostPort | None = None
    psk_enabled: bool = default_of(AuthSection, "psk")
    pki_rebootstrap: bool = default_of(AuthSection, "pki_rebootstrap")
    its_mac: bool = default_of(AuthSection, "its_mac")
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    # [pki] crl / crl_grace_s: revocation list checked at bootstrap (runtime/credentials.py).
    crl_file: Path | None = None
    crl_grace: float = default_of(PkiSection, "crl_grace_s")
    # [policy] accept_kems: further KEMs a peer may choose, after `kem` in preference.
    accept_kems: tuple[str, ...] = ()
    # [kme] id / tls_min_version: the local KME's own name, pinned against its TLS
    # certificate (None: "kme-<site_id>"), and the lowest TLS version spoken to it.
    kme_id: str | None = None
    kme_min_tls: str = default_of(KmeSection, "tls_min_version")
    # [kme] api: how keys are fetched, "etsi014" (ETSI GS QKD 014) or "skip" (Cisco SKIP).
    kme_api: str = default_of(KmeSection, "api")

    @property
    def kme_name(self) -> str:
        return self.kme_id or f"kme-{self.site_id}"

    @property
    def kems(self) -> tuple[str, ...]:
        """This side's KEMs in preference order: the one it proposes first."""
        return tuple(dict.fromkeys((self.kem, *self.accept_kems)))

    @property
    def initiator(self) -> bool:
        return self.tunnel_connect is not None

    @classmethod
    def load(cls, path: str | Path) -> GatewayConfig:
        doc, source = load_model(GatewayFile, path)
        return cls.from_file(doc, source)

    @classmethod
    def from_file(cls, f: GatewayFile, source: Path) -> GatewayConfig:
        gw, tun, pki, kme, pol = f.gateway, f.tunnel, f.pki, f.kme, f.policy
        # A relative state_dir was resolved against the config's directory; the default
        # is built from that directory too (resolving twice would nest a relative path).
        state_dir = gw.state_dir or source.parent / "state" / gw.site_id
        return cls(
            source=source, site_id=gw.site_id, sae_id=gw.sae_id, state_dir=state_dir,
            tunnel_listen=tun.listen, tunnel_connect=tun.connect,
            handshake_timeout=tun.handshake_timeout_s, rekey_interval=tun.rekey_interval_s,
            key_update_records=tun.key_update_records, key_update_bytes=tun.key_update_bytes,
            stream_window=tun.stream_window, max_streams=tun.max_streams,
            connect_wait=tun.connect_wait_s, reconnect_min=tun.reconnect_min_s,
            reconnect_max=tun.reconnect_max_s, peer_site_id=f.peer.site_id,
            peer_sae_id=f.peer.sae_id, ca_file=pki.ca, cert_file=pki.cert, key_file=pki.key,
            kme_url=kme.url.rstrip("/"), kme_ca=kme.ca, kme_cert=kme.cert, kme_key=kme.key,
            kme_timeout=kme.timeout_s, kme_id=kme.id or f"kme-{gw.site_id}",
            kme_min_tls=kme.tls_min_version, kme_api=kme.api, kem=pol.kem,
            allow_degraded=pol.allow_degraded, qkd_key_bits=pol.qkd_key_bits,
            pqc_backend=pol.pqc_backend,
            listeners=tuple(ListenerConfig(e.listen, e.service) for e in f.listen),
            services=tuple(ServiceConfig(e.name, e.target) for e in f.service),
            log_level=f.logging.level, log_format=f.logging.format,
            keylog_file=f.logging.keylog_file, admin_listen=f.admin.listen,
            psk_enabled=f.auth.psk, pki_rebootstrap=f.auth.pki_rebootstrap,
            its_mac=f.auth.its_mac, admission=tun.admission.settings(tun.handshake_timeout_s),
            crl_file=pki.crl, crl_grace=pki.crl_grace_s, accept_kems=pol.accept_kems,
        )


__all__ = ["ConfigError", "GatewayConfig", "GatewayFile", "ListenerConfig", "ServiceConfig"]
