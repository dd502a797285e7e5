"""The split quantum channel (Alice emits, Eve may rewrite, Bob measures) against the
simulator's physics, and Alice's and Bob's post-processing running on its records."""

from __future__ import annotations

import numpy as np
import pytest

from qkd.link.quantum import FrameError, PulseFrame, attack, emit, measure
from qkd.sim.channel import expected_click_probability
from qkd.sim.params import LinkParams
from qkd.sim.protocol import AliceProtocol, BobProtocol
from qkd.sim.session import post_params, run_parties

# A short fibre and a good detector so a few million pulses already give key.
PARAMS = LinkParams(distance_km=25.0, detector_efficiency=0.8, misalignment=0.01,
                    pulses=20_000_000, dark_count_prob=1e-7)


def run_round(params: LinkParams, eve: str | None = None, fraction: float = 1.0,
              seed: int = 1) -> tuple[AliceProtocol, BobProtocol, int]:
    rng = np.random.default_rng(seed)
    rec_a, frame = emit(params, 7, rng)
    wire = frame.encode()
    if eve:
        wire = attack(PulseFrame.decode(wire), eve, fraction, rng).encode()
    rec_b = measure(PulseFrame.decode(wire), params, rng)
    alice = AliceProtocol(rec_a, post_params(params), np.random.default_rng(seed + 1))
    bob = BobProtocol(rec_b, post_params(params), np.random.default_rng(seed + 2))
    run_parties(alice, bob)
    return alice, bob, rec_b.slots.size


def test_click_rate_matches_the_simulator_physics() -> None:
    params = PARAMS.with_(pulses=2_000_000)
    rng = np.random.default_rng(3)
    _, frame = emit(params, 0, rng)
    rec = measure(frame, params, rng)
    p = expected_click_probability(params)
    expected = p * params.pulses
    assert abs(rec.slots.size - expected) < 5 * np.sqrt(expected)


def test_honest_short_fibre_round_yields_identical_keys() -> None:
    # 10 km keeps the default run short; the 25 km round is in the slow suite.
    alice, bob, _ = run_round(PARAMS.with_(distance_km=10.0, pulses=8_000_000))
    assert not alice.result.aborted, alice.result.abort_reason
    assert alice.result.final_key.size > 1000
    assert np.array_equal(alice.result.final_key, bob.result.final_key)


@pytest.mark.slow
def test_honest_round_yields_identical_keys() -> None:
    alice, bob, _ = run_round(PARAMS)
    assert not alice.result.aborted, alice.result.abort_reason
    assert alice.result.final_key.size > 1000
    assert np.array_equal(alice.result.final_key, bob.result.final_key)
    assert alice.result.qber_x < 0.03


@pytest.mark.parametrize(("eve", "fraction"), [("intercept-resend", 1.0), ("noise", 0.5)])
def test_attacks_raise_qber_and_abort(eve: str, fraction: float) -> None:
    alice, bob, _ = run_round(PARAMS.with_(pulses=4_000_000), eve, fraction)
    assert alice.result.aborted and bob.result.aborted
    assert "QBER" in alice.result.abort_reason
    assert alice.result.qber_x > 0.2
    assert alice.result.final_key.size == 0 and bob.result.final_key.size == 0


def test_pns_changes_only_what_bob_can_measure() -> None:
    rng = np.random.default_rng(5)
    params = PARAMS.with_(pulses=2_000_000)
    _, frame = emit(params, 0, rng)
    tapped = attack(frame, "pns", 1.0, rng)
    photons = frame.state & 0x1F
    assert tapped.slots.size == int(np.count_nonzero(photons >= 2))
    assert np.all(tapped.state >> 7 == 1)


def test_frame_decoder_rejects_garbage() -> None:
    rng = np.random.default_rng(0)
    _, frame = emit(PARAMS.with_(pulses=10_000), 3, rng)
    data = frame.encode()
    assert PulseFrame.decode(data).round == 3
    for bad in (data[:10], data[:-1], b"XXXX" + data[4:], data + b"\x00"):
        with pytest.raises(FrameError):
            PulseFrame.decode(bad)
