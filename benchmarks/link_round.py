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
import time

from link_pair import connected_pair, pump


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pulses", type=float, default=1.2e7)
    ap.add_argument("--distance", type=float, default=10.0)
    args = ap.parse_args()
    params, a, b = connected_pair(args.distance, args.pulses)
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
