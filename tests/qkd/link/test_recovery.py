"""Crash recovery of the link cores around a round's commit, and the pool limit.

A "crash" here keeps exactly what the KME persists (the auth keys plus
`LinkCore.export_state()`, through JSON as in the sealed state file) at the moment the
process would die, and builds a new core from it. The process-level version of the
same (real KMEs, SIGKILL) is in tests/qkd/link/test_crash_commit.py. Rounds take seconds of
CPU, so the default run covers the rekeying round, the positive control, the dropped
ACK and the pool limit; `-m slow` adds the refill round, the rollback and Bob's crash."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from qkd.link import core as lc
from qkd.link.wegman_carter import AuthKeys
from tests.support.link_pair import PARAMS, PSK, connect, pair
from tests.support.link_pair import pump as core_pump

# frame -> frame, or None to drop it
Hook = Callable[[str, bytes], bytes | None]
Snapshot = tuple[dict[str, object], dict[str, object]]


def pump(a: lc.LinkCore, b: lc.LinkCore, hook: Hook | None = None,
         deposit: bool = True) -> list[tuple[str, object]]:
    return core_pump(a, b, None if hook is None else lambda name, _i, frame: hook(name, frame),
                     depositors=("alice", "bob") if deposit else ())


def snapshot(core: lc.LinkCore) -> Snapshot:
    return (json.loads(json.dumps(core.auth.export_state())),
            json.loads(json.dumps(core.export_state())))


def restore(role: str, snap: Snapshot, seed: int) -> lc.LinkCore:
    auth, saved = snap
    return lc.LinkCore(role, AuthKeys.import_state(auth), PARAMS, 256,
                       np.random.default_rng(seed), link_secret=PSK,
                       committed=int(saved["committed"]),  # type: ignore[call-overload]
                       saved=saved)


def blocks_of(events: list[tuple[str, object]], side: str,
              kind: type = lc.RoundCommitted) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for s, e in events:
        if s == side and isinstance(e, kind):
            out += e.blocks  # type: ignore[attr-defined]
    return out


def reconnect(a: lc.LinkCore, b: lc.LinkCore) -> list[tuple[str, object]]:
    a.connection_made()
    b.connection_made()
    return pump(a, b)


def honest_round(a: lc.LinkCore, b: lc.LinkCore) -> None:
    """One committed round with the same blocks on both sides. An honest round may
    still abort, rarely, on a Cascade frame error; that is retried, an authentication
    failure is not."""
    for _ in range(3):
        a.start_round(0.0)
        ev = pump(a, b)
        ka, kb = blocks_of(ev, "alice"), blocks_of(ev, "bob")
        if ka or kb:
            assert ka and ka == kb
            return
        assert not any(isinstance(e, lc.RoundAborted) and e.auth_failure for _, e in ev)
    raise AssertionError("three honest rounds in a row without key")


def crash_alice_at_commit(a: lc.LinkCore, b: lc.LinkCore, *, deliver_commit: bool
                          ) -> tuple[Snapshot, list[tuple[str, object]]]:
    """Run a round; Alice 'dies' right after her COMMIT left (its state is what she
    persisted before sending it). Bob gets the COMMIT or not; nothing reaches Alice."""
    snap: list[Snapshot] = []

    def hook(name: str, frame: bytes) -> bytes | None:
        if snap:
            return None  # Alice is dead: nothing in or out any more
        if name == "a2b" and frame[0] == lc.COMMIT:
            snap.append(snapshot(a))
            return frame if deliver_commit else None
        return frame

    a.start_round(0.0)
    ev = pump(a, b, hook)
    assert snap, "the round never reached COMMIT"
    return snap[0], ev


@pytest.mark.parametrize("rounds_before", [0, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["rekey-round", "refill-round"])
def test_alice_crash_after_commit_resumes_when_bob_committed(rounds_before: int) -> None:
    a, b = pair()
    connect(a, b)
    for _ in range(rounds_before):
        honest_round(a, b)
    snap, ev = crash_alice_at_commit(a, b, deliver_commit=True)
    bob_blocks = blocks_of(ev, "bob")
    assert bob_blocks and b.committed == rounds_before + 1
    assert snap[1]["pending_commit"] is not None

    a2 = restore("alice", snap, 11)
    ev = reconnect(a2, b)
    # Resumed: Alice commits the same blocks under the same IDs as Bob did.
    assert blocks_of(ev, "alice") == bob_blocks
    assert a2.committed == b.committed and a2.auth.mode == b.auth.mode == "qkd"
    assert a2.auth.levels() == b.auth.levels()[::-1]
    # And the pair goes on producing matching keys on link-made pads.
    honest_round(a2, b)
    assert a2.stats.auth_failures == b.stats.auth_failures == 0


@pytest.mark.slow
def test_alice_crash_before_bob_saw_commit_rolls_back_on_both() -> None:
    a, b = pair()
    connect(a, b)
    snap, ev = crash_alice_at_commit(a, b, deliver_commit=False)
    assert not blocks_of(ev, "bob") and b.committed == 0
    a2 = restore("alice", snap, 12)
    ev = reconnect(a2, b)
    assert not blocks_of(ev, "alice")
    assert any(isinstance(e, lc.RoundAborted) and "rolled back" in e.reason for _, e in ev)
    assert a2.committed == b.committed == 0 and a2.auth.mode == b.auth.mode == "bootstrap"
    honest_round(a2, b)
    assert a2.auth.mode == "qkd" and a2.stats.auth_failures == b.stats.auth_failures == 0


def test_positive_control_without_the_persisted_commit_the_pair_desyncs() -> None:
    """The attack on the old design: Alice restarts without her pending commit while
    Bob committed the rekeying round; the pair can no longer authenticate."""
    a, b = pair()
    connect(a, b)
    snap, _ = crash_alice_at_commit(a, b, deliver_commit=True)
    auth, saved = snap
    a2 = restore("alice", (auth, saved | {"pending_commit": None}), 13)
    reconnect(a2, b)
    assert a2.stats.auth_failures + b.stats.auth_failures > 0
    assert not (a2.peer_ready and b.peer_ready)


@pytest.mark.slow
def test_bob_crash_after_commit_before_deposit_stores_the_blocks_on_restart() -> None:
    a, b = pair()
    connect(a, b)
    snap: list[Snapshot] = []

    def hook(name: str, frame: bytes) -> bytes | None:
        if name == "b2a" and frame[0] == lc.COMMIT_ACK:
            snap.append(snapshot(b))  # what Bob persisted before the ACK left
        return frame

    a.start_round(0.0)
    ev = pump(a, b, hook, deposit=False)  # Bob dies before storing anything
    alice_blocks = blocks_of(ev, "alice", lc.DepositRequested)
    assert alice_blocks and snap and snap[0][1]["pending_deposit"] is not None
    b2 = restore("bob", snap[0], 14)
    assert b2.round_active  # no round may start before the blocks are stored
    b2.resume()
    ev2 = pump(a, b2)
    assert blocks_of(ev2, "bob") == alice_blocks
    assert not b2.round_active
    # Alice's own deposit is still outstanding in this harness; finish it, then go on.
    a.deposit_done(a.committed)
    reconnect(a, b2)
    honest_round(a, b2)
    assert a.stats.auth_failures == b2.stats.auth_failures == 0


def test_commit_unacknowledged_makes_alice_reconnect_and_resolve() -> None:
    """A lost COMMIT_ACK (dropped by an attacker) neither hangs Alice nor splits the
    pair: she times out, reconnects, and Bob's HELLO commits the round."""
    a, b = pair()
    connect(a, b)

    def drop_ack(name: str, frame: bytes) -> bytes | None:
        return None if name == "b2a" and frame[0] == lc.COMMIT_ACK else frame

    a.start_round(0.0)
    ev = pump(a, b, drop_ack)
    bob_blocks = blocks_of(ev, "bob")
    assert bob_blocks and not blocks_of(ev, "alice")
    assert not a.check_timeout(1.0)
    assert a.check_timeout(a.post.timeout_s + 1.0)  # adapter: drop the connection
    ev = reconnect(a, b)
    assert blocks_of(ev, "alice") == bob_blocks
    assert a.committed == b.committed == 1 and a.auth.levels() == b.auth.levels()[::-1]
    assert a.stats.auth_failures == b.stats.auth_failures == 0


def test_round_key_beyond_the_pool_room_is_discarded_alike_on_both_sides() -> None:
    a, b = pair()
    connect(a, b)
    a.start_round(0.0, room=3)
    ev = pump(a, b)
    ka, kb = blocks_of(ev, "alice"), blocks_of(ev, "bob")
    assert len(ka) == 3 and ka == kb
    # The round had more: the rest was dropped, alike on both sides, and counted.
    assert a.stats.blocks_discarded == b.stats.blocks_discarded > 0
    assert ev[-1][1].discarded == a.stats.blocks_discarded  # type: ignore[attr-defined]
