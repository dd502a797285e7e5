"""KME configuration (`qkdgw kme --config FILE`), see configs/kme-a.toml for every field
(several links and the relay, `[[neighbour]]` and `[network]`: qkd.kme.network_config).

Everything that can be checked before the server starts is checked here, so a bad
config ends in one `ConfigError` naming the field and the fix rather than a traceback
at the first request: the certificate and key files are loaded into a throwaway TLS
context and the link secret is parsed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from qkd.common.confload import ConfigError, HostPort, Section, load_toml
from qkd.etsi014.messages import HKDF_MAX_BITS, Limits, is_valid_id
from qkd.kme.network_config import NeighbourConfig, NetworkConfig, load_neighbours, load_network
from qkd.link.ideal import load_link_secret
from qkd.sim.params import LinkParams, ParamError

LINK_TYPES = ("ideal", "bb84")
LINK_ROLES = ("alice", "bob")
# [link] fields copied into qkd.sim.params.LinkParams (same names, same meaning).
BB84_FLOATS = ("distance_km", "fiber_loss_db_km", "detector_efficiency", "dark_count_prob",
               "misalignment", "mu", "nu", "p_mu", "p_nu", "basis_bias", "rep_rate_hz",
               "eps_sec", "eps_cor", "qber_abort")
# The BB84 defaults: 25 km of standard fibre, a GHz source and superconducting-nanowire
# detectors (efficiency 0.8, 1e-7 background, 1 % misalignment). 4e7 pulses per round
# is 40 ms of source time; smaller rounds lose most of their key to finite-size terms.
BB84_DEFAULTS = LinkParams(distance_km=25.0, detector_efficiency=0.8, dark_count_prob=1e-7,
                           misalignment=0.01, pulses=40_000_000)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")
_ID_FIX = "use 1-255 characters from A-Z a-z 0-9 . _ ~ : @ -"


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class PeerConfig:
    kme_id: str
    sae_ids: tuple[str, ...]


@dataclass(frozen=True)
class LinkConfig:
    type: str
    secret_file: Path
    key_rate: float
    secret: bytes = field(repr=False)
    # bb84 only (see configs/kme-a.toml)
    role: str = ""
    params: LinkParams = BB84_DEFAULTS
    peer: HostPort | None = None
    quantum: HostPort | None = None
    listen: HostPort | None = None
    quantum_listen: HostPort | None = None
    state_file: Path | None = None
    round_timeout_s: float = 60.0


@dataclass(frozen=True)
class KmeConfig:
    source: Path
    kme_id: str
    listen: HostPort
    db: Path
    limits: Limits
    storage_key: Path
    key_lifetime_s: float
    tls: TlsConfig
    local_sae_ids: tuple[str, ...]
    peer: PeerConfig
    link: LinkConfig
    log_level: str = "info"
    log_format: str = "console"
    # [admin] listen: plain-HTTP /status and /metrics; None = no admin listener.
    admin_listen: HostPort | None = None
    # Every link of this KME (issue 11); the first is `peer` + `link`. () = just those.
    neighbours: tuple[NeighbourConfig, ...] = ()
    network: NetworkConfig | None = None  # [network]: relay to non-adjacent KMEs

    @classmethod
    def load(cls, path: str | Path) -> KmeConfig:
        root = load_toml(path)
        kme = root.section("kme")
        kme_id = _id(kme, "id", fix='set it to this KME\'s ID, e.g. "kme-site-a"')
        listen = kme.ip_host_port("listen", fix="write it as 'ip:port', e.g. '127.0.0.1:7441' "
                                                "('127.0.0.1:0' picks a free port)")
        db = kme.path("db", fix='set it to the SQLite file of this KME, e.g. '
                                '"../state/kme-site-a.sqlite3"')
        limits = _limits(kme)
        storage_key = kme.path("storage_key", Path(str(db) + ".storage-key"),
                               fix='set it to a file only this KME reads, e.g. '
                                   '"../state/kme-site-a.storage-key" (created on first '
                                   'start, mode 0600)')
        lifetime = kme.float("key_lifetime_s", 3600.0, min=1.0,
                             fix="seconds a key block may wait in the pool before it is "
                                 "erased unused, e.g. 3600")
        kme.finish()

        tls_sec = root.section("tls")
        tls = TlsConfig(
            cert=_readable(tls_sec, "cert", "the KME's HTTPS certificate, e.g. "
                           '"../pki/site-a/kme-server.crt" from `qkdgw pki init`'),
            key=_readable(tls_sec, "key", "the private key of [tls] cert, e.g. "
                          '"../pki/site-a/kme-server.key"'),
            client_ca=_readable(tls_sec, "client_ca", "the CA that signs the SAE client "
                                'certificates, e.g. "../pki/tls-ca.crt"'),
        )
        _check_tls(tls_sec, tls)
        tls_sec.finish()

        local: list[str] = []
        for sae in root.sections("sae"):
            sae_id = _id(sae, "id", fix='set it to the SAE ID (client certificate CN) of a '
                                        'local gateway, e.g. "site-a-gw"')
            if sae_id in local:
                raise sae.error("id", f"SAE {sae_id!r} is listed twice", "remove the duplicate")
            local.append(sae_id)
            sae.finish()
        if not local:
            raise root.error("sae", "no local SAE configured",
                             'add one [[sae]] table per local gateway with id = "site-a-gw"')

        if root.has("neighbour"):
            # Several links (issue 11): parsed in qkd.kme.network_config.
            neighbours = load_neighbours(root, kme_id, tuple(local), db, _peer, _link)
        else:
            peer_sec = root.section("peer")
            peer = _peer(peer_sec, kme_id, local)
            peer_sec.finish()
            link_sec = root.section("link")
            link = _link(link_sec, db)
            link_sec.finish()
            neighbours = (NeighbourConfig(peer, link, db),)
        network = None
        if root.has("network"):
            network = load_network(root, kme_id, tuple(local), neighbours)

        admin_sec = root.section("admin", required=False)
        admin_listen = admin_sec.ip_host_port(
            "listen", None, fix="write it as 'ip:port' on loopback, e.g. '127.0.0.1:9201' "
                                "('127.0.0.1:0' picks a free port), or remove [admin]")
        admin_sec.finish()

        log_sec = root.section("logging", required=False)
        level = log_sec.str("level", "info", choices=LOG_LEVELS)
        fmt = log_sec.str("format", "console", choices=LOG_FORMATS)
        log_sec.finish()
        root.finish()

        return cls(
            source=root.source, kme_id=kme_id, listen=listen, db=db, limits=limits,
            storage_key=storage_key, key_lifetime_s=lifetime, tls=tls,
            local_sae_ids=tuple(local), peer=neighbours[0].peer, link=neighbours[0].link,
            neighbours=neighbours, network=network,
            log_level=level, log_format=fmt, admin_listen=admin_listen,
        )

    def error(self, field_name: str, problem: str, fix: str) -> ConfigError:
        """A ConfigError for a problem found after loading (e.g. the db cannot be opened)."""
        return ConfigError(f"{self.source}: {field_name}: {problem} (fix: {fix})")


def _peer(peer_sec: Section, kme_id: str, local: list[str]) -> PeerConfig:
    """A peer KME's ID and SAEs ([peer], or one [[neighbour]] table)."""
    peer_kme = _id(peer_sec, "kme_id", fix='set it to the peer KME\'s ID, e.g. '
                                           '"kme-site-b"')
    peer_saes = peer_sec.str_list("sae_ids", fix='list the SAE IDs behind the peer KME, '
                                                 'e.g. ["site-b-gw"]')
    if not peer_saes:
        raise peer_sec.error("sae_ids", "empty", 'list at least one SAE ID, e.g. '
                                                 '["site-b-gw"]')
    for sae_id in peer_saes:
        if not is_valid_id(sae_id):
            raise peer_sec.error("sae_ids", f"{sae_id!r} is not a valid SAE ID", _ID_FIX)
    if len(set(peer_saes)) != len(peer_saes):
        raise peer_sec.error("sae_ids", "contains duplicates", "list each SAE once")
    both = sorted(set(peer_saes) & set(local))
    if both:
        # The key ID binds (master, slave); an SAE on both sides would make the
        # direction of a key ambiguous.
        raise peer_sec.error("sae_ids", f"{both[0]!r} is also a local [[sae]]",
                             "an SAE belongs to exactly one KME; remove it from one list")
    if peer_kme == kme_id:
        raise peer_sec.error("kme_id", "same as [kme] id", "set the peer KME's own ID")
    return PeerConfig(peer_kme, tuple(peer_saes))


