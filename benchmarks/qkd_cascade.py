"""Cascade throughput (sifted Mbit/s, one core), efficiency f and frame error rate.

Run: python benchmarks/qkd_cascade.py [--frames 1024] [--frame-bits 16384]
FER resolution is 1/frames: claiming FER < 1e-4 needs >= 3e4 frames with no failure
(`--frames 32768`, about half an hour here).
"""

from __future__ import annotations

import argparse

from qkd.sim.cli import reconcile_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--frame-bits", type=int, default=1 << 14)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--variants", default="original,option8")
    ap.add_argument("--qbers", default="0.01,0.02,0.03,0.05")
    args = ap.parse_args()
    rows = reconcile_rows([float(q) for q in args.qbers.split(",")], args.frame_bits,
                          args.frames, args.variants.split(","), seed=1, group=args.group)
    print(f"{'variant':>9} {'QBER':>5} {'f':>7} {'f sd':>6} {'FER':>9} {'fails':>5} "
          f"{'msgs':>7} {'Mbit/s':>7}")
    for r in rows:
        print(f"{r['variant']:>9} {r['qber']:5g} {r['mean_efficiency']:7.4f} "
              f"{r['efficiency_std']:6.3f} {r['frame_error_rate']:9.2e} {r['frame_errors']:5d} "
              f"{r['channel_uses']:7d} {r['throughput_mbps']:7.2f}")


if __name__ == "__main__":
    main()
