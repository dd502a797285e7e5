"""Attacks on PSK-mode handshakes, each with a positive control.

The attacker is a full protocol implementation (a TunnelConnection) given whatever the
scenario hands it: a stolen PSK store, a signing key, a recorded flight. Whether it
reaches a KME is the scenario's other knob.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.tunnel import events as ev
from gateway.tunnel.connection import TunnelConnection
from gateway.tunnel.handshake import AUTH_PSK, MODE_HYBRID, MODE_MLKEM_ONLY, HandshakePolicy
from gateway.tunnel.wire import ErrorCode
from tests.support.psk_sites import Site, connect
from tests.support.tunnel_harness import FakeKmePair, params, serve_qkd

DEGRADED = HandshakePolicy(allowed_modes=(MODE_HYBRID, MODE_MLKEM_ONLY))


def run(a: TunnelConnection, b: TunnelConnection, kme_a: FakeKmePair | None,
        kme_b: FakeKmePair | None, stores: dict[str, Site]) -> tuple[list[ev.Event],
                                                                     list[ev.Event]]:
    """Drive a handshake where each side reaches only the KME it is given (None: no KME
    access, so no QKD key)."""
    ea: list[ev.Event] = []
    eb: list[ev.Event] = []
    a.start(0.0)
    for _ in range(40):
        moved = False
        for name, conn, kme, sink, other in (("a", a, kme_a, ea, b), ("b", b, kme_b, eb, a)):
            for e in iter(conn.next_event, None):
                moved = True
                sink.append(e)
                if isinstance(e, ev.NextPskDerived | ev.PskConfirmed | ev.PskRejected):
                    if name in stores:
                        stores[name].store.apply(e)
                else:
                    serve_qkd(conn, e, kme)
            out = b"".join(conn.data_to_send())
            if out:
                moved = True
                other.receive_data(out, 0.0)
        if not moved:
            break
    return ea, eb


def _established(pki: Path, tmp: Path) -> tuple[Site, Site, FakeKmePair]:
    sa = Site(tmp / "a.sqlite", "site-b")
    sb = Site(tmp / "b.sqlite", "site-a")
    kme = FakeKmePair()
    assert connect(pki, sa, sb, kme).ready  # PKI bootstrap
    assert connect(pki, sa, sb, kme).ready  # first PSK tunnel
    return sa, sb, kme


def _stolen_copy(site: Site, tmp: Path, name: str) -> Site:
    """What a thief gets by copying the PSK database file."""
    site.store.close()
    shutil.copy(site.path, tmp / f"{name}.sqlite")
    site.restart()
    return Site(tmp / f"{name}.sqlite", site.peer)


def test_stolen_psk_without_the_kme_cannot_impersonate(pki_dir: Path, tmp_path: Path) -> None:
    sa, sb, kme = _established(pki_dir, tmp_path)
    thief = _stolen_copy(sa, tmp_path, "thief")
    # The thief plays site A towards B. It cannot ask A's KME for a key, so it names
    # key IDs it made up (its own "KME"); B's KME has none of them.
    fake_kme = FakeKmePair()
    attacker = TunnelConnection(initiator=True,
                                params=params(pki_dir, "site-a", "site-b", psk_book=thief.store))
    victim = TunnelConnection(initiator=False,
                              params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    before = sb.store.status()
    _ea, eb = run(attacker, victim, fake_kme, kme, {})
    assert not victim.ready
    term = [e for e in eb if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.QKD_KEY_REJECTED
    assert sb.store.status().current_epoch == before.current_epoch  # nothing advanced
    # Positive control: the same thief with access to A's KME (the shared key pool)
    # completes the handshake: the PSK is symmetric and does authenticate.
    attacker2 = TunnelConnection(initiator=True,
                                 params=params(pki_dir, "site-a", "site-b", psk_book=thief.store))
    victim2 = TunnelConnection(initiator=False,
                               params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    run(attacker2, victim2, kme, kme, {})
    assert victim2.ready and victim2.session.auth == AUTH_PSK  # type: ignore[union-attr]


def test_stolen_psk_impersonates_the_other_side_only_with_kme_access(pki_dir: Path,
                                                                     tmp_path: Path) -> None:
    """A PSK is symmetric, so a thief of A's copy can also pose as B to A (the
    key-compromise impersonation a signature would prevent). Without B's KME it has no
    QKD key, and A's key confirmation fails."""
    sa, _sb, kme = _established(pki_dir, tmp_path)
    thief = _stolen_copy(sa, tmp_path, "thief")
    # The thief acts as B's responder, with the responder's view of the same epochs.
    epoch = sa.store.offer().epoch  # type: ignore[union-attr]
    as_b = Site(tmp_path / "as-b.sqlite", "site-a")
    as_b.store._commit({"current": thief.store.offer()})  # type: ignore[dict-item]
    assert as_b.store.lookup(epoch) is not None
    victim = TunnelConnection(initiator=True,
                              params=params(pki_dir, "site-a", "site-b", psk_book=sa.store))
    attacker = TunnelConnection(initiator=False,
                                params=params(pki_dir, "site-b", "site-a", psk_book=as_b.store))
    _ea, _ = run(victim, attacker, kme, FakeKmePair(), {})
    assert not victim.ready
    # Positive control: with B's KME (the real pool), the impersonation succeeds.
    victim2 = TunnelConnection(initiator=True,
                               params=params(pki_dir, "site-a", "site-b", psk_book=sa.store))
    attacker2 = TunnelConnection(initiator=False,
                                 params=params(pki_dir, "site-b", "site-a", psk_book=as_b.store))
    run(victim2, attacker2, kme, kme, {})
    assert victim2.ready


