"""KME configuration (`qkdgw kme --config FILE`): the schema `KmeFile` and the view
`KmeConfig` the service reads. configs/kme-a.toml spells out every field; a KME with
several links describes each as a `[[neighbour]]` (configs/network/), and `[network]`
(qkd.kme.network_config) places it in a relay network.

Everything that can be checked before the server starts is checked here, so a bad
config ends in one `ConfigError` naming the field and the fix rather than a traceback
at the first request: the certificate and key files are loaded into a throwaway TLS
context and the link secret is parsed. A new table is one more `Schema` class and one
field on `KmeFile`; `KmeConfig.file` carries the whole validated file.
"""

from __future__ import annotations

import ssl
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PrivateAttr, model_validator

from qkd.common.confload import ConfigError, HostPort
from qkd.common.schema import (
    ConfPath,
    Float,
    FloatOrInf,
    HostPortT,
    Int,
    IpHostPort,
    Problem,
    ReadableFile,
    Schema,
    Str,
    load_model,
    section,
    setting,
    tables,
)
from qkd.etsi014.messages import HKDF_MAX_BITS, Limits, is_valid_id
from qkd.kme.network_config import NeighbourConfig, NetworkConfig, NetworkSection, check_network
from qkd.link.ideal import load_link_secret
from qkd.sim.params import LinkParams, ParamError

LinkType = Literal["ideal", "bb84"]
LinkRole = Literal["alice", "bob"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["console", "json"]
LINK_TYPES: tuple[str, ...] = typing.get_args(LinkType)
LINK_ROLES: tuple[str, ...] = typing.get_args(LinkRole)
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)
LOG_FORMATS: tuple[str, ...] = typing.get_args(LogFormat)
# [link] fields copied into qkd.sim.params.LinkParams (same names, same meaning); their
# ranges are LinkParams.validate()'s.
BB84_FLOATS = ("distance_km", "fiber_loss_db_km", "detector_efficiency", "dark_count_prob",
               "misalignment", "mu", "nu", "p_mu", "p_nu", "basis_bias", "rep_rate_hz",
               "eps_sec", "eps_cor", "qber_abort")
# The BB84 defaults: 25 km of standard fibre, a GHz source and superconducting-nanowire
# detectors (efficiency 0.8, 1e-7 background, 1 % misalignment). 4e7 pulses per round
# is 40 ms of source time; smaller rounds lose most of their key to finite-size terms.
BB84_DEFAULTS = LinkParams(distance_km=25.0, detector_efficiency=0.8, dark_count_prob=1e-7,
                           misalignment=0.01, pulses=40_000_000)
_ID_FIX = "use 1-255 characters from A-Z a-z 0-9 . _ ~ : @ -"


def _check_id(value: str) -> str:
    if not is_valid_id(value):
        raise Problem(f"{value[:60]!r} is not a valid ID", _ID_FIX)
    return value


def _check_bits(value: int) -> int:
    if value % 8:
        raise Problem(f"{value} bits is not a multiple of 8",
                      f"use {value - value % 8 or 8} or {value - value % 8 + 8}")
    return value


EtsiId = Annotated[Str, AfterValidator(_check_id)]
KeyBits = Annotated[Int, Field(ge=8, le=HKDF_MAX_BITS), AfterValidator(_check_bits)]
Rate = Annotated[FloatOrInf, Field(ge=0.0)]


# --------------------------------------------------------------------------- schema


