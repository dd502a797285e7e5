"""Downgrades an on-path attacker might force (issue 9.3 and 9.5): ML-KEM-only by
replaying the first flight, ML-KEM-only by claiming that a KME has no key, and
ML-KEM-1024 -> 768 with both configured.

The relay tests run real gateways and KMEs through `mitm_relay.MitmRelay`; each has a
positive control that switches the protection off through a test-only hook
(`legacy_qkd_degrade` restores the degrade rules as they were before the fix, and
`_check_kem_choice` is the responder's KEM-choice check) and shows the attack then
reaches its goal. The sans-I/O tests pin the rules one by one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.tunnel import events as ev
from gateway.tunnel import handshake as hs_mod
from gateway.tunnel.handshake import (
    MODE_HYBRID,
    MODE_MLKEM_ONLY,
    QKD_NO_KEY,
    QKD_UNREACHABLE,
    ClientHello,
    HandshakePolicy,
    KeyLogEntry,
    ServerHello,
)
from gateway.tunnel.wire import ErrorCode
from pqc.factory import get_kem
from qkd.etsi014.client import KmeNoKey
from tests.support.handshake_attacks import _NeverSeen, assert_no_session, keylog_into, wait_failure
from tests.support.mitm_relay import (
    A2B,
    B2A,
    ReplayOnSideConnection,
    Sites,
    TamperHandshake,
    legacy_qkd_degrade,
    rewrite_hello,
)
from tests.support.tunnel_harness import FakeKmePair, make_pair, serve_qkd

CH, SH = hs_mod.MSG_CLIENT_HELLO, hs_mod.MSG_SERVER_HELLO
DEGRADED = HandshakePolicy(allowed_modes=(MODE_HYBRID, MODE_MLKEM_ONLY))
BOTH_DEGRADED = {"allow_degraded": True}


def terminated(events: list[ev.Event]) -> ev.ConnectionTerminated | None:
    found = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    return found[-1] if found else None


async def mlkem_only_sessions(sites: Sites, site: str) -> float:
    return sum([await sites.counter(site, "qkdgw_handshakes_total", auth=auth,
                                    mode=MODE_MLKEM_ONLY) for auth in ("pki", "psk", "chain")])


def forget_key_ids(gw: Any) -> None:
    """B's key-ID memory is empty (bounded, not persisted: e.g. B restarted), so only
    the KME's once-only delivery sees the replay."""
    gw.used_key_ids = _NeverSeen()


# ---------------------------------------------- 9.3: replayed first flight (relay)


@pytest.mark.parametrize("guard", ["replay_memory", "kme"])
async def test_replayed_first_flight_cannot_force_mlkem_only(sites: Sites, guard: str) -> None:
    attack = ReplayOnSideConnection()
    await sites.start(a=BOTH_DEGRADED, b=BOTH_DEGRADED, strategy=lambda: attack,
                      setup_b=forget_key_ids if guard == "kme" else None)
    await wait_failure(sites, "site-b", ErrorCode.QKD_KEY_REJECTED)
    assert attack.fired.is_set()
    # The side connection really spent the key IDs: B answered it with a ServerHello.
    assert attack.side_answer[:1] == [SH]
    kind = "replayed_key_id" if guard == "replay_memory" else "KmeRejected"
    assert await sites.counter("site-b", "qkdgw_kme_errors_total", kind=kind) >= 1
    assert await sites.counter("site-a", "qkdgw_handshake_failures_total",
                               reason=str(int(ErrorCode.QKD_KEY_REJECTED))) >= 1
    for site in ("site-a", "site-b"):
        assert await mlkem_only_sessions(sites, site) == 0
        assert await sites.counter(site, "qkdgw_degraded") == 0
    assert sites.log_events("tunnel.qkd_key_id_replayed") or guard == "kme"
    # The next, unattacked connection is a normal hybrid session.
    await sites.recover()
    assert sites.tunnel_of("site-a").conn.session.mode == MODE_HYBRID
    assert sites.tunnel_of("site-b").conn.session.mode == MODE_HYBRID


@pytest.mark.parametrize("guard", ["replay_memory", "kme"])
async def test_positive_control_replayed_first_flight_forced_mlkem_only_before_the_fix(
        sites: Sites, guard: str, monkeypatch: pytest.MonkeyPatch) -> None:
    legacy_qkd_degrade(monkeypatch)
    attack = ReplayOnSideConnection()
    await sites.start(a=BOTH_DEGRADED, b=BOTH_DEGRADED, strategy=lambda: attack,
                      setup_b=forget_key_ids if guard == "kme" else None)
    await sites.wait_tunnel()
    assert attack.fired.is_set() and attack.side_answer[:1] == [SH]
    # The attacker chose the mode: both sides run on ML-KEM alone although the QKD link
    # was up and A had fetched its keys.
    assert sites.tunnel_of("site-a").conn.session.mode == MODE_MLKEM_ONLY
    assert sites.tunnel_of("site-b").conn.session.mode == MODE_MLKEM_ONLY
    assert await sites.counter("site-b", "qkdgw_degraded") == 1


