"""Authenticated link control frames are still checked strictly (issue 16.4): a peer
that holds the keys but sends a malformed frame gets a LinkProtocolError, never an
OverflowError out of `int(inf)` or a tripped `assert`.

Each reproducer signs its frame with the sender's real authentication keys, so the tag
verifies and only the field checks stand between the frame and the handler. The
controls send the well-formed frame the same way and it is accepted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qkd.link import core as lc
from tests.support.link_pair import PARAMS, connect, pair, pump

SMALL = PARAMS.with_(pulses=200_000)


def _signed(src: lc.LinkCore, kind: int, raw: str) -> bytes:
    """A control frame with a body written by hand (JSON extensions such as Infinity
    included), tagged with the sender's keys as `_send_ctrl` would."""
    body = raw.encode()
    offset, tag = src.auth.sign(lc._LABEL + bytes([kind]) + body, for_round=False)
    return lc._CTRL.pack(kind, offset, tag) + body


def _ready() -> tuple[lc.LinkCore, lc.LinkCore]:
    a, b = pair(SMALL)
    connect(a, b)
    return a, b


@pytest.mark.parametrize(("kind", "raw"), [
    (lc.ROUND_START, '{"nonce":"%s","pulses":Infinity,"round":1}' % ("00" * 16)),
    (lc.ROUND_START, '{"nonce":"%s","pulses":2e5,"round":1}' % ("00" * 16)),
    (lc.ROUND_START, '{"nonce":"zz","pulses":200000,"round":1}'),
    (lc.RESERVE, '{"keys":[],"master":"m","request":1e400,"slave":"s"}'),
    (lc.RESERVE, '{"keys":[["k",["k"],NaN]],"master":"m","request":3,"slave":"s"}'),
    (lc.ABORT, '{"reason":"x","round":-Infinity}'),
])
def test_malformed_authenticated_frame_to_bob_is_a_protocol_error(kind: int,
                                                                  raw: str) -> None:
    a, b = _ready()
    frame = _signed(a, kind, raw)
    with pytest.raises(lc.LinkProtocolError):
        b.receive_frame(frame, 0.0)


def test_malformed_reserve_ack_to_alice_is_a_protocol_error() -> None:
    a, b = _ready()
    frame = _signed(b, lc.RESERVE_ACK, '{"ok":true,"reason":"","request":Infinity}')
    with pytest.raises(lc.LinkProtocolError):
        a.receive_frame(frame, 0.0)
    # Control: a well-formed answer on the next pad is accepted.
    good = _signed(b, lc.RESERVE_ACK, '{"ok":true,"reason":"","request":5}')
    a.receive_frame(good, 0.0)
    ev = a.next_event()
    assert isinstance(ev, lc.ReservationAnswered) and ev.request == 5 and ev.ok


def test_well_formed_signed_frames_are_accepted() -> None:
    a, b = _ready()
    body = json.dumps({"keys": [["k", ["k"], 256]], "master": "m", "request": 4,
                       "slave": "s"}, separators=(",", ":"), sort_keys=True)
    b.receive_frame(_signed(a, lc.RESERVE, body), 0.0)
    ev = b.next_event()
    assert isinstance(ev, lc.ReservationRequested) and ev.keys == [("k", ["k"], 256)]


def test_commit_before_bob_measured_is_a_protocol_error() -> None:
    a, b = _ready()
    a.start_round(0.0)
    for f in a.frames_to_send():
        b.receive_frame(f, 0.0)  # ROUND_START only; the pulses never arrive
    a.quantum_to_send()
    assert b._round is not None and b._round.proto is None
    commit: dict[str, Any] = {"blocks": 1, "key_bits": 4096, "refill": 0, "rekey": False,
                              "round": b._round.number}
    frame = _signed(a, lc.COMMIT, json.dumps(commit, separators=(",", ":"),
                                             sort_keys=True))
    with pytest.raises(lc.LinkProtocolError, match="COMMIT before"):
        b.receive_frame(frame, 0.0)
    assert b.committed == 0


def test_control_round_still_commits() -> None:
    # Positive control for the strict checks: an honest round passes every one.
    a, b = pair()
    connect(a, b)
    a.start_round(0.0)
    ev = pump(a, b)
    assert not [e for s, e in ev if s == "protocol_error"]
    got = {s: [e.blocks for s2, e in ev if s2 == s and isinstance(e, lc.RoundCommitted)]
           for s in ("alice", "bob")}
    assert got["alice"] and got["alice"] == got["bob"]
