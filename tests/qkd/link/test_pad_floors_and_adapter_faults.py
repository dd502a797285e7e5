"""Pad floors and adapter faults of the link, each a test that failed on the code before it:

- a failed state write must never let a signed frame leave (one-time pad reuse after a
  restart), and the adapter's task loops must survive errors;
- reservations from both sides at once must not drain the pads below what the round
  that refills them needs;
- a stranger's TCP connection to Bob must cost no pad and not displace the live link;
- Bob must not commit a round while the previous one's blocks are unstored;
- Alice starts a round only when both directions can carry it, and running out of pads
  mid-round aborts it instead of raising out of the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkd.common.confload import HostPort
from qkd.common.storage_key import Sealer
from qkd.link import bb84
from qkd.link import core as lc
from qkd.link.bb84 import Bb84Link, Bb84Settings, LinkStateNotSaved, LinkUnavailable
from qkd.link.wegman_carter import PAD_BYTES, AuthError
from tests.support.link_pair import PARAMS, PSK, connect, pair, pump

FLOOR = lc.RESERVE_PAD_BYTES + lc.ROUND_PAD_BYTES


def xfer(a: lc.LinkCore, b: lc.LinkCore) -> None:
    for f in a.frames_to_send():
        b.receive_frame(f, 0.0)
    for f in b.frames_to_send():
        a.receive_frame(f, 0.0)


def answer_all(*cores: lc.LinkCore) -> int:
    """Answer every reservation request (ok); returns how many answers were sent."""
    sent = 0
    for c in cores:
        while (ev := c.next_event()) is not None:
            if isinstance(ev, lc.ReservationRequested):
                sent += bool(c.answer_reservation(ev.request, True))
    return sent


def levels_ok(*cores: lc.LinkCore) -> bool:
    return all(min(c.auth.levels()) >= FLOOR for c in cores)


# ----------------------------------------------------------------- reservations

def test_concurrent_reservation_floods_leave_the_pads_a_round_needs() -> None:
    a, b = pair()
    connect(a, b)
    sent = {}
    for name, core in (("a", a), ("b", b)):
        n = 0
        with pytest.raises(AuthError, match="pads low"):
            while True:
                core.request_reservation(n, "m", "s", [])
                n += 1
        sent[name] = n
    assert sent["a"] > 100 and sent["b"] > 100
    xfer(a, b)
    answered = answer_all(a, b)  # the old code raised AuthError here
    xfer(a, b)
    # Each side answered only what its own pads above the floor allowed, the rest lapsed.
    assert a.stats.reservations_lapsed + b.stats.reservations_lapsed > 0
    assert answered + a.stats.reservations_lapsed + b.stats.reservations_lapsed == \
        sent["a"] + sent["b"]
    assert levels_ok(a, b)
    assert a.round_pads_ok
    while a.next_event() is not None:
        pass  # the answers
    a.start_round(0.0)
    assert isinstance(a.next_event(), lc.RoundStarted)


def test_a_few_concurrent_reservations_on_low_pads_still_let_the_refill_round_run() -> None:
    """Rounds have been aborting (pads at 16 per direction); each master sends four
    enc_keys at once. Before: both streams fell to 8 pads, below ROUND_START's 9, for
    good. Now the refill round runs and commits."""
    a, b = pair()
    connect(a, b)
    n = 0
    while min(a.auth.levels()) > 16 * PAD_BYTES:
        n += 1
        a.request_reservation(n, "m", "s", [])
        xfer(a, b)
        answer_all(b)
        xfer(a, b)
        answer_all(a)
    for i in range(4):
        # Some of these are refused now ("pads low"); the old check took them all.
        with contextlib.suppress(AuthError):
            a.request_reservation(1000 + i, "m", "s", [])
        with contextlib.suppress(AuthError):
            b.request_reservation(2000 + i, "m", "s", [])
    xfer(a, b)
    answer_all(a, b)
    xfer(a, b)
    answer_all(a, b)
    assert levels_ok(a, b)
    a.start_round(0.0)
    ev = pump(a, b)
    assert any(s == "alice" and isinstance(e, lc.RoundCommitted) for s, e in ev), ev
    assert a.auth.mode == "qkd" and min(a.auth.levels()) >= lc.TARGET_PAD_BYTES  # refilled


# ------------------------------------------------------------ pads per direction

def _drain_b2a(a: lc.LinkCore, b: lc.LinkCore, down_to: int) -> None:
    """Bob spends b2a pads on frames Alice verifies and ignores (ABORT of no round)."""
    while a.auth.levels()[1] > down_to:
        b._send_ctrl(lc.ABORT, {"round": -7, "reason": "test"}, for_round=False)
        xfer(a, b)


def test_alice_starts_no_round_when_bobs_direction_is_low() -> None:
    a, b = pair()
    connect(a, b)
    need = a.auth.reserve + lc.ROUND_NEED_BYTES
    _drain_b2a(a, b, need)
    assert a.round_pads_ok  # control: exactly what a round needs is enough
    _drain_b2a(a, b, need - PAD_BYTES)
    assert a.auth.levels()[0] > 200 * PAD_BYTES  # Alice's own direction is full
    assert not a.round_pads_ok
    out_before = a.auth.levels()[0]
    a.start_round(0.0)
    ev = a.next_event()
    assert isinstance(ev, lc.RoundAborted) and "pads low" in ev.reason
    assert a.frames_to_send() == [] and a.auth.levels()[0] == out_before
    assert not a.round_active


def test_running_out_of_pads_mid_round_aborts_it_instead_of_raising() -> None:
    a, b = pair(PARAMS.with_(pulses=4_000_000))
    connect(a, b)
    a.start_round(0.0)
    xfer(a, b)  # ROUND_START reaches Bob
    assert b.round_active
    with pytest.raises(AuthError):
        while True:
            b.auth.take_pad(for_round=False)  # Bob's b2a stream is now empty
    ev = pump(a, b)  # the old code raised AuthError out of Bob's work_done
    bob_aborts = [e for s, e in ev if s == "bob" and isinstance(e, lc.RoundAborted)]
    assert bob_aborts and "cannot sign" in bob_aborts[0].reason
    assert not b.round_active and b.committed == 0
    assert not any(isinstance(e, lc.RoundCommitted) for _, e in ev)
    a.check_timeout(a.post.timeout_s + 1.0)  # Alice's round ends on its timeout
    assert not a.round_active


# ---------------------------------------------------------- Bob's pending deposit

def _pump_without_bob_deposits(a: lc.LinkCore, b: lc.LinkCore) -> list[tuple[str, Any]]:
    return pump(a, b, depositors=("alice",))


def test_bob_refuses_a_round_while_his_last_deposit_is_unstored() -> None:
    a, b = pair()
    connect(a, b)
    a.start_round(0.0)
    _pump_without_bob_deposits(a, b)
    assert a.committed == b.committed == 1
    assert b.export_state()["pending_deposit"]["round"] == 1
    a.start_round(0.0)
    ev = _pump_without_bob_deposits(a, b)
    # Bob refused (the old code committed round 2 over round 1's unstored blocks).
    assert b.committed == 1 and b.export_state()["pending_deposit"]["round"] == 1
    assert a.committed == 1 and not a.round_active and a.peer_busy_aborts == 1
    assert any(s == "alice" and isinstance(e, lc.RoundAborted) and "not stored" in e.reason
               for s, e in ev)
    # Once Bob's store takes the blocks, rounds go on.
    b.deposit_done(1)
    a.start_round(0.0)
    ev = pump(a, b)
    assert a.committed == b.committed > 1 and a.peer_busy_aborts == 0
    assert a.stats.auth_failures == b.stats.auth_failures == 0


# ------------------------------------------------------------------- HELLO order

def _forge(frame: bytes) -> bytes:
    bad = bytearray(frame)
    bad[12] ^= 0x01  # inside the tag
    return bytes(bad)


def test_bob_signs_no_hello_before_alices_verifies_and_keeps_the_live_round() -> None:
    a, b = pair()
    connect(a, b)
    a.start_round(0.0)
    xfer(a, b)
    assert b.round_active
    out_before = b.auth.levels()[0]
    # A new connection with nothing, garbage, or a forged HELLO: nothing signed,
    # nothing changed.
    other = lc.LinkCore("alice", lc.bootstrap_auth("alice", PSK), PARAMS, 256,
                     np.random.default_rng(5), link_secret=PSK)
    other.connection_made()
    stranger_hello = other.frames_to_send()[0]  # a HELLO at an offset Bob has already seen
    for data in (b"", b"\x01", b"\x02" + bytes(40), _forge(stranger_hello), stranger_hello):
        assert not b.accept_hello(data, 0.0)
    assert b.frames_to_send() == [] and b.auth.levels()[0] == out_before
    assert b.round_active and b.peer_ready
    # Positive control: Alice's genuine HELLO on a new connection is accepted, and only
    # then does Bob sign his.
    a.connection_made()
    hello = a.frames_to_send()
    assert len(hello) == 1 and hello[0][0] == lc.HELLO
    assert b.accept_hello(hello[0], 0.0)
    reply = b.frames_to_send()
    assert [f[0] for f in reply] == [lc.HELLO]
    assert b.auth.levels()[0] == out_before - PAD_BYTES
    for f in reply:
        a.receive_frame(f, 0.0)
    assert a.peer_ready and b.peer_ready and not b.round_active
    # A replay of that HELLO (a new connection again) no longer verifies.
    assert not b.accept_hello(hello[0], 0.0)


# --------------------------------------------------------------------- adapter

class FakeWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def _offsets(buf: bytes) -> list[int]:
    out, i = [], 0
    while i < len(buf):
        (n,) = struct.unpack_from("<I", buf, i)
        out.append(struct.unpack_from("<Q", buf, i + 5)[0])
        i += 4 + n
    return out


def _alice_link(d: Path, sealer: Sealer, state: str = "state") -> Bb84Link:
    s = Bb84Settings(role="alice", params=PARAMS, bootstrap_key=PSK)
    fresh = not (d / state).exists()
    link = Bb84Link(s, None, sealer, d / state, key_size_bits=256,  # type: ignore[arg-type]
                    lifetime_s=3600, max_key_count=10, local_saes=["a"], peer_saes=["b"])
    if fresh:
        # As if the BOOT / BOOT_ACK exchange had run (no peer in these tests).
        link.core.auth = lc.bootstrap_auth("alice", PSK, os.urandom(32))
        link.core.auth_dirty = True
    return link


def _next_offset_after_restart(d: Path, sealer: Sealer, state: str) -> int:
    link = _alice_link(d, sealer, state)
    link.core.request_reservation(99, "other", "message", [])
    return struct.unpack_from("<Q", link.core.frames_to_send()[0], 1)[0]


def test_failed_state_write_never_lets_the_signed_frame_leave(tmp_path: Path) -> None:
    sealer = Sealer(os.urandom(32))

    async def main() -> None:
        link = _alice_link(tmp_path, sealer)
        w = FakeWriter()
        link._writer = w  # type: ignore[assignment]
        await link._call(link.core.request_reservation, 1, "m", "s", [])
        real = link._save_state

        def disk_full(state: dict[str, Any]) -> None:
            raise OSError(28, "No space left on device")

        link._save_state = disk_full  # type: ignore[method-assign]
        with pytest.raises(LinkStateNotSaved):
            await link._call(link.core.request_reservation, 2, "m", "s", [])
        assert link.core.auth_dirty and link._writer is None and w.closed
        assert link.health.state_save_failures == 1
        # What _timeout_loop does every second: still failing, still nothing sent.
        link._writer = w  # type: ignore[assignment]
        with pytest.raises(LinkStateNotSaved):
            await link._call(link.core.check_timeout, time.monotonic())
        link._save_state = real  # type: ignore[method-assign]
        link._writer = w  # type: ignore[assignment]
        await link._call(bb84._nothing)  # the retry succeeds
        assert not link.core.auth_dirty
        shutil.copy(tmp_path / "state", tmp_path / "stale")
        await link._call(link.core.request_reservation, 3, "m", "s", [])
        sent = _offsets(bytes(w.data))
        assert sent == [0, 2 * PAD_BYTES]  # request 2's frame never left
        persisted = json.loads(sealer.open(bb84._STATE_ID, (tmp_path / "state").read_bytes()))
        assert persisted["auth"]["next_out"] > max(sent)
        assert _next_offset_after_restart(tmp_path, sealer, "state") not in sent
        # Positive control: a state file older than a frame that left does reuse its pad.
        assert _next_offset_after_restart(tmp_path, sealer, "stale") in sent

    asyncio.run(main())


def test_work_and_dial_loops_survive_unexpected_errors(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    sealer = Sealer(os.urandom(32))
    monkeypatch.setattr(bb84, "LOOP_RETRY_S", 0.01)

    async def main() -> None:
        link = _alice_link(tmp_path, sealer)
        calls = {"work": 0, "dial": 0}
        real_take = link.core.take_work

        def take_work() -> lc.Work | None:
            calls["work"] += 1
            if calls["work"] == 1:
                raise RuntimeError("boom")
            return real_take()

        link.core.take_work = take_work  # type: ignore[method-assign]
        work = asyncio.create_task(link._work_loop())
        link._work_ready.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if calls["work"] >= 2:
                break
        assert calls["work"] >= 2 and not work.done()

        async def open_connection(*args: Any, **kw: Any) -> Any:
            calls["dial"] += 1
            raise RuntimeError("unexpected") if calls["dial"] == 1 else OSError("refused")

        monkeypatch.setattr(bb84.asyncio, "open_connection", open_connection)
        link.s = Bb84Settings(role="alice", params=PARAMS, bootstrap_key=PSK,
                              peer=HostPort("127.0.0.1", 9), quantum=HostPort("127.0.0.1", 9))
        dial = asyncio.create_task(link._dial_loop())
        for _ in range(300):
            await asyncio.sleep(0.01)
            if calls["dial"] >= 2:
                break
        assert calls["dial"] >= 2 and not dial.done()
        assert link.health.loop_errors == 2
        for t in (work, dial):
            t.cancel()
        await asyncio.gather(work, dial, return_exceptions=True)

    asyncio.run(main())


async def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_strangers_connecting_to_bob_cost_no_pad_and_leave_the_link_up(tmp_path: Path
                                                                      ) -> None:
    sealer_a, sealer_b = Sealer(os.urandom(32)), Sealer(os.urandom(32))

    async def main() -> None:
        sb = Bb84Settings(role="bob", params=PARAMS, bootstrap_key=PSK,
                          listen=HostPort("127.0.0.1", 0),
                          quantum_listen=HostPort("127.0.0.1", 0))
        bob = Bb84Link(sb, None, sealer_b, tmp_path / "bob", key_size_bits=256,  # type: ignore[arg-type]
                       lifetime_s=3600, max_key_count=10, local_saes=["b"], peer_saes=["a"])
        await bob.start()
        sa = Bb84Settings(role="alice", params=PARAMS, bootstrap_key=PSK,
                          peer=HostPort("127.0.0.1", bob.ports["classical"]),
                          quantum=HostPort("127.0.0.1", bob.ports["quantum"]))
        alice = Bb84Link(sa, None, sealer_a, tmp_path / "alice", key_size_bits=256,  # type: ignore[arg-type]
                         lifetime_s=3600, max_key_count=10, local_saes=["a"],
                         peer_saes=["b"])
        await alice.start()
        idle: list[asyncio.StreamWriter] = []
        try:
            await _wait(lambda: alice.core.peer_ready and bob.core.peer_ready)
            live = bob._writer
            out_before = bob.core.auth.levels()[0]
            port = bob.ports["classical"]
            forged = bytearray(lc._CTRL.pack(lc.HELLO, 10_000 * PAD_BYTES, os.urandom(16))
                               + lc._ALT.pack(0, 0, bytes(16)))
            forged += json.dumps({"role": "alice", "params": bob.core.fingerprint,
                                  "watermark_in": 0, "committed": 0}).encode()
            for i in range(60):
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                if i % 3 == 1:
                    bb84.write_frame(w, b"\x02" + bytes(30))
                elif i % 3 == 2:
                    bb84.write_frame(w, bytes(forged))
                await w.drain()
                w.close()
            await _wait(lambda: bob.health.connections_refused >= 60)
            # The old code signed a HELLO per connection and dropped the live one.
            assert bob.core.auth.levels()[0] == out_before
            assert bob._writer is live and alice.core.peer_ready and bob.core.peer_ready
            assert alice._peer_ready_count == 1
            # The live link still carries an authenticated round trip.
            with pytest.raises(LinkUnavailable, match="refused the reservation"):
                await alice.reserve_at_peer("not-registered", "b", [])
            out_live = bob.core.auth.levels()[0]
            # Idle strangers beyond the cap cannot lock Alice out either.
            for _ in range(bb84.MAX_UNVERIFIED_CONNECTIONS + 4):
                idle.append((await asyncio.open_connection("127.0.0.1", port))[1])
            await asyncio.sleep(0.2)
            # Positive control: Alice reconnecting (a verified HELLO) does cost Bob
            # exactly one pad and replaces the connection.
            alice._drop_connection()
            await _wait(lambda: alice._peer_ready_count == 2 and bob.core.peer_ready)
            assert bob.core.auth.levels()[0] == out_live - PAD_BYTES
            assert bob._writer is not live
        finally:
            for w in idle:
                w.close()
            await alice.close()
            await bob.close()

    asyncio.run(main())
