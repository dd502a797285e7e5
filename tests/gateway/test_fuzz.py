"""Property-based fuzzing of every tunnel parser: garbage never escapes as anything but
the parser's own error (no IndexError, UnicodeError, struct.error...), and a session fed
garbage ends in a counted close, never a traceback. The long run is marked slow."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnel_harness import make_pair

from gateway import events as ev
from gateway.handshake import (
    ClientHello,
    ServerHello,
    decode_alert,
    decode_certificate,
    decode_certificate_verify,
    decode_finished,
)
from gateway.record import RecordReader
from gateway.streams import MuxError, StreamMux
from gateway.wire import DecodeError

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
