"""Toeplitz privacy amplification throughput on 1e7-bit blocks (input Mbit/s).

Compares, in the same run and interleaved (so machine load hits both alike):
this module's `toeplitz_fft` (one complex four-step FFT of seed + i*key, Hermitian
half-length inverse, see qkd/sim/privacy.py) with workers=1 (the per-core figure) and
workers=2, against the plain numpy approach (full linear convolution padded to a power
of two, three numpy real FFTs). All outputs are compared bit for bit.

Each method runs --repeat times; the table gives the best wall time, the median wall
time and the best CPU time (user + system of this process, which is what one core
spends even when other processes compete for it). The ratio uses the same statistic
for both methods.

Run: python benchmarks/qkd_privacy.py [--bits 1e7] [--ratio 0.5] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from qkd.sim.privacy import toeplitz_fft


def plain_numpy(x: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    n = x.size
    size = 1 << (n + s.size - 1).bit_length()
    conv = np.fft.irfft(np.fft.rfft(s.astype(float), size) * np.fft.rfft(x.astype(float), size),
                        size)
    return (np.rint(conv[n - 1 : n - 1 + m]).astype(np.int64) & 1).astype(np.uint8)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, default=1e7)
    ap.add_argument("--ratio", type=float, default=0.5, help="output/input length")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = int(args.bits)
    m = int(n * args.ratio)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    methods = {
        "toeplitz_fft": lambda: toeplitz_fft(x, s, m, workers=1),
        "toeplitz_fft w2": lambda: toeplitz_fft(x, s, m, workers=2),
        "plain numpy": lambda: plain_numpy(x, s, m),
    }
    wall: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    out: dict[str, np.ndarray] = {}
    for _ in range(args.repeat):
        for name, fn in methods.items():
            c, t = _cpu(), time.perf_counter()
            y = fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(_cpu() - c)
            if name in out:
                assert np.array_equal(out[name], y)
            out[name] = y
    ref = out["plain numpy"]
    assert all(np.array_equal(y, ref) for y in out.values()), "outputs differ"
    print(f"n = {n} input bits, m = {m} output bits, {args.repeat} runs each, interleaved")
    print(f"{'method':>16} {'best s':>7} {'median s':>8} {'Mbit/s':>7} {'best CPU s':>10} "
          f"{'Mbit/s CPU':>10}")
    for name in methods:
        b, med, c = min(wall[name]), statistics.median(wall[name]), min(cpu[name])
        print(f"{name:>16} {b:7.2f} {med:8.2f} {n / b / 1e6:7.2f} {c:10.2f} {n / c / 1e6:10.2f}")
    p, f = "plain numpy", "toeplitz_fft"
    print(f"speed-up vs plain numpy (workers=1): best wall {min(wall[p]) / min(wall[f]):.2f}x, "
          f"median wall {statistics.median(wall[p]) / statistics.median(wall[f]):.2f}x, "
          f"best CPU {min(cpu[p]) / min(cpu[f]):.2f}x (outputs identical)")


if __name__ == "__main__":
    main()
