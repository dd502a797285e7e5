"""Cascade with per-frame verification: a run, one tag per frame, retries, drops.

Cascade leaves a frame wrong now and then (an even number of errors that no pass
split). After each Cascade run Alice sends a Toeplitz tag of every frame of the run
(one fresh seed per run, shared by its frames): for any fixed nonzero difference a
t-bit Toeplitz tag with a uniform seed collides with probability 2^-t, so a wrong frame
passes unnoticed with probability <= 2^-t (t = DEFAULT_FRAME_TAG_BITS = 32 by default).
Bob answers which tags differed. Both then know the next step: while retries are left,
a new Cascade run (fresh permutation seed, same QBER estimate) on exactly those frames,
then another check; after the last retry the frames still wrong are dropped by both.

Leakage: every parity and every tag bit is counted (`revealed_bits`), including those of
frames later dropped (their bits are removed from the key as well, which the caller
charges in full; counting both is conservative). The whole-key VerifyHash of the
protocol stays: it is what eps_cor rests on.

    Bob   -> Alice  CascadeHello, ParityQuery ...     (qkd.sim.cascade)
    Alice -> Bob    ParityReply ...
    Bob   -> Alice  CascadeDone
    Alice -> Bob    FrameCheck(attempt, seed, tags)
    Bob   -> Alice  FrameCheckResult(attempt, bad)    then CascadeHello on the bad frames
                                                      while attempt < retries
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkd.sim import messages as m
from qkd.sim.cascade import CascadeAlice, CascadeBob
from qkd.sim.constants import (
    DEFAULT_FRAME_RETRIES,
    DEFAULT_FRAME_TAG_BITS,
    FRAME_TAG_MAX_BITS,
)
from qkd.sim.privacy import toeplitz_hash

# Test-only: Bob accepts every tag as matching, so the positive control can show a frame
# with residual errors surviving when the check does nothing.
_TEST_IGNORE_TAGS = False


def frame_tags(frames: np.ndarray, seed: np.ndarray, tag_bits: int) -> np.ndarray:
    """Toeplitz tag of every row of `frames` under one seed: row f of the result is
    `toeplitz_hash(frames[f], seed, tag_bits)` (the reference, tested bit for bit)."""
    frames = np.ascontiguousarray(frames, np.uint8)
    nf, n = frames.shape
    if seed.size != n + tag_bits - 1:
        raise ValueError(f"seed must have n + t - 1 = {n + tag_bits - 1} bits, "
                         f"got {seed.size}")
    if nf == 0 or tag_bits == 0:
        return np.zeros((nf, tag_bits), np.uint8)
    # Row i of the Toeplitz matrix is seed[i : i + n] reversed (privacy.toeplitz_hash).
    idx = np.arange(tag_bits)[:, None] + (n - 1 - np.arange(n))[None, :]
    mat = np.asarray(seed, np.float32)[idx]  # (t, n)
    # Exact: sums of at most n <= 2^24 ones in float32.
    if n >= 1 << 24:
        return np.stack([toeplitz_hash(fr, seed, tag_bits) for fr in frames])
    acc = frames.astype(np.float32) @ mat.T
    return (acc.astype(np.int64) & 1).astype(np.uint8)


def frame_tags_reference(frames: np.ndarray, seed: np.ndarray, tag_bits: int) -> np.ndarray:
    return np.stack([toeplitz_hash(fr, seed, tag_bits) for fr in frames]) if len(frames) \
        else np.zeros((0, tag_bits), np.uint8)


def _check_params(tag_bits: int, retries: int) -> None:
    if not 0 <= tag_bits <= FRAME_TAG_MAX_BITS:
        raise ValueError(f"frame tag_bits must be in 0..{FRAME_TAG_MAX_BITS} (0 = no "
                         f"per-frame check), got {tag_bits}")
    if not 0 <= retries <= 255:
        raise ValueError(f"frame retries must be in 0..255, got {retries}")


class ReconcileAlice:
    """Alice's side for one group of frames: answers Cascade, tags frames, drops.

    `keep` (bool per frame) is final once `done`; her frames never change."""

    def __init__(self, frames: np.ndarray, rng: Any, tag_bits: int = DEFAULT_FRAME_TAG_BITS,
                 retries: int = DEFAULT_FRAME_RETRIES) -> None:
        _check_params(tag_bits, retries)
        self._bits = np.ascontiguousarray(frames, np.uint8)
        self._rng = rng
        self.tag_bits, self.retries = tag_bits, retries
        self.keep = np.ones(self._bits.shape[0], bool)
        self._active = np.arange(self._bits.shape[0])
        self._attempt = 0
        self._cascade: CascadeAlice | None = None
        self._state = "hello"  # hello -> cascade -> check -> (hello | done)
        self._out: deque[bytes] = deque()
        self.revealed_bits = 0
        self.tag_bits_revealed = 0
        self.done = False

    def messages_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        self.receive_decoded(m.decode(data), now)

    def receive_decoded(self, msg: m.Message, now: float = 0.0) -> None:
        """As receive_message, for a message the caller already decoded (to route it)."""
        if self.done:
            raise m.MessageError("reconciliation message after the group finished")
        if isinstance(msg, m.CascadeHello):
            if self._state != "hello":
                raise m.MessageError("unexpected CascadeHello")
            if msg.frames != self._active.size:
                raise m.MessageError(f"CascadeHello for {msg.frames} frames; this run "
                                     f"covers {self._active.size}")
            self._cascade = CascadeAlice(self._bits[self._active])
            self._state = "cascade"
        if isinstance(msg, (m.CascadeHello, m.ParityQuery, m.CascadeDone)):
            if self._state != "cascade" or self._cascade is None:
                raise m.MessageError(f"{type(msg).__name__} outside a Cascade run")
            self._cascade.receive_decoded(msg, now)
            self._out.extend(self._cascade.messages_to_send())
            if self._cascade.done:
                self.revealed_bits += self._cascade.revealed_bits
                self._after_run()
            return
        if isinstance(msg, m.FrameCheckResult):
            if self._state != "check":
                raise m.MessageError("FrameCheckResult without a FrameCheck")
            if msg.attempt != self._attempt or msg.bad.size != self._active.size:
                raise m.MessageError(f"FrameCheckResult for attempt {msg.attempt} over "
                                     f"{msg.bad.size} frames; expected attempt "
                                     f"{self._attempt} over {self._active.size}")
            self._resolve(self, msg.bad.astype(bool))
            return
        raise m.MessageError(f"unexpected {type(msg).__name__} during reconciliation")

    def _after_run(self) -> None:
        if self.tag_bits == 0:
            self.done = True
            return
        n, t = self._bits.shape[1], self.tag_bits
        seed = self._rng.integers(0, 2, n + t - 1, dtype=np.uint8)
        msg = m.FrameCheck(self._attempt, t, seed, frame_tags(self._bits[self._active], seed, t))
        self.revealed_bits += msg.revealed_bits()
        self.tag_bits_revealed += msg.revealed_bits()
        self._out.append(msg.encode())
        self._state = "check"

    @staticmethod
    def _resolve(side: ReconcileAlice | ReconcileBob, bad: np.ndarray) -> None:
        """What both sides do with a check's outcome (the same rule on each)."""
        if not bad.any():
            side.done = True
        elif side._attempt < side.retries:
            side._active = side._active[bad]
            side._attempt += 1
            side._state = "hello"
        else:
            side.keep[side._active[bad]] = False
            side.done = True


