"""Where the time of an emulated BB84 link round goes, stage by stage.

Two `qkd.link.core.LinkCore`s back to back in one process, as in `link_round.py`, with
the stage functions wrapped by timers at run time (production code is not changed):
each stage's *exclusive* wall and CPU time is summed over both sides, so nested calls
(the privacy amplification inside Alice's verify handler, message decoding inside a
handler) are counted once, in the innermost stage. Whatever no wrapper covers (the
cores' frame handling, the pump loop) is "other".

Stages:
  emission            Alice's source (`quantum.emit`)
  qc framing+seal     pulse-frame encode/decode and AES-GCM seal/unseal of the quantum
                      channel (the in-process transfer itself is a list append)
  measurement         Bob's receiver (`quantum.measure`)
  sifting             Detections / SiftReply / TestBits handling (both sides)
  estimation          decoy-state bounds and the finite-key length check
  cascade             reconciliation (both sides' Cascade state machines and the
                      per-frame check's tags and retries)
  verification        the Toeplitz verification hash (both sides)
  privacy amp.        Toeplitz privacy amplification (both sides) and Alice's seed
  pp codec            encoding and decoding of post-processing messages
  commit+tags         TRANSCRIPT / COMMIT / COMMIT_ACK, the Wegman-Carter tags over
                      the round's transcript, pads, deposit
  other               everything not wrapped (core dispatch, transcript buffers, pump)

Run from the repo root: python benchmarks/link_stages.py [--rounds 1] [--pulses 4e7]
  [--profile N]   also print the N most expensive functions (cProfile, tottime)
  [--compare N]   N runs each of the numpy paths (QKDGW_NATIVE=0) and the compiled
                  kernels (default), interleaved, each in a fresh process; prints CPU
                  per stage per run, the key per round and the key rates, and the load
                  average before and after
  [--baseline DIR] with --compare: a third column, the qkd package of another
                  checkout (e.g. `git archive main | tar -x -C DIR`) first on PYTHONPATH
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import inspect
import json
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from link_pair import connected_pair, pump

from qkd.link import core as lc
from qkd.link import quantum
from qkd.sim import messages, protocol
from qkd.sim.cascade import CascadeAlice, CascadeBob

try:
    from qkd.sim import reconcile
except ImportError:  # a checkout from before the per-frame check (--baseline)
    reconcile = None  # type: ignore[assignment]

_STAGES = ["emission", "qc framing+seal", "measurement", "sifting", "estimation",
           "cascade", "verification", "privacy amp.", "pp codec", "commit+tags"]
_wall: dict[str, float] = dict.fromkeys(_STAGES, 0.0)
_cpu: dict[str, float] = dict.fromkeys(_STAGES, 0.0)
# One frame per running stage: [name, wall at entry, cpu at entry, child wall, child cpu]
_stack: list[list[Any]] = []


def _timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        frame = [stage, time.perf_counter(), time.process_time(), 0.0, 0.0]
        _stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            _stack.pop()
            w = time.perf_counter() - frame[1]
            c = time.process_time() - frame[2]
            # Exclusive time: a nested stage already booked its share.
            _wall[stage] += w - frame[3]
            _cpu[stage] += c - frame[4]
            if _stack:
                _stack[-1][3] += w
                _stack[-1][4] += c
    return wrapper


def _wrap(owner: Any, name: str, stage: str) -> None:
    """Replace owner.name by a timed wrapper; skip names an older checkout lacks."""
    fn = inspect.getattr_static(owner, name, None)
    if fn is None:
        return
    if isinstance(fn, classmethod):
        setattr(owner, name, classmethod(_timed(stage, fn.__func__)))
    elif isinstance(fn, staticmethod):
        setattr(owner, name, staticmethod(_timed(stage, fn.__func__)))
    else:
        setattr(owner, name, _timed(stage, fn))


def instrument() -> None:
    # core.py imports these by name, so its own references are the ones to wrap.
    for mod in (quantum, lc):
        _wrap(mod, "emit", "emission")
        _wrap(mod, "measure", "measurement")
        _wrap(mod, "seal", "qc framing+seal")
        _wrap(mod, "seal_frame", "qc framing+seal")
        _wrap(mod, "unseal", "qc framing+seal")
    _wrap(quantum, "sealed_header", "qc framing+seal")
    _wrap(quantum.PulseFrame, "encode", "qc framing+seal")
    _wrap(quantum.PulseFrame, "decode", "qc framing+seal")
    A, B = protocol.AliceProtocol, protocol.BobProtocol
    _wrap(A, "_on_detections", "sifting")
    _wrap(B, "_on_sift", "sifting")
    _wrap(B, "__init__", "sifting")  # sends Detections
    _wrap(A, "_on_test_bits", "estimation")
    _wrap(B, "_on_estimate", "estimation")
    _wrap(B, "_start_group", "cascade")
    # The link drives Cascade through the per-frame check (qkd.sim.reconcile) when the
    # checkout has it; its tags count as reconciliation too.
    for cls in (CascadeAlice, CascadeBob, getattr(reconcile, "ReconcileAlice", None),
                getattr(reconcile, "ReconcileBob", None)):
        if cls is None:
            continue
        for name in ("__init__", "receive_message", "receive_decoded", "messages_to_send"):
            _wrap(cls, name, "cascade")
    _wrap(A, "_after_cascade", "verification")
    _wrap(B, "_on_verify_hash", "verification")
    _wrap(protocol, "toeplitz_hash", "verification")
    _wrap(A, "_on_verify", "privacy amp.")
    _wrap(B, "_on_pa", "privacy amp.")
    _wrap(protocol, "privacy_amplification", "privacy amp.")
    _wrap(messages, "decode", "pp codec")
    for name in dir(messages):
        cls = getattr(messages, name)
        if isinstance(cls, type) and "encode" in vars(cls):
            _wrap(cls, "encode", "pp codec")
    for name in ("_on_transcript", "_alice_close", "_on_commit", "_on_commit_ack",
                 "_commit", "deposit_done", "_send_ctrl"):
        _wrap(lc.LinkCore, name, "commit+tags")


def compare(args: argparse.Namespace) -> None:
    """Old (numpy) and new (compiled) interleaved, one fresh process per run."""
    cmd = [sys.executable, __file__, "--json", "--rounds", str(args.rounds),
           "--pulses", str(args.pulses), "--distance", str(args.distance)]
    load0 = os.getloadavg()
    modes = {"numpy (QKDGW_NATIVE=0)": {"QKDGW_NATIVE": "0"},
             "compiled kernels": {"QKDGW_NATIVE": "1"}}
    if args.baseline:
        modes = {f"baseline {args.baseline}": {"PYTHONPATH": str(args.baseline)}, **modes}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.compare):
        for mode, env in modes.items():
            out = subprocess.run(cmd, env={**os.environ, **env}, check=True,
                                 capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.splitlines()[-1]))
    load1 = os.getloadavg()
    print(f"pulses/round {args.pulses:.3g}  distance {args.distance:g} km  rounds/run "
          f"{args.rounds}  runs {args.compare} x {len(modes)}, interleaved  load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after")
    print("| stage (CPU s / round) | " + " | ".join(modes) + " |")
    print("|---" * (len(modes) + 1) + "|")

    def row(label: str, key: Callable[[dict[str, Any]], float], fmt: str) -> None:
        cells = [", ".join(format(key(r), fmt) for r in runs[m]) for m in runs]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for s in [*_STAGES, "other"]:
        row(s, lambda r, s=s: r["cpu"][s], ".3f")
    row("**total CPU s**", lambda r: r["cpu_total"], ".3f")
    row("total wall s", lambda r: r["wall_total"], ".3f")
    row("final key bits / round", lambda r: r["key_bits_round"], ",.0f")
    row("**key bit/s of wall time**", lambda r: r["rate_wall"], ",.0f")
    row("key bit/s per CPU second", lambda r: r["rate_cpu"], ",.0f")
    row("rounds aborted", lambda r: r["aborted"], "d")
    for m, rs in runs.items():
        for r in rs:
            if r["aborted"]:
                print(f"aborted ({m}): {r['abort_reason']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pulses", type=float, default=4e7)
    ap.add_argument("--distance", type=float, default=10.0)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--compare", type=int, default=0, metavar="N")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        compare(args)
        return
    params, a, b = connected_pair(args.distance, args.pulses)
    instrument()
    prof = cProfile.Profile() if args.profile else None
    bits = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    for _ in range(args.rounds):
        prepared = a.prepare_round(a.next_round_number())
        a.start_round(0.0, prepared)
        bits += pump(a, b)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    r = args.rounds
    _wall["other"] = wall - sum(_wall[s] for s in _STAGES)
    _cpu["other"] = cpu - sum(_cpu[s] for s in _STAGES)
    if args.json:  # one line for --compare
        print(json.dumps({
            "cpu": {s: v / r for s, v in _cpu.items()}, "cpu_total": cpu / r,
            "wall_total": wall / r, "key_bits_round": a.stats.key_bits / r,
            "rate_wall": a.stats.key_bits / wall, "rate_cpu": a.stats.key_bits / cpu,
            "committed": a.stats.rounds_committed, "aborted": a.stats.rounds_aborted,
            "abort_reason": a.stats.last_abort_reason}))
        return
    print(f"code: {Path(lc.__file__).parents[2]}")
    print(f"pulses/round {params.pulses:.3g}  distance {params.distance_km:g} km  "
          f"rounds {r}  committed {a.stats.rounds_committed}  "
          f"final key bits/round {a.stats.key_bits / r:,.0f}")
    print(f"{'stage':<17} {'wall s/round':>12} {'cpu s/round':>11} {'share':>6}")
    rows = [*_STAGES, "other"]
    for s in rows:
        print(f"{s:<17} {_wall[s] / r:12.3f} {_cpu[s] / r:11.3f} {_wall[s] / wall:6.1%}")
    print(f"{'total':<17} {wall / r:12.3f} {cpu / r:11.3f}")
    print(f"secret key rate: {a.stats.key_bits / wall:,.0f} bit/s of wall time "
          f"({a.stats.key_bits / cpu:,.0f} per CPU second); deposited in blocks "
          f"{bits / wall:,.0f} bit/s")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
