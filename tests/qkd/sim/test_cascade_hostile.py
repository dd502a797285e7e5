"""Cascade against a lying Alice: contradictory parity replies end the run, never hang it.

A peer (or a tamperer on an unauthenticated path) that answers parities inconsistently
once made CascadeBob flip the same bits back and forth forever. The positive control
switches Bob's consistency checks off and shows the same replies keep him busy until
a timer stops him.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from qkd.sim import cascade as cc
from qkd.sim import messages as m

N, FRAMES, QBER = 4096, 8, 0.02


class _Timeout(Exception):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _frames(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (FRAMES, N), dtype=np.uint8)
    b = a ^ (rng.random((FRAMES, N)) < QBER).astype(np.uint8)
    return a, b


def _run(seed: int, variant: str, lie_at: int, mode: str = "flip") -> tuple[str, cc.CascadeBob]:
    """Honest Alice, except reply number `lie_at` (1-based): one bit flipped, or (mode
    "random") every parity bit replaced by a coin toss. Returns how Bob ended."""
    a, b = _frames(seed)
    alice, bob = cc.CascadeAlice(a), cc.CascadeBob(b, QBER, variant, seed)
    rng = np.random.default_rng(seed + 1000)
    replies = 0
    while not bob.done:
        for data in bob.messages_to_send():
            alice.receive_message(data)
        for data in alice.messages_to_send():
            replies += 1
            if replies == lie_at:
                if mode == "flip":
                    bad = bytearray(data)
                    i = int(rng.integers(8, len(bad)))
                    bad[i] ^= 1 << int(rng.integers(0, 8))
                    data = bytes(bad)
                else:
                    msg = m.decode(data)
                    assert isinstance(msg, m.ParityReply)
                    coins = rng.integers(0, 2, msg.bits.size, dtype=np.uint8)
                    data = m.ParityReply(coins).encode()
            try:
                bob.receive_message(data)
            except m.MessageError:
                return "refused", bob
    return "done", bob


@pytest.mark.parametrize("variant", cc.VARIANTS)
@pytest.mark.parametrize("lie_at", [2, 3, 5])
@pytest.mark.parametrize("mode", ["flip", "random"])
def test_inconsistent_replies_end_the_run(variant: str, lie_at: int, mode: str) -> None:
    with deadline(20.0):
        outcome, bob = _run(lie_at, variant, lie_at, mode)
    assert outcome in ("refused", "done")
    if outcome == "refused":
        # Refused for good: no later reply turns the aborted run into a finished one.
        with pytest.raises(m.MessageError):
            bob.receive_message(m.ParityReply(np.zeros(1, np.uint8)).encode())
        assert not bob.done
        assert not any(m.decode(x).__class__ is m.CascadeDone
                       for x in bob.messages_to_send())


@pytest.mark.parametrize("variant", cc.VARIANTS)
def test_honest_replies_are_never_refused(variant: str) -> None:
    for seed in range(4):
        a, _ = _frames(seed)
        with deadline(20.0):
            outcome, bob = _run(seed, variant, lie_at=0)
        assert outcome == "done"
        assert (bob.bits != a).sum() <= 2  # Cascade's residual errors, rare; verified later


def test_control_without_the_checks_the_same_lie_never_ends(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(cc, "_TEST_TRUST_PARITIES", True)
    with pytest.raises(_Timeout), deadline(4.0):
        _run(0, "option8", lie_at=3)
    # The same case, checks on: refused at once.
    monkeypatch.setattr(cc, "_TEST_TRUST_PARITIES", False)
    with deadline(20.0):
        assert _run(0, "option8", lie_at=3)[0] == "refused"
