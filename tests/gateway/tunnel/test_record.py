"""Record layer and stream frames against independent computations and bad input."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.tunnel import events as ev
from gateway.tunnel.key_schedule import next_traffic_secret, record_key_iv
from gateway.tunnel.record import (
    HEADER_LEN,
    INNER_STREAM,
    MAX_PROTECTED_BODY,
    PROTECTED,
    RecordError,
    RecordLayer,
    RecordReader,
)
from gateway.tunnel.streams import FRAME_DATA, FRAME_HEADER, MuxError, StreamMux
from gateway.tunnel.wire import DecodeError, ErrorCode

SECRET = bytes(range(48))


def pair() -> tuple[RecordLayer, RecordLayer]:
    tx, rx = RecordLayer(), RecordLayer()
    tx.install_send(SECRET)
    rx.install_recv(SECRET)
    return tx, rx


def split(record: bytes) -> tuple[int, int, bytes, bytes]:
    return record[0], record[1], record[:HEADER_LEN], record[HEADER_LEN:]


def test_nonce_is_iv_xor_sequence_and_header_is_aad() -> None:
    tx, _ = pair()
    key, iv = record_key_iv(SECRET)
    records = [tx.seal(INNER_STREAM, f"msg{i}".encode()) for i in range(3)]
    for seq, rec in enumerate(records):
        nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
        plain = AESGCM(key).decrypt(nonce, rec[HEADER_LEN:], rec[:HEADER_LEN])
        assert plain == bytes([INNER_STREAM]) + f"msg{seq}".encode()


@pytest.mark.parametrize("position", [0, 1, 2, 4, 5, 10, -17, -1])
def test_any_flipped_bit_is_fatal(position: int) -> None:
    tx, rx = pair()
    rec = bytearray(tx.seal(INNER_STREAM, b"payload bytes"))
    rec[position] ^= 0x04
    with pytest.raises((RecordError, DecodeError)):
        reader = RecordReader()
        reader.feed(bytes(rec))
        got = reader.next_record()
        assert got is not None
        rx.open(*got)


def test_untampered_record_opens() -> None:  # positive control for the test above
    tx, rx = pair()
    assert rx.open(*split(tx.seal(INNER_STREAM, b"payload bytes"))) == (INNER_STREAM,
                                                                          b"payload bytes")


def test_replay_reorder_and_drop_fail() -> None:
    tx, rx = pair()
    r0, r1, _r2 = (tx.seal(INNER_STREAM, bytes([i])) for i in range(3))
    rx.open(*split(r0))
    with pytest.raises(RecordError) as exc:
        rx.open(*split(r0))  # replay
    assert exc.value.code == ErrorCode.BAD_RECORD_MAC
    _, rx = pair()
    with pytest.raises(RecordError):
        rx.open(*split(r1))  # r0 dropped / reordered


def test_reflection_fails() -> None:
    # A side's own records sent back to it use the other direction's key.
    tx = RecordLayer()
    tx.install_send(SECRET)
    tx.install_recv(bytes(48))
    with pytest.raises(RecordError):
        tx.open(*split(tx.seal(INNER_STREAM, b"x")))


def test_key_update_follows_phase_flip() -> None:
    tx, rx = pair()
    rx.open(*split(tx.seal(INNER_STREAM, b"a")))
    tx.update_send_key()
    rec = tx.seal(INNER_STREAM, b"b")
    assert rec[1] & 1 == 1
    assert rx.open(*split(rec)) == (INNER_STREAM, b"b")
    assert rx.recv_generation == 1
    key, _ = record_key_iv(next_traffic_secret(SECRET))
    assert key != record_key_iv(SECRET)[0]


def test_reader_rejects_oversize_zero_length_and_unknown_types() -> None:
    for bad in (bytes([PROTECTED, 0]) + (MAX_PROTECTED_BODY + 1).to_bytes(3, "big"),
                bytes([PROTECTED, 0, 0, 0, 0]), bytes([0x42, 0, 0, 0, 5]) + b"hello"):
        reader = RecordReader()
        reader.feed(bad)
        with pytest.raises(DecodeError):
            reader.next_record()


def test_reader_reassembles_byte_by_byte() -> None:
    tx, rx = pair()
    data = b"".join(tx.seal(INNER_STREAM, os.urandom(n)) for n in (1, 1000, 5))
    reader = RecordReader()
    got = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        while (rec := reader.next_record()) is not None:
            got.append(rx.open(*rec))
    assert [len(p) for _, p in got] == [1, 1000, 5]


def test_mux_rejects_window_overrun_and_bad_ids() -> None:
    mux = StreamMux(is_initiator=False, peer_recv_window=100)
    mux.settings.recv_window = 100
    mux.receive_payload(FRAME_HEADER.pack(1, 1, 3) + b"svc")
    assert isinstance(mux.events[0], ev.StreamOpened)
    with pytest.raises(MuxError) as exc:
        mux.receive_payload(FRAME_HEADER.pack(FRAME_DATA, 1, 101) + b"x" * 101)
    assert exc.value.code == ErrorCode.FLOW_CONTROL
    with pytest.raises(MuxError):  # responder-parity id opened by the initiator
        StreamMux(is_initiator=False).receive_payload(FRAME_HEADER.pack(1, 2, 3) + b"svc")
    with pytest.raises(MuxError):  # data for a stream never opened
        StreamMux(is_initiator=False).receive_payload(FRAME_HEADER.pack(FRAME_DATA, 7, 1) + b"x")
    with pytest.raises(MuxError):  # frame longer than its record
        StreamMux(is_initiator=False).receive_payload(FRAME_HEADER.pack(1, 1, 50) + b"svc")


def test_reader_any_split_gives_the_same_records() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tx, _ = pair()
    sizes = [1, 70, 65536, 3, 40000, 65536, 12]
    stream = b"".join(tx.seal(INNER_STREAM, os.urandom(n)) for n in sizes)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=len(stream)), max_size=12))
    def check(cuts: list[int]) -> None:
        _, rx = pair()
        reader = RecordReader()
        bounds = [*sorted(set(cuts)), len(stream)]
        got = []
        start = 0
        for end in bounds:
            reader.feed(stream[start:end])
            start = end
            while (rec := reader.next_record()) is not None:
                got.append(len(rx.open(*rec)[1]))
        assert got == sizes

    check()


def _reference_records(stream: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """An independent parse of a whole byte stream: header by header, no buffering."""
    out, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 2 : pos + 5], "big")
        end = pos + HEADER_LEN + length
        out.append((stream[pos], stream[pos + 1], stream[pos : pos + HEADER_LEN],
                    stream[pos + HEADER_LEN : end]))
        pos = end
    return out


@pytest.mark.parametrize("seed", range(40))
def test_reader_split_records_match_the_reference_bit_for_bit(seed: int) -> None:
    """Records cut at random points (split headers, one-byte reads, reads holding
    several records) come out as exactly the bytes an independent parse finds, and
    `buffered` counts exactly the bytes held back."""
    import random

    rnd = random.Random(seed)
    tx, _ = pair()
    sizes = [rnd.choice((0, 1, 4, 5, 6, 63, 64, 65, 1000, 65535, 65536))
             for _ in range(rnd.randint(1, 8))]
    stream = b"".join(tx.seal(INNER_STREAM, os.urandom(n)) for n in sizes)
    want = _reference_records(stream)
    reader = RecordReader()
    got: list[tuple[int, int, bytes, bytes]] = []
    pos = consumed = 0
    while pos < len(stream):
        step = rnd.choice((1, 2, 4, 5, 6, 100, 4096, 65536, 70000, 200000))
        reader.feed(stream[pos : pos + step])
        pos = min(pos + step, len(stream))
        while (rec := reader.next_record()) is not None:
            rtype, flags, header, body = rec
            got.append((rtype, flags, bytes(header), bytes(body)))
            consumed += HEADER_LEN + len(body)
        assert reader.buffered == pos - consumed
    assert got == want
    assert reader.buffered == 0


def test_reader_hands_out_split_records_that_later_reads_do_not_change() -> None:
    """A record assembled from several reads is a buffer of its own: the next record
    being assembled must not overwrite a body a consumer still holds."""
    tx, _ = pair()
    stream = b"".join(tx.seal(INNER_STREAM, bytes([i]) * 3000) for i in range(1, 5))
    reader = RecordReader()
    bodies = []
    for off in range(0, len(stream), 1000):
        reader.feed(stream[off : off + 1000])
        while (rec := reader.next_record()) is not None:
            bodies.append((rec[3], bytes(rec[3])))
    assert len(bodies) == 4
    assert all(bytes(view) == copy for view, copy in bodies)
