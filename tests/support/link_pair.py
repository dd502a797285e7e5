"""Two sans-I/O link cores wired back to back in memory, with a relay that may tamper."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from qkd.link import core as lc
from qkd.link.quantum import PulseFrame, attack, seal, sealed_header, unseal
from qkd.sim.params import LinkParams

# 10 km, a good detector and 1.2e7 pulses: a round with enough key to leave the
# bootstrap keys in about two seconds.
PARAMS = LinkParams(distance_km=10.0, detector_efficiency=0.8, misalignment=0.01,
                    dark_count_prob=1e-7, pulses=12_000_000)


PSK = os.urandom(32)


# (direction, frame number, frame) -> the frame to deliver, or None to drop it
Tamper = Callable[[str, int, bytes], bytes | None]


def pair(params: LinkParams = PARAMS) -> tuple[lc.LinkCore, lc.LinkCore]:
    a = lc.LinkCore("alice", lc.bootstrap_auth("alice", PSK), params, 256,
                    np.random.default_rng(1), link_secret=PSK)
    b = lc.LinkCore("bob", lc.bootstrap_auth("bob", PSK), params, 256,
                    np.random.default_rng(2), link_secret=PSK)
    return a, b


def pump(a: lc.LinkCore, b: lc.LinkCore, tamper: Tamper | None = None,
         eve: str | None = None, depositors: tuple[str, ...] = ("alice", "bob")
         ) -> list[tuple[str, object]]:
    """Move frames until both sides are quiet; the `depositors` store their blocks at
    once, the others never. Returns events."""
    events: list[tuple[str, object]] = []
    counts = {"a2b": 0, "b2a": 0}
    while True:
        moved = False
        for src, dst, name in ((a, b, "a2b"), (b, a, "b2a")):
            for frame in src.frames_to_send():
                moved = True
                counts[name] += 1
                out = tamper(name, counts[name], frame) if tamper is not None else frame
                if out is None:
                    continue
                try:
                    dst.receive_frame(out, 0.0)
                except lc.LinkProtocolError as exc:
                    events.append(("protocol_error", str(exc)))
        for q in a.quantum_to_send():
            moved = True
            if eve:
                # Eve is handed the link secret: she opens, attacks and reseals.
                rnd, nonce, counter = sealed_header(q)
                f = attack(PulseFrame.decode(unseal(PSK, q)), eve, 1.0,
                           np.random.default_rng(9))
                q = seal(PSK, nonce, rnd, f.encode(), counter + 1)
            b.receive_pulses(q, 0.0)
        for side, core in (("alice", a), ("bob", b)):
            while (work := core.take_work()) is not None:
                moved = True
                core.work_done(work.run(), 0.0)
            while (ev := core.next_event()) is not None:
                moved = True
                events.append((side, ev))
                if isinstance(ev, lc.DepositRequested) and side in depositors:
                    core.deposit_done(ev.round)
        if not moved:
            return events


def connect(a: lc.LinkCore, b: lc.LinkCore) -> None:
    a.connection_made()
    b.connection_made()
    pump(a, b)
    assert a.peer_ready and b.peer_ready


def committed(events: list[tuple[str, object]], side: str) -> list[lc.KeyBlocks]:
    return [e for s, e in events if s == side and isinstance(e, lc.RoundCommitted)]