class ReconcileBob:
    """Bob's side for one group: drives Cascade runs and compares the frame tags.

    `bits` are his corrected frames and `keep` which survive, once `done`."""

    def __init__(self, frames: np.ndarray, qber_estimate: float, variant: str, rng: Any,
                 tag_bits: int = DEFAULT_FRAME_TAG_BITS,
                 retries: int = DEFAULT_FRAME_RETRIES) -> None:
        _check_params(tag_bits, retries)
        self.bits = np.array(frames, dtype=np.uint8, copy=True)
        self._q, self._variant, self._rng = qber_estimate, variant, rng
        self.tag_bits, self.retries = tag_bits, retries
        nf = self.bits.shape[0]
        self.keep = np.ones(nf, bool)
        self.leak_per_frame = np.zeros(nf, np.int64)
        self._active = np.arange(nf)
        self._attempt = 0
        self.round_trips = 0
        self.revealed_bits = 0
        self.tag_bits_revealed = 0
        self.runs = 0
        self.first_run_bad = 0  # frames whose tag differed after the first run
        self.first_run_bits: np.ndarray | None = None  # Bob's frames after the first run
        self.done = False
        self._failed = False
        self._out: deque[bytes] = deque()
        self._start_run()

    def messages_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    def _start_run(self) -> None:
        seed = int(self._rng.integers(0, 2**63))
        self._cascade = CascadeBob(self.bits[self._active], self._q, self._variant, seed)
        self.runs += 1
        self._state = "cascade"
        self._out.extend(self._cascade.messages_to_send())

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        self.receive_decoded(self._decode(data), now)

    def receive_decoded(self, msg: m.Message, now: float = 0.0) -> None:
        """As receive_message, for a message the caller already decoded (to route it)."""
        if self.done:
            raise m.MessageError("reconciliation message after the group finished")
        if self._failed:
            raise m.MessageError("reconciliation message after the group was aborted")
        try:
            self._receive(msg, now)
        except BaseException:
            self._failed = True
            raise

    def _decode(self, data: bytes) -> m.Message:
        try:
            return m.decode(data)
        except BaseException:
            self._failed = True  # a malformed message aborts the group, as before
            raise

    def _receive(self, msg: m.Message, now: float) -> None:
        if isinstance(msg, m.ParityReply):
            if self._state != "cascade":
                raise m.MessageError("parity reply outside a Cascade run")
            cas = self._cascade
            cas.receive_decoded(msg, now)
            self._out.extend(cas.messages_to_send())
            if cas.done:
                self.bits[self._active] = cas.bits
                if self.runs == 1:
                    self.first_run_bits = cas.bits  # not changed again: later runs copy
                self.leak_per_frame[self._active] += cas.leak_per_frame
                self.revealed_bits += cas.revealed_bits
                self.round_trips += cas.round_trips
                if self.tag_bits == 0:
                    self.done = True
                else:
                    self._state = "check"
            return
        if isinstance(msg, m.FrameCheck):
            if self._state != "check":
                raise m.MessageError("FrameCheck before the Cascade run finished")
            n, t = self.bits.shape[1], self.tag_bits
            if (msg.attempt != self._attempt or msg.tag_bits != t
                    or msg.tags.shape[0] != self._active.size or msg.seed.size != n + t - 1):
                raise m.MessageError(
                    f"FrameCheck of attempt {msg.attempt}, {msg.tag_bits}-bit tags over "
                    f"{msg.tags.shape[0]} frames, seed {msg.seed.size} bits; expected "
                    f"attempt {self._attempt}, {t}-bit tags over {self._active.size} "
                    f"frames, seed {n + t - 1} bits")
            self.revealed_bits += msg.revealed_bits()
            self.tag_bits_revealed += msg.revealed_bits()
            self.leak_per_frame[self._active] += t
            mine = frame_tags(self.bits[self._active], msg.seed, t)
            bad = np.any(mine != msg.tags, axis=1)
            if _TEST_IGNORE_TAGS:
                bad[:] = False
            if self._attempt == 0:
                self.first_run_bad = int(bad.sum())
            self._out.append(m.FrameCheckResult(self._attempt, bad.astype(np.uint8)).encode())
            ReconcileAlice._resolve(self, bad)
            if self._state == "hello":
                self._start_run()
            return
        raise m.MessageError(f"unexpected {type(msg).__name__} during reconciliation")


