"""A passive tap on the emulated quantum channel (issue 9.1).

The tap records every byte the KMEs put on the quantum connection (each u32-framed
payload the adapter writes) and every classical frame (those are public anyway:
authenticated, not encrypted). With the old plaintext frames (test hook
`quantum._TEST_PLAINTEXT`, the positive control) the pulses' bits and bases, Bob's
public detections and Alice's public privacy-amplification seed rebuild every block Bob
deposits, bit for bit. With the frames sealed the same tap gets nothing: the bytes do
not parse, and an altered, replayed or injected frame is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qkd.link import core as lc
from qkd.link import quantum
from qkd.link.quantum import FrameError, PulseFrame, SealError, seal, sealed_header, unseal
from qkd.link.wegman_carter import HASH_KEY_BYTES
from qkd.sim import messages as m
from qkd.sim.channel import Z_BASIS
from qkd.sim.privacy import privacy_amplification
from tests.support.link_pair import PARAMS, PSK, connect, pair

# Dark clicks in vacuum slots are bits no frame carries: make them (almost) never.
TAP_PARAMS = PARAMS.with_(dark_count_prob=1e-12)


def _run_tapped(a: lc.LinkCore, b: lc.LinkCore, quantum_hook=None):  # type: ignore[no-untyped-def]
    """One round; returns (recorded quantum payloads, classical frames by direction,
    Bob's deposit events, every event)."""
    tap_q: list[bytes] = []
    tap_c: dict[str, list[bytes]] = {"a2b": [], "b2a": []}
    deposits: list[lc.DepositRequested] = []
    events: list[tuple[str, object]] = []
    a.start_round(0.0)
    while True:
        moved = False
        for src, dst, name in ((a, b, "a2b"), (b, a, "b2a")):
            for frame in src.frames_to_send():
                moved = True
                tap_c[name].append(frame)
                dst.receive_frame(frame, 0.0)
        for q in a.quantum_to_send():
            moved = True
            tap_q.append(q)
            b.receive_pulses(q if quantum_hook is None else quantum_hook(q), 0.0)
        for side, core in (("alice", a), ("bob", b)):
            while (w := core.take_work()) is not None:
                moved = True
                core.work_done(w.run(), 0.0)
            while (ev := core.next_event()) is not None:
                moved = True
                events.append((side, ev))
                if isinstance(ev, lc.DepositRequested):
                    if side == "bob":
                        deposits.append(ev)
                    core.deposit_done(ev.round)
        if not moved:
            return tap_q, tap_c, deposits, events


def _attacker(tap_q: list[bytes], tap_c: dict[str, list[bytes]], frame_bits: int
              ) -> list[tuple[str, bytes]]:
    """What an observer computes from the recorded bytes alone."""
    frame = PulseFrame.decode(tap_q[0])  # FrameError when the frames are sealed
    pp_a = [m.decode(f[1:]) for f in tap_c["a2b"] if f[0] == lc.PP]
    pp_b = [m.decode(f[1:]) for f in tap_c["b2a"] if f[0] == lc.PP]
    det = next(x for x in pp_b if isinstance(x, m.Detections))
    sift = next(x for x in pp_a if isinstance(x, m.SiftReply))
    pa = next(x for x in pp_a if isinstance(x, m.PrivacyAmp))
    ctrl = {f[0]: json.loads(f[lc._CTRL.size:]) for f in tap_c["a2b"]
            if f[0] in (lc.ROUND_START, lc.COMMIT)}
    start, commit = ctrl[lc.ROUND_START], ctrl[lc.COMMIT]
    pos = np.searchsorted(frame.slots, det.slots)
    pos = np.minimum(pos, frame.slots.size - 1)
    bits = (frame.state[pos] >> 6) & 1
    key = bits[(sift.bases == det.bases) & (sift.bases == Z_BASIS)].astype(np.uint8)
    f = max(1, -(-key.size // frame_bits))
    key = key[: f * (key.size // f)]
    final = privacy_amplification(key, pa.seed, pa.out_bits)
    material = np.packbits(final[: final.size - final.size % 8]).tobytes()
    skip = (HASH_KEY_BYTES if commit["rekey"] else 0) + 2 * commit["refill"]
    rest = material[skip:]
    ids = lc.block_ids(bytes.fromhex(start["nonce"]), start["round"], commit["blocks"])
    return [(ids[i], rest[i * 32:(i + 1) * 32]) for i in range(commit["blocks"])]


def test_control_plaintext_tap_rebuilds_bobs_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantum, "_TEST_PLAINTEXT", True)
    a, b = pair(TAP_PARAMS)
    connect(a, b)
    tap_q, tap_c, deposits, _ = _run_tapped(a, b)
    assert deposits and deposits[0].blocks
    assert _attacker(tap_q, tap_c, TAP_PARAMS.frame_bits) == deposits[0].blocks


def test_sealed_quantum_channel_gives_a_tap_nothing() -> None:
    a, b = pair(TAP_PARAMS)
    connect(a, b)
    tap_q, tap_c, deposits, _ = _run_tapped(a, b)
    assert deposits and deposits[0].blocks  # the honest link still makes key
    with pytest.raises(FrameError):
        _attacker(tap_q, tap_c, TAP_PARAMS.frame_bits)
    # Not even the frame's plain encoding is in the bytes (the state bytes are noise).
    plain = unseal(PSK, tap_q[0])
    assert plain[:4] == b"QKDQ" and plain[-4096:] not in tap_q[0]
    body = tap_q[0][quantum.SEAL_OVERHEAD:]
    counts = np.bincount(np.frombuffer(body, np.uint8), minlength=256)
    assert counts.min() > 0.8 * body.__len__() / 256  # ciphertext bytes look uniform
    # A wrong link secret opens nothing.
    with pytest.raises(SealError):
        unseal(bytes(32), tap_q[0])


def test_altered_replayed_and_injected_pulse_frames_are_refused() -> None:
    a, b = pair(TAP_PARAMS)
    connect(a, b)

    def flip(q: bytes) -> bytes:
        bad = bytearray(q)
        bad[len(bad) // 2] ^= 0x01
        return bytes(bad)

    _, _, deposits, events = _run_tapped(a, b, flip)
    assert not deposits
    aborts = [e for s, e in events if s == "bob" and isinstance(e, lc.RoundAborted)]
    assert aborts and aborts[0].auth_failure and "authentication" in aborts[0].reason
    assert b.stats.auth_failures == 1
    # Control: the same pair, untouched, commits; keep its frame for a replay.
    tap_q, _, deposits, _ = _run_tapped(a, b)
    assert deposits
    old = tap_q[0]
    _, _, deposits, events = _run_tapped(a, b, lambda q: old)  # round 2's frame again
    # Filed under its own (old) round, it is never measured for the new one.
    assert not deposits and b._round is not None and b._round.proto is None
    with pytest.raises(SealError, match="another round"):
        unseal(PSK, old, b._round.number, b._round.nonce)
    for core in (a, b):
        core.check_timeout(core.post.timeout_s + 1.0)
    assert not a.round_active and not b.round_active
    # A frame made by someone without the link secret, under the right header.
    rnd, nonce, counter = sealed_header(old)
    forged = seal(bytes(32), nonce, rnd, unseal(PSK, old), counter)
    _, _, deposits, events = _run_tapped(a, b, lambda q: forged)
    assert not deposits
    # An unsealed (plaintext) frame injected on the connection is a protocol error.
    with pytest.raises(lc.LinkProtocolError, match="quantum channel"):
        b.receive_pulses(unseal(PSK, old), 0.0)
