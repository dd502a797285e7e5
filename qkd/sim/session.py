"""One simulated link session: quantum phase, then Alice and Bob over an in-memory pipe."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from qkd.sim.channel import simulate_link
from qkd.sim.estimation import decoy_bounds, h2, key_length
from qkd.sim.params import LinkParams
from qkd.sim.protocol import AliceProtocol, BobProtocol, PostParams, SessionResult
from qkd.sim.theory import theory_rates


def post_params(params: LinkParams) -> PostParams:
    return PostParams(
        mus=params.intensities,
        probs=params.intensity_probs,
        eps_sec=params.eps_sec,
        eps_cor=params.eps_cor,
        qber_abort=params.qber_abort,
        frame_bits=params.frame_bits,
        cascade_variant=params.cascade_variant,
    )


def run_parties(alice: AliceProtocol, bob: BobProtocol) -> None:
    """Shuttle messages until both parties are done (or one stops talking)."""
    now = 0.0
    while True:
        moved = False
        for src, dst in ((bob, alice), (alice, bob)):
            for data in src.messages_to_send():
                moved = True
                if not dst.done:
                    dst.receive_message(data, now)
        if not moved:
            break
    if not (alice.done and bob.done):
        raise RuntimeError("protocol stalled before both parties finished")


def _rate_std(params: LinkParams, res: SessionResult, rng: np.random.Generator,
              samples: int = 200) -> float:
    """Statistical error of the key rate: parametric bootstrap of the observed counts
    (Poisson), with the measured leakage per sifted bit held fixed."""
    if res.estimate is None or res.sifted_bits == 0:
        return 0.0
    nz = np.array(res.n_z, float)
    nx = np.array(res.n_x, float)
    mx = np.array(res.m_x, float)
    leak_per_bit = res.leaked_ec_bits / max(res.key_bits_reconciled, 1)
    out = np.empty(samples)
    for i in range(samples):
        z, x, e = rng.poisson(nz), rng.poisson(nx), rng.poisson(np.maximum(mx, 0))
        est = decoy_bounds(z, x, e, params.intensities, params.intensity_probs, params.eps_sec)
        ell = key_length(est, leak_per_bit * z.sum(), params.eps_sec, params.eps_cor)
        out[i] = max(ell, 0.0) / params.pulses
    return float(out.std())


def run_session(params: LinkParams, seed: int | None = None, sampler: str = "auto"
                ) -> dict[str, Any]:
    """Run one session and return the report (the JSON of `qkdgw qkd simulate`)."""
    params.validate()
    ss = np.random.SeedSequence(seed)
    chan_rng, alice_rng, bob_rng, boot_rng = (np.random.default_rng(s) for s in ss.spawn(4))
    t0 = time.perf_counter()
    rec = simulate_link(params, chan_rng, sampler)
    t1 = time.perf_counter()
    post = post_params(params)
    alice = AliceProtocol(rec.alice, post, alice_rng)
    bob = BobProtocol(rec.bob, post, bob_rng)
    run_parties(alice, bob)
    t2 = time.perf_counter()
    ra, rb = alice.result, bob.result
    aborted = ra.aborted or rb.aborted
    reason = ra.abort_reason or rb.abort_reason
    final_bits = 0 if aborted else int(ra.final_key.size)
    keys_match = bool(np.array_equal(ra.final_key, rb.final_key))
    # Bob learns the key-basis error count from the corrections Cascade made.
    qber = rb.corrected_errors / rb.key_bits_reconciled if rb.key_bits_reconciled else None
    ideal = rb.key_bits_reconciled * h2(qber) if qber else 0.0
    efficiency = rb.leaked_ec_bits / ideal if ideal > 0 else None
    rate = final_bits / params.pulses
    th = theory_rates(params)
    # The same finite-key formula on expected counts but with the EC cost measured here,
    # which is what the simulated rate should reproduce within its statistical error.
    th_measured_f = (theory_rates(params, f=efficiency).finite_key_expected
                     if efficiency is not None else None)
    clicks = rec.bob.slots.size
    idx = rec.alice.lookup(rec.bob.slots)
    det_per_int = np.bincount(rec.alice.intensity[idx], minlength=3)
    est = ra.estimate
    truth_eve = float(rec.truth.eve_knows.mean()) if clicks else 0.0
    return {
        "pulses": params.pulses,
        "sampler": rec.truth.sampler,
        "sent_per_intensity": dict(zip(("mu", "nu", "vacuum"),
                                       (int(v) for v in rec.alice.sent_per_intensity),
                                       strict=True)),
        "detections": int(clicks),
        "detections_per_intensity": dict(zip(("mu", "nu", "vacuum"),
                                             (int(v) for v in det_per_int), strict=True)),
        "gain_per_intensity": dict(zip(
            ("mu", "nu", "vacuum"),
            (float(d / s) if s else 0.0 for d, s in zip(det_per_int,
                                                        rec.alice.sent_per_intensity,
                                                        strict=True)), strict=True)),
        "sifted_bits": ra.sifted_bits,
        "test_bits": ra.test_bits,
        "qber": qber,
        "qber_test_basis": ra.qber_x,
        "decoy_estimates": est.to_json() if est else None,
        "reconciled_bits": rb.key_bits_reconciled,
        "leaked_ec_bits": rb.leaked_ec_bits,
        "leaked_verification_bits": rb.leaked_verify_bits,
        "ec_efficiency": efficiency,
        "cascade_variant": params.cascade_variant,
        "cascade_round_trips": rb.cascade_round_trips,
        # The per-frame check after Cascade (qkd/sim/reconcile.py): its tag bits (part
        # of leaked_ec_bits), frames whose tags differed after the first run, and frames
        # dropped after every retry.
        "leaked_frame_check_bits": rb.leaked_frame_check_bits,
        "frames_checked_bad": rb.frames_checked_bad,
        "frames_dropped": rb.frames_dropped,
        "verification_ok": ra.verified,
        "verification_collision_prob": 2.0 ** -post.tag_bits,
        "final_key_bits": final_bits,
        "keys_match": keys_match,
        "key_rate_per_pulse": rate,
        "key_rate_per_pulse_std": 0.0 if aborted else _rate_std(params, ra, boot_rng),
        "key_rate_bps": rate * params.rep_rate_hz,
        "aborted": aborted,
        "abort_reason": reason or None,
        "theory": {**th.to_json(), "finite_key_expected_measured_f": th_measured_f},
        "eve": params.eve,
        "eve_fraction": params.eve_fraction if params.eve != "none" else 0.0,
        "eve_knows_fraction_of_detections": truth_eve,
        "classical_bytes": ra.bytes_sent + rb.bytes_sent,
        "classical_messages": ra.messages_sent + rb.messages_sent,
        "time_quantum_s": t1 - t0,
        "time_postprocessing_s": t2 - t1,
        "params": {k: (None if isinstance(v, float) and math.isinf(v) else v)
                   for k, v in params.to_dict().items()},
    }
