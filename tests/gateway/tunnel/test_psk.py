"""PSK authentication after bootstrap: epochs, persistence, and every interruption point.

Each scenario runs two sites with real SQLite PSK stores, cuts a handshake at one point
(a lost flight, or a crash before or after a store write), restarts both sites from
their files, and checks that they reconnect in a bounded number of attempts without a
PKI re-bootstrap, agree on the PSK, and never accept a superseded epoch again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.runtime.psk_store import PskStore
from gateway.tunnel import events as ev
from gateway.tunnel.connection import ConnectionSettings, TunnelConnection
from gateway.tunnel.handshake import AUTH_PKI, AUTH_PSK, PskKey
from gateway.tunnel.wire import ErrorCode
from tests.support.psk_sites import CUTS, PSK_EVENTS, Site, connect, reconnect
from tests.support.tunnel_harness import FakeKmePair, params


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Site, Site]:
    return Site(tmp_path / "a" / "psk.sqlite", "site-b"), \
        Site(tmp_path / "b" / "psk.sqlite", "site-a")


def test_bootstrap_by_pki_then_psk_without_signatures(pki_dir: Path, sites: tuple[Site, Site],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    first = connect(pki_dir, sa, sb, kme)
    assert first.ready
    assert first.completed("a").auth == first.completed("b").auth == AUTH_PKI  # type: ignore[union-attr]
    assert sa.store.status().current_epoch == sb.store.status().current_epoch == 1
    # From now on no signature is made or checked: break signing to prove it.
    import gateway.tunnel.handshake as hs_mod

    def no_signatures(*_a: object, **_k: object) -> bytes:
        raise AssertionError("a PSK handshake must not sign")

    monkeypatch.setattr(hs_mod.pqc_sig, "sign", no_signatures)
    monkeypatch.setattr(hs_mod.pqc_sig, "verify", no_signatures)
    for expected in (2, 3, 4):
        att = connect(pki_dir, sa, sb, kme)
        assert att.ready
        done_a, done_b = att.completed("a"), att.completed("b")
        assert done_a is not None and done_b is not None
        assert done_a.auth == done_b.auth == AUTH_PSK
        assert done_a.psk_epoch == done_b.psk_epoch == expected - 1
        assert sa.store.status().current_epoch == sb.store.status().current_epoch == expected
    # The stores hold the same key for the shared epoch, and it changes every session.
    key_a = sa.store.offer()
    key_b = sb.store.lookup(4)
    assert key_a is not None and key_b is not None and key_a.key == key_b.key
    assert sb.store.lookup(2) is None  # two sessions back: gone


def test_psk_depends_on_the_session_qkd_key(pki_dir: Path, sites: tuple[Site, Site]) -> None:
    """The next PSK is a key-schedule output, so it mixes the session's QKD key: two
    sessions with everything else fixed but the QKD key give different PSKs."""
    from gateway.tunnel.key_schedule import HybridKeySchedule

    th = b"\x01" * 48
    ss = b"\x02" * 32
    k1 = HybridKeySchedule(ss, b"\x03" * 32).session_keys(th).next_psk
    k2 = HybridKeySchedule(ss, b"\x04" * 32).session_keys(th).next_psk
    assert k1 != k2
    sa, sb = sites
    kme = FakeKmePair()
    connect(pki_dir, sa, sb, kme)
    psk1 = sa.store.offer()
    connect(pki_dir, sa, sb, kme)
    psk2 = sa.store.offer()
    assert psk1 is not None and psk2 is not None and psk1.key != psk2.key


@pytest.mark.parametrize("stage", ["bootstrap", "psk"])
@pytest.mark.parametrize("cut", list(CUTS))
def test_every_interruption_point_recovers(pki_dir: Path, sites: tuple[Site, Site],
                                           cut: str, stage: str) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    if stage == "psk":
        assert connect(pki_dir, sa, sb, kme).ready
        assert connect(pki_dir, sa, sb, kme).ready
    before = sb.store.status().current_epoch
    broken = connect(pki_dir, sa, sb, kme, cut=cut)
    # The last cut comes after the tunnel was up; the process dies all the same.
    assert not broken.ready or cut == "initiator_crash_before_promoting"
    sa.restart()
    sb.restart()
    att, attempts = reconnect(pki_dir, sa, sb, kme)
    done_a = att.completed("a")
    assert done_a is not None
    # Recovery never needs the signing keys once a PSK is shared; only a bootstrap that
    # never completed on the responder bootstraps again.
    responder_had_psk = before > 0 or cut in (
        "lost_handshake_done", "initiator_crash_before_promoting")
    assert done_a.auth == (AUTH_PSK if responder_had_psk else AUTH_PKI)
    assert attempts <= 2
    st_a, st_b = sa.store.status(), sb.store.status()
    assert st_a.pending_epoch == 0  # promoted by HandshakeDone
    assert st_a.current_epoch == st_b.current_epoch > 0
    assert not st_a.out_of_step
    # A later connection runs on the newest epoch.
    again = connect(pki_dir, sa, sb, kme)
    assert again.ready and again.completed("a").psk_epoch == st_b.current_epoch  # type: ignore[union-attr]


def test_superseded_epoch_is_refused_even_when_replayed(pki_dir: Path,
                                                         sites: tuple[Site, Site]) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    connect(pki_dir, sa, sb, kme)  # PKI, epoch 1
    psk1 = sa.store.offer()
    assert psk1 is not None and psk1.epoch == 1
    recorded = connect(pki_dir, sa, sb, kme)  # PSK epoch 1 -> 2
    old_hello_flight = recorded.client_flights[0]
    assert connect(pki_dir, sa, sb, kme).ready  # epoch 2 -> 3; epoch 1 is gone
    responder = TunnelConnection(initiator=False,
                                 params=params(pki_dir, "site-b", "site-a", psk_book=sb.store))
    responder.receive_data(old_hello_flight, 0.0)
    events = []
    while (e := responder.next_event()) is not None:
        events.append(e)
    term = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.UNKNOWN_PSK
    assert not any(isinstance(e, ev.QkdKeysToFetch) for e in events)
    # Positive control: the same recorded hello, offered to a responder that still
    # holds epoch 1 (say, restored from a backup), gets past the epoch and binder checks
    # and asks its KME for the QKD key, which the KME's once-only delivery then refuses.
    stale = Site(sb.path.parent / "stale.sqlite", "site-a")
    stale.store._commit({"current": psk1})
    control = TunnelConnection(initiator=False,
                               params=params(pki_dir, "site-b", "site-a", psk_book=stale.store))
    control.receive_data(old_hello_flight, 0.0)
    assert any(isinstance(e, ev.QkdKeysToFetch) for e in iter(control.next_event, None))


def test_previous_epoch_is_accepted_for_one_retry_only(pki_dir: Path,
                                                       sites: tuple[Site, Site]) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    connect(pki_dir, sa, sb, kme)  # epoch 1 at both
    assert connect(pki_dir, sa, sb, kme).ready  # responder: current 2, previous 1
    # An initiator that lost epoch 2 (say, restored from an old backup) retries with 1.
    old = PskKey(1, sb.store.lookup(1).key)  # type: ignore[union-attr]
    sa.store._commit({"current": old, "pending": None})
    retry = connect(pki_dir, sa, sb, kme)
    assert retry.ready and retry.completed("b").psk_epoch == 1  # type: ignore[union-attr]
    # Epoch 1 is spent: offering it again fails, with no QKD key fetched for it.
    sa.store._commit({"current": old, "pending": None})
    fetched = len(kme.fetches)
    again = connect(pki_dir, sa, sb, kme)
    assert not again.ready
    assert again.terminated("b").code == ErrorCode.UNKNOWN_PSK  # type: ignore[union-attr]
    assert len(kme.fetches) == fetched


def test_pki_rebootstrap_only_when_policy_allows(pki_dir: Path, tmp_path: Path) -> None:
    kme = FakeKmePair()
    sa = Site(tmp_path / "a.sqlite", "site-b")
    sb = Site(tmp_path / "b.sqlite", "site-a")
    assert connect(pki_dir, sa, sb, kme).ready
    # Site A loses its state entirely (new disk): it can only offer PKI.
    sa.store.reset()
    refused = connect(pki_dir, sa, sb, kme)
    assert not refused.ready
    term = refused.terminated("b")
    assert term is not None and term.code == ErrorCode.ACCESS_DENIED
    assert "pki_rebootstrap" in term.reason
    # Allowed on the responder: the PKI handshake goes through and restarts the chain.
    sb.rebootstrap = True
    sb.restart()
    att = connect(pki_dir, sa, sb, kme)
    assert att.ready and att.completed("b").auth == AUTH_PKI  # type: ignore[union-attr]
    assert sb.store.status().bootstraps == 2  # the first bootstrap and this re-bootstrap
    assert sb.store.lookup(1) is None  # the old chain is void
    assert sa.store.status().current_epoch == sb.store.status().current_epoch


def test_responder_state_lost_initiator_stuck_unless_rebootstrap(pki_dir: Path,
                                                                 tmp_path: Path) -> None:
    kme = FakeKmePair()
    sa = Site(tmp_path / "a.sqlite", "site-b")
    sb = Site(tmp_path / "b.sqlite", "site-a")
    assert connect(pki_dir, sa, sb, kme).ready
    sb.store.reset()
    stuck = connect(pki_dir, sa, sb, kme)
    assert not stuck.ready
    assert any(isinstance(e, ev.PskRejected) for e in stuck.events_a)
    assert sa.store.out_of_step
    assert sa.store.offer() is not None  # keeps trying the PSK: no silent PKI fallback
    assert not connect(pki_dir, sa, sb, kme).ready
    # With re-bootstrap allowed at the initiator, the next connection uses PKI.
    sa.store.pki_rebootstrap = True
    att = connect(pki_dir, sa, sb, kme)
    assert att.ready and att.completed("a").auth == AUTH_PKI  # type: ignore[union-attr]
    assert not sa.store.out_of_step
    assert connect(pki_dir, sa, sb, kme).completed("a").auth == AUTH_PSK  # type: ignore[union-attr]


def test_rekeys_advance_the_psk_and_a_drop_mid_rekey_recovers(pki_dir: Path,
                                                               sites: tuple[Site, Site]) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    settings = ConnectionSettings(rekey_interval=10.0)
    att = connect(pki_dir, sa, sb, kme, settings=settings)
    assert att.ready
    epoch_before = sb.store.status().current_epoch
    # Drive one in-tunnel rekey but lose the connection right after the initiator's
    # Finished left (the initiator stored its pending PSK, the responder never saw it).
    att.a.handle_timer(11.0)
    fin_sent = False
    for _ in range(20):
        for e in iter(att.a.next_event, None):
            if isinstance(e, ev.QkdKeysRequested):
                att.a.supply_qkd_keys(e.handshake_id, kme.enc(e.number, e.size_bits) or [], 0)
            elif isinstance(e, PSK_EVENTS):
                sa.store.apply(e)
                fin_sent = True
        out = b"".join(att.a.data_to_send())
        if fin_sent:
            break
        if out:
            att.b.receive_data(out, 0.0)
        for e in iter(att.b.next_event, None):
            if isinstance(e, ev.QkdKeysToFetch):
                att.b.supply_qkd_keys(e.handshake_id, kme.dec(e.key_ids) or [], 0)
            elif isinstance(e, PSK_EVENTS):
                sb.store.apply(e)
        back = b"".join(att.b.data_to_send())
        if back:
            att.a.receive_data(back, 0.0)
    assert fin_sent
    assert sa.store.status().pending_epoch > epoch_before == sb.store.status().current_epoch
    sa.restart()
    sb.restart()
    again, attempts = reconnect(pki_dir, sa, sb, kme)
    assert attempts == 2  # one "unknown PSK", then the current epoch
    assert again.completed("a").auth == AUTH_PSK  # type: ignore[union-attr]
    assert sa.store.status().current_epoch == sb.store.status().current_epoch


def test_store_files_are_owner_only_and_keys_stay_out_of_reprs(sites: tuple[Site, Site],
                                                                pki_dir: Path) -> None:
    sa, sb = sites
    connect(pki_dir, sa, sb, FakeKmePair())
    assert (sa.path.stat().st_mode & 0o777) == 0o600
    key = sa.store.offer()
    assert key is not None
    for text in (repr(key), repr(sa.store), repr(sa.store.status()),
                 repr(ev.NextPskDerived(epoch=1, psk=key.key))):
        assert key.key.hex() not in text and repr(key.key) not in text


def test_mismatched_psk_setting_is_a_clear_policy_error(pki_dir: Path, tmp_path: Path) -> None:
    sa = Site(tmp_path / "a.sqlite", "site-b")
    a = TunnelConnection(initiator=True,
                         params=params(pki_dir, "site-a", "site-b", psk_book=sa.store))
    b = TunnelConnection(initiator=False, params=params(pki_dir, "site-b", "site-a"))
    kme = FakeKmePair()
    a.start(0.0)
    for e in iter(a.next_event, None):
        if isinstance(e, ev.QkdKeysRequested):
            a.supply_qkd_keys(e.handshake_id, kme.enc(e.number, e.size_bits) or [], 0)
    b.receive_data(b"".join(a.data_to_send()), 0.0)
    term = [e for e in iter(b.next_event, None) if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].code == ErrorCode.POLICY_MISMATCH and "[auth] psk" in term[0].reason


def test_psk_cli_shows_epochs_and_resets(tmp_path: Path, pki_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    from gateway.cli import main
    from gateway.config import GatewayConfig

    repo = Path(__file__).resolve().parents[3]
    shutil.copytree(pki_dir, tmp_path / "pki")
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "site-a.toml"
    cfg.write_text((repo / "configs" / "site-a.toml").read_text())
    config = GatewayConfig.load(cfg)
    store = PskStore(config.state_dir / "psk.sqlite", "site-b")
    store._commit({"current": PskKey(7, b"\x42" * 48)}, bootstrap=True)
    store.close()
    assert main(["psk", "show", "--config", str(cfg)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["current_epoch"] == 7 and shown["bootstraps"] == 1
    assert "42" * 8 not in json.dumps(shown)
    assert main(["psk", "reset", "--config", str(cfg)]) == 2  # needs --yes
    assert "--yes" in capsys.readouterr().err
    assert main(["psk", "reset", "--config", str(cfg), "--yes"]) == 0
    assert main(["psk", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    after = json.loads(out[out.rindex("{\n"):])
    assert after["current_epoch"] is None and after["max_epoch"] == 7



def _forged_refusal(pki: Path, sa: Site, kme: FakeKmePair) -> ev.PskRejected | None:
    """An on-path attacker swallows the ClientHello and answers with a plaintext
    UNKNOWN_PSK alert of its own: no secret needed."""
    from gateway.tunnel.handshake import encode_alert
    from gateway.tunnel.record import RecordLayer

    a = TunnelConnection(initiator=True, params=params(pki, "site-a", "site-b",
                                                       psk_book=sa.store))
    a.start(0.0)
    for e in iter(a.next_event, None):
        if isinstance(e, ev.QkdKeysRequested):
            a.supply_qkd_keys(e.handshake_id, kme.enc(e.number, e.size_bits) or [], 0.0)
    a.data_to_send()  # the hello goes nowhere
    alert = encode_alert(ErrorCode.UNKNOWN_PSK, "forged")
    a.receive_data(RecordLayer().seal_plaintext_handshake(alert), 0.0)
    rejected = None
    for e in iter(a.next_event, None):
        if isinstance(e, PSK_EVENTS):
            sa.store.apply(e)
            rejected = e if isinstance(e, ev.PskRejected) else rejected
    return rejected


def test_forged_refusals_never_strand_the_pair(pki_dir: Path, tmp_path: Path) -> None:
    """Alerts are unauthenticated: refusals never delete a PSK, so an attacker who
    forges them (between lost HandshakeDones) only costs reconnects, never a PKI
    downgrade or an operator reset."""
    sa = Site(tmp_path / "a.sqlite", "site-b")
    sb = Site(tmp_path / "b.sqlite", "site-a")
    kme = FakeKmePair()
    assert connect(pki_dir, sa, sb, kme).ready
    assert connect(pki_dir, sa, sb, kme).ready
    for _ in range(3):
        assert not connect(pki_dir, sa, sb, kme, cut="lost_handshake_done").ready
        assert _forged_refusal(pki_dir, sa, kme) is not None
    att, attempts = reconnect(pki_dir, sa, sb, kme, max_attempts=3)
    assert att.completed("a").auth == AUTH_PSK  # type: ignore[union-attr]
    assert attempts <= 2
    assert not sa.store.out_of_step
    assert sa.store.status().current_epoch == sb.store.status().current_epoch
    assert sb.store.status().bootstraps == 1  # never re-bootstrapped by PKI


def test_one_forged_refusal_does_not_downgrade_to_pki(pki_dir: Path, tmp_path: Path) -> None:
    """With re-bootstrap allowed, PKI is tried only after every PSK we hold was refused
    REBOOTSTRAP_AFTER rounds in a row; a single forged alert costs one reconnect.
    (A forger who keeps it up can force the re-bootstrap: docs/security.md.)"""
    from gateway.runtime.psk_store import REBOOTSTRAP_AFTER

    sa = Site(tmp_path / "a.sqlite", "site-b", rebootstrap=True)
    sb = Site(tmp_path / "b.sqlite", "site-a", rebootstrap=True)
    kme = FakeKmePair()
    assert connect(pki_dir, sa, sb, kme).ready
    assert _forged_refusal(pki_dir, sa, kme) is not None
    assert sa.store.offer() is not None  # still a PSK, not PKI
    assert connect(pki_dir, sa, sb, kme).completed("a").auth == AUTH_PSK  # type: ignore[union-attr]
    # Positive control: refusals of every PSK for REBOOTSTRAP_AFTER rounds do fall
    # back to PKI, which the responder (allowing it) accepts.
    # Each forged refusal below is one connection attempt; the first that offers PKI
    # has no PSK for the attacker to refuse, so _forged_refusal returns None.
    pki_at = next(i for i in range(1, 10) if _forged_refusal(pki_dir, sa, kme) is None)
    assert pki_at == REBOOTSTRAP_AFTER + 1


def test_out_of_step_clears_on_success(pki_dir: Path, sites: tuple[Site, Site]) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    connect(pki_dir, sa, sb, kme)
    assert _forged_refusal(pki_dir, sa, kme) is not None
    assert sa.store.out_of_step  # every PSK we hold was "refused"
    assert connect(pki_dir, sa, sb, kme).ready  # ...but the real peer still takes it
    assert not sa.store.out_of_step


def test_handshake_finishing_late_cannot_overwrite_a_newer_psk(pki_dir: Path,
                                                               sites: tuple[Site, Site]) -> None:
    """An attacker holds back the initiator's Finished of one connection while a later
    connection completes; released afterwards, it must not replace the newer PSK."""
    from gateway.runtime.psk_store import StalePskUpdate

    sa, sb = sites
    kme = FakeKmePair()
    connect(pki_dir, sa, sb, kme)
    # Connection 1 up to the initiator's Finished, which the attacker keeps.
    held = connect(pki_dir, sa, sb, kme, cut="lost_initiator_finished")
    finished_flight = held.client_flights[-1]
    # The initiator gives up on it; the pending PSK is refused, it falls back.
    sa.restart()
    reconnect(pki_dir, sa, sb, kme)
    state = sb.store.status()
    # The held Finished arrives at the old responder connection now.
    held.b.receive_data(finished_flight, 0.0)
    late = [e for e in iter(held.b.next_event, None) if isinstance(e, ev.NextPskDerived)]
    assert late, "the late Finished completed the old handshake"
    with pytest.raises(StalePskUpdate):
        sb.store.apply(late[0])
    assert sb.store.status() == state
    # The live tunnel's PSK still works for the next connection.
    assert connect(pki_dir, sa, sb, kme).completed("a").auth == AUTH_PSK  # type: ignore[union-attr]


def test_held_finished_released_in_time_is_accepted(pki_dir: Path,
                                                    sites: tuple[Site, Site]) -> None:
    """The control for the test above: the same held Finished, released before any
    other handshake completed, is an ordinary (slow) handshake and is stored."""
    sa, sb = sites
    kme = FakeKmePair()
    connect(pki_dir, sa, sb, kme)
    held = connect(pki_dir, sa, sb, kme, cut="lost_initiator_finished")
    held.b.receive_data(held.client_flights[-1], 0.0)
    late = [e for e in iter(held.b.next_event, None) if isinstance(e, ev.NextPskDerived)]
    assert late
    sb.store.apply(late[0])
    assert sb.store.status().current_epoch == late[0].epoch


def test_concurrent_handshakes_get_distinct_epochs(tmp_path: Path) -> None:
    store = PskStore(tmp_path / "r.sqlite", "site-a")
    store._commit({"current": PskKey(5, b"\x01" * 48)})
    assert [store.next_epoch() for _ in range(3)] == [6, 7, 8]


def test_peek_does_not_count_an_attempt(pki_dir: Path, tmp_path: Path) -> None:
    """The runtime looks (peek) before it dials and offers once per connection: looking
    must not use up a round, or the PKI fallback would come early or never."""
    from gateway.runtime.psk_store import REBOOTSTRAP_AFTER

    sa = Site(tmp_path / "a.sqlite", "site-b", rebootstrap=True)
    sb = Site(tmp_path / "b.sqlite", "site-a", rebootstrap=True)
    kme = FakeKmePair()
    assert connect(pki_dir, sa, sb, kme).ready
    offered = []
    for _ in range(REBOOTSTRAP_AFTER + 1):
        for _ in range(5):
            sa.store.peek()
        offered.append(_forged_refusal(pki_dir, sa, kme) is not None)
    assert offered == [True] * REBOOTSTRAP_AFTER + [False]
