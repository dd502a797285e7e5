"""Cascade throughput (sifted Mbit/s, one core), efficiency f and frame error rate,
with the per-frame verification of qkd.sim.reconcile (tags, retries, drops).

Run: python benchmarks/qkd_cascade.py [--frames 512] [--frame-bits 16384] [--group 128]
     [--variants original,option8] [--qbers 0.01,0.02,0.03,0.05] [--log FILE] [--json]
     [--tag-bits 32] [--retries 2]

Frames are drawn on a binary symmetric channel and reconciled `--group` at a time (one
Cascade run, the protocol's default of 128 frames); both parties run in this process
and exchange encoded messages. Columns:

  f, f sd     mean and standard deviation over frames of leaked / (n h(Q)), leaked =
              every parity and every per-frame tag bit (dropped frames included)
  f casc      the same without the tags (Cascade's parities alone, retries included)
  FER0        frames wrong after the first Cascade run / frames (before the check)
  FER         frames kept whose bits still differ from Alice's / frames (after the
              check), with the exact (Clopper-Pearson) 95 % upper bound; with 0
              failures in N frames that bound is 1 - 0.05^(1/N) ~ 3/N, so
              "FER < 1e-4 at 95 %" needs N >= 29956 frames without a failure
  drop        frames dropped by both sides (still wrong after the retries)
  RT/run      round trips per Cascade run; B/par: query+reply bytes per revealed parity
  Mbit/s      sifted bits / wall time, and / CPU time of this process (user + system:
              what one core spends, even when other processes compete for it)

Long runs: `--frames 32768 --log cascade.log` writes one progress line per group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from qkd.sim.estimation import h2
from qkd.sim.reconcile import reconcile_verified


def fer_upper(fails: int, frames: int, conf: float = 0.95) -> float:
    """One-sided exact binomial (Clopper-Pearson) upper confidence bound."""
    if fails >= frames:
        return 1.0
    if fails == 0:
        return 1.0 - (1.0 - conf) ** (1.0 / frames)
    from scipy.stats import beta

    return float(beta.ppf(conf, fails + 1, frames - fails))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run(variant: str, q: float, frames: int, frame_bits: int, group: int, seed: int,
        log, tag_bits: int = 32, retries: int = 2) -> dict:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng([seed, round(q * 1e6)])
    leaks, fails, rts, nbytes, wall, cpu, done = [], 0, [], 0, 0.0, 0.0, 0
    fails0 = dropped = tags = 0
    t_start = time.time()
    while done < frames:
        g = min(group, frames - done)
        a = rng.integers(0, 2, (g, frame_bits), dtype=np.uint8)
        b = a ^ (rng.random((g, frame_bits)) < q).astype(np.uint8)
        c0, t0 = _cpu(), time.perf_counter()
        res = reconcile_verified(a, b, q, variant, int(rng.integers(0, 2**63)), tag_bits,
                                 retries)
        wall += time.perf_counter() - t0
        cpu += _cpu() - c0
        wrong = np.any(res.corrected != a, axis=1)
        fails += int(np.count_nonzero(wrong & res.keep))
        fails0 += int(np.count_nonzero(np.any(res.first_run_bits != a, axis=1)))
        dropped += int(np.count_nonzero(~res.keep))
        tags += res.tag_bits
        leaks.append(res.leak_per_frame)
        rts.append(res.round_trips)
        nbytes += res.bytes_exchanged
        done += g
        if log:
            el = time.time() - t_start
            print(f"{time.strftime('%H:%M:%S')} {variant} Q={q:g}: {done}/{frames} frames, "
                  f"{fails0} wrong before the check, {fails} after, {dropped} dropped, "
                  f"{done * frame_bits / cpu / 1e6:.2f} Mbit/s CPU, "
                  f"elapsed {el:.0f} s, eta {el / done * (frames - done):.0f} s",
                  file=log, flush=True)
    eff = np.concatenate(leaks) / (frame_bits * h2(q))
    leaked = int(np.concatenate(leaks).sum())
    nh = frames * frame_bits * h2(q)
    return {
        "variant": variant, "qber": q, "frame_bits": frame_bits, "frames": frames,
        "group": group, "mean_efficiency": float(eff.mean()),
        "efficiency_std": float(eff.std()), "efficiency_max": float(eff.max()),
        "efficiency_cascade": (leaked - tags) / nh, "tag_bits": tag_bits,
        "retries": retries,
        "frame_errors_before_check": fails0, "fer_before_check": fails0 / frames,
        "fer_before_upper_95": fer_upper(fails0, frames),
        "frames_dropped": dropped,
        "frame_errors": fails, "frame_error_rate": fails / frames,
        "fer_upper_95": fer_upper(fails, frames),
        "round_trips_per_run": float(np.mean(rts)), "round_trips_max": int(max(rts)),
        "bytes_per_parity": nbytes / max(leaked, 1),
        "throughput_mbps": frames * frame_bits / wall / 1e6,
        "cpu_throughput_mbps": frames * frame_bits / cpu / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--frame-bits", type=int, default=1 << 14)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--variants", default="original,option8")
    ap.add_argument("--qbers", default="0.01,0.02,0.03,0.05")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tag-bits", type=int, default=32, help="per-frame tag (0: no check)")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--log", default=None, help="progress file ('-' for stderr)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    log = None
    if args.log == "-":
        log = sys.stderr
    elif args.log:
        log = open(args.log, "a")  # noqa: SIM115 - kept open for the whole run
    rows = [run(v, float(q), args.frames, args.frame_bits, args.group, args.seed, log,
                args.tag_bits, args.retries)
            for v in args.variants.split(",") for q in args.qbers.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.frames} frames of {args.frame_bits} bits, {args.group} frames per run, "
          f"{args.tag_bits}-bit frame tags, {args.retries} retries")
    print(f"{'variant':>9} {'QBER':>5} {'f':>7} {'f casc':>7} {'f sd':>6} {'FER0':>8} "
          f"{'drop':>4} {'fails':>5} {'FER':>8} "
          f"{'FER<(95%)':>9} {'RT/run':>7} {'B/par':>6} {'Mbit/s':>7} {'CPU Mbit/s':>10}")
    for r in rows:
        print(f"{r['variant']:>9} {r['qber']:5g} {r['mean_efficiency']:7.4f} "
              f"{r['efficiency_cascade']:7.4f} "
              f"{r['efficiency_std']:6.3f} {r['fer_before_check']:8.1e} "
              f"{r['frames_dropped']:4d} {r['frame_errors']:5d} "
              f"{r['frame_error_rate']:8.1e} {r['fer_upper_95']:9.2e} "
              f"{r['round_trips_per_run']:7.0f} {r['bytes_per_parity']:6.2f} "
              f"{r['throughput_mbps']:7.2f} {r['cpu_throughput_mbps']:10.2f}")
    if any(math.isnan(r["mean_efficiency"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
