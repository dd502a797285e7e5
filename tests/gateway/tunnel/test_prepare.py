"""`TunnelConnection.prepare_handshake`: the work a handshake does while its KME request
is out (initiator: the ML-KEM key pair; responder: the hybrid server flight up to
Finished) gives the same handshake as without it, and nothing prepared leaves when the
KME's answer ends the handshake instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.tunnel import events as ev
from gateway.tunnel import handshake as hs_mod
from gateway.tunnel.connection import TunnelConnection
from gateway.tunnel.wire import ErrorCode
from tests.support.tunnel_harness import FakeKmePair, Pair, params, serve_qkd, traffic_secrets


@dataclass
class PreparingPair(Pair):
    """Calls prepare_handshake before each KME answer, as the runtime does while the
    request is on the wire; `refuse_dec` makes the responder's KME refuse the IDs."""

    refuse_dec: bool = False
    prepared: list[str] = field(default_factory=list)

    def _serve(self, conn: TunnelConnection, event: ev.Event) -> None:
        if isinstance(event, ev.QkdKeysRequested | ev.QkdKeysToFetch):
            conn.prepare_handshake(event.handshake_id, self.now)
            hs = conn._handshake
            assert hs is not None
            if hs._prepared is not None:
                self.prepared.append("server flight")
            elif hs._dk is not None:
                self.prepared.append("key pair")
            if isinstance(event, ev.QkdKeysToFetch) and self.refuse_dec:
                conn.qkd_keys_rejected(event.handshake_id, "refused (test)", self.now)
                return
        serve_qkd(conn, event, self.kme, self.now)


def preparing_pair(pki: Path, **kw: object) -> PreparingPair:
    a = TunnelConnection(initiator=True, params=params(pki, "site-a", "site-b"))
    b = TunnelConnection(initiator=False, params=params(pki, "site-b", "site-a"))
    pair = PreparingPair(a, b, FakeKmePair(), **kw)  # type: ignore[arg-type]
    a.start(0.0)
    pair.pump()
    return pair


def test_prepared_pki_handshake_completes_with_the_same_keys(pki_dir: Path) -> None:
    pair = preparing_pair(pki_dir)
    assert pair.prepared == ["key pair", "server flight"]
    assert pair.a.ready and pair.b.ready
    send_a, recv_a = traffic_secrets(pair.a)
    send_b, recv_b = traffic_secrets(pair.b)
    assert send_a == recv_b and send_b == recv_a
    # The tunnel carries data both ways.
    sid = pair.a.open_stream("echo")
    pair.a.send_stream_data(sid, b"hello")
    pair.pump()
    assert [e.data for e in pair.events_b if isinstance(e, ev.StreamDataReceived)] == [b"hello"]