class KmeSection(Schema):
    id: EtsiId = setting(doc="This KME's ID (ETSI 014 source_KME_ID); convention kme-<site>.",
                         fix='set it to this KME\'s ID, e.g. "kme-site-a"')
    listen: IpHostPort = setting(
        doc="Address of the ETSI 014 HTTPS API ('ip:port'); port 0 picks a free port.",
        fix="write it as 'ip:port', e.g. '127.0.0.1:7441' ('127.0.0.1:0' picks a free port)")
    db: ConfPath = setting(
        doc="SQLite file recording every key delivery; never shared, never deleted while "
        "its keys may be used.",
        fix='set it to the SQLite file of this KME, e.g. "../state/kme-site-a.sqlite3"')
    storage_key: ConfPath | None = setting(
        None, doc="Local key sealing key material in the db (created mode 0600). Default: "
        "the db path + \".storage-key\".",
        fix='set it to a file only this KME reads, e.g. "../state/kme-site-a.storage-key" '
        "(created on first start, mode 0600)")
    key_lifetime_s: Float = setting(
        3600.0, ge=1.0, unit="s", doc="How long a key may wait in the pool before its "
        "material is erased.",
        fix="seconds a key block may wait in the pool before it is erased unused, e.g. 3600")
    key_size: KeyBits = setting(256, unit="bits", doc="Key size when a request gives none "
                                "(multiple of 8).")
    min_key_size: KeyBits = setting(64, unit="bits", doc="Smallest key size a request may "
                                    "ask for (multiple of 8).")
    max_key_size: KeyBits = setting(8192, unit="bits", doc="Largest key size a request may "
                                    f"ask for (multiple of 8, at most {HKDF_MAX_BITS}).")
    max_key_count: Int = setting(1000, ge=1, le=10_000_000, unit="keys", doc="Most keys (of "
                                 "key_size bits) the pool holds; Status's max_key_count.")
    max_key_per_request: Int = setting(
        128, ge=1, le=10_000, unit="keys", doc="Most keys (or key IDs) in one request; at "
        "most max_key_count.")

    @model_validator(mode="after")
    def _consistent(self) -> KmeSection:
        lo, hi = self.min_key_size, self.max_key_size
        if lo > hi:
            raise Problem(f"{lo} is above max_key_size {hi}",
                          "make min_key_size <= max_key_size", at="min_key_size")
        if not lo <= self.key_size <= hi:
            raise Problem(f"{self.key_size} is outside min_key_size..max_key_size "
                          f"({lo}..{hi})", "pick a default size inside that range",
                          at="key_size")
        if self.max_key_per_request > self.max_key_count:
            raise Problem(f"{self.max_key_per_request} is above max_key_count "
                          f"{self.max_key_count}", "make max_key_per_request <= max_key_count",
                          at="max_key_per_request")
        return self

    def limits(self) -> Limits:
        return Limits(key_size=self.key_size, min_key_size=self.min_key_size,
                      max_key_size=self.max_key_size, max_key_count=self.max_key_count,
                      max_key_per_request=self.max_key_per_request)


class TlsSection(Schema):
    cert: ReadableFile = setting(
        doc="The KME's HTTPS server certificate (PEM).",
        fix='set it to the KME\'s HTTPS certificate, e.g. "../pki/site-a/kme-server.crt" '
        "from `qkdgw pki init`")
    key: ReadableFile = setting(
        doc="The private key of [tls] cert (PEM).",
        fix='set it to the private key of [tls] cert, e.g. "../pki/site-a/kme-server.key"')
    client_ca: ReadableFile = setting(
        doc="CA that signed the SAE client certificates; only its clients get in.",
        fix='set it to the CA that signs the SAE client certificates, e.g. '
        '"../pki/tls-ca.crt"')

    @model_validator(mode="after")
    def _loadable(self) -> TlsSection:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise Problem(f"cannot use cert {str(self.cert)[:60]!r} with key "
                          f"{str(self.key)[:60]!r} ({exc.reason or exc})",
                          "point cert and key at a matching PEM certificate and PKCS#8 key",
                          at="key") from None
        try:
            ctx.load_verify_locations(cafile=self.client_ca)
        except ssl.SSLError as exc:
            raise Problem(f"not a PEM CA certificate ({exc.reason or exc})",
                          "use the tls-ca.crt from `qkdgw pki init`", at="client_ca") from None
        return self


class SaeEntry(Schema):
    id: EtsiId = setting(doc="SAE ID (client certificate CN) of a local gateway.",
                         fix='set it to the SAE ID (client certificate CN) of a local '
                         'gateway, e.g. "site-a-gw"')


class PeerSection(Schema):
    kme_id: EtsiId = setting(doc="ID of the KME at the other end of the link (ETSI 014 "
                             "target_KME_ID).", fix='set it to the peer KME\'s ID, e.g. '
                             '"kme-site-b"')
    sae_ids: tuple[Str, ...] = setting(
        doc="SAE IDs served by the peer KME; must not overlap the [[sae]] IDs.",
        fix='list the SAE IDs behind the peer KME, e.g. ["site-b-gw"]')

    @model_validator(mode="after")
    def _valid(self) -> PeerSection:
        if not self.sae_ids:
            raise Problem("empty", 'list at least one SAE ID, e.g. ["site-b-gw"]', at="sae_ids")
        for sae_id in self.sae_ids:
            if not is_valid_id(sae_id):
                raise Problem(f"{sae_id[:60]!r} is not a valid SAE ID", _ID_FIX, at="sae_ids")
        if len(set(self.sae_ids)) != len(self.sae_ids):
            raise Problem("contains duplicates", "list each SAE once", at="sae_ids")
        return self