# ------------------------------ degraded only when each side's own KME has no key


def test_initiator_with_qkd_keys_never_accepts_mlkem_only(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A responder that (for whatever reason) falls back to ML-KEM-only is refused by an
    initiator holding QKD keys; the control shows the old initiator accepting it."""

    def always_degrade(self: Any, reason: str, status: str) -> None:
        self._qkd_keys = []
        self._send_server_flight(MODE_MLKEM_ONLY, status)

    def unavailable_dec(pair: Any) -> None:
        # The responder's KME cannot deliver the keys A named.
        def serve(conn: Any, event: ev.Event) -> None:
            if isinstance(event, ev.QkdKeysToFetch):
                conn.qkd_keys_unavailable(event.handshake_id, "KME down", pair.now,
                                          QKD_UNREACHABLE)
            else:
                serve_qkd(conn, event, pair.kme, pair.now)
        pair._serve = serve  # type: ignore[method-assign]

    monkeypatch.setattr(hs_mod.Handshake, "_dec_keys_failed", always_degrade)
    pair = make_pair(pki_dir, policy_a=DEGRADED, policy_b=DEGRADED, start=False)
    unavailable_dec(pair)
    pair.a.start(0.0)
    pair.pump()
    term = terminated(pair.events_a)
    assert not pair.a.ready and term is not None and term.code == ErrorCode.POLICY_MISMATCH
    assert "brought QKD keys" in term.reason
    # Positive control: without the initiator's rule the forced fallback gets through.
    monkeypatch.setattr(hs_mod.Handshake, "_refuse_mlkem_only_with_own_keys",
                        lambda self, ch: None)
    pair = make_pair(pki_dir, policy_a=DEGRADED, policy_b=DEGRADED, start=False)
    unavailable_dec(pair)
    pair.a.start(0.0)
    pair.pump()
    assert pair.a.ready and pair.a.session is not None
    assert pair.a.session.mode == MODE_MLKEM_ONLY


def test_responder_kme_failure_for_named_keys_never_degrades(pki_dir: Path) -> None:
    """Both allow ML-KEM-only, A fetched keys, B's KME is unreachable: the handshake
    fails (QKD_UNAVAILABLE), it does not fall back."""
    pair = make_pair(pki_dir, policy_a=DEGRADED, policy_b=DEGRADED, start=False)

    def serve(conn: Any, event: ev.Event) -> None:
        if isinstance(event, ev.QkdKeysToFetch):
            conn.qkd_keys_unavailable(event.handshake_id, "KME down", 0.0, QKD_UNREACHABLE)
        else:
            serve_qkd(conn, event, pair.kme)

    pair._serve = serve  # type: ignore[method-assign]
    pair.a.start(0.0)
    pair.pump()
    term = terminated(pair.events_b)
    assert term is not None and term.code == ErrorCode.QKD_UNAVAILABLE
    assert not pair.a.ready and not pair.b.ready


@pytest.mark.parametrize(("a_kme", "b_kme", "outcome"), [
    ("empty", "empty", (QKD_NO_KEY, QKD_NO_KEY)),
    ("unreachable", "empty", (QKD_UNREACHABLE, QKD_NO_KEY)),
    ("empty", "unreachable", (QKD_NO_KEY, QKD_UNREACHABLE)),
    ("unreachable", "has_keys", None),
])
def test_mlkem_only_needs_both_own_kmes_without_key(
        pki_dir: Path, a_kme: str, b_kme: str, outcome: tuple[str, str] | None) -> None:
    kmes = {"empty": FakeKmePair(available=0), "unreachable": None,
            "has_keys": FakeKmePair()}
    pair = make_pair(pki_dir, policy_a=DEGRADED, policy_b=DEGRADED, start=False)

    def serve(conn: Any, event: ev.Event) -> None:
        serve_qkd(conn, event, kmes[a_kme] if conn is pair.a else kmes[b_kme])

    pair._serve = serve  # type: ignore[method-assign]
    pair.a.start(0.0)
    pair.pump()
    if outcome is None:
        # A's own KME trouble is not B's: B's KME holds keys, so the link is up and B
        # refuses to run without them.
        term = terminated(pair.events_b)
        assert term is not None and term.code == ErrorCode.QKD_UNAVAILABLE
        assert "holds keys" in term.reason and not pair.a.ready
        return
    assert pair.a.ready and pair.b.ready
    sa, sb = pair.a.session, pair.b.session
    assert sa is not None and sb is not None
    assert sa.mode == sb.mode == MODE_MLKEM_ONLY
    # Each side's reason travels in its hello (in TH) and reaches the other.
    assert (sa.qkd_status, sa.peer_qkd_status) == outcome
    assert (sb.peer_qkd_status, sb.qkd_status) == outcome
    done = [e for e in pair.events_b if isinstance(e, ev.HandshakeCompleted)]
    assert done and (done[0].peer_qkd_status, done[0].qkd_status) == outcome
    assert pair.a.stats.degraded_handshakes == pair.b.stats.degraded_handshakes == 1


def test_hello_without_key_ids_must_say_why(pki_dir: Path) -> None:
    """A ClientHello without key IDs that claims QKD_OK (or with IDs that claims none) is
    a policy mismatch, checked before any KME request."""
    for change in ({"qkd_key_ids": ()}, {"qkd_status": QKD_NO_KEY}):
        pair = make_pair(pki_dir, start=False)

        def tamper(data: bytes, change: dict[str, Any] = change) -> bytes:
            from gateway.tunnel.record import HEADER_LEN

            if data[0] != 0x16 or data[HEADER_LEN] != CH:
                return data
            msg = rewrite_hello(data[HEADER_LEN:], **change)
            n = len(msg)
            return bytes((0x16, 0, n >> 16, (n >> 8) & 0xFF, n & 0xFF)) + msg

        pair.tamper_a2b = tamper
        pair.a.start(0.0)
        pair.pump()
        term = terminated(pair.events_b)
        assert term is not None and term.code == ErrorCode.POLICY_MISMATCH, change
        assert pair.kme.fetches == []


async def test_claimed_empty_kme_is_checked_at_the_responder(
        sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay strips the key IDs and claims A's KME has none; with the transcript
    binding switched off for exactly that message (so only the KME check is left), B
    asks its own KME, which holds keys, and refuses. Control: with B's KME reporting no
    key as well, B agrees and only A's rules remain (it fetched keys: it refuses)."""
    from tests.support.mitm_relay import unbind_transcript

    def strip(d: str, m: bytes) -> bytes:
        if d == A2B and m[0] == CH:
            return rewrite_hello(m, qkd_key_ids=(), qkd_status=QKD_NO_KEY)
        return m

    tamper = TamperHandshake(strip)
    unbind_transcript(monkeypatch, tamper.originals)
    await sites.start(a=BOTH_DEGRADED, b=BOTH_DEGRADED, strategy=lambda: tamper)
    await wait_failure(sites, "site-b", ErrorCode.QKD_UNAVAILABLE)
    assert sites.log_events("tunnel.closed", code_name="QKD_UNAVAILABLE")
    await assert_no_session(sites)

    async def no_key(slave: str) -> dict[str, Any]:
        raise KmeNoKey("KME: no key available (test)")

    monkeypatch.setattr(sites.b.kme, "status", no_key)
    await wait_failure(sites, "site-a", ErrorCode.POLICY_MISMATCH)
    assert any("brought QKD keys" in e.get("reason", "")
               for e in sites.log_events("tunnel.closed"))
    for site in ("site-a", "site-b"):
        assert await mlkem_only_sessions(sites, site) == 0


# -------------------------------------------- ML-KEM-1024 -> 768 (relay)

BOTH_KEMS = {"kem": "ML-KEM-1024", "accept_kems": ("ML-KEM-768",)}


def _attacker_ek() -> Any:
    return get_kem("ML-KEM-768").from_seed(os.urandom(64))


async def test_kem_downgrade_to_768_is_refused(sites: Sites) -> None:
    """Both sites accept ML-KEM-1024 and 768, A proposes 1024. The relay rewrites the
    hello to ask for 768 (with its own 768 key, the only way to make the sizes match).
    B refuses the choice as a downgrade before it encapsulates anything."""
    dk = _attacker_ek()
    logged: list[KeyLogEntry] = []

    def to_768(d: str, m: bytes) -> bytes:
        if d == A2B and m[0] == CH:
            return rewrite_hello(m, kem="ML-KEM-768", encapsulation_key=dk.encapsulation_key)
        return m

    tamper = TamperHandshake(to_768)
    await sites.start(a=BOTH_KEMS, b=BOTH_KEMS, strategy=lambda: tamper,
                      setup_b=keylog_into(logged))
    await wait_failure(sites, "site-b", ErrorCode.POLICY_MISMATCH)
    assert any("refused as a downgrade" in e.get("reason", "")
               for e in sites.log_events("tunnel.closed"))
    assert not logged  # B never encapsulated to the attacker's key
    await assert_no_session(sites)
    await sites.recover()
    assert sites.tunnel_of("site-a").conn.session.kem == "ML-KEM-1024"
    assert sites.tunnel_of("site-b").conn.session.kem == "ML-KEM-1024"


async def test_positive_control_kem_downgrade_reaches_the_responder_without_the_check(
        sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    """With B's KEM-choice check off, the same rewrite gets B to run ML-KEM-768 with the
    attacker's key: B's ServerHello names 768 and B's ML-KEM secret is the attacker's.
    (The session still fails at A, which sees another KEM than it proposed; with one
    encapsulation key per hello the attacker cannot also fool A.)"""
    monkeypatch.setattr(hs_mod.Handshake, "_check_kem_choice", lambda self, ch: None)
    dk = _attacker_ek()
    stolen: list[bytes] = []
    logged: list[KeyLogEntry] = []

    def to_768(d: str, m: bytes) -> bytes:
        if d == A2B and m[0] == CH:
            return rewrite_hello(m, kem="ML-KEM-768", encapsulation_key=dk.encapsulation_key)
        if d == B2A and m[0] == SH and not stolen:
            sh = ServerHello.decode(m)
            assert sh.kem == "ML-KEM-768"
            stolen.append(dk.decapsulate(sh.ciphertext))
        return m

    await sites.start(a=BOTH_KEMS, b=BOTH_KEMS, strategy=lambda: TamperHandshake(to_768),
                      setup_b=keylog_into(logged))
    await wait_failure(sites, "site-a", ErrorCode.HANDSHAKE_FAILURE)
    assert stolen and logged and logged[0].mlkem_shared_secret == stolen[0]
    assert sites.log_events("tunnel.closed", reason="ServerHello names another KEM")


async def test_kem_offer_stripped_too_is_caught_by_the_initiator(sites: Sites) -> None:
    """The relay also removes 1024 from the offer, so B's check passes; A sees B answer
    with another KEM than it proposed (and the transcripts differ anyway)."""
    dk = _attacker_ek()

    def to_768(d: str, m: bytes) -> bytes:
        if d == A2B and m[0] == CH:
            return rewrite_hello(m, kem="ML-KEM-768", kems_offered=("ML-KEM-768",),
                                 encapsulation_key=dk.encapsulation_key)
        return m

    await sites.start(a=BOTH_KEMS, b=BOTH_KEMS, strategy=lambda: TamperHandshake(to_768))
    await wait_failure(sites, "site-a", ErrorCode.HANDSHAKE_FAILURE)
    await assert_no_session(sites)
    await sites.recover()
    assert sites.tunnel_of("site-a").conn.session.kem == "ML-KEM-1024"


def test_kem_choice_rule_accepts_honest_preferences(pki_dir: Path) -> None:
    """The rule does not get in the way: A proposes 768 first (B prefers 1024) and gets
    768; A proposes 1024 and gets 1024; a KEM B does not accept is UNSUPPORTED."""
    for a_kems, b_kems, expect in [
        (("ML-KEM-768", "ML-KEM-1024"), ("ML-KEM-1024", "ML-KEM-768"), "ML-KEM-768"),
        (("ML-KEM-1024", "ML-KEM-768"), ("ML-KEM-768", "ML-KEM-1024"), "ML-KEM-1024"),
        (("ML-KEM-1024",), ("ML-KEM-768",), None),
    ]:
        pair = make_pair(pki_dir, policy_a=HandshakePolicy(kems=a_kems),
                         policy_b=HandshakePolicy(kems=b_kems))
        if expect is None:
            term = terminated(pair.events_b)
            assert term is not None and term.code == ErrorCode.UNSUPPORTED
        else:
            assert pair.a.ready and pair.a.session is not None
            assert pair.a.session.kem == expect


def test_hello_fields_carry_the_qkd_status() -> None:
    ch = ClientHello(
        version="qkdgw/1", epoch=0, auth="pki", psk_epoch=0, kems_offered=("ML-KEM-768",),
        kem="ML-KEM-768", allowed_modes=(MODE_HYBRID, MODE_MLKEM_ONLY), initiator_id="a",
        responder_id="b", initiator_sae_id="a-gw", nonce=bytes(32),
        encapsulation_key=bytes(1184), qkd_key_size_bits=256, qkd_key_ids=(),
        stream_window=1, qkd_status=QKD_UNREACHABLE)
    assert ClientHello.decode(ch.encode()) == ch
    sh = ServerHello(version="qkdgw/1", kem="ML-KEM-768", mode=MODE_MLKEM_ONLY,
                     allowed_modes=(MODE_HYBRID,), responder_id="b", nonce=bytes(32),
                     ciphertext=b"c", stream_window=1, qkd_status=QKD_NO_KEY)
    assert ServerHello.decode(sh.encode()) == sh