def test_stolen_psk_with_degraded_policy_is_enough(pki_dir: Path, tmp_path: Path) -> None:
    """Written down in docs/security.md: where both sites allow the ML-KEM-only mode and
    the victim's own KME has no key for it (or cannot be reached), a PSK thief without
    any KME gets a session. With the default policy, or a victim KME holding keys, it
    does not."""
    sa = Site(tmp_path / "a.sqlite", "site-b")
    sb = Site(tmp_path / "b.sqlite", "site-a")
    kme = FakeKmePair()
    pa = params(pki_dir, "site-a", "site-b", DEGRADED, psk_book=sa.store)
    pb = params(pki_dir, "site-b", "site-a", DEGRADED, psk_book=sb.store)
    for _ in range(2):
        run(TunnelConnection(initiator=True, params=pa), TunnelConnection(initiator=False,
            params=pb), kme, kme, {"a": sa, "b": sb})
    thief = _stolen_copy(sa, tmp_path, "thief")
    attacker = TunnelConnection(initiator=True, params=params(
        pki_dir, "site-a", "site-b", DEGRADED, psk_book=thief.store))
    victim = TunnelConnection(initiator=False, params=pb)
    run(attacker, victim, None, None, {})
    assert victim.ready and victim.session.mode == MODE_MLKEM_ONLY  # type: ignore[union-attr]
    # ...but only because the victim's own KME is out of reach too. While the victim's
    # KME holds keys (the QKD link is up), the same thief is refused: the victim decides
    # about ML-KEM-only from its own KME, not from the initiator's claim.
    attacker = TunnelConnection(initiator=True, params=params(
        pki_dir, "site-a", "site-b", DEGRADED, psk_book=thief.store))
    victim_with_kme = TunnelConnection(initiator=False, params=pb)
    _, eb = run(attacker, victim_with_kme, None, kme, {})
    assert not victim_with_kme.ready
    term = [e for e in eb if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.QKD_UNAVAILABLE and "holds keys" in term[0].reason
    # Default policy at the victim: the same thief is refused.
    victim_strict = TunnelConnection(initiator=False, params=params(
        pki_dir, "site-b", "site-a", psk_book=sb.store))
    attacker = TunnelConnection(initiator=True, params=params(
        pki_dir, "site-a", "site-b", DEGRADED, psk_book=thief.store))
    run(attacker, victim_strict, None, None, {})
    assert not victim_strict.ready


def test_stolen_signing_key_cannot_restart_the_chain(pki_dir: Path, tmp_path: Path) -> None:
    """After bootstrap a signing key (or a broken signature scheme) no longer opens a
    tunnel: the responder refuses PKI unless the operator allows a re-bootstrap."""
    _sa, sb, kme = _established(pki_dir, tmp_path)
    # The thief has A's signing key and certificate (params() loads them) and even A's
    # KME access, but no PSK state: it can only offer PKI.
    attacker = TunnelConnection(initiator=True, params=params(
        pki_dir, "site-a", "site-b", psk_book=Site(tmp_path / "t.sqlite", "site-b").store))
    victim = TunnelConnection(initiator=False,
                              params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    _, eb = run(attacker, victim, kme, kme, {})
    term = [e for e in eb if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.ACCESS_DENIED
    # Positive control: with re-bootstrap allowed, the same signing key gets in.
    sb.store.pki_rebootstrap = True
    attacker = TunnelConnection(initiator=True, params=params(
        pki_dir, "site-a", "site-b", psk_book=Site(tmp_path / "t2.sqlite", "site-b").store))
    victim = TunnelConnection(initiator=False,
                              params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    run(attacker, victim, kme, kme, {})
    assert victim.ready


@pytest.mark.parametrize("live", [True, False])
def test_replayed_psk_handshake_is_refused(pki_dir: Path, tmp_path: Path, live: bool) -> None:
    sa, sb, kme = _established(pki_dir, tmp_path)
    recorded = connect(pki_dir, sa, sb, kme)  # a PSK tunnel; its first flight is recorded
    assert recorded.ready
    if not live:
        recorded.a.close()
        recorded.b.receive_data(b"".join(recorded.a.data_to_send()), 0.0)
    state = sb.store.status()
    fetches = len(kme.fetches)
    replay_target = TunnelConnection(initiator=False,
                                     params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    replay_target.receive_data(recorded.client_flights[0], 0.0)
    events = list(iter(replay_target.next_event, None))
    for e in events:
        if isinstance(e, ev.QkdKeysToFetch):
            keys = kme.dec(e.key_ids)
            assert keys is None  # the KME already delivered those keys
            replay_target.qkd_keys_rejected(e.handshake_id, "key IDs already used", 0.0)
    events += list(iter(replay_target.next_event, None))
    term = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code in (ErrorCode.UNKNOWN_PSK, ErrorCode.QKD_KEY_REJECTED)
    assert not replay_target.ready
    assert sb.store.status() == state  # the replay changed nothing
    assert len(kme.fetches) <= fetches + 1
    if live:
        assert recorded.a.ready and recorded.b.ready  # the live tunnel is untouched
    # Positive control: a KME that would hand the same keys out again lets the replay
    # through the QKD step, which is why the store's once-only delivery matters.
    kme.delivered_dec.clear()
    again = TunnelConnection(initiator=False,
                             params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    again.receive_data(recorded.client_flights[0], 0.0)
    evs = list(iter(again.next_event, None))
    fetch = [e for e in evs if isinstance(e, ev.QkdKeysToFetch)]
    # The replayed epoch is B's "previous" (one retry), so the once-only QKD key is the
    # guard that stopped it; the replayer would still lack the ML-KEM and PSK secrets.
    assert fetch and kme.dec(fetch[0].key_ids) is not None


def test_psk_hello_without_the_psk_costs_no_kme_request(pki_dir: Path, tmp_path: Path) -> None:
    """The epoch travels in the clear; the binder (an HMAC under the PSK) is checked
    before the responder asks its KME for anything."""
    from dataclasses import replace

    from gateway.tunnel.handshake import ClientHello, psk_binder
    from gateway.tunnel.record import RecordLayer, RecordReader

    sa, sb, kme = _established(pki_dir, tmp_path)
    honest = connect(pki_dir, sa, sb, kme)
    reader = RecordReader()
    reader.feed(honest.client_flights[0])
    record = reader.next_record()
    assert record is not None
    hello = ClientHello.decode(bytes(record[3]))
    current = sb.store.status().current_epoch
    forged = replace(hello, psk_epoch=current, qkd_key_ids=("made-up",),
                     psk_binder=b"\x00" * 48)

    def first_flight(h: ClientHello) -> bytes:
        return RecordLayer().seal_plaintext_handshake(h.encode())

    victim = TunnelConnection(initiator=False,
                              params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    victim.receive_data(first_flight(forged), 0.0)
    events = list(iter(victim.next_event, None))
    assert not any(isinstance(e, ev.QkdKeysToFetch) for e in events)
    term = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.HANDSHAKE_FAILURE and "binder" in term[0].reason
    # Positive control: the thief of the PSK computes the right binder and gets as far
    # as the KME request (where its made-up key ID then fails).
    key = sb.store.lookup(current)
    assert key is not None
    good = replace(forged, psk_binder=psk_binder(key.key, forged))
    victim2 = TunnelConnection(initiator=False,
                               params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    victim2.receive_data(first_flight(good), 0.0)
    assert any(isinstance(e, ev.QkdKeysToFetch) for e in iter(victim2.next_event, None))
