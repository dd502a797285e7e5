"""The sans-I/O link core: two KME sides wired back to back in memory, with a relay in
between that may tamper with the classical frames or let Eve rewrite the pulses."""

from __future__ import annotations

import pytest

from qkd.link import core as lc
from tests.support.link_pair import PARAMS, Tamper, committed, connect, pair, pump


def test_honest_round_commits_the_same_blocks_and_leaves_bootstrap() -> None:
    a, b = pair()
    connect(a, b)
    assert a.auth.mode == "bootstrap"
    a.start_round(0.0)
    ev = pump(a, b)
    ka, kb = committed(ev, "alice"), committed(ev, "bob")
    assert len(ka) == len(kb) == 1
    assert ka[0].blocks and ka[0].blocks == kb[0].blocks
    assert all(len(m) == 32 for _, m in ka[0].blocks)
    assert len({kid for kid, _ in ka[0].blocks}) == len(ka[0].blocks)
    # The round paid for the link's own hash key and pads: bootstrap is over.
    assert a.auth.mode == b.auth.mode == "qkd"
    assert a.committed == b.committed == 1
    assert "blocks" not in repr(ka[0])
    # A second round on link-made keys (positive control for the tamper tests too).
    a.start_round(0.0)
    ev = pump(a, b)
    k2a, k2b = committed(ev, "alice"), committed(ev, "bob")
    assert k2a and k2a[0].blocks == k2b[0].blocks
    assert not {k for k, _ in k2a[0].blocks} & {k for k, _ in ka[0].blocks}
    assert a.stats.auth_failures == b.stats.auth_failures == 0


def _flip_pp(direction: str, index: int) -> Tamper:
    """Flip the last bit of the index-th post-processing frame in one direction."""
    seen = [0]

    def tamper(name: str, i: int, frame: bytes) -> bytes:
        if name != direction or frame[0] != lc.PP or len(frame) < 40:
            return frame
        seen[0] += 1
        if seen[0] != index:
            return frame
        bad = bytearray(frame)
        # A single data bit, late in the frame: the protocol may not notice. (The top
        # bit of the last byte: the low bits may be padding, which the decoders refuse.)
        bad[-1] ^= 0x80
        return bytes(bad)
    return tamper


# a2b 1 and b2a 2 still parse, so only the transcript tag can catch them; a flip in a
# Cascade frame (b2a 4) may break the protocol first or parse and fail the tag
# (depends on the message encoding), either way no key.
@pytest.mark.parametrize(("direction", "index", "by_tag"),
                         [("a2b", 1, True), ("b2a", 2, True), ("b2a", 4, None)])
def test_tampered_post_processing_frame_never_yields_key(direction: str, index: int,
                                                         by_tag: bool | None) -> None:
    a, b = pair()
    connect(a, b)
    a.start_round(0.0)
    ev = pump(a, b, _flip_pp(direction, index))
    assert not committed(ev, "alice") and not committed(ev, "bob")
    aborted = [e for _, e in ev if isinstance(e, lc.RoundAborted)]
    assert aborted, ev
    if by_tag is not None:
        assert any(e.auth_failure for e in aborted) == by_tag
    assert a.committed == b.committed == 0
    if index != 1 or direction != "a2b":
        return
    # The link recovers: the next round (untouched) commits.
    a.start_round(0.0)
    ev = pump(a, b)
    assert committed(ev, "alice") and committed(ev, "bob")


def test_forged_commit_is_rejected_and_counted() -> None:
    a, b = pair()
    connect(a, b)
    a.start_round(0.0)

    def forge(name: str, i: int, frame: bytes) -> bytes:
        if name == "a2b" and frame[0] == lc.COMMIT:
            bad = bytearray(frame)
            bad[10] ^= 0x80  # inside the tag
            return bytes(bad)
        return frame

    ev = pump(a, b, forge)
    assert not committed(ev, "alice") and not committed(ev, "bob")
    assert b.stats.auth_failures == 1
    assert any(isinstance(e, lc.RoundAborted) and e.auth_failure for _, e in ev)


def test_intercept_resend_aborts_on_qber() -> None:
    a, b = pair(PARAMS.with_(pulses=4_000_000))
    connect(a, b)
    a.start_round(0.0)
    ev = pump(a, b, eve="intercept-resend")
    assert not committed(ev, "alice") and not committed(ev, "bob")
    aborts = [e for s, e in ev if s == "alice" and isinstance(e, lc.RoundAborted)]
    assert aborts and "QBER" in aborts[0].reason
    assert a.stats.last_qber is not None and a.stats.last_qber > 0.2


def test_reservation_messages_are_authenticated() -> None:
    a, b = pair()
    connect(a, b)
    a.request_reservation(7, "site-a-gw", "site-b-gw", [("k", ["k"], 256)])
    ev = pump(a, b)
    req = [e for s, e in ev if s == "bob" and isinstance(e, lc.ReservationRequested)]
    assert req and req[0].keys == [("k", ["k"], 256)]
    b.answer_reservation(7, True)
    ev = pump(a, b)
    assert next(e for s, e in ev if isinstance(e, lc.ReservationAnswered)).ok

    a.request_reservation(8, "site-a-gw", "site-b-gw", [("k2", ["k2"], 256)])

    def alter(name: str, i: int, frame: bytes) -> bytes:
        return frame.replace(b"k2", b"k3")

    ev = pump(a, b, alter)
    assert not [e for s, e in ev if isinstance(e, lc.ReservationRequested)]
    assert b.stats.auth_failures == 1


def test_state_round_trip_keeps_pads_one_time() -> None:
    a, b = pair()
    connect(a, b)
    state = a.auth.export_state()
    a2 = lc.AuthKeys.import_state(state)
    assert a2.next_out == a.auth.next_out and a2.levels() == a.auth.levels()
    assert "redacted" in repr(a2)
