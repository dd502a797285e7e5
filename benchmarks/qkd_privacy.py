"""Toeplitz privacy amplification throughput on 1e7-bit blocks (input Mbit/s).

Compares, in the same run and interleaved (so machine load hits all alike): the compiled
GF(2) kernel (`toeplitz_native`, _qkdgw_gf2: carry-less Karatsuba middle product with a
VPCLMULQDQ or PCLMULQDQ base case, the 128-bit one also timed when both exist;
`--portable` adds the software-clmul fallback), the float64 FFT reference `toeplitz_fft`
(one complex four-step FFT of seed + i*key, Hermitian half-length inverse, see
qkd/sim/privacy.py) with workers=1 (the per-core figure) and workers=2, and the plain
numpy approach (full linear convolution padded to a power
of two, three numpy real FFTs). All outputs are compared bit for bit.

Each method runs --repeat times; the table gives the best wall time, the median wall
time and the best CPU time (user + system of this process, which is what one core
spends even when other processes compete for it). The ratio uses the same statistic
for both methods.

Every --ratios value (output/input length) gets its own table: 0.5 is the issue's case,
0.155 what the link's rounds use (~155 kbit final key from ~1e6 reconciled bits, see
benchmarks/README.md). Packing 0/1 bytes to words and back is inside the timed call.
The load average (/proc/loadavg) is printed before and after.

Run: python benchmarks/qkd_privacy.py [--bits 1e7] [--ratios 0.5,0.155] [--repeat 5]
     [--no-plain] [--portable]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from qkd import native
from qkd.sim.privacy import toeplitz_fft, toeplitz_native


def plain_numpy(x: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    n = x.size
    size = 1 << (n + s.size - 1).bit_length()
    conv = np.fft.irfft(np.fft.rfft(s.astype(float), size) * np.fft.rfft(x.astype(float), size),
                        size)
    return (np.rint(conv[n - 1 : n - 1 + m]).astype(np.int64) & 1).astype(np.uint8)


def _cpu() -> float:
    return time.process_time()  # user + system of this process


def _isas() -> list[str]:
    gf2 = native.load("gf2")
    if gf2 is None:
        raise SystemExit("_qkdgw_gf2 not built (pip install -e .) or QKDGW_NATIVE=0")
    return list(gf2.isas())


def _loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run(n: int, m: int, repeat: int, plain: bool, portable: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    methods = {
        "native gf2": lambda: toeplitz_native(x, s, m),
        "toeplitz_fft": lambda: toeplitz_fft(x, s, m, workers=1),
        "toeplitz_fft w2": lambda: toeplitz_fft(x, s, m, workers=2),
    }
    isas = _isas()
    if "vpclmul" in isas:  # the default is the ymm base case; show the 128-bit one too
        methods["native pclmul"] = lambda: toeplitz_native(x, s, m, isa="pclmul")
    if portable:
        methods["native portable"] = lambda: toeplitz_native(x, s, m, force_portable=True)
    if plain:
        methods["plain numpy"] = lambda: plain_numpy(x, s, m)
    wall: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    out: dict[str, np.ndarray] = {}
    load0 = _loadavg()
    for _ in range(repeat):
        for name, fn in methods.items():
            c, t = _cpu(), time.perf_counter()
            y = fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(_cpu() - c)
            if name in out:
                assert np.array_equal(out[name], y)
            out[name] = y
    ref = out["toeplitz_fft"]
    assert all(np.array_equal(y, ref) for y in out.values()), "outputs differ"
    print(f"n = {n} input bits, m = {m} output bits, {repeat} runs each, interleaved; "
          f"load average {load0} -> {_loadavg()}; native default base case: {isas[-1]}")
    print(f"{'method':>16} {'best s':>7} {'median s':>8} {'Mbit/s':>7} {'best CPU s':>10} "
          f"{'Mbit/s CPU':>10}")
    for name in methods:
        b, med, c = min(wall[name]), statistics.median(wall[name]), min(cpu[name])
        print(f"{name:>16} {b:7.3f} {med:8.3f} {n / b / 1e6:7.1f} {c:10.3f} "
              f"{n / max(c, 1e-6) / 1e6:10.1f}")
    f, g = "toeplitz_fft", "native gf2"
    print(f"native vs toeplitz_fft (workers=1): best wall {min(wall[f]) / min(wall[g]):.2f}x, "
          f"median wall {statistics.median(wall[f]) / statistics.median(wall[g]):.2f}x "
          f"(outputs identical)")
    if plain:
        p = "plain numpy"
        print(f"toeplitz_fft vs plain numpy: best wall {min(wall[p]) / min(wall[f]):.2f}x, "
              f"best CPU {min(cpu[p]) / min(cpu[f]):.2f}x")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, default=1e7)
    ap.add_argument("--ratios", default="0.5,0.155", help="output/input lengths, comma-separated")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain numpy FFT")
    ap.add_argument("--portable", action="store_true", help="also time the software clmul")
    args = ap.parse_args()
    n = int(args.bits)
    for r in args.ratios.split(","):
        run(n, int(n * float(r)), args.repeat, not args.no_plain, args.portable)


if __name__ == "__main__":
    main()