_ADDR = "write it as 'ip:port', e.g. '127.0.0.1:7451'"


# The physics fields: (unit, description). Ranges are LinkParams.validate()'s; all must
# be equal on both KMEs (checked at connect).
_PHYSICS: dict[str, tuple[str | None, str]] = {
    "distance_km": ("km", "fibre length between the KMEs"),
    "fiber_loss_db_km": ("dB/km", "fibre attenuation"),
    "detector_efficiency": (None, "efficiency of Bob's detectors and optics, (0, 1]"),
    "dark_count_prob": ("1/pulse", "background click probability per pulse (Y0)"),
    "misalignment": (None, "probability a photon hits the wrong detector (e_d)"),
    "mu": ("photons", "mean photon number of the signal pulses"),
    "nu": ("photons", "mean photon number of the weak decoy, below mu"),
    "p_mu": (None, "probability of a signal pulse"),
    "p_nu": (None, "probability of a decoy pulse (p_mu + p_nu < 1 leaves vacuum pulses)"),
    "basis_bias": (None, "probability of the Z (key) basis"),
    "rep_rate_hz": ("Hz", "source repetition rate"),
    "qber_abort": (None, "QBER above which a round is aborted"),
    "eps_sec": (None, "secrecy parameter of the finite-key bound"),
    "eps_cor": (None, "correctness parameter (error verification)"),
}


def _physics(name: str) -> typing.Any:
    unit, what = _PHYSICS[name]
    return setting(getattr(BB84_DEFAULTS, name), unit=unit,
                   doc=f"bb84: {what}; range as in qkd.sim.params.LinkParams.",
                   fix=f"set {name} as in qkd.sim.params.LinkParams")


