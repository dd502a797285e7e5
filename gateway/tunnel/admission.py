"""Admission control for the tunnel listener: what a responder does before any expensive work.

A responder's costly steps for one ClientHello are the KME `dec_keys` call (a database
round trip that may consume a QKD key), an ML-KEM encapsulation and an ML-DSA signature.
This module decides, without I/O and with the time passed in, whether a new tunnel
connection gets that far:

- **Per-source token bucket.** Each source address (an IPv4 address, or the /64 of an
  IPv6 address, since one IPv6 host usually owns a whole /64) may open `burst`
  connections at once and `rate` per second after that. The table is capped at
  `max_sources` entries; the least recently seen source is evicted first, so memory
  stays bounded whatever the number of sources.
- **Pending handshakes.** Connections that have not yet confirmed a handshake are
  counted, globally (`max_pending`) and per source (`max_pending_per_source`), so one
  source cannot hold every slot.
- **The configured peer's reservation.** Connections from `peer_sources` (the peer
  gateway's addresses or networks, from config) never compete with anyone else: they
  have `peer_reserved` pending slots and a rate bucket of their own, outside the global
  cap and the shared source table, so a flood from any number of other addresses cannot
  lock the peer out. What identifies the peer here is only its TCP source address, the
  one thing known before any state is built: after the TCP handshake it shows the
  client receives at that address, which an off-path attacker cannot fake, but an
  on-path one can (it could also just drop the peer's packets), and so can any host
  that shares the peer's address (NAT). The PSK binder, which only the peer can make,
  arrives in the first record, after this decision; docs/security.md has the limits.
- **Stateless cookies** (the `CookieGate` the sans-I/O connection calls). In mode
  "always", or in "under-load" while the number of pending handshakes is at or above
  `load_threshold`, a ClientHello without a valid cookie is answered with a
  HelloRetryRequest carrying a cookie and costs the responder one HMAC. The cookie is

      generation (1) | issued_at_ms (8) | HMAC-SHA256(secret, label | generation |
                                                      issued_at_ms | source IP | digest)

  (41 bytes), bound to the source IP (not the port: a host behind NAT may reconnect
  from another port) and to the SHA-384 digest of the ClientHello, so it cannot be
  moved to another source or another hello. The secret is random and replaced every
  `secret_rotation` seconds; the previous one is still accepted, which is why a
  cookie's lifetime may not exceed the rotation interval. Nothing per cookie is
  stored. Over TCP the cookie adds little that the TCP handshake does not already prove
  (the source can receive); what it buys is that a client must read and echo an answer
  before the responder does any work for it, so fire-and-forget ClientHello floods and
  pipelined bursts cost the responder an HMAC each, while the rate limits and pending
  caps bound what a client that does echo can get.

Everything that happens is also queued as a small event (`Admission.events`) for the
runtime to turn into log lines and metrics; events never carry secret bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import struct
import typing
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import AfterValidator, model_validator

from gateway.tunnel.constants import COOKIE_CLOCK_SLACK_MS as _CLOCK_SLACK_MS
from gateway.tunnel.constants import COOKIE_LABEL, COOKIE_MAC_LEN
from qkd.common.schema import Float, Int, Problem, Schema, Str, setting

COOKIE_OFF = "off"
COOKIE_UNDER_LOAD = "under-load"
COOKIE_ALWAYS = "always"
COOKIE_MODES = (COOKIE_OFF, COOKIE_UNDER_LOAD, COOKIE_ALWAYS)

REFUSED_RATE = "rate_limited"
REFUSED_PENDING = "pending_cap"
REFUSED_SOURCE_PENDING = "source_pending_cap"
REFUSED_PEER_PENDING = "peer_reserved_full"
# Decided by the runtime, which owns the clocks and the byte counts; counted here too.
CUT_FIRST_RECORD = "first_record_timeout"
CUT_COOKIE_RETRY = "cookie_retry_timeout"
CUT_HANDSHAKE_BYTES = "handshake_bytes"

_COOKIE_HEAD = struct.Struct(">BQ")
COOKIE_LEN = _COOKIE_HEAD.size + COOKIE_MAC_LEN


class CookieGate(Protocol):
    """What the sans-I/O responder calls; one object per tunnel connection."""

    def cookie_required(self, now: float) -> bool: ...

    def make_cookie(self, hello_digest: bytes, now: float) -> bytes: ...

    def cookie_valid(self, cookie: bytes, hello_digest: bytes, now: float) -> bool: ...


def _peer_sources(entries: tuple[str, ...]) -> tuple[str, ...]:
    for entry in entries:
        try:
            peer_network(entry)
        except ValueError:
            raise Problem(f"{entry!r} is not an IP address or network",
                          'use addresses or CIDR networks, e.g. ["192.0.2.7", '
                          '"2001:db8::/64"]') from None
    return entries


class AdmissionConfig(Schema):
    """[tunnel.admission]: the schema of the settings below, with their defaults (the
    only place they are written). Only the side with [tunnel] listen uses it."""

    cookie: Literal["off", "under-load", "always"] = setting(
        COOKIE_UNDER_LOAD, doc="Stateless cookies before any KME request, encapsulation or "
        'signature: "off", "under-load" (while pending handshakes >= load_threshold) or '
        '"always".')
    load_threshold: Int = setting(
        16, ge=1, le=100000, doc="Pending handshakes at which under-load cookies turn on; "
        "at most max_pending.")
    cookie_lifetime_s: Float = setting(
        10.0, ge=1.0, le=300.0, unit="s", doc="How long a cookie stays valid; at most "
        "cookie_secret_rotation_s (only the previous secret is kept).")
    cookie_secret_rotation_s: Float = setting(
        60.0, ge=1.0, le=86400.0, unit="s", doc="How often the cookies' HMAC secret is "
        "replaced.")
    rate_per_s: Float = setting(
        2.0, ge=0.01, le=10000.0, unit="1/s", doc="New tunnel connections per second per "
        "source address (IPv4 address or IPv6 /64), after the burst.")
    burst: Int = setting(10, ge=1, le=100000, doc="Connections a source may open at once.")
    max_sources: Int = setting(
        4096, ge=16, le=1 << 20, doc="Source addresses tracked by the rate limiter (least "
        "recent forgotten first).")
    max_pending: Int = setting(
        64, ge=1, le=100000, doc="Connections without a confirmed handshake, in all.")
    max_pending_per_source: Int = setting(
        8, ge=1, le=100000, doc="Connections without a confirmed handshake per source "
        "address; at most max_pending.")
    first_record_timeout_s: Float = setting(
        5.0, ge=0.1, le=300.0, unit="s", doc="A connection must deliver a complete record "
        "within this time (and again after a cookie request). Default: 5 or [tunnel] "
        "handshake_timeout_s if that is shorter; at most handshake_timeout_s.")
    max_handshake_bytes: Int = setting(
        256 * 1024, ge=1 << 14, le=1 << 26, unit="bytes", doc="Bytes a connection may send "
        "before its handshake is confirmed.")
    peer_sources: typing.Annotated[tuple[Str, ...], AfterValidator(_peer_sources)] = setting(
        (), doc="The peer gateway's source addresses or networks (IPv4, IPv6, CIDR): they "
        "get peer_reserved pending slots and a rate bucket of their own. Empty: none.",
        fix='list the peer gateway\'s addresses, e.g. ["192.0.2.7"]')
    peer_reserved: Int = setting(
        4, ge=1, le=1024, doc="Pending slots reserved for peer_sources, outside "
        "max_pending.")

    @model_validator(mode="after")
    def _consistent(self) -> AdmissionConfig:
        if self.cookie_lifetime_s > self.cookie_secret_rotation_s:
            raise Problem(f"{self.cookie_lifetime_s} s is longer than "
                          f"cookie_secret_rotation_s ({self.cookie_secret_rotation_s} s)",
                          "keep cookie_lifetime_s at most cookie_secret_rotation_s: only the "
                          "previous secret is kept", at="cookie_lifetime_s")
        if self.max_pending_per_source > self.max_pending:
            raise Problem(f"{self.max_pending_per_source} is above max_pending "
                          f"({self.max_pending})", "make it at most max_pending",
                          at="max_pending_per_source")
        if self.load_threshold > self.max_pending:
            raise Problem(f"{self.load_threshold} is above max_pending ({self.max_pending}): "
                          "cookies would never turn on", "make it at most max_pending",
                          at="load_threshold")
        return self

    def settings(self, handshake_timeout: float) -> AdmissionSettings:
        """The core's settings; the first-record timeout follows a short handshake
        timeout unless it is set."""
        first = (self.first_record_timeout_s if "first_record_timeout_s" in
                 self.model_fields_set else min(self.first_record_timeout_s, handshake_timeout))
        return AdmissionSettings(
            cookie=self.cookie, cookie_lifetime=self.cookie_lifetime_s,
            secret_rotation=self.cookie_secret_rotation_s, rate=self.rate_per_s,
            burst=self.burst, max_sources=self.max_sources, max_pending=self.max_pending,
            max_pending_per_source=self.max_pending_per_source,
            load_threshold=self.load_threshold, first_record_timeout=first,
            max_handshake_bytes=self.max_handshake_bytes, peer_sources=self.peer_sources,
            peer_reserved=self.peer_reserved)


_D = AdmissionConfig()


@dataclass(frozen=True)
class AdmissionSettings:
    """What `Admission` runs on. The defaults are AdmissionConfig's (the config schema)."""

    cookie: str = _D.cookie
    cookie_lifetime: float = _D.cookie_lifetime_s
    secret_rotation: float = _D.cookie_secret_rotation_s
    rate: float = _D.rate_per_s
    burst: int = _D.burst
    max_sources: int = _D.max_sources
    max_pending: int = _D.max_pending
    max_pending_per_source: int = _D.max_pending_per_source
    load_threshold: int = _D.load_threshold
    first_record_timeout: float = _D.first_record_timeout_s
    max_handshake_bytes: int = _D.max_handshake_bytes
    # The configured peer's addresses or networks ("192.0.2.7", "2001:db8::/64"), and the
    # pending slots reserved for them (separate from max_pending).
    peer_sources: tuple[str, ...] = _D.peer_sources
    peer_reserved: int = _D.peer_reserved

    def __post_init__(self) -> None:
        # The config loader reports these per field; this guards direct construction.
        if self.cookie not in COOKIE_MODES:
            raise ValueError(f"cookie mode must be one of {', '.join(COOKIE_MODES)}")
        if not 0 < self.cookie_lifetime <= self.secret_rotation:
            raise ValueError("cookie_lifetime must be positive and at most secret_rotation")
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        if min(self.max_sources, self.max_pending, self.max_pending_per_source,
               self.load_threshold) < 1:
            raise ValueError("caps and the load threshold must be at least 1")
        if self.first_record_timeout <= 0 or self.max_handshake_bytes < 1:
            raise ValueError("first_record_timeout and max_handshake_bytes must be positive")
        if self.peer_reserved < 1:
            raise ValueError("peer_reserved must be at least 1")
        for entry in self.peer_sources:
            peer_network(entry)  # raises ValueError naming the entry

    @property
    def peer_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(peer_network(e) for e in self.peer_sources)


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ConnectionRefused:
    """A new tunnel connection was turned away before any handshake work."""

    source: str
    reason: str


