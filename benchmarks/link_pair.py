"""Shared by link_round.py and link_stages.py: two `qkd.link.core.LinkCore`s back to
back in one process (no sockets), the benchmark's link parameters, and the pump that
moves their frames, pulses, work and events until both are idle.

Works against an older checkout too (PYTHONPATH=/path/to/old): only what `LinkCore`
takes there is passed."""

from __future__ import annotations

import inspect
import os
import time

import numpy as np

from qkd.link import core as lc
from qkd.sim.params import LinkParams


def bench_params(distance_km: float, pulses: float) -> LinkParams:
    """A short, clean link: 80 % detectors, 1 % misalignment, few dark counts."""
    return LinkParams(distance_km=distance_km, detector_efficiency=0.8,
                      misalignment=0.01, dark_count_prob=1e-7, pulses=int(pulses))


def make_pair(params: LinkParams, psk: bytes) -> tuple[lc.LinkCore, lc.LinkCore]:
    extra: dict[str, object] = {}
    if "link_secret" in inspect.signature(lc.LinkCore).parameters:
        extra["link_secret"] = psk
    cores = []
    for role, seed in (("alice", 1), ("bob", 2)):
        cores.append(lc.LinkCore(role, lc.bootstrap_auth(role, psk), params, 256,
                                 np.random.default_rng(seed), **extra))  # type: ignore[arg-type]
    return cores[0], cores[1]


def pump(a: lc.LinkCore, b: lc.LinkCore, clock: dict[str, float] | None = None) -> int:
    """Run both cores until neither moves; returns the secret bits Alice deposited.
    With `clock`, each work kind's wall time is added to clock[kind]."""
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
                if clock is not None:
                    clock[w.kind] = clock.get(w.kind, 0.0) + time.perf_counter() - t
            while (ev := core.next_event()) is not None:
                moved = True
                if isinstance(ev, lc.DepositRequested):
                    core.deposit_done(ev.round)
                if isinstance(ev, lc.RoundCommitted) and core is a:
                    bits += len(ev.blocks) * len(ev.blocks[0][1]) * 8 if ev.blocks else 0
        if not moved:
            return bits


def connected_pair(distance_km: float, pulses: float
                   ) -> tuple[LinkParams, lc.LinkCore, lc.LinkCore]:
    """A fresh pair under a random PSK, connected and past the HELLO exchange."""
    params = bench_params(distance_km, pulses)
    a, b = make_pair(params, os.urandom(32))
    a.connection_made()
    b.connection_made()
    pump(a, b)
    return params, a, b
