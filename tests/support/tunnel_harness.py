"""In-memory harness for the sans-I/O tunnel: two connections, a fake KME pair, a clock."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from gateway.pki import load_certificate, load_private_key
from gateway.tunnel import events as ev
from gateway.tunnel.connection import ConnectionSettings, TunnelConnection
from gateway.tunnel.handshake import Credentials, HandshakeParams, HandshakePolicy


def credentials(pki: Path, site: str, ca_pki: Path | None = None) -> Credentials:
    return Credentials(
        private_key=load_private_key(pki / site / "gateway.key"),
        chain=(load_certificate(pki / site / "gateway.crt"),),
        trust_anchor=load_certificate((ca_pki or pki) / "ca.crt"),
    )


def params(pki: Path, local: str, peer: str, policy: HandshakePolicy | None = None,
           **kw: object) -> HandshakeParams:
    return HandshakeParams(
        local_identity=local, peer_identity=peer, local_sae_id=f"{local}-gw",
        peer_sae_id=f"{peer}-gw", credentials=credentials(pki, local),
        policy=policy or HandshakePolicy(), **kw)  # type: ignore[arg-type]


def traffic_secrets(conn: TunnelConnection) -> tuple[bytes, bytes]:
    """(send, receive) secrets of the connection's record layer now: the session result
    keeps none (the record layer owns and ratchets them)."""
    rec = conn._records
    assert rec._send is not None and rec._recv is not None
    return bytes(rec._send.secret), bytes(rec._recv.secret)


@dataclass
class FakeKmePair:
    """Both KMEs of a link as one dict: enough for the sans-I/O tests. Delivers each key
    once to the master and once to the slave, like the real store."""

    keys: dict[str, bytes] = field(default_factory=dict)
    delivered_dec: set[str] = field(default_factory=set)
    available: int = 1_000_000
    consumed: int = 0
    fetches: list[tuple[str, ...]] = field(default_factory=list)

    def enc(self, number: int, size_bits: int) -> list[tuple[str, bytes]] | None:
        if self.available < number:
            return None
        out = []
        for _ in range(number):
            kid = str(uuid.uuid4())
            self.keys[kid] = os.urandom(size_bits // 8)
            out.append((kid, self.keys[kid]))
        self.available -= number
        self.consumed += number
        return out

    def dec(self, key_ids: tuple[str, ...]) -> list[tuple[str, bytes]] | None:
        self.fetches.append(key_ids)
        if any(k not in self.keys or k in self.delivered_dec for k in key_ids):
            return None
        self.delivered_dec.update(key_ids)
        return [(k, self.keys[k]) for k in key_ids]

    def status(self, number: int) -> str:
        """What ETSI 014 status tells a responder: does the (shared) pool hold keys?"""
        return "ok" if self.available >= number else "no-key"


def serve_qkd(conn: TunnelConnection, event: ev.Event, kme: FakeKmePair | None,
              now: float = 0.0) -> bool:
    """Answer a QKD event from `kme` (None: this side cannot reach any KME). False if
    `event` is not a QKD request."""
    if isinstance(event, ev.QkdKeysRequested):
        keys = kme.enc(event.number, event.size_bits) if kme is not None else None
        if keys is None:
            conn.qkd_keys_unavailable(event.handshake_id, "pool empty" if kme else
                                      "no KME access", now,
                                      "no-key" if kme is not None else "unreachable")
        else:
            conn.supply_qkd_keys(event.handshake_id, keys, now)
    elif isinstance(event, ev.QkdKeysToFetch):
        if kme is None:
            conn.qkd_keys_unavailable(event.handshake_id, "no KME access", now, "unreachable")
            return True
        keys = kme.dec(event.key_ids)
        if keys is None:
            conn.qkd_keys_rejected(event.handshake_id, "unknown or delivered key IDs", now)
        else:
            conn.supply_qkd_keys(event.handshake_id, keys, now)
    elif isinstance(event, ev.QkdStatusToCheck):
        conn.local_qkd_status(event.handshake_id,
                              kme.status(event.number) if kme is not None else "unreachable",
                              now)
    else:
        return False
    return True


@dataclass
class Pair:
    a: TunnelConnection
    b: TunnelConnection
    kme: FakeKmePair
    now: float = 0.0
    events_a: list[ev.Event] = field(default_factory=list)
    events_b: list[ev.Event] = field(default_factory=list)
    wire_a2b: list[bytes] = field(default_factory=list)
    wire_b2a: list[bytes] = field(default_factory=list)
    tamper_a2b: object = None  # callable(bytes) -> bytes, applied to each flight
    tamper_b2a: object = None

    def _serve(self, conn: TunnelConnection, event: ev.Event) -> None:
        serve_qkd(conn, event, self.kme, self.now)

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for conn, sink in ((self.a, self.events_a), (self.b, self.events_b)):
                while (e := conn.next_event()) is not None:
                    sink.append(e)
                    self._serve(conn, e)
                    moved = True
            out_a = b"".join(self.a.data_to_send())
            out_b = b"".join(self.b.data_to_send())
            if out_a:
                self.wire_a2b.append(out_a)
                if callable(self.tamper_a2b):
                    out_a = self.tamper_a2b(out_a)
                if out_a:
                    self.b.receive_data(out_a, self.now)
                moved = True
            if out_b:
                self.wire_b2a.append(out_b)
                if callable(self.tamper_b2a):
                    out_b = self.tamper_b2a(out_b)
                if out_b:
                    self.a.receive_data(out_b, self.now)
                moved = True
            if not moved:
                for conn, sink in ((self.a, self.events_a), (self.b, self.events_b)):
                    while (e := conn.next_event()) is not None:
                        sink.append(e)
                        self._serve(conn, e)
                        moved = True
            if not moved:
                return

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for conn in (self.a, self.b):
            t = conn.get_timer()
            if t is not None and t <= self.now:
                conn.handle_timer(self.now)
        self.pump()


def make_pair(pki: Path, *, policy_a: HandshakePolicy | None = None,
              policy_b: HandshakePolicy | None = None,
              settings: ConnectionSettings | None = None, kme: FakeKmePair | None = None,
              params_a: HandshakeParams | None = None, params_b: HandshakeParams | None = None,
              keylog_a: object = None, keylog_b: object = None, start: bool = True,
              wallclock_a: object = None, wallclock_b: object = None) -> Pair:
    a = TunnelConnection(initiator=True,
                         params=params_a or params(pki, "site-a", "site-b", policy_a),
                         settings=settings, keylog=keylog_a,  # type: ignore[arg-type]
                         wallclock=wallclock_a)  # type: ignore[arg-type]
    b = TunnelConnection(initiator=False,
                         params=params_b or params(pki, "site-b", "site-a", policy_b),
                         settings=settings, keylog=keylog_b,  # type: ignore[arg-type]
                         wallclock=wallclock_b)  # type: ignore[arg-type]
    pair = Pair(a, b, kme or FakeKmePair())
    if start:
        a.start(0.0)
        pair.pump()
    return pair
