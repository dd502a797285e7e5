"""Toeplitz privacy amplification throughput on 1e7-bit blocks (input Mbit/s).

Compares, in the same run: this module's circular FFT (length n+m-1, in-place scipy FFT
when scipy is installed) against the plain numpy approach (full linear convolution
padded to a power of two), and checks both agree.

Run: python benchmarks/qkd_privacy.py [--bits 1e7] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qkd.sim.privacy import toeplitz_fft


def plain_numpy(x: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    n = x.size
    size = 1 << (n + s.size - 1).bit_length()
    conv = np.fft.irfft(np.fft.rfft(s.astype(float), size) * np.fft.rfft(x.astype(float), size),
                        size)
    return (np.rint(conv[n - 1 : n - 1 + m]).astype(np.int64) & 1).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, default=1e7)
    ap.add_argument("--ratio", type=float, default=0.5, help="output/input length")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = int(args.bits)
    m = int(n * args.ratio)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    best = {}
    for name, fn in (("toeplitz_fft", toeplitz_fft), ("plain numpy", plain_numpy)):
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            y = fn(x, s, m)
            times.append(time.perf_counter() - t)
        best[name] = (min(times), y)
        print(f"{name:>13}: {min(times):6.2f} s  {n / min(times) / 1e6:6.2f} Mbit/s input")
    assert np.array_equal(best["toeplitz_fft"][1], best["plain numpy"][1])
    print(f"speed-up vs plain numpy: {best['plain numpy'][0] / best['toeplitz_fft'][0]:.2f}x "
          f"(outputs identical)")


if __name__ == "__main__":
    main()
