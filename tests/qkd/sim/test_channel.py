"""The emulated channel against the model it claims to implement.

Tolerances: a count of n Bernoulli(p) trials has standard deviation sqrt(n p (1-p)), so
an observed rate is accepted within 5 of those (a two-sided miss has probability ~6e-7
per check); seeds are fixed, so the tests are deterministic anyway, but the band is
what the sample size justifies, not a tuned number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkd.sim.channel import _dead_time_keep, expected_click_probability, simulate_link
from qkd.sim.params import LinkParams, ParamError
from qkd.sim.theory import gain_error_model


def _sift(rec):  # type: ignore[no-untyped-def]
    idx = rec.alice.lookup(rec.bob.slots)
    match = rec.alice.basis[idx] == rec.bob.basis
    err = rec.alice.bit[idx] != rec.bob.bit
    return idx, match, err


def _within(observed: float, expected: float, n: float, k: float = 5.0) -> bool:
    sigma = math.sqrt(max(expected * (1 - expected), 1e-300) / n)
    return abs(observed - expected) <= k * sigma


@pytest.mark.parametrize("sampler", ["full", "detected"])
def test_gains_and_qber_match_model(sampler: str) -> None:
    p = LinkParams(distance_km=20, pulses=3 * 10**7, dark_count_prob=1e-4)
    rec = simulate_link(p, np.random.default_rng(11), sampler)
    idx, match, err = _sift(rec)
    sent = rec.alice.sent_per_intensity
    assert sent.sum() == p.pulses
    det = np.bincount(rec.alice.intensity[idx], minlength=3)
    for k, mean in enumerate(p.intensities):
        q, e = (gain_error_model(p.eta_sys, mean, p.dark_count_prob, p.misalignment)
                if mean > 0 else (p.dark_count_prob, 0.5))
        assert _within(det[k] / sent[k], q, sent[k]), (k, det[k] / sent[k], q)
        sel = match & (rec.alice.intensity[idx] == k)
        assert _within(err[sel].mean(), e, sel.sum()), (k, err[sel].mean(), e)


def test_basis_bias_and_sent_fractions() -> None:
    p = LinkParams(distance_km=5, pulses=10**7, basis_bias=0.8)
    rec = simulate_link(p, np.random.default_rng(3), "full")
    frac_z = float(np.mean(rec.bob.basis == 0))
    assert _within(frac_z, 0.8, rec.bob.basis.size)
    for k, pk in enumerate(p.intensity_probs):
        assert _within(rec.alice.sent_per_intensity[k] / p.pulses, pk, p.pulses)


def test_seeded_runs_are_reproducible() -> None:
    p = LinkParams(distance_km=10, pulses=10**6)
    a = simulate_link(p, np.random.default_rng(5))
    b = simulate_link(p, np.random.default_rng(5))
    assert np.array_equal(a.bob.slots, b.bob.slots)
    assert np.array_equal(a.bob.bit, b.bob.bit)


@pytest.mark.parametrize("sampler", ["full", "detected"])
def test_intercept_resend_gives_quarter_qber(sampler: str) -> None:
    # Eve measures every pulse in a random basis and resends one photon: in the sifted
    # set she picked the wrong basis half the time and then errs half the time -> 1/4,
    # plus misalignment on the rest: E = 1/4 + e_d/2 (dark counts negligible here).
    p = LinkParams(distance_km=5, pulses=10**7, eve="intercept-resend", eve_fraction=1.0)
    rec = simulate_link(p, np.random.default_rng(7), sampler)
    _, match, err = _sift(rec)
    expected = 0.25 + p.misalignment / 2
    assert _within(float(err[match].mean()), expected, match.sum())
    # Ground truth: Eve chose Alice's basis on about half the detected pulses.
    assert _within(float(rec.truth.eve_knows.mean()), 0.5, rec.truth.eve_knows.size)


def test_partial_intercept_resend_scales() -> None:
    p = LinkParams(distance_km=5, pulses=10**7, eve="intercept-resend", eve_fraction=0.2)
    rec = simulate_link(p, np.random.default_rng(8), "detected")
    _, match, err = _sift(rec)
    # Detections from attacked pulses are rarer (one photon resent), so weigh by gain.
    base = LinkParams(distance_km=5, pulses=10**7)
    q_ok, e_ok = gain_error_model(base.eta_sys, base.mu, base.dark_count_prob,
                                  base.misalignment)
    q_eve = 1 - math.exp(-base.mu)  # P(n >= 1), then one photon: gain ~ that * eta
    w = 0.2 * q_eve * base.eta_sys / (0.2 * q_eve * base.eta_sys + 0.8 * q_ok)
    expected = w * (0.25 + base.misalignment / 2) + (1 - w) * e_ok
    sig_mu = match & (rec.alice.intensity[rec.alice.lookup(rec.bob.slots)] == 0)
    assert abs(float(err[sig_mu].mean()) - expected) < 0.01


def test_pns_blocks_single_photons_and_beam_splitter_is_invisible() -> None:
    base = LinkParams(distance_km=40, pulses=2 * 10**7)
    rec = simulate_link(base.with_(eve="pns"), np.random.default_rng(1), "detected")
    # With every single photon blocked, single-photon pulses click only by dark counts:
    # expected N * P(n=1) * Y0 = 2e7 * 0.8 * 0.303 * 1.7e-6 ~ 8, versus ~1.7e5 clicks.
    assert np.count_nonzero(rec.truth.photons == 1) < 40
    assert rec.truth.eve_knows[rec.truth.photons >= 2].all()
    bs = simulate_link(base.with_(eve="beam-splitting"), np.random.default_rng(1), "detected")
    clean = simulate_link(base, np.random.default_rng(2), "detected")
    n = clean.bob.slots.size
    assert abs(bs.bob.slots.size - n) < 5 * math.sqrt(n)
    assert 0 < bs.truth.eve_knows.mean() < 0.5


def test_noise_attack_adds_half_its_fraction_to_qber() -> None:
    p = LinkParams(distance_km=5, pulses=10**7, eve="noise", eve_fraction=0.1,
                   misalignment=0.0, dark_count_prob=0.0)
    rec = simulate_link(p, np.random.default_rng(4), "detected")
    _, match, err = _sift(rec)
    assert _within(float(err[match].mean()), 0.05, match.sum())


def test_dead_time_filter() -> None:
    slots = np.array([0, 3, 5, 9, 10, 30, 31, 50])
    keep = _dead_time_keep(slots, 5)
    # 0 kept; 3 and 5 blocked (<= 5 after 0); 9 kept; 10 blocked; 30 kept; 31 blocked; 50 kept
    assert keep.tolist() == [True, False, False, True, False, True, False, True]
    rng = np.random.default_rng(0)
    s = np.unique(rng.integers(0, 10**6, 10**5))
    k = _dead_time_keep(s, 20)
    # Greedy reference.
    ref, last = [], -(10**9)
    for x in s:
        ok = x - last > 20
        ref.append(ok)
        if ok:
            last = x
    assert np.array_equal(k, np.array(ref))


def test_dead_time_and_afterpulses_in_simulation() -> None:
    p = LinkParams(distance_km=0, pulses=10**6, dead_time_s=10e-9, rep_rate_hz=1e9,
                   afterpulse_prob=0.05)
    rec = simulate_link(p, np.random.default_rng(2), "full")
    assert np.all(np.diff(rec.bob.slots) > p.dead_time_slots)
    assert rec.truth.removed_by_dead_time > 0
    p2 = LinkParams(distance_km=0, pulses=10**6, afterpulse_prob=0.05)
    rec2 = simulate_link(p2, np.random.default_rng(2), "full")
    assert rec2.truth.afterpulse.sum() > 0
    # Afterpulses carry no information about Alice's bit: half of them are errors.
    idx = rec2.alice.lookup(rec2.bob.slots)
    ap = rec2.truth.afterpulse & (rec2.alice.basis[idx] == rec2.bob.basis)
    err = rec2.alice.bit[idx][ap] != rec2.bob.bit[ap]
    assert _within(float(err.mean()), 0.5, ap.sum())


def test_detected_sampler_is_cheap_for_long_fibres() -> None:
    p = LinkParams(distance_km=200, pulses=10**12)
    assert expected_click_probability(p) < 1e-4
    rec = simulate_link(p, np.random.default_rng(0), "detected")
    exp = expected_click_probability(p) * p.pulses
    assert abs(rec.bob.slots.size - exp) < 5 * math.sqrt(exp)


def test_validation_names_the_field() -> None:
    with pytest.raises(ParamError, match="nu"):
        LinkParams(mu=0.1, nu=0.2).validate()
    with pytest.raises(ParamError, match="p_mu"):
        LinkParams(p_mu=0.6, p_nu=0.4).validate()
    with pytest.raises(ParamError, match="eve"):
        LinkParams(eve="laser").validate()


@pytest.mark.parametrize("sampler", ["full", "detected"])
def test_ideal_detector_at_distance_zero(sampler: str) -> None:
    # eta_sys = 1 exactly: the old log1p clamp (1 - 1e-300 == 1.0) took log(0) and the
    # sifted QBER came out near 0.5 (or the sampler raised on NaN probabilities).
    p = LinkParams(distance_km=0, detector_efficiency=1.0, pulses=2 * 10**5)
    assert p.eta_sys == 1.0
    rec = simulate_link(p, np.random.default_rng(5), sampler)
    idx, match, err = _sift(rec)
    det = np.bincount(rec.alice.intensity[idx], minlength=3)
    errs = np.bincount(rec.alice.intensity[idx], weights=err & match, minlength=3)
    sifted = np.bincount(rec.alice.intensity[idx], weights=match, minlength=3)
    sent = rec.alice.sent_per_intensity
    for k, mu in enumerate(p.intensities):
        if sifted[k] < 100:
            continue
        gain, qber = gain_error_model(1.0, mu, p.dark_count_prob, p.misalignment)
        assert _within(det[k] / sent[k], gain, sent[k])
        assert _within(errs[k] / sifted[k], qber, sifted[k])
