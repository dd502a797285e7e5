"""End-to-end sessions: Alice and Bob as separate state machines over encoded messages."""

from __future__ import annotations

import numpy as np
import pytest

from qkd.sim import messages as m
from qkd.sim.channel import simulate_link
from qkd.sim.params import LinkParams
from qkd.sim.protocol import AliceProtocol, BobProtocol
from qkd.sim.session import post_params, run_parties, run_session

# 5 km, 5e7 pulses, a decoy-heavy source and an efficient detector: ~8e5 sifted key
# bits, enough for a positive Lim et al. finite key in a few seconds of test time.
_P = LinkParams(distance_km=5, pulses=5 * 10**7, mu=0.6, nu=0.15, p_mu=0.5, p_nu=0.35,
                detector_efficiency=0.25)


@pytest.fixture(scope="module")
def clean_report() -> dict:
    return run_session(_P, seed=21)


def test_session_produces_identical_keys(clean_report: dict) -> None:
    r = clean_report
    assert not r["aborted"], r["abort_reason"]
    assert r["keys_match"] and r["verification_ok"]
    assert r["final_key_bits"] > 0
    assert 1.0 < r["ec_efficiency"] < 1.10
    assert r["leaked_verification_bits"] == 50  # ceil(log2(1e15))


def test_session_rate_matches_theory(clean_report: dict) -> None:
    r = clean_report
    th = r["theory"]
    rate = r["key_rate_per_pulse"]
    # Never above the asymptotic bounds, let alone PLOB.
    assert rate <= th["gllp_vacuum_weak"] <= th["gllp_infinite_decoy"] < th["plob"]
    # On the finite-key curve for the same N and the measured EC cost, within the
    # bootstrap standard error (5 sd) plus 2 % for the model's higher-order terms.
    expected = th["finite_key_expected_measured_f"]
    assert abs(rate - expected) <= 5 * r["key_rate_per_pulse_std"] + 0.02 * expected
    # The QBER Bob learns from Cascade matches the model to within the binomial error.
    assert abs(r["qber"] - 0.0331) < 5 * (0.033 / r["reconciled_bits"]) ** 0.5 + 1e-4


def test_intercept_resend_aborts() -> None:
    r = run_session(_P.with_(eve="intercept-resend", eve_fraction=1.0, pulses=10**7), seed=2)
    assert r["aborted"] and "QBER" in r["abort_reason"]
    # 1/4 + e_d/2 = 0.2665; sd of the test-basis QBER with >= 6e4 bits is <= 0.0018.
    assert abs(r["qber_test_basis"] - 0.2665) < 5 * 0.0018
    assert r["final_key_bits"] == 0


def test_pns_is_caught_by_decoys() -> None:
    r = run_session(_P.with_(distance_km=30, eve="pns", pulses=10**8), seed=4)
    assert r["aborted"] or r["final_key_bits"] == 0


def test_reproducible(clean_report: dict) -> None:
    again = run_session(_P, seed=21)
    assert again["final_key_bits"] == clean_report["final_key_bits"]
    assert again["leaked_ec_bits"] == clean_report["leaked_ec_bits"]


def test_parties_reject_out_of_order_messages() -> None:
    rec = simulate_link(_P.with_(pulses=10**5), np.random.default_rng(0))
    post = post_params(_P)
    alice = AliceProtocol(rec.alice, post, np.random.default_rng(1))
    with pytest.raises(m.MessageError):
        alice.receive_message(m.VerifyResult(True).encode())
    bob = BobProtocol(rec.bob, post, np.random.default_rng(2))
    with pytest.raises(m.MessageError):
        bob.receive_message(m.PrivacyAmp(5, np.zeros(3, np.uint8)).encode())
    bob.check_timeout(1000.0)
    assert bob.done and bob.result.aborted and "timeout" in bob.result.abort_reason


@pytest.mark.parametrize("old_bob", [False, True])
def test_alice_reads_packed_and_plain_detections(old_bob: bool) -> None:
    # Bob sends PackedDetections; a Bob of the old wire format sent Detections (u64
    # deltas). Alice gets the same key either way.
    params = LinkParams(distance_km=10, detector_efficiency=0.8, misalignment=0.01,
                        dark_count_prob=1e-7, pulses=10**7)
    rec = simulate_link(params, np.random.default_rng(3))
    post = post_params(params)
    alice = AliceProtocol(rec.alice, post, np.random.default_rng(1))
    bob = BobProtocol(rec.bob, post, np.random.default_rng(2))
    first = bob.messages_to_send()
    assert [x[0] for x in first] == [m.c.MSG_DETECTIONS_PACKED]
    if old_bob:
        d = m.decode(first[0])
        assert isinstance(d, m.Detections)
        first = [m.Detections(d.slots, d.bases).encode()]
    for data in first:
        alice.receive_message(data)
    run_parties(alice, bob)
    assert not alice.result.aborted and alice.result.final_key.size > 0
    assert np.array_equal(alice.result.final_key, bob.result.final_key)