def _link(link_sec: Section, db: Path) -> LinkConfig:
    """One link's settings ([link], or a [neighbour.link] table)."""
    link_type = link_sec.str("type", "bb84", fix='set type = "bb84" (the emulated QKD '
                             'link) or "ideal" (tests only)', choices=LINK_TYPES)
    secret_file = _readable(link_sec, "secret_file", "the shared link secret, e.g. "
                            '"../pki/link-secret.key" from `qkdgw pki init`, the same '
                            "file on both KMEs")
    try:
        secret = load_link_secret(secret_file)
    except ValueError as exc:
        raise link_sec.error("secret_file", str(exc),
                             "use the link-secret.key written by `qkdgw pki init` "
                             "(64 hex digits)") from None
    if link_type == "ideal":
        key_rate = link_sec.float("key_rate", 100.0, min=0.0, allow_inf=True,
                                  fix="keys per second the simulated link produces; "
                                      "0 = none, inf = unlimited")
        link = LinkConfig(link_type, secret_file, key_rate, secret)
    else:
        link = _bb84(link_sec, secret_file, secret, db)
    return link


def _id(sec: Section, key: str, *, fix: str) -> str:
    value: str = sec.str(key, fix=fix)
    if not is_valid_id(value):
        raise sec.error(key, f"{value!r} is not a valid ID", _ID_FIX)
    return value