class LinkSection(Schema):
    type: LinkType = setting(
        "bb84", doc='Key source: "bb84" (the emulated decoy-state BB84 link) or "ideal" '
        "(keys derived from secret_file, NO quantum security, tests only).",
        fix='set type = "bb84" (the emulated QKD link) or "ideal" (tests only)')
    secret_file: ReadableFile = setting(
        doc="Hex pre-shared key, the same file on both KMEs (bb84: authenticates the "
        "classical channel until the link's own output takes over).",
        fix='set it to the shared link secret, e.g. "../pki/link-secret.key" from `qkdgw '
        'pki init`, the same file on both KMEs')
    key_rate: Rate = setting(
        100.0, unit="keys/s", doc="ideal: keys per second the simulated link produces; 0 = "
        "none, inf = unlimited.",
        fix="keys per second the simulated link produces; 0 = none, inf = unlimited")
    role: LinkRole | None = setting(
        None, doc='bb84: "alice" (emits the pulses, drives the rounds, dials) or "bob" '
        "(measures, listens).",
        fix='set role = "alice" on one KME (it drives the rounds and dials) and "bob" on the '
        "other (it listens)")
    peer: HostPortT | None = setting(None, doc="bb84, alice: Bob's classical [link] listen "
                                     "address.", fix=f"Bob's classical [link] listen "
                                     f"address; {_ADDR}")
    quantum: HostPortT | None = setting(
        None, doc="bb84, alice: Bob's quantum_listen address, or an eavesdropper's.",
        fix=f"Bob's [link] quantum_listen address, or the eavesdropper's listen address; "
        f"{_ADDR}")
    listen: IpHostPort | None = setting(None, doc="bb84, bob: where Alice's KME dials in.",
                                        fix=f"where Alice's KME dials in; {_ADDR}")
    quantum_listen: IpHostPort | None = setting(
        None, doc="bb84, bob: where the quantum channel arrives.",
        fix=f"where the quantum channel arrives; {_ADDR}")
    distance_km: Float = _physics("distance_km")
    fiber_loss_db_km: Float = _physics("fiber_loss_db_km")
    detector_efficiency: Float = _physics("detector_efficiency")
    dark_count_prob: Float = _physics("dark_count_prob")
    misalignment: Float = _physics("misalignment")
    mu: Float = _physics("mu")
    nu: Float = _physics("nu")
    p_mu: Float = _physics("p_mu")
    p_nu: Float = _physics("p_nu")
    basis_bias: Float = _physics("basis_bias")
    rep_rate_hz: Float = _physics("rep_rate_hz")
    pulses: Int = setting(BB84_DEFAULTS.pulses, ge=1000, le=1 << 31, unit="pulses",
                          doc="bb84: pulses per round (4e7 = 40 ms of source time).",
                          fix="pulses per round, e.g. 40000000")
    qber_abort: Float = _physics("qber_abort")
    eps_sec: Float = _physics("eps_sec")
    eps_cor: Float = _physics("eps_cor")
    frame_bits: Int = setting(BB84_DEFAULTS.frame_bits, ge=256, le=1 << 22, unit="bits",
                              doc="bb84: Cascade frame size.",
                              fix="Cascade frame size in bits, e.g. 16384")
    state_file: ConfPath | None = setting(
        None, doc='bb84: sealed authentication state. Default: the db path + ".link-state".',
        fix="a file only this KME reads (sealed authentication state)")
    round_timeout_s: Float = setting(
        60.0, ge=1.0, le=3600.0, unit="s",
        doc="bb84: how long a round may stall before it is aborted.",
        fix="seconds a round may stall (a lost or dropped frame) before it is aborted, "
        "e.g. 60")
    refill_below: Float = setting(
        0.75, ge=0.01, le=1.0,
        doc="bb84, alice: start refilling rounds once the pool (free + reserved keys) is "
        "below this fraction of max_key_count, or sooner when the recent draw rate would "
        "take it there within two rounds; then refill until full. 1 = a round as soon as "
        "one key is taken.",
        fix="a fraction of max_key_count from 0.01 to 1, e.g. 0.75")

    _secret: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _consistent(self) -> LinkSection:
        try:
            self._secret = load_link_secret(self.secret_file)
        except ValueError as exc:
            raise Problem(str(exc), "use the link-secret.key written by `qkdgw pki init` "
                          "(64 hex digits)", at="secret_file") from None
        given = self.model_fields_set
        if self.type == "ideal":
            for name in LinkSection.model_fields:
                if name not in ("type", "secret_file", "key_rate") and name in given:
                    raise Problem('only used with type = "bb84"',
                                  'remove it, or set type = "bb84"', at=name)
            return self
        if "key_rate" in given:
            raise Problem('only used with type = "ideal"', 'remove it, or set type = "ideal"',
                          at="key_rate")
        if self.role is None:
            raise Problem("missing", at="role")
        mine, theirs = ((("peer", "quantum"), ("listen", "quantum_listen"))
                        if self.role == "alice" else
                        (("listen", "quantum_listen"), ("peer", "quantum")))
        other = "bob" if self.role == "alice" else "alice"
        for name in theirs:
            if name in given:
                raise Problem(f'only used with role = "{other}"', "remove it", at=name)
        for name in mine:
            if getattr(self, name) is None:
                raise Problem("missing", at=name)
        try:
            self.params()
        except ParamError as exc:
            raise Problem(str(exc).split(": ", 1)[-1], "use a value inside the range given",
                          at=exc.field_name) from None
        return self

    @property
    def secret(self) -> bytes:
        return self._secret

    def params(self) -> LinkParams:
        values: dict[str, float | int] = {n: getattr(self, n) for n in BB84_FLOATS}
        values.update(pulses=self.pulses, frame_bits=self.frame_bits)
        return BB84_DEFAULTS.with_(**values).validate()


class NeighbourEntry(PeerSection):
    """One link of a KME with several: the [peer] fields, the link's own db and relay
    address, and a [neighbour.link] table with the fields of [link]."""

    db: ConfPath | None = setting(
        None, doc="SQLite file of this link's pool and deliveries, one per link. Default: "
        "[kme] db for the first [[neighbour]] (so a KME that gains a second link keeps its "
        "first link's keys), [kme] db + \".<kme_id>\" for the others.",
        fix='set it to this link\'s SQLite file, e.g. "../state/kme-site-b.kme-site-c.sqlite3" '
        "(one per link)")
    relay: HostPortT | None = setting(
        None, doc="The neighbour's [network] relay_listen address, dialled for the relay "
        "channel. Unset: the neighbour dials this KME.",
        fix="the neighbour's [network] relay_listen address as 'host:port', e.g. "
        "'127.0.0.1:7461'; or leave it out when the neighbour dials this KME")
    link: LinkSection = section(LinkSection, doc="This neighbour's link: the fields of "
                                "[link].", required=True)