@dataclass
class VerifiedResult:
    corrected: np.ndarray
    keep: np.ndarray
    leaked_bits: int
    tag_bits: int
    leak_per_frame: np.ndarray
    round_trips: int
    runs: int
    first_run_bad: int
    first_run_bits: np.ndarray
    messages: int
    bytes_exchanged: int


def reconcile_verified(alice: np.ndarray, bob: np.ndarray, qber_estimate: float,
                       variant: str = "option8", seed: int = 0,
                       tag_bits: int = DEFAULT_FRAME_TAG_BITS,
                       retries: int = DEFAULT_FRAME_RETRIES) -> VerifiedResult:
    """Run both parties in memory (benchmarks, tests), passing encoded messages."""
    rng = np.random.default_rng(seed)
    a = ReconcileAlice(alice, np.random.default_rng(rng.integers(0, 2**63)), tag_bits,
                       retries)
    b = ReconcileBob(bob, qber_estimate, variant, rng, tag_bits, retries)
    messages = nbytes = 0
    while not (a.done and b.done):
        moved = 0
        for src, dst in ((b, a), (a, b)):
            for data in src.messages_to_send():
                moved += 1
                nbytes += len(data)
                dst.receive_message(data)
        messages += moved
        if not moved:
            raise AssertionError("reconciliation stalled")
    if a.revealed_bits != b.revealed_bits or not np.array_equal(a.keep, b.keep):
        raise AssertionError("Alice and Bob disagree on the leak or the frames kept")
    return VerifiedResult(b.bits, b.keep, b.revealed_bits, b.tag_bits_revealed,
                          b.leak_per_frame, b.round_trips, b.runs, b.first_run_bad,
                          b.first_run_bits if b.first_run_bits is not None else b.bits,
                          messages, nbytes)
