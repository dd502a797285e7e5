"""Rounds of the emulated BB84 link per second, and secret key bits per second.

Two `qkd.link.core.LinkCore`s back to back in one process (no sockets): Alice's
emission, the quantum-channel frame (sealed with AES-256-GCM where the code does it),
Bob's measurement, the whole post-processing and the commit, one round after another,
on one core. Prints the wall and CPU time per phase and the totals.

Run from the repo root: python benchmarks/link_round.py [--rounds 5] [--pulses 1.2e7]
The same script runs against an older checkout (PYTHONPATH=/path/to/old), so a change
is measured as a before/after pair on the same machine.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time

import numpy as np

from qkd.link import core as lc
from qkd.sim.params import LinkParams


def make_pair(params: LinkParams, psk: bytes) -> tuple[lc.LinkCore, lc.LinkCore]:
    extra: dict[str, object] = {}
    if "link_secret" in inspect.signature(lc.LinkCore).parameters:
        extra["link_secret"] = psk
    cores = []
    for role, seed in (("alice", 1), ("bob", 2)):
        cores.append(lc.LinkCore(role, lc.bootstrap_auth(role, psk), params, 256,
                                 np.random.default_rng(seed), **extra))  # type: ignore[arg-type]
    return cores[0], cores[1]


def pump(a: lc.LinkCore, b: lc.LinkCore, clock: dict[str, float]) -> int:
    bits = 0
    while True:
        moved = False
        for src, dst in ((a, b), (b, a)):
            for f in src.frames_to_send():
                moved = True
                dst.receive_frame(f, 0.0)
        for q in a.quantum_to_send():
            moved = True
            b.receive_pulses(q, 0.0)
        for core in (a, b):
            while (w := core.take_work()) is not None:
                moved = True
                t = time.perf_counter()
                core.work_done(w.run(), 0.0)
                clock[w.kind] = clock.get(w.kind, 0.0) + time.perf_counter() - t
            while (ev := core.next_event()) is not None:
                moved = True
                if isinstance(ev, lc.DepositRequested):
                    core.deposit_done(ev.round)
                if isinstance(ev, lc.RoundCommitted) and core is a:
                    bits += len(ev.blocks) * len(ev.blocks[0][1]) * 8 if ev.blocks else 0
        if not moved:
            return bits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pulses", type=float, default=1.2e7)
    ap.add_argument("--distance", type=float, default=10.0)
    args = ap.parse_args()
    params = LinkParams(distance_km=args.distance, detector_efficiency=0.8,
                        misalignment=0.01, dark_count_prob=1e-7, pulses=int(args.pulses))
    a, b = make_pair(params, os.urandom(32))
    a.connection_made()
    b.connection_made()
    pump(a, b, {})
    clock: dict[str, float] = {}
    bits = rounds = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.rounds):
        t = time.perf_counter()
        prepared = a.prepare_round(a.next_round_number())
        clock["emit"] = clock.get("emit", 0.0) + time.perf_counter() - t
        a.start_round(0.0, prepared)
        bits += pump(a, b, clock)
        rounds += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(f"pulses/round {params.pulses:.3g}  distance {params.distance_km:g} km  "
          f"rounds {rounds}  committed {a.stats.rounds_committed}")
    print("phase seconds per round: " + "  ".join(
        f"{k} {v / rounds:.3f}" for k, v in sorted(clock.items())))
    print(f"wall {wall:.2f} s  cpu {cpu:.2f} s  rounds/s {rounds / wall:.3f}  "
          f"deposited secret bits/s {bits / wall:,.0f}  "
          f"(final key bits/s {a.stats.key_bits / wall:,.0f})")


if __name__ == "__main__":
    main()