class AdminSection(Schema):
    listen: IpHostPort | None = setting(
        None, doc="Plain-HTTP /status (JSON) and Prometheus /metrics; keep it on loopback. "
        "Unset: no admin listener.",
        fix="write it as 'ip:port' on loopback, e.g. '127.0.0.1:9201' ('127.0.0.1:0' picks "
        "a free port), or remove [admin]")


class LoggingSection(Schema):
    level: LogLevel = setting("info", doc="Log level.")
    format: LogFormat = setting(
        "console", doc='"console" (readable) or "json" (one JSON object per line).')


class KmeFile(Schema):
    """The whole KME config file."""

    kme: KmeSection = section(KmeSection, doc="This KME.", required=True)
    tls: TlsSection = section(TlsSection, doc="The ETSI 014 HTTPS API's TLS.", required=True)
    sae: tuple[SaeEntry, ...] = tables(doc="One [[sae]] table per local SAE (gateway) allowed "
                                       "to use this KME.")
    peer: PeerSection | None = Field(
        None, description="The KME at the other end of the link (one link; several: "
        "[[neighbour]]). Required unless [[neighbour]] is given.")
    link: LinkSection | None = Field(
        None, description="The key source (one link; several: [neighbour.link]). Required "
        "with [peer].")
    neighbour: tuple[NeighbourEntry, ...] = tables(
        doc="One [[neighbour]] table (with its [neighbour.link]) per link, instead of "
        "[peer] and [link].")
    network: NetworkSection | None = Field(
        None, description="Relay of keys to SAEs behind non-adjacent KMEs (docs/network.md). "
        "Unset: no relay.")
    admin: AdminSection = section(AdminSection, doc="Status and metrics listener.")
    logging: LoggingSection = section(LoggingSection, doc="Logging.")

    @model_validator(mode="after")
    def _consistent(self) -> KmeFile:
        local: list[str] = []
        for i, sae in enumerate(self.sae):
            if sae.id in local:
                raise Problem(f"SAE {sae.id!r} is listed twice", "remove the duplicate",
                              at=("sae", i, "id"))
            local.append(sae.id)
        if not local:
            raise Problem("no local SAE configured",
                          'add one [[sae]] table per local gateway with id = "site-a-gw"',
                          at=("sae",))
        if self.neighbour:
            for old in ("peer", "link"):
                if old in self.model_fields_set:
                    raise Problem("given together with [[neighbour]]",
                                  "describe every link as a [[neighbour]] table (with its "
                                  "[neighbour.link]) and remove [peer] and [link]", at=old)
            self._check_neighbours(local)
        else:
            if self.peer is None:
                raise Problem("missing section", "add a [peer] table (or one [[neighbour]] "
                              "table per link)", at="peer")
            if self.link is None:
                raise Problem("missing section", "add a [link] table", at="link")
            self._check_peer(self.peer, local, ("peer",))
        if self.network is not None:
            check_network(self.network, self.kme.id, tuple(local),
                          {n.kme_id: (n.sae_ids, n.link.type) for n in self.neighbours()})
        return self

    def _check_peer(self, peer: PeerSection, local: list[str],
                    at: tuple[str | int, ...]) -> None:
        both = sorted(set(peer.sae_ids) & set(local))
        if both:
            # The key ID binds (master, slave); an SAE on both sides would make the
            # direction of a key ambiguous.
            raise Problem(f"{both[0]!r} is also a local [[sae]]",
                          "an SAE belongs to exactly one KME; remove it from one list",
                          at=(*at, "sae_ids"))
        if peer.kme_id == self.kme.id:
            raise Problem("same as [kme] id", "set the peer KME's own ID", at=(*at, "kme_id"))

    def _check_neighbours(self, local: list[str]) -> None:
        seen_kmes: set[str] = set()
        seen_saes: dict[str, str] = {}
        dbs: set[Path] = set()
        for i, (nb, db) in enumerate(zip(self.neighbour, self.neighbour_dbs(), strict=True)):
            at = ("neighbour", i)
            self._check_peer(nb, local, at)
            if nb.kme_id in seen_kmes:
                raise Problem(f"KME {nb.kme_id!r} is listed twice",
                              "one [[neighbour]] table per neighbour KME", at=(*at, "kme_id"))
            seen_kmes.add(nb.kme_id)
            for sae in nb.sae_ids:
                if sae in seen_saes:
                    raise Problem(f"{sae!r} is also behind {seen_saes[sae]!r}",
                                  "an SAE belongs to exactly one KME; remove it from one list",
                                  at=(*at, "sae_ids"))
                seen_saes[sae] = nb.kme_id
            if db in dbs:
                raise Problem(f"{str(db)[-80:]!r} is also another link's db",
                              "give every [[neighbour]] its own db file", at=(*at, "db"))
            dbs.add(db)

    def neighbour_dbs(self) -> list[Path]:
        """Each [[neighbour]]'s db, defaults filled in: the first link keeps [kme] db, so
        a KME that gains a second link keeps the deliveries and pool of its first."""
        return [nb.db or (self.kme.db if i == 0 else Path(f"{self.kme.db}.{nb.kme_id}"))
                for i, nb in enumerate(self.neighbour)]

    def neighbours(self) -> list[NeighbourEntry]:
        """Every link as a [[neighbour]] (the [peer] + [link] form is one, with [kme] db)."""
        if self.neighbour:
            return list(self.neighbour)
        assert self.peer is not None and self.link is not None
        return [NeighbourEntry(kme_id=self.peer.kme_id, sae_ids=self.peer.sae_ids,
                               link=self.link)]


