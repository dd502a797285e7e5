"""Property-based fuzzing of every tunnel parser: garbage never escapes as anything but
the parser's own error (no IndexError, UnicodeError, struct.error...), and a session fed
garbage ends in a counted close, never a traceback. The long run is marked slow."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.tunnel import events as ev
from gateway.tunnel.handshake import (
    ClientHello,
    ServerHello,
    decode_alert,
    decode_certificate,
    decode_certificate_verify,
    decode_finished,
    encode_alert,
)
from gateway.tunnel.record import RecordReader
from gateway.tunnel.streams import MuxError, StreamMux
from gateway.tunnel.wire import DecodeError
from tests.support.bad_certificates import der_of, pair_with_bad_cert
from tests.support.tunnel_harness import make_pair

PARSERS = [ClientHello.decode, ServerHello.decode, decode_certificate,
           decode_certificate_verify, decode_finished, decode_alert]

SHORT = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=20_000, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_hello() -> bytes:
    return ClientHello(
        version="qkdgw/1", epoch=0, auth="pki", psk_epoch=0, kems_offered=("ML-KEM-768",),
        kem="ML-KEM-768", allowed_modes=("hybrid",), initiator_id="site-a",
        responder_id="site-b", initiator_sae_id="site-a-gw", nonce=bytes(32),
        encapsulation_key=bytes(1184), qkd_key_size_bits=256,
        qkd_key_ids=("0b9c3f2e-1c7e-4a51-9d8e-0d1f2a3b4c5d",), stream_window=1 << 20,
    ).encode()


def _check_parsers(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(DecodeError):
            parse(data)


def _check_mux(data: bytes) -> None:
    mux = StreamMux(is_initiator=True)
    with contextlib.suppress(MuxError):
        mux.receive_payload(data)


def _check_reader(data: bytes) -> None:
    reader = RecordReader()
    reader.feed(data)
    try:
        while reader.next_record() is not None:
            pass
    except DecodeError:
        pass


@SHORT
@given(st.binary(max_size=3000))
def test_parsers_raise_only_decode_errors(data: bytes) -> None:
    _check_parsers(data)
    _check_mux(data)
    _check_reader(data)


@SHORT
@given(st.integers(min_value=0, max_value=1300), st.binary(min_size=1, max_size=8))
def test_mutated_valid_hello(position: int, junk: bytes) -> None:
    valid = _valid_hello()
    assert ClientHello.decode(valid).initiator_id == "site-a"  # positive control
    mutated = valid[:position] + junk + valid[position + len(junk):]
    _check_parsers(mutated)
    _check_parsers(valid[:position])


@SHORT
@given(st.binary(min_size=1, max_size=2000))
def test_garbage_from_the_network_ends_in_a_close(pki_dir: Path, data: bytes) -> None:
    pair = make_pair(pki_dir, start=False)
    pair.b.receive_data(data, 0.0)
    pair.b.connection_lost(0.0)
    pair.pump()
    closes = [e for e in pair.events_b if isinstance(e, ev.ConnectionTerminated)]
    assert len(closes) == 1 and not closes[0].clean
    assert not pair.b.ready


@pytest.mark.slow
@LONG
@given(st.binary(max_size=5000))
def test_parsers_long_run(data: bytes) -> None:
    _check_parsers(data)
    _check_mux(data)
    _check_reader(data)


# ------------------------------------- mutated real certificates in real flights (16.1)

CERT_SHORT = settings(max_examples=60, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
CERT_LONG = settings(max_examples=3000, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def _cert_mutation(draw: st.DrawFn) -> tuple[str, int, bytes, int]:
    """(kind, position, bytes, length): overwrite, insert or delete inside a certificate."""
    kind = draw(st.sampled_from(["overwrite", "insert", "delete"]))
    position = draw(st.integers(min_value=0, max_value=6000))
    data = draw(st.binary(min_size=1, max_size=4))
    return kind, position, data, draw(st.integers(min_value=1, max_value=8))


def _apply(der: bytes, mutation: tuple[str, int, bytes, int]) -> bytes:
    kind, position, data, length = mutation
    pos = position % len(der)
    if kind == "overwrite":
        return der[:pos] + data + der[pos + len(data):]
    if kind == "insert":
        return der[:pos] + data + der[pos:]
    return der[:pos] + der[pos + length:]


def _check_mutated_certificate(pki_dir: Path, sender: str,
                               mutation: tuple[str, int, bytes, int]) -> None:

    der = der_of(pki_dir, "site-a" if sender == "initiator" else "site-b")
    mutated = _apply(der, mutation)
    # Any exception out of here is the bug class of issue 16.1.
    pair = pair_with_bad_cert(pki_dir, sender, (mutated,))
    events = pair.events_a + pair.events_b
    assert not [e for e in events if isinstance(e, ev.UnexpectedError)]
    if mutated == der:
        assert pair.a.ready and pair.b.ready  # positive control: the real one works
        return
    receiver = pair.events_b if sender == "initiator" else pair.events_a
    closes = [e for e in receiver if isinstance(e, ev.ConnectionTerminated)]
    assert not pair.a.ready and not pair.b.ready
    assert len(closes) == 1 and not closes[0].clean and not closes[0].by_peer
    other = pair.events_a if sender == "initiator" else pair.events_b
    # The refusal went out as an alert: the sender saw the peer abort.
    assert [e.code for e in other if isinstance(e, ev.ConnectionTerminated)
            and e.by_peer] == [closes[0].code]


@CERT_SHORT
@given(st.sampled_from(["initiator", "responder"]), _cert_mutation())
def test_mutated_certificate_in_a_real_flight(pki_dir: Path, sender: str,
                                              mutation: tuple[str, int, bytes, int]) -> None:
    _check_mutated_certificate(pki_dir, sender, mutation)


@pytest.mark.slow
@CERT_LONG
@given(st.sampled_from(["initiator", "responder"]), _cert_mutation())
def test_mutated_certificate_in_a_real_flight_long_run(
        pki_dir: Path, sender: str, mutation: tuple[str, int, bytes, int]) -> None:
    _check_mutated_certificate(pki_dir, sender, mutation)


def _mutated_first_flights(pki_dir: Path, target: str, position: int, junk: bytes) -> None:
    """A real flight (the initiator's ClientHello, or the responder's whole first
    flight), bytes overwritten at the record level, into the real peer."""
    pair = make_pair(pki_dir, start=False)
    pair.a.start(0.0)
    while (e := pair.a.next_event()) is not None:
        pair._serve(pair.a, e)
    flight = b"".join(pair.a.data_to_send())
    if target == "responder":
        pos = position % len(flight)
        pair.b.receive_data(flight[:pos] + junk + flight[pos + len(junk):], 0.0)
        sink = pair.events_b
        conn = pair.b
    else:
        pair.b.receive_data(flight, 0.0)
        for _ in range(3):
            while (e := pair.b.next_event()) is not None:
                pair.events_b.append(e)
                pair._serve(pair.b, e)
        answer = b"".join(pair.b.data_to_send())
        pos = position % len(answer)
        pair.a.receive_data(answer[:pos] + junk + answer[pos + len(junk):], 0.0)
        sink = pair.events_a
        conn = pair.a
    conn.connection_lost(0.0)
    sink.extend(iter(conn.next_event, None))
    assert not [e for e in sink if isinstance(e, ev.UnexpectedError)]
    closes = [e for e in sink if isinstance(e, ev.ConnectionTerminated)]
    assert len(closes) == 1 and not closes[0].clean


@CERT_SHORT
@given(st.sampled_from(["initiator", "responder"]), st.integers(min_value=0),
       st.binary(min_size=1, max_size=8))
def test_mutated_real_flight(pki_dir: Path, target: str, position: int, junk: bytes) -> None:
    _mutated_first_flights(pki_dir, target, position, junk)


@pytest.mark.slow
@CERT_LONG
@given(st.sampled_from(["initiator", "responder"]), st.integers(min_value=0),
       st.binary(min_size=1, max_size=8))
def test_mutated_real_flight_long_run(pki_dir: Path, target: str, position: int,
                                      junk: bytes) -> None:
    _mutated_first_flights(pki_dir, target, position, junk)


@given(st.text(max_size=400))
def test_any_alert_reason_reaches_the_peer_as_an_alert(reason: str) -> None:
    """A refusal may quote the peer's own bytes (a certificate name with a NUL, found by
    the long certificate run): whatever the reason, the peer decodes an alert."""
    code, got = decode_alert(encode_alert(5, reason))
    assert code == 5 and got.isprintable() and len(got.encode()) <= 200
    if reason.isprintable() and len(reason.encode()) <= 200:
        assert got == reason  # a clean, short reason goes out unchanged
