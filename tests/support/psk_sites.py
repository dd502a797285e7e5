"""Two sites' PSK stores and tunnel connections over the in-memory harness, with cuts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.runtime.psk_store import PskStore
from gateway.tunnel import events as ev
from gateway.tunnel.connection import ConnectionSettings, TunnelConnection
from tests.support.tunnel_harness import FakeKmePair, params, serve_qkd

PSK_EVENTS = (ev.NextPskDerived, ev.PskConfirmed, ev.PskRejected)


@dataclass
class Site:
    path: Path
    peer: str
    rebootstrap: bool = False
    store: PskStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = PskStore(self.path, self.peer, pki_rebootstrap=self.rebootstrap)

    def restart(self) -> None:
        """A crash: whatever was not written to the file is gone."""
        self.store.close()
        self.store = PskStore(self.path, self.peer, pki_rebootstrap=self.rebootstrap)


@dataclass
class Attempt:
    a: TunnelConnection
    b: TunnelConnection
    events_a: list[ev.Event]
    events_b: list[ev.Event]
    client_flights: list[bytes]

    @property
    def ready(self) -> bool:
        return self.a.ready and self.b.ready

    def completed(self, side: str) -> ev.HandshakeCompleted | None:
        found = [e for e in (self.events_a if side == "a" else self.events_b)
                 if isinstance(e, ev.HandshakeCompleted)]
        return found[-1] if found else None

    def terminated(self, side: str) -> ev.ConnectionTerminated | None:
        found = [e for e in (self.events_a if side == "a" else self.events_b)
                 if isinstance(e, ev.ConnectionTerminated)]
        return found[-1] if found else None


CUTS = {
    # name: (flight to drop as (sender, n), crash point as (side, event type))
    "lost_client_hello": (("a", 1), None),
    "lost_server_flight": (("b", 1), None),
    "initiator_crash_before_storing_pending": (None, ("a", ev.NextPskDerived)),
    "lost_initiator_finished": (("a", 2), None),
    "responder_crash_before_storing": (None, ("b", ev.NextPskDerived)),
    "lost_handshake_done": (("b", 2), None),
    "initiator_crash_before_promoting": (None, ("a", ev.PskConfirmed)),
}


def connect(pki: Path, sa: Site, sb: Site, kme: FakeKmePair, cut: str | None = None,
            settings: ConnectionSettings | None = None) -> Attempt:
    """One tunnel connection, delivered flight by flight; PSK events reach the stores
    before the bytes that follow them leave, as in the runtime."""
    drop, crash = CUTS[cut] if cut else (None, None)
    a = TunnelConnection(initiator=True, settings=settings,
                         params=params(pki, "site-a", "site-b", psk_book=sa.store))
    b = TunnelConnection(initiator=False, settings=settings,
                         params=params(pki, "site-b", "site-a", psk_book=sb.store))
    att = Attempt(a, b, [], [], [])
    a.start(0.0)
    sides = {"a": (a, sa, att.events_a, b), "b": (b, sb, att.events_b, a)}
    flights = {"a": 0, "b": 0}
    for _ in range(50):
        moved = False
        for name, (conn, site, events, other) in sides.items():
            while (e := conn.next_event()) is not None:
                moved = True
                events.append(e)
                if crash is not None and crash == (name, type(e)):
                    return att  # the process dies before the write: nothing more happens
                if isinstance(e, PSK_EVENTS):
                    site.store.apply(e)
                else:
                    serve_qkd(conn, e, kme)
            out = b"".join(conn.data_to_send())
            if not out:
                continue
            moved = True
            flights[name] += 1
            if name == "a":
                att.client_flights.append(out)
            if drop == (name, flights[name]):
                return att  # the flight is lost and the connection with it
            other.receive_data(out, 0.0)
        if not moved:
            break
    return att


def reconnect(pki: Path, sa: Site, sb: Site, kme: FakeKmePair, max_attempts: int = 3
              ) -> tuple[Attempt, int]:
    for n in range(1, max_attempts + 1):
        att = connect(pki, sa, sb, kme)
        if att.ready:
            return att, n
    raise AssertionError(f"no tunnel after {max_attempts} attempts: "
                         f"{att.terminated('a')} / {att.terminated('b')}")