@dataclass(frozen=True)
class CookieIssued:
    """A HelloRetryRequest with a cookie goes out instead of the expensive work."""

    source: str
    under_load: bool


@dataclass(frozen=True)
class CookieRejected:
    source: str
    reason: str  # malformed, unknown_secret, expired, bad_mac


AdmissionEvent = ConnectionRefused | CookieIssued | CookieRejected


# ------------------------------------------------------------------------- pieces


def _packed_ip(address: str) -> bytes:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        # Not an IP transport (or no peer name): all such clients share one identity.
        return b"\x00" + address.encode("utf-8", "replace")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed


def peer_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A peer_sources entry as a network (a bare address is a /32 or /128)."""
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f"{entry!r} is not an IP address or network") from None


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def source_key(address: str) -> str:
    """The rate limiter's bucket for an address: the IPv4 address or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "?"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class TokenBucketTable:
    """Per-source token buckets with a hard cap on the number of sources tracked."""

    def __init__(self, rate: float, burst: int, max_sources: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        """Spend one token of `key`'s bucket; False when it is empty."""
        entry = self._buckets.pop(key, None)
        if entry is None:
            tokens = self.burst
        else:
            tokens, last = entry
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        # Re-inserted at the end: the front of the dict is always the least recently
        # seen source, the one to evict.
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
            self.evictions += 1
        return allowed


class CookieJar:
    """Makes and checks stateless cookies; holds the current and previous secret."""

    def __init__(self, lifetime: float, rotation: float,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        if not 0 < lifetime <= rotation:
            raise ValueError("cookie lifetime must be positive and at most the rotation")
        self.lifetime = lifetime
        self.rotation = rotation
        self._rng = rng
        self._generation: int | None = None
        self._current = b""
        self._previous: bytes | None = None

    def __repr__(self) -> str:
        return f"CookieJar(lifetime={self.lifetime}, rotation={self.rotation})"

    def _rotate(self, now: float) -> int:
        gen = math.floor(now / self.rotation)
        if self._generation is None or gen > self._generation + 1:
            self._previous = None
            self._current = self._rng(32)
        elif gen == self._generation + 1:
            self._previous = self._current
            self._current = self._rng(32)
        elif gen < self._generation:
            # A clock that went backwards would otherwise resurrect old generations.
            return self._generation
        self._generation = gen
        return gen

    @staticmethod
    def _mac(secret: bytes, head: bytes, ip: bytes, digest: bytes) -> bytes:
        return hmac.new(secret, COOKIE_LABEL + head + ip + digest, hashlib.sha256).digest()

    def make(self, source_ip: str, hello_digest: bytes, now: float) -> bytes:
        gen = self._rotate(now)
        head = _COOKIE_HEAD.pack(gen & 0xFF, max(0, int(now * 1000)))
        return head + self._mac(self._current, head, _packed_ip(source_ip), hello_digest)

    def check(self, cookie: bytes, source_ip: str, hello_digest: bytes,
              now: float) -> str | None:
        """None if valid, else why not (a short reason for logs and metrics)."""
        if len(cookie) != COOKIE_LEN:
            return "malformed"
        gen = self._rotate(now)
        head, mac = cookie[: _COOKIE_HEAD.size], cookie[_COOKIE_HEAD.size :]
        cookie_gen, issued_ms = _COOKIE_HEAD.unpack(head)
        if cookie_gen == gen & 0xFF:
            secret: bytes | None = self._current
        elif cookie_gen == (gen - 1) & 0xFF:
            secret = self._previous
        else:
            secret = None
        if secret is None:
            return "unknown_secret"
        expected = self._mac(secret, head, _packed_ip(source_ip), hello_digest)
        if not hmac.compare_digest(mac, expected):
            return "bad_mac"
        # Checked after the MAC, so the timestamp is the one this jar wrote.
        age_ms = int(now * 1000) - issued_ms
        if age_ms > self.lifetime * 1000 or age_ms < -_CLOCK_SLACK_MS:
            return "expired"
        return None


class LogThrottle:
    """At most one log line per key per `interval` seconds, so a flood cannot turn into
    a log flood; the next line that does go out says how many were held back."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """The number of suppressed lines before this one if it may be logged, else None.

        Keys are event kinds and reasons, a small fixed set, so the tables stay small."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


# ------------------------------------------------------------------------- admission


class PendingHandshake:
    """One admitted connection that has not confirmed a handshake yet.

    `confirmed()` or `release()` frees its pending slot; both are idempotent."""

    __slots__ = ("_admission", "_released", "reserved", "source", "source_key")

    def __init__(self, admission: Admission, source: str, key: str,
                 reserved: bool = False) -> None:
        self._admission = admission
        self.source = source
        self.source_key = key
        self.reserved = reserved  # holds one of the configured peer's reserved slots
        self._released = False

    def __repr__(self) -> str:
        return (f"PendingHandshake(source={self.source!r}, reserved={self.reserved}, "
                f"released={self._released})")

    @property
    def pending(self) -> bool:
        return not self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self.reserved:
                self._admission._release_peer()
            else:
                self._admission._release(self.source_key)

    confirmed = release

    def cookie_gate(self) -> ConnectionCookieGate:
        return ConnectionCookieGate(self._admission, self.source)


class ConnectionCookieGate:
    """The `CookieGate` of one tunnel connection: the shared jar, this source's IP."""

    __slots__ = ("_admission", "issued", "source")

    def __init__(self, admission: Admission, source: str) -> None:
        self._admission = admission
        self.source = source
        # Cookies sent on this connection: the runtime gives the client a deadline to
        # come back with it, so a HelloRetryRequest does not hold a pending slot for the
        # whole handshake timeout.
        self.issued = 0

    def __repr__(self) -> str:
        return f"ConnectionCookieGate(source={self.source!r})"

    def cookie_required(self, now: float) -> bool:
        return self._admission.cookie_required(now)

    def make_cookie(self, hello_digest: bytes, now: float) -> bytes:
        a = self._admission
        self.issued += 1
        a.stats_cookies_issued += 1
        a.events.append(CookieIssued(self.source, a.under_load))
        return a.jar.make(self.source, hello_digest, now)

    def cookie_valid(self, cookie: bytes, hello_digest: bytes, now: float) -> bool:
        a = self._admission
        reason = a.jar.check(cookie, self.source, hello_digest, now)
        if reason is None:
            return True
        a.stats_cookies_rejected += 1
        a.events.append(CookieRejected(self.source, reason))
        return False


@dataclass(frozen=True)
class Refused:
    reason: str


class Admission:
    """The listener's admission state: rate buckets, pending counts, the cookie jar."""

    def __init__(self, settings: AdmissionSettings | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.settings = s = settings or AdmissionSettings()
        self.buckets = TokenBucketTable(s.rate, s.burst, s.max_sources)
        self.jar = CookieJar(s.cookie_lifetime, s.secret_rotation, rng)
        self.pending = 0
        # The configured peer's own slots and bucket: nothing from other sources touches
        # them (the shared table evicts under a flood; this one only holds the peer).
        self._peer_networks = s.peer_networks
        self.peer_buckets = TokenBucketTable(s.rate, s.burst, max(16, len(s.peer_sources)))
        self.peer_pending = 0
        self._pending_by_source: dict[str, int] = {}
        self.events: deque[AdmissionEvent] = deque()
        self.stats_refused: dict[str, int] = {}
        self.stats_cookies_issued = 0
        self.stats_cookies_rejected = 0

    def __repr__(self) -> str:
        return (f"Admission(cookie={self.settings.cookie!r}, pending={self.pending}, "
                f"sources={len(self.buckets)})")

    @property
    def under_load(self) -> bool:
        return self.pending >= self.settings.load_threshold

    def cookie_required(self, now: float) -> bool:
        mode = self.settings.cookie
        if mode == COOKIE_ALWAYS:
            return True
        if mode == COOKIE_OFF:
            return False
        return self.under_load

    def is_peer(self, source: str) -> bool:
        ip = _ip(source)
        return ip is not None and any(ip.version == n.version and ip in n
                                      for n in self._peer_networks)

    def admit(self, source: str, now: float) -> PendingHandshake | Refused:
        """A new tunnel connection from `source` (an IP address string)."""
        s = self.settings
        key = source_key(source)
        if self.is_peer(source):
            if self.peer_pending >= s.peer_reserved:
                return self._refuse(source, REFUSED_PEER_PENDING)
            if not self.peer_buckets.take(key, now):
                return self._refuse(source, REFUSED_RATE)
            self.peer_pending += 1
            return PendingHandshake(self, source, key, reserved=True)
        # Caps first: a refused connection should not also spend its source's tokens.
        if self.pending >= s.max_pending:
            return self._refuse(source, REFUSED_PENDING)
        if self._pending_by_source.get(key, 0) >= s.max_pending_per_source:
            return self._refuse(source, REFUSED_SOURCE_PENDING)
        if not self.buckets.take(key, now):
            return self._refuse(source, REFUSED_RATE)
        self.pending += 1
        self._pending_by_source[key] = self._pending_by_source.get(key, 0) + 1
        return PendingHandshake(self, source, key)

    def note_refused(self, source: str, reason: str) -> None:
        """A refusal decided elsewhere (deadline, byte cap), counted with the rest."""
        self._refuse(source, reason)

    def _refuse(self, source: str, reason: str) -> Refused:
        self.stats_refused[reason] = self.stats_refused.get(reason, 0) + 1
        self.events.append(ConnectionRefused(source, reason))
        return Refused(reason)

    def _release(self, key: str) -> None:
        self.pending -= 1
        left = self._pending_by_source.get(key, 0) - 1
        if left > 0:
            self._pending_by_source[key] = left
        else:
            self._pending_by_source.pop(key, None)

    def _release_peer(self) -> None:
        self.peer_pending -= 1

    def pending_from(self, source: str) -> int:
        return self._pending_by_source.get(source_key(source), 0)


__all__ = [
    "COOKIE_ALWAYS",
    "COOKIE_LEN",
    "COOKIE_MODES",
    "COOKIE_OFF",
    "COOKIE_UNDER_LOAD",
    "CUT_COOKIE_RETRY",
    "CUT_FIRST_RECORD",
    "CUT_HANDSHAKE_BYTES",
    "Admission",
    "AdmissionConfig",
    "AdmissionEvent",
    "AdmissionSettings",
    "ConnectionCookieGate",
    "ConnectionRefused",
    "CookieGate",
    "CookieIssued",
    "CookieJar",
    "CookieRejected",
    "LogThrottle",
    "PendingHandshake",
    "Refused",
    "TokenBucketTable",
    "peer_network",
    "source_key",
]
