"""The sans-I/O tunnel end to end in memory: handshake, streams, rekeys, failures."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.tunnel import events as ev
from gateway.tunnel.connection import ConnectionSettings
from gateway.tunnel.handshake import MODE_HYBRID, MODE_MLKEM_ONLY, HandshakePolicy
from gateway.tunnel.record import RecordLimits
from gateway.tunnel.streams import StreamCode
from gateway.tunnel.wire import ErrorCode
from tests.support.tunnel_harness import (
    FakeKmePair,
    Pair,
    credentials,
    make_pair,
    params,
    traffic_secrets,
)

DEGRADED = HandshakePolicy(allowed_modes=(MODE_HYBRID, MODE_MLKEM_ONLY))


def terminated(events: list[ev.Event]) -> ev.ConnectionTerminated | None:
    found = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    return found[-1] if found else None


def transfer(pair: Pair, payload: bytes, service: str = "svc") -> bytes:
    """Send payload from A to B on a new stream, FIN it, and return what B received."""
    sid = pair.a.open_stream(service)
    received = bytearray()
    sent = 0
    for _ in range(10_000):
        window = pair.a.send_window(sid)
        if sent < len(payload) and window:
            chunk = payload[sent : sent + window]
            pair.a.send_stream_data(sid, chunk)
            sent += len(chunk)
            if sent == len(payload):
                pair.a.end_stream(sid)
        pair.pump()
        for e in list(pair.events_b):
            if isinstance(e, ev.StreamDataReceived) and e.stream_id == sid:
                received += e.data
                pair.b.stream_data_consumed(sid, len(e.data))
        ended = any(isinstance(e, ev.StreamEnded) and e.stream_id == sid for e in pair.events_b)
        pair.events_b.clear()
        if ended:
            return bytes(received)
    raise AssertionError("transfer did not finish")


def test_handshake_completes_with_matching_keys(pki_dir: Path) -> None:
    pair = make_pair(pki_dir)
    assert pair.a.ready and pair.b.ready
    sa, sb = pair.a.session, pair.b.session
    assert sa is not None and sb is not None
    assert sa.mode == sb.mode == MODE_HYBRID
    a_send, a_recv = traffic_secrets(pair.a)
    b_send, b_recv = traffic_secrets(pair.b)
    assert a_send == b_recv and a_recv == b_send and a_send != a_recv
    assert sa.keys.chain_key == sb.keys.chain_key
    # The session result keeps no traffic secret (the record layer owns and ratchets it).
    assert sa.keys.i2r_traffic == sa.keys.r2i_traffic == b""
    assert len(sa.qkd_key_ids) == 1 and sa.qkd_key_ids == sb.qkd_key_ids
    assert pair.kme.consumed == 1
    assert any(isinstance(e, ev.TunnelReady) for e in pair.events_a)
    assert any(isinstance(e, ev.TunnelReady) for e in pair.events_b)


def test_no_application_data_before_confirmation(pki_dir: Path) -> None:
    pair = make_pair(pki_dir, start=False)
    with pytest.raises(RuntimeError):
        pair.a.open_stream("svc")
    pair.a.start(0.0)
    # Run one flight at a time: the initiator must stay not-ready until HandshakeDone.
    for _ in range(3):
        pair.pump(rounds=1)
        if not pair.b.ready:
            assert not pair.a.ready
    pair.pump()
    assert pair.a.ready


def test_streams_carry_data_intact_both_ways(pki_dir: Path) -> None:
    pair = make_pair(pki_dir)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    got = transfer(pair, payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    # And from the responder's side.
    sid = pair.b.open_stream("back")
    assert sid % 2 == 0
    pair.b.send_stream_data(sid, b"pong")
    pair.b.end_stream(sid)
    pair.pump()
    data = b"".join(e.data for e in pair.events_a
                    if isinstance(e, ev.StreamDataReceived) and e.stream_id == sid)
    assert data == b"pong"
    assert any(isinstance(e, ev.StreamOpened) and e.service == "back" for e in pair.events_a)


def test_flow_control_stops_sender_at_window(pki_dir: Path) -> None:
    pair = make_pair(pki_dir)
    sid = pair.a.open_stream("svc")
    window = pair.a.send_window(sid)
    assert window == 1 << 20
    pair.a.send_stream_data(sid, b"x" * window)
    assert pair.a.send_window(sid) == 0
    with pytest.raises(ValueError):
        pair.a.send_stream_data(sid, b"y")
    pair.pump()
    assert pair.a.send_window(sid) == 0  # B's app has not consumed anything yet
    pair.b.stream_data_consumed(sid, window)
    pair.pump()
    assert pair.a.send_window(sid) == window


def test_rekey_on_timer_keeps_streams_and_changes_keys(pki_dir: Path) -> None:
    settings = ConnectionSettings(rekey_interval=10.0)
    pair = make_pair(pki_dir, settings=settings)
    old = pair.a.session
    assert old is not None
    old_secrets = traffic_secrets(pair.a)
    sid = pair.a.open_stream("svc")
    pair.a.send_stream_data(sid, b"before")
    pair.pump()
    pair.advance(10.0)
    assert pair.a.epoch == pair.b.epoch == 1
    new = pair.a.session
    assert new is not None and new.auth == "chain"
    assert new.keys.chain_key != old.keys.chain_key
    assert traffic_secrets(pair.a) != old_secrets
    assert new.qkd_key_ids != old.qkd_key_ids
    assert pair.kme.consumed == 2
    pair.a.send_stream_data(sid, b"after")
    pair.a.end_stream(sid)
    pair.pump()
    data = b"".join(e.data for e in pair.events_b
                    if isinstance(e, ev.StreamDataReceived) and e.stream_id == sid)
    assert data == b"beforeafter"
    assert pair.a.stats.rekeys == 1 and pair.b.stats.rekeys == 1
    # A second and third rekey work as well (the chain advances).
    pair.advance(10.0)
    pair.advance(10.0)
    assert pair.a.epoch == pair.b.epoch == 3


def test_key_update_by_record_count(pki_dir: Path) -> None:
    limits = RecordLimits(update_after_records=8, update_after_bytes=1 << 40)
    pair = make_pair(pki_dir, settings=ConnectionSettings(record_limits=limits))
    payload = os.urandom(40 * 60_000)
    got = transfer(pair, payload)
    assert got == payload
    assert pair.a.stats.key_updates >= 4


def test_hard_limit_without_update_is_fatal(pki_dir: Path) -> None:
    # Positive control for the limit: the update threshold sits above the hard limit,
    # so no update happens and the sender must refuse to reuse the key.
    limits = RecordLimits(update_after_records=1 << 30, hard_max_records=5)
    pair = make_pair(pki_dir, settings=ConnectionSettings(record_limits=limits))
    sid = pair.a.open_stream("svc")
    for _ in range(10):
        if pair.a.closed:
            break
        pair.a.send_stream_data(sid, b"z" * 10)
        pair.pump()
    term = terminated(pair.events_a)
    assert term is not None and term.code == ErrorCode.KEY_LIMIT


def test_fail_closed_without_qkd_key(pki_dir: Path) -> None:
    pair = make_pair(pki_dir, kme=FakeKmePair(available=0))
    assert not pair.a.ready and not pair.b.ready
    term = terminated(pair.events_a)
    assert term is not None and term.code == ErrorCode.QKD_UNAVAILABLE
    assert not any(isinstance(e, ev.TunnelReady) for e in pair.events_a + pair.events_b)


def test_degraded_mode_needs_both_sides(pki_dir: Path) -> None:
    # Both allow it: ML-KEM only, loudly flagged in the result.
    pair = make_pair(pki_dir, kme=FakeKmePair(available=0), policy_a=DEGRADED,
                     policy_b=DEGRADED)
    assert pair.a.ready and pair.b.ready
    assert pair.a.session is not None and pair.a.session.mode == MODE_MLKEM_ONLY
    assert pair.a.stats.degraded_handshakes == 1
    # Only the initiator allows it: the responder refuses.
    pair = make_pair(pki_dir, kme=FakeKmePair(available=0), policy_a=DEGRADED)
    assert not pair.b.ready
    term = terminated(pair.events_b)
    assert term is not None and term.code == ErrorCode.QKD_UNAVAILABLE


def test_responder_without_key_fails_closed(pki_dir: Path) -> None:
    class ForgetfulKme(FakeKmePair):
        def dec(self, key_ids: tuple[str, ...]) -> None:
            return None

    pair = make_pair(pki_dir, kme=ForgetfulKme())
    assert not pair.a.ready and not pair.b.ready
    term = terminated(pair.events_b)
    # A key ID the KME does not deliver is refused outright (never a reason to degrade).
    assert term is not None and term.code == ErrorCode.QKD_KEY_REJECTED


def test_wrong_peer_identity_is_rejected(pki_dir: Path) -> None:
    # B expects site-c; A (site-a) connects: rejected by identity, before any key use.
    pb = params(pki_dir, "site-b", "site-c")
    pair = make_pair(pki_dir, params_b=pb)
    assert not pair.b.ready
    term = terminated(pair.events_b)
    assert term is not None and term.code == ErrorCode.ACCESS_DENIED


def test_certificate_from_another_ca_is_rejected(pki_dir: Path, other_pki_dir: Path) -> None:
    # A presents a site-a certificate issued by a different CA.
    pa = params(pki_dir, "site-a", "site-b")
    pa = replace(pa, credentials=credentials(other_pki_dir, "site-a"))
    pair = make_pair(pki_dir, params_a=pa)
    assert not pair.a.ready and not pair.b.ready
    term = terminated(pair.events_a)
    assert term is not None and term.code == ErrorCode.BAD_CERTIFICATE
    # Positive control: with the same CA the same identities connect.
    assert make_pair(pki_dir).a.ready


def test_impostor_with_valid_cert_for_other_identity(pki_dir: Path) -> None:
    # site-c holds a valid certificate from the same CA but claims to be site-a.
    pa = params(pki_dir, "site-a", "site-b")
    pa = replace(pa, credentials=credentials(pki_dir, "site-c"))
    pair = make_pair(pki_dir, params_a=pa)
    assert not pair.b.ready
    term = terminated(pair.events_b) or terminated(pair.events_a)
    assert term is not None and term.code == ErrorCode.BAD_CERTIFICATE


@pytest.mark.parametrize("flight", [0, 1, 2])
def test_tampered_handshake_byte_fails(pki_dir: Path, flight: int) -> None:
    """Flip one byte at several positions of each handshake flight: never ready."""
    for position in (6, 40, 200, 1000, -40, -3):
        counter = {"a2b": 0, "b2a": 0}

        def tamper(direction: str, data: bytes, position: int = position,
                   counter: dict[str, int] = counter) -> bytes:
            index = counter[direction]
            counter[direction] += 1
            target = {0: ("a2b", 0), 1: ("b2a", 0), 2: ("a2b", 1)}[flight]
            if (direction, index) != target:
                return data
            buf = bytearray(data)
            buf[position % len(buf)] ^= 0x01
            return bytes(buf)

        pair = make_pair(pki_dir, start=False)
        pair.tamper_a2b = lambda d: tamper("a2b", d)
        pair.tamper_b2a = lambda d: tamper("b2a", d)
        pair.a.start(0.0)
        pair.pump()
        assert not (pair.a.ready and pair.b.ready), f"tampered flight {flight} at {position}"
        assert pair.a.closed or pair.b.closed


def test_handshake_timeout(pki_dir: Path) -> None:
    pair = make_pair(pki_dir, start=False)
    pair.tamper_a2b = lambda d: b""  # the ClientHello never arrives
    pair.a.start(0.0)
    pair.pump()
    pair.advance(20.0)
    term = terminated(pair.events_a)
    assert term is not None and term.code == ErrorCode.TIMEOUT


def test_authenticated_close_versus_truncation(pki_dir: Path) -> None:
    pair = make_pair(pki_dir)
    pair.a.close()
    pair.pump()
    term = terminated(pair.events_b)
    assert term is not None and term.clean and term.by_peer

    pair = make_pair(pki_dir)
    sid = pair.a.open_stream("svc")
    pair.a.send_stream_data(sid, b"partial")
    pair.pump()
    pair.b.connection_lost(pair.now)  # TCP FIN without an authenticated close
    pair.pump()
    term = terminated(pair.events_b)
    assert term is not None and not term.clean and term.code == ErrorCode.TRUNCATED
    resets = [e for e in pair.events_b if isinstance(e, ev.StreamReset)]
    assert [r.stream_id for r in resets] == [sid]
    assert not any(isinstance(e, ev.StreamEnded) for e in pair.events_b)


def test_record_tampering_is_fatal(pki_dir: Path) -> None:
    pair = make_pair(pki_dir)
    sid = pair.a.open_stream("svc")
    pair.tamper_a2b = lambda d: d[:-1] + bytes([d[-1] ^ 0x80])
    pair.a.send_stream_data(sid, b"secret payload")
    pair.pump()
    term = terminated(pair.events_b)
    assert term is not None and term.code == ErrorCode.BAD_RECORD_MAC
    assert not any(isinstance(e, ev.StreamDataReceived) for e in pair.events_b)


def test_reset_and_unknown_stream(pki_dir: Path) -> None:
    pair = make_pair(pki_dir)
    sid = pair.a.open_stream("svc")
    pair.pump()
    pair.b.reset_stream(sid, StreamCode.UNKNOWN_SERVICE, "no such service")
    pair.pump()
    resets = [e for e in pair.events_a if isinstance(e, ev.StreamReset)]
    assert resets and resets[0].code == StreamCode.UNKNOWN_SERVICE
    # The tunnel itself survives a stream reset.
    assert pair.a.ready and pair.b.ready


def test_keylog_gets_both_secrets(pki_dir: Path) -> None:
    entries: list[object] = []
    pair = make_pair(pki_dir, keylog_a=entries.append)
    assert pair.a.ready
    assert len(entries) == 1
    entry = entries[0]
    assert "mlkem_shared_secret" not in repr(entry) or "b'" not in repr(entry)
    assert len(entry.mlkem_shared_secret) == 32  # type: ignore[attr-defined]
    assert len(entry.qkd_key) == 2 + 32  # type: ignore[attr-defined]


def test_responder_closes_when_initiator_never_rekeys(pki_dir: Path) -> None:
    from gateway.tunnel.connection import TunnelConnection

    a = TunnelConnection(initiator=True, params=params(pki_dir, "site-a", "site-b"),
                         settings=ConnectionSettings(rekey_interval=1000.0))
    b = TunnelConnection(initiator=False, params=params(pki_dir, "site-b", "site-a"),
                         settings=ConnectionSettings(rekey_interval=10.0))
    pair = Pair(a, b, FakeKmePair())
    a.start(0.0)
    pair.pump()
    assert b.ready
    pair.advance(30.0)
    assert b.ready  # 3 x 10 s + 15 s handshake allowance not yet over
    pair.advance(20.0)
    term = terminated(pair.events_b)
    assert term is not None and term.code == ErrorCode.TIMEOUT
    assert "outlived" in term.reason


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_stream_data_of_any_buffer_type_arrives_intact(pki_dir: Path, kind: str) -> None:
    """send_stream_data cuts big writes into record-sized views of the caller's buffer
    (no copy until sealing): sizes around the chunk limit arrive bit for bit."""
    from gateway.tunnel.connection import MAX_STREAM_CHUNK

    pair = make_pair(pki_dir)
    sid = pair.a.open_stream("svc")
    sizes = [0, 1, MAX_STREAM_CHUNK - 1, MAX_STREAM_CHUNK, MAX_STREAM_CHUNK + 1,
             3 * MAX_STREAM_CHUNK + 5]
    sent = b""
    for n in sizes:
        raw = os.urandom(n)
        data = {"bytes": raw, "bytearray": bytearray(raw),
                "memoryview": memoryview(b"xx" + raw)[2:]}[kind]
        pair.a.send_stream_data(sid, data)
        sent += raw
    pair.pump()
    chunks = [e.data for e in pair.events_b
              if isinstance(e, ev.StreamDataReceived) and e.stream_id == sid]
    assert b"".join(bytes(c) for c in chunks) == sent
    assert max(len(c) for c in chunks) <= MAX_STREAM_CHUNK
