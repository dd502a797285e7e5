"""Pulses simulated per second, full per-pulse model vs detected-event sampling.

Run: python benchmarks/qkd_pulses.py [--pulses 2e8]
Single process, one core (numpy's RNG and comparisons are single-threaded).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qkd.sim.channel import simulate_link
from qkd.sim.params import LinkParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pulses", type=float, default=2e8)
    args = ap.parse_args()
    n = int(args.pulses)
    print(f"{'sampler':>9} {'km':>5} {'pulses':>9} {'clicks':>9} {'s':>7} {'pulses/s':>10}")
    for sampler, km, pulses in (("full", 25, n), ("full", 100, n), ("detected", 25, n),
                                ("detected", 100, 50 * n), ("detected", 200, 5000 * n)):
        p = LinkParams(distance_km=km, pulses=pulses)
        simulate_link(p.with_(pulses=10**6), np.random.default_rng(0), sampler)  # warm-up
        t = time.perf_counter()
        rec = simulate_link(p, np.random.default_rng(1), sampler)
        dt = time.perf_counter() - t
        print(f"{sampler:>9} {km:5d} {pulses:9.2e} {rec.bob.slots.size:9d} {dt:7.2f} "
              f"{pulses / dt:10.3e}")


if __name__ == "__main__":
    main()
