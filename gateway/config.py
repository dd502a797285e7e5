"""The gateway's config file (`qkdgw gateway --config site-a.toml`).

Every field is documented in `configs/site-a.toml`. Loading checks everything a typo
could break before any socket opens: types and ranges, that files exist and parse,
that the certificate's identity is this site's, and that the policy makes sense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.tunnel.admission import COOKIE_MODES, AdmissionSettings, peer_network
from qkd.common.confload import ConfigError, HostPort, Section, load_toml

KEMS = ("ML-KEM-768", "ML-KEM-1024")
BACKENDS = ("auto", "openssl", "liboqs")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


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
    log_level: str = "info"
    log_format: str = "console"
    keylog_file: Path | None = None
    admin_listen: HostPort | None = None
    psk_enabled: bool = True
    pki_rebootstrap: bool = False
    its_mac: bool = False
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    # [pki] crl / crl_grace_s: revocation list checked at bootstrap (runtime/credentials.py).
    crl_file: Path | None = None
    crl_grace: float = 0.0
    # [policy] accept_kems: further KEMs a peer may choose, after `kem` in preference.
    accept_kems: tuple[str, ...] = ()
    # [kme] id / tls_min_version: the local KME's own name, pinned against its TLS
    # certificate (None: "kme-<site_id>"), and the lowest TLS version spoken to it.
    kme_id: str | None = None
    kme_min_tls: str = "1.3"
    # [kme] api: how keys are fetched, "etsi014" (ETSI GS QKD 014) or "skip" (Cisco SKIP).
    kme_api: str = "etsi014"

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
        root = load_toml(path)
        cfg = _parse(root)
        root.finish()
        return cfg


def _name(sec: Section, key: str, example: str) -> str:
    value: str = sec.str(key, fix=f'set it to a name such as "{example}"')
    if not value or len(value) > 64 or not set(value) <= _NAME_CHARS:
        raise sec.error(key, f"{value!r} is not a valid name",
                        "use 1-64 lowercase letters, digits, '-', '_' or '.'")
    return value


def _existing_file(sec: Section, key: str, what: str) -> Path:
    p: Path = sec.path(key, fix=f"point it at {what}")
    try:
        is_file = p.is_file()
    except OSError as exc:  # is_file() only swallows "not found"-like errors
        raise sec.error(key, f"cannot look at {str(p)[:60]!r} ({exc.strerror})",
                        f"point it at {what}") from None
    if not is_file:
        raise sec.error(key, f"file {str(p)!r} does not exist or is not a file",
                        f"point it at {what} (run `qkdgw pki init` to create one)")
    return p


def _admission(sec: Section, handshake_timeout: float) -> AdmissionSettings:
    """[tunnel.admission]: what the listening side does before any expensive handshake
    work (gateway/tunnel/admission.py). Only the side with [tunnel] listen uses it."""
    cookie = sec.str("cookie", "under-load", choices=COOKIE_MODES)
    lifetime = sec.float("cookie_lifetime_s", 10.0, min=1.0, max=300.0)
    rotation = sec.float("cookie_secret_rotation_s", 60.0, min=1.0, max=86400.0)
    if lifetime > rotation:
        raise sec.error("cookie_lifetime_s", f"{lifetime} s is longer than "
                        f"cookie_secret_rotation_s ({rotation} s)",
                        "keep cookie_lifetime_s at most cookie_secret_rotation_s: only the "
                        "previous secret is kept")
    rate = sec.float("rate_per_s", 2.0, min=0.01, max=10000.0)
    burst = sec.int("burst", 10, min=1, max=100000)
    max_sources = sec.int("max_sources", 4096, min=16, max=1 << 20)
    max_pending = sec.int("max_pending", 64, min=1, max=100000)
    per_source = sec.int("max_pending_per_source", 8, min=1, max=100000)
    if per_source > max_pending:
        raise sec.error("max_pending_per_source", f"{per_source} is above max_pending "
                        f"({max_pending})", "make it at most max_pending")
    threshold = sec.int("load_threshold", 16, min=1, max=100000)
    if threshold > max_pending:
        raise sec.error("load_threshold", f"{threshold} is above max_pending ({max_pending}): "
                        "cookies would never turn on", "make it at most max_pending")
    first_record = sec.float("first_record_timeout_s", min(5.0, handshake_timeout), min=0.1,
                             max=300.0)
    if first_record > handshake_timeout:
        raise sec.error("first_record_timeout_s", f"{first_record} s is longer than [tunnel] "
                        f"handshake_timeout_s ({handshake_timeout} s)",
                        "make it at most handshake_timeout_s")
    max_bytes = sec.int("max_handshake_bytes", 256 * 1024, min=1 << 14, max=1 << 26)
    peer_sources = tuple(sec.str_list(
        "peer_sources", [], fix='list the peer gateway\'s addresses, e.g. ["192.0.2.7"]'))
    for entry in peer_sources:
        try:
            peer_network(entry)
        except ValueError:
            raise sec.error("peer_sources", f"{entry!r} is not an IP address or network",
                            'use addresses or CIDR networks, e.g. ["192.0.2.7", '
                            '"2001:db8::/64"]') from None
    peer_reserved = sec.int("peer_reserved", 4, min=1, max=1024)
    sec.finish()
    return AdmissionSettings(
        cookie=cookie, cookie_lifetime=lifetime, secret_rotation=rotation, rate=rate,
        burst=burst, max_sources=max_sources, max_pending=max_pending,
        max_pending_per_source=per_source, load_threshold=threshold,
        first_record_timeout=first_record, max_handshake_bytes=max_bytes,
        peer_sources=peer_sources, peer_reserved=peer_reserved)


def _parse(root: Section) -> GatewayConfig:
    gw = root.section("gateway")
    site_id = _name(gw, "site_id", "site-a")
    sae_id = _name(gw, "sae_id", f"{site_id}-gw")
    # path() resolves a relative value against the config file's directory; the default
    # gets the same treatment here (resolving twice would nest a relative config path).
    state_dir = gw.path("state_dir", None) or gw.base_dir / "state" / site_id
    gw.finish()

    tun = root.section("tunnel")
    listen = tun.ip_host_port("listen", None)
    connect = tun.host_port("connect", None)
    if listen is None and connect is None:
        raise tun.error("listen", "neither listen nor connect is set",
                        "set connect on the site that dials and listen on the one that "
                        "accepts")
    if listen is not None and connect is not None:
        raise tun.error("connect", "both listen and connect are set",
                        "one site dials (connect), the other accepts (listen)")
    handshake_timeout = tun.float("handshake_timeout_s", 15.0, min=1.0, max=300.0)
    rekey_interval = tun.float("rekey_interval_s", 600.0, min=1.0, max=86400.0)
    key_update_records = tun.int("key_update_records", 1 << 20, min=16, max=1 << 22)
    key_update_bytes = tun.int("key_update_bytes", 1 << 34, min=1 << 16, max=1 << 35)
    stream_window = tun.int("stream_window", 1 << 20, min=1 << 14, max=1 << 30)
    max_streams = tun.int("max_streams", 1024, min=1, max=65536)
    connect_wait = tun.float("connect_wait_s", 10.0, min=0.0, max=300.0)
    reconnect_min = tun.float("reconnect_min_s", 0.5, min=0.05, max=60.0)
    reconnect_max = tun.float("reconnect_max_s", 30.0, min=0.1, max=3600.0)
    if reconnect_max < reconnect_min:
        raise tun.error("reconnect_max_s", "is below reconnect_min_s",
                        "make reconnect_max_s at least reconnect_min_s")
    admission = _admission(tun.section("admission", required=False), handshake_timeout)
    tun.finish()

    peer = root.section("peer")
    peer_site = _name(peer, "site_id", "site-b")
    peer_sae = _name(peer, "sae_id", f"{peer_site}-gw")
    peer.finish()
    if peer_site == site_id:
        raise peer.error("site_id", "is this site's own identity",
                         "set it to the other site's identity")

    pki = root.section("pki")
    ca_file = _existing_file(pki, "ca", "the gateway CA certificate (ca.crt)")
    cert_file = _existing_file(pki, "cert", "this site's gateway.crt")
    key_file = _existing_file(pki, "key", "this site's gateway.key")
    crl_file = (_existing_file(pki, "crl", "the gateway CA's revocation list (crl.pem), or "
                               "remove the line to turn revocation checks off")
                if pki.has("crl") else None)
    crl_grace = pki.float("crl_grace_s", 0.0, min=0.0, max=30 * 86400.0,
                          fix="seconds a revocation list may be past its nextUpdate and "
                              "still be used; 0 (default) refuses bootstraps at once")
    if crl_grace and crl_file is None:
        raise pki.error("crl_grace_s", "is set but [pki] crl is not",
                        "set crl to the revocation list, or remove crl_grace_s")
    pki.finish()

    kme = root.section("kme")
    url = kme.str("url", fix='set it to the KME base URL, e.g. "https://127.0.0.1:8701"')
    if not url.startswith("https://"):
        raise kme.error("url", f"{url!r} is not an https:// URL",
                        "ETSI 014 runs over HTTPS with client certificates: use https://")
    kme_ca = _existing_file(kme, "ca", "the CA that signed the KME's TLS certificate")
    kme_cert = _existing_file(kme, "cert", "this site's sae-client.crt")
    kme_key = _existing_file(kme, "key", "this site's sae-client.key")
    kme_timeout = kme.float("timeout_s", 5.0, min=0.1, max=120.0)
    kme_id = (_name(kme, "id", f"kme-{site_id}") if kme.has("id") else f"kme-{site_id}")
    kme_min_tls = kme.str("tls_min_version", "1.3", choices=("1.3", "1.2"),
                          fix='"1.3" (default), or "1.2" for a KME without TLS 1.3')
    kme_api = kme.str("api", "etsi014", choices=("etsi014", "skip"),
                      fix='"etsi014" (default), or "skip" for a Cisco SKIP key provider')
    kme.finish()

    pol = root.section("policy", required=False)
    kem = pol.str("kem", "ML-KEM-768", choices=KEMS)
    accept_kems = tuple(pol.str_list("accept_kems", [], fix=f"list KEMs from {', '.join(KEMS)}"))
    for other in accept_kems:
        if other not in KEMS:
            raise pol.error("accept_kems", f"{other!r} is not a known KEM",
                            f"use names from {', '.join(KEMS)}")
    allow_degraded = pol.bool("allow_degraded", False)
    qkd_key_bits = pol.int("qkd_key_bits", 256, min=128, max=4096)
    if qkd_key_bits % 8:
        raise pol.error("qkd_key_bits", f"{qkd_key_bits} is not a multiple of 8",
                        "use a multiple of 8 such as 256")
    backend = pol.str("pqc_backend", "auto", choices=BACKENDS)
    pol.finish()

    listeners = []
    for sec in root.sections("listen"):
        listeners.append(ListenerConfig(sec.ip_host_port("listen"),
                                        _name(sec, "service", "sink")))
        sec.finish()
    services = []
    seen: set[str] = set()
    for sec in root.sections("service"):
        name = _name(sec, "name", "sink")
        if name in seen:
            raise sec.error("name", f"service {name!r} is defined twice", "give each a unique name")
        seen.add(name)
        services.append(ServiceConfig(name, sec.host_port("target")))
        sec.finish()

    auth = root.section("auth", required=False)
    psk_enabled = auth.bool("psk", True)
    pki_rebootstrap = auth.bool("pki_rebootstrap", False)
    its_mac = auth.bool("its_mac", False)
    if its_mac and qkd_key_bits < 256:
        raise auth.error("its_mac", f"needs QKD keys of at least 256 bits, [policy] "
                         f"qkd_key_bits is {qkd_key_bits}",
                         "set [policy] qkd_key_bits = 256 or turn its_mac off")
    if its_mac and allow_degraded:
        raise auth.error("its_mac", "cannot work in the ML-KEM-only mode that [policy] "
                         "allow_degraded permits: there are no QKD keys for the MACs",
                         "turn one of them off")
    auth.finish()

    logs = root.section("logging", required=False)
    level = logs.str("level", "info", choices=("debug", "info", "warning", "error"))
    fmt = logs.str("format", "console", choices=("console", "json"))
    keylog = logs.path("keylog_file", None)
    logs.finish()

    admin = root.section("admin", required=False)
    admin_listen = admin.ip_host_port("listen", None)
    admin.finish()

    return GatewayConfig(
        source=root.source, site_id=site_id, sae_id=sae_id, state_dir=state_dir,
        tunnel_listen=listen, tunnel_connect=connect, handshake_timeout=handshake_timeout,
        rekey_interval=rekey_interval, key_update_records=key_update_records,
        key_update_bytes=key_update_bytes, stream_window=stream_window,
        max_streams=max_streams, connect_wait=connect_wait, reconnect_min=reconnect_min,
        reconnect_max=reconnect_max, peer_site_id=peer_site, peer_sae_id=peer_sae,
        ca_file=ca_file, cert_file=cert_file, key_file=key_file, kme_url=url.rstrip("/"),
        kme_ca=kme_ca, kme_cert=kme_cert, kme_key=kme_key, kme_timeout=kme_timeout,
        kme_id=kme_id, kme_min_tls=kme_min_tls, kme_api=kme_api,
        kem=kem, allow_degraded=allow_degraded, qkd_key_bits=qkd_key_bits,
        pqc_backend=backend, listeners=tuple(listeners), services=tuple(services),
        log_level=level, log_format=fmt, keylog_file=keylog, admin_listen=admin_listen,
        psk_enabled=psk_enabled, pki_rebootstrap=pki_rebootstrap, its_mac=its_mac,
        admission=admission, crl_file=crl_file, crl_grace=crl_grace, accept_kems=accept_kems,
    )


__all__ = ["ConfigError", "GatewayConfig", "ListenerConfig", "ServiceConfig"]
