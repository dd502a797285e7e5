"""Key updates ratchet the traffic secret and erase the old one (issue 9.5).

The attacker takes a snapshot of everything a live tunnel connection holds (every
bytes-like value reachable from the TunnelConnection objects of both sides, as a
memory dump of those objects would show) after some key updates, and tries every
48-byte value in it as a traffic secret (with up to 16 ratchet steps forward) and every
32-byte value as an AES key with every 12-byte value as IV, against a record sent
under generation 0. With the ratchet nothing opens it. The control is the scheme the
fix replaced: every generation derives from one secret the session keeps (the
handshake's traffic secrets left in the session result), and the same search opens
the record. A second control leaves the replaced secrets un-erased.

What a Python process cannot promise (copies in freed immutable bytes from the
handshake's HKDF, swap, core dumps) is in docs/protocol.md, "Erasure".
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import gateway.tunnel.record as record_mod
from gateway.tunnel import events as ev
from gateway.tunnel.connection import ConnectionSettings, TunnelConnection
from gateway.tunnel.key_schedule import next_traffic_secret, record_key_iv
from gateway.tunnel.record import HEADER_LEN, PROTECTED, RecordLimits, RecordReader
from tests.support.tunnel_harness import Pair, make_pair

UPDATE_EVERY = 4
_ATOMS = (str, int, float, bool, type(None), complex)


def snapshot(*roots: Any) -> set[bytes]:
    """Every bytes-like value reachable from `roots` through attributes, slots and
    containers (what a dump of these objects' memory would contain)."""
    found: set[bytes] = set()
    seen: set[int] = set()
    stack: list[Any] = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMS):
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray | memoryview):
            found.add(bytes(obj))
            continue
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "__dict__")):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
            continue
        if isinstance(obj, list | tuple | set | frozenset | collections.deque):
            stack.extend(obj)
            continue
        if dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        if hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return found


def first_protected_record(wire: list[bytes]) -> tuple[bytes, bytes]:
    reader = RecordReader()
    reader.feed(b"".join(wire))
    while (rec := reader.next_record()) is not None:
        rtype, _, header, body = rec
        if rtype == PROTECTED:
            return header, bytes(body)
    raise AssertionError("no protected record on the wire")


def opens(record: tuple[bytes, bytes], values: set[bytes]) -> bool:
    """Whether any value of the snapshot decrypts `record` (sequence number 0)."""
    header, body = record

    def tries(key: bytes, iv: bytes) -> bool:
        try:
            AESGCM(key).decrypt(iv, body, header)
        except InvalidTag:
            return False
        return True

    for value in values:
        if len(value) == 48:
            secret = value
            for _ in range(16):
                if tries(*record_key_iv(secret)):
                    return True
                secret = next_traffic_secret(secret)
    keys = [v for v in values if len(v) == 32]
    ivs = [v for v in values if len(v) == 12]
    return any(tries(k, iv) for k in keys for iv in ivs)


def run_with_updates(pki_dir: Path) -> tuple[Pair, tuple[bytes, bytes], Any]:
    settings = ConnectionSettings(record_limits=RecordLimits(update_after_records=UPDATE_EVERY))
    pair = make_pair(pki_dir, settings=settings)
    assert pair.a.ready and pair.b.ready
    wire_before = len(pair.wire_a2b)
    generation0 = pair.a._records._send
    sid = pair.a.open_stream("svc")
    for i in range(5 * UPDATE_EVERY):
        pair.a.send_stream_data(sid, f"record {i} ".encode() * 20)
        pair.pump()
    assert pair.a._records.send_generation >= 4
    # The sender ratchets right after the record that reached the limit; the receiver
    # follows on the next record.
    assert pair.b._records.recv_generation >= pair.a._records.send_generation - 1 >= 3
    assert sum(isinstance(e, ev.KeyUpdated) for e in pair.events_a) >= 4
    data = b"".join(bytes(e.data) for e in pair.events_b if isinstance(e, ev.StreamDataReceived))
    assert data.startswith(b"record 0 ") and b"record 19 " in data
    return pair, first_protected_record(pair.wire_a2b[wire_before:]), generation0


def test_snapshot_after_key_updates_opens_no_earlier_generation(pki_dir: Path) -> None:
    pair, record, generation0 = run_with_updates(pki_dir)
    values = snapshot(pair.a, pair.b)
    # The walk does reach the record layer: the current generation's secret is there.
    assert pair.a._records._send is not None
    assert bytes(pair.a._records._send.secret) in values
    assert not opens(record, values)
    # The generation-0 secret the record layer held was overwritten in place.
    assert generation0.secret == bytearray(48) and generation0._aead is None
    # The session result keeps the chain key only.
    assert pair.a.session is not None and pair.a.session.keys.i2r_traffic == b""


def test_positive_control_one_retained_secret_opens_every_generation(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old scheme: the session result keeps the handshake's traffic secrets, from
    which every generation is derived; the same snapshot search opens the record."""
    monkeypatch.setattr(TunnelConnection, "_forget_traffic_secrets",
                        staticmethod(lambda result: result))
    pair, record, _ = run_with_updates(pki_dir)
    assert opens(record, snapshot(pair.a, pair.b))


def test_positive_control_without_erasure_the_old_secret_is_still_there(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replaced generation the record layer did not wipe still holds its secret, and
    that secret opens the record (the reason the ratchet overwrites it)."""
    monkeypatch.setattr(record_mod, "wipe", lambda buf: None)
    _, record, generation0 = run_with_updates(pki_dir)
    assert generation0.secret != bytearray(48)
    assert opens(record, {bytes(generation0.secret)})


def test_closed_connection_erases_its_current_keys(pki_dir: Path) -> None:
    pair, record, _ = run_with_updates(pki_dir)
    current = pair.a._records._send
    assert current is not None and current.secret != bytearray(48)
    pair.a.close()
    assert current.secret == bytearray(48)
    assert HEADER_LEN == 5 and record[0][0] == PROTECTED
