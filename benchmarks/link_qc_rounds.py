"""The quantum channel's four steps round after round in one process: emission,
encode+seal, unseal+decode, measurement, with CPU time and minor page faults per step.

`link_stages.py` runs fresh processes, where the first round's cold memory (page
faults, huge-page zeroing) is much of a step's cost; this shows the steady state a KME
reaches after its first round, and how many fresh pages each step touches.

Run from the repo root: python benchmarks/link_qc_rounds.py [--rounds 4] [--distance 25]
(PYTHONPATH=DIR in front runs another checkout's qkd package and kernels, e.g. main's
`git archive main | tar -x -C DIR` after `python setup.py build_ext --inplace` in DIR).
"""

from __future__ import annotations

import argparse
import resource
import secrets
import time

import numpy as np
from link_pair import bench_params

from qkd.link import quantum
from qkd.link.csprng import SecretRng


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--distance", type=float, default=25.0)
    ap.add_argument("--pulses", type=float, default=4e7)
    args = ap.parse_args()
    params = bench_params(args.distance, args.pulses)
    link_secret, nonce = secrets.token_bytes(32), secrets.token_bytes(16)
    seal_frame = getattr(quantum, "seal_frame", None)  # absent in older checkouts
    print(f"code: {quantum.__file__}")
    for rnd in range(args.rounds):
        marks = [(time.process_time(), _faults())]
        _, frame = quantum.emit(params, rnd, np.random.default_rng(rnd), SecretRng())
        marks.append((time.process_time(), _faults()))
        wire = (seal_frame(link_secret, nonce, rnd, frame) if seal_frame else
                quantum.seal(link_secret, nonce, rnd, frame.encode()))
        marks.append((time.process_time(), _faults()))
        got = quantum.PulseFrame.decode(quantum.unseal(link_secret, wire, rnd, nonce))
        marks.append((time.process_time(), _faults()))
        quantum.measure(got, params, np.random.default_rng(rnd + 1000), SecretRng())
        marks.append((time.process_time(), _faults()))
        cells = [f"{name} {1e3 * (b[0] - a[0]):6.1f} ms {b[1] - a[1]:6d} faults"
                 for name, a, b in zip(("emit", "encode+seal", "unseal+decode", "measure"),
                                       marks, marks[1:], strict=False)]
        print(f"round {rnd}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