def test_positive_control_a_prepared_flight_on_another_transcript_fails(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the prepared flight bound to another TH than the peer's, the handshake
    would fail: the test above could see a wrong transcript."""
    real = hs_mod.Handshake.prepare

    def skewed(self: hs_mod.Handshake, now: object = None) -> None:
        real(self, now)  # type: ignore[arg-type]
        if self._prepared is not None:
            import dataclasses
            self._prepared = dataclasses.replace(self._prepared,
                                                 th_server_hello=b"\x00" * 48)

    monkeypatch.setattr(hs_mod.Handshake, "prepare", skewed)
    pair = preparing_pair(pki_dir)
    assert "server flight" in pair.prepared
    assert not pair.a.ready and not pair.b.ready


def test_nothing_prepared_leaves_when_the_kme_refuses(pki_dir: Path) -> None:
    pair = preparing_pair(pki_dir, refuse_dec=True)
    assert pair.prepared == ["key pair", "server flight"]
    assert not pair.a.ready and not pair.b.ready
    closed = [e for e in pair.events_a if isinstance(e, ev.ConnectionTerminated)]
    assert closed and closed[-1].code == ErrorCode.QKD_KEY_REJECTED
    # B sent its alert only: a ServerHello carries a 1088-byte ML-KEM ciphertext, the
    # prepared CertificateVerify a 3309-byte ML-DSA-65 signature.
    assert len(pair.wire_b2a) == 1 and len(pair.wire_b2a[0]) < 400


@dataclass
class ExpiringPair(PreparingPair):
    """The responder's wall clock jumps past every certificate's end between its
    prepare_handshake and the KME's answer (`expire`; off for the control)."""

    expire: bool = True
    clock: list[datetime] = field(default_factory=lambda: [datetime.now(UTC)])

    def _serve(self, conn: TunnelConnection, event: ev.Event) -> None:
        if isinstance(event, ev.QkdKeysToFetch) and self.expire:
            conn.prepare_handshake(event.handshake_id, self.now)
            hs = conn._handshake
            if hs is not None and hs._prepared is not None:
                self.prepared.append("server flight")
            self.clock[0] = datetime(2200, 1, 1, tzinfo=UTC)
            serve_qkd(conn, event, self.kme, self.now)
            return
        super()._serve(conn, event)


@pytest.mark.parametrize("expire", [True, False])
def test_a_certificate_expiring_during_the_kme_request_drops_the_prepared_flight(
        pki_dir: Path, expire: bool) -> None:
    """The prepared flight is re-checked at the KME's answer with the clock of that
    moment: an expired own certificate is refused, not presented (control: without the
    jump the same pair completes)."""
    clock = [datetime.now(UTC)]
    a = TunnelConnection(initiator=True, params=params(pki_dir, "site-a", "site-b"))
    b = TunnelConnection(initiator=False, params=params(pki_dir, "site-b", "site-a"),
                         wallclock=lambda: clock[0])
    pair = ExpiringPair(a, b, FakeKmePair(), expire=expire, clock=clock)
    a.start(0.0)
    pair.pump()
    assert "server flight" in pair.prepared
    assert pair.b.ready is (not expire)
    if expire:
        # Neither the prepared ServerHello (1088-byte ciphertext) nor its signature left.
        assert all(len(m) < 400 for m in pair.wire_b2a)


@dataclass
class OneSided(Pair):
    preparing: str = "a"

    def _serve(self, conn: TunnelConnection, event: ev.Event) -> None:
        if isinstance(event, ev.QkdKeysRequested | ev.QkdKeysToFetch) and (
                (conn is self.a) == (self.preparing == "a")):
            conn.prepare_handshake(event.handshake_id, self.now)
        serve_qkd(conn, event, self.kme, self.now)


@pytest.mark.parametrize("side", ["a", "b"])
def test_unprepared_and_prepared_sides_interoperate(pki_dir: Path, side: str) -> None:
    """Only one side prepares: the wire is the same protocol."""
    a = TunnelConnection(initiator=True, params=params(pki_dir, "site-a", "site-b"))
    b = TunnelConnection(initiator=False, params=params(pki_dir, "site-b", "site-a"))
    pair = OneSided(a, b, FakeKmePair(), preparing=side)
    a.start(0.0)
    pair.pump()
    assert pair.a.ready and pair.b.ready


def test_prepared_psk_handshakes_advance_the_chain(pki_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """PKI bootstrap, then PSK handshakes, every KME answer after a prepare_handshake:
    both stores advance together and the PSK sessions use no signature."""
    from tests.support import psk_sites

    prepared: list[bool] = []
    real_serve = psk_sites.serve_qkd

    def serve(conn: TunnelConnection, event: ev.Event, kme: FakeKmePair | None,
              now: float = 0.0) -> bool:
        if isinstance(event, ev.QkdKeysToFetch):
            conn.prepare_handshake(event.handshake_id, now)
            prepared.append(conn._handshake is not None
                            and conn._handshake._prepared is not None)
        return real_serve(conn, event, kme, now)

    monkeypatch.setattr(psk_sites, "serve_qkd", serve)
    sa = psk_sites.Site(tmp_path / "a" / "psk.sqlite", "site-b")
    sb = psk_sites.Site(tmp_path / "b" / "psk.sqlite", "site-a")
    kme = FakeKmePair()
    first = psk_sites.connect(pki_dir, sa, sb, kme)
    assert first.ready and first.completed("a").auth == hs_mod.AUTH_PKI  # type: ignore[union-attr]
    for expected in (2, 3):
        att = psk_sites.connect(pki_dir, sa, sb, kme)
        assert att.ready
        done = att.completed("a")
        assert done is not None and done.auth == hs_mod.AUTH_PSK
        assert done.psk_epoch == expected - 1
        sa.store._settle()
        assert sa.store.status().current_epoch == sb.store.status().current_epoch == expected
    assert prepared == [True, True, True]