# --------------------------------------------------------------------------- service view


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
    round_timeout_s: float = LinkSection.model_fields["round_timeout_s"].default
    refill_below: float = LinkSection.model_fields["refill_below"].default

    @classmethod
    def from_section(cls, s: LinkSection, db: Path) -> LinkConfig:
        if s.type == "ideal":
            return cls("ideal", s.secret_file, s.key_rate, s.secret)
        return cls("bb84", s.secret_file, 0.0, s.secret, role=s.role or "",
                   params=s.params(), peer=s.peer, quantum=s.quantum, listen=s.listen,
                   quantum_listen=s.quantum_listen,
                   state_file=s.state_file or Path(str(db) + ".link-state"),
                   round_timeout_s=s.round_timeout_s, refill_below=s.refill_below)


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
    log_level: str = LoggingSection.model_fields["level"].default
    log_format: str = LoggingSection.model_fields["format"].default
    # [admin] listen: plain-HTTP /status and /metrics; None = no admin listener.
    admin_listen: HostPort | None = None
    # Every link of this KME (issue 11); the first is `peer` + `link`.
    neighbours: tuple[NeighbourConfig, ...] = ()
    network: NetworkConfig | None = None  # [network]: relay to non-adjacent KMEs
    # The validated file, for tables this view does not flatten.
    file: KmeFile | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path) -> KmeConfig:
        doc, source = load_model(KmeFile, path)
        return cls.from_file(doc, source)

    @classmethod
    def from_file(cls, f: KmeFile, source: Path) -> KmeConfig:
        k = f.kme
        dbs = f.neighbour_dbs() if f.neighbour else [k.db]
        neighbours = tuple(
            NeighbourConfig(PeerConfig(nb.kme_id, nb.sae_ids),
                            LinkConfig.from_section(nb.link, db), db, nb.relay)
            for nb, db in zip(f.neighbours(), dbs, strict=True))
        return cls(
            source=source, kme_id=k.id, listen=k.listen, db=k.db, limits=k.limits(),
            storage_key=k.storage_key or Path(str(k.db) + ".storage-key"),
            key_lifetime_s=k.key_lifetime_s,
            tls=TlsConfig(cert=f.tls.cert, key=f.tls.key, client_ca=f.tls.client_ca),
            local_sae_ids=tuple(s.id for s in f.sae),
            peer=neighbours[0].peer, link=neighbours[0].link, neighbours=neighbours,
            network=NetworkConfig.from_section(f.network) if f.network else None,
            log_level=f.logging.level, log_format=f.logging.format,
            admin_listen=f.admin.listen, file=f,
        )

    def error(self, field_name: str, problem: str, fix: str) -> ConfigError:
        """A ConfigError for a problem found after loading (e.g. the db cannot be opened)."""
        return ConfigError(f"{self.source}: {field_name}: {problem} (fix: {fix})")