def _size(sec: Section, key: str, default: int) -> int:
    value: int = sec.int(key, default, min=8, max=HKDF_MAX_BITS)
    if value % 8:
        raise sec.error(key, f"{value} bits is not a multiple of 8",
                        f"use {value - value % 8 or 8} or {value - value % 8 + 8}")
    return value


def _limits(kme: Section) -> Limits:
    key_size = _size(kme, "key_size", 256)
    min_size = _size(kme, "min_key_size", 64)
    max_size = _size(kme, "max_key_size", 8192)
    if min_size > max_size:
        raise kme.error("min_key_size", f"{min_size} is above max_key_size {max_size}",
                        "make min_key_size <= max_key_size")
    if not min_size <= key_size <= max_size:
        raise kme.error("key_size", f"{key_size} is outside min_key_size..max_key_size "
                        f"({min_size}..{max_size})", "pick a default size inside that range")
    max_count = kme.int("max_key_count", 1000, min=1, max=10_000_000)
    per_request = kme.int("max_key_per_request", 128, min=1, max=10_000)
    if per_request > max_count:
        raise kme.error("max_key_per_request", f"{per_request} is above max_key_count "
                        f"{max_count}", "make max_key_per_request <= max_key_count")
    return Limits(key_size=key_size, min_key_size=min_size, max_key_size=max_size,
                  max_key_count=max_count, max_key_per_request=per_request)


def _readable(sec: Section, key: str, what: str) -> Path:
    p: Path = sec.path(key, fix=f"set it to {what}")
    try:
        with p.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise sec.error(key, f"cannot read {str(p)!r} ({exc.strerror})",
                        f"set it to {what}, readable by this process") from None
    return p


def _check_tls(sec: Section, tls: TlsConfig) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        raise sec.error("key", f"cannot use cert {str(tls.cert)!r} with key "
                        f"{str(tls.key)!r} ({exc.reason or exc})",
                        "point cert and key at a matching PEM certificate and PKCS#8 key"
                        ) from None
    try:
        ctx.load_verify_locations(cafile=tls.client_ca)
    except ssl.SSLError as exc:
        raise sec.error("client_ca", f"not a PEM CA certificate ({exc.reason or exc})",
                        'use the tls-ca.crt from `qkdgw pki init`') from None


def _bb84(sec: Section, secret_file: Path, secret: bytes, db: Path) -> LinkConfig:
    role = sec.str("role", fix='set role = "alice" on one KME (it drives the rounds and '
                   'dials) and "bob" on the other (it listens)', choices=LINK_ROLES)
    values: dict[str, float | int] = {}
    for name in BB84_FLOATS:
        values[name] = sec.float(name, getattr(BB84_DEFAULTS, name),
                                 fix=f"set {name} as in qkd.sim.params.LinkParams")
    values["pulses"] = sec.int("pulses", BB84_DEFAULTS.pulses, min=1000, max=1 << 31,
                               fix="pulses per round, e.g. 40000000")
    values["frame_bits"] = sec.int("frame_bits", BB84_DEFAULTS.frame_bits, min=256,
                                   max=1 << 22, fix="Cascade frame size in bits, e.g. 16384")
    try:
        params = BB84_DEFAULTS.with_(**values).validate()
    except ParamError as exc:
        raise sec.error(exc.field_name, str(exc).split(": ", 1)[-1],
                        "use a value inside the range given") from None
    fix_addr = "write it as 'ip:port', e.g. '127.0.0.1:7451'"
    peer = quantum = listen = quantum_listen = None
    if role == "alice":
        peer = sec.host_port("peer", fix=f"Bob's classical [link] listen address; {fix_addr}")
        quantum = sec.host_port("quantum", fix="Bob's [link] quantum_listen address, or "
                                f"the eavesdropper's listen address; {fix_addr}")
    else:
        listen = sec.ip_host_port("listen", fix=f"where Alice's KME dials in; {fix_addr}")
        quantum_listen = sec.ip_host_port("quantum_listen",
                                          fix=f"where the quantum channel arrives; {fix_addr}")
    state_file = sec.path("state_file", Path(str(db) + ".link-state"),
                          fix="a file only this KME reads (sealed authentication state)")
    timeout = sec.float("round_timeout_s", 60.0, min=1.0, max=3600.0,
                        fix="seconds a round may stall (a lost or dropped frame) before "
                            "it is aborted, e.g. 60")
    return LinkConfig("bb84", secret_file, 0.0, secret, role=role, params=params, peer=peer,
                      quantum=quantum, listen=listen, quantum_listen=quantum_listen,
                      state_file=state_file, round_timeout_s=timeout)
