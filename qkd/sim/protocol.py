"""Alice's and Bob's post-processing as two sans-I/O state machines.

Each party sees only its own device record and the messages it receives. Drive them
with `receive_message(data, now)` and `messages_to_send()`; `now` is only used for the
idle timeout (`check_timeout(now)`), so the machines never sleep or read a clock.

Flow (every arrow is one encoded `qkd.sim.messages` message):

    Bob   -> Alice  PackedDetections (slots, Bob's bases; Alice also reads Detections)
    Alice -> Bob    SiftReply (Alice's bases and intensity classes)
    Bob   -> Alice  TestBits (Bob's X-basis bits; X is the test basis)
    Alice -> Bob    EstimationResult (X errors per intensity; abort reason if any)
    Bob  <-> Alice  Cascade on the Z-basis key, per group of frames, each run followed
                    by per-frame tags (FrameCheck / FrameCheckResult), a retry of the
                    frames whose tags differ, and finally their drop (qkd.sim.reconcile)
    Alice -> Bob    VerifyHash (Toeplitz seed, tag)       eps_cor = 2^-tag_bits
    Bob   -> Alice  VerifyResult
    Alice -> Bob    PrivacyAmp (final length from Lim et al. 2014, Toeplitz seed)

What is revealed about the key (Cascade parities, frame tags, the tag) is summed from
the messages; dropped frames leave the key and are charged in full.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from qkd import native
from qkd.sim import messages as m
from qkd.sim.channel import AliceRecord, BobRecord
from qkd.sim.constants import (
    DEFAULT_CASCADE_VARIANT,
    DEFAULT_EPS_COR,
    DEFAULT_EPS_SEC,
    DEFAULT_FRAME_BITS,
    DEFAULT_FRAME_RETRIES,
    DEFAULT_FRAME_TAG_BITS,
    DEFAULT_QBER_ABORT,
    MIN_QBER_GUESS,
    X_BASIS,
    Z_BASIS,
)
from qkd.sim.estimation import DecoyEstimate, decoy_bounds, key_length
from qkd.sim.privacy import privacy_amplification, toeplitz_hash
from qkd.sim.reconcile import ReconcileAlice, ReconcileBob


@dataclass(frozen=True)
class PostParams:
    """Post-processing settings both parties agree on in advance."""

    mus: tuple[float, float, float]
    probs: tuple[float, float, float]
    eps_sec: float = DEFAULT_EPS_SEC
    eps_cor: float = DEFAULT_EPS_COR
    qber_abort: float = DEFAULT_QBER_ABORT
    frame_bits: int = DEFAULT_FRAME_BITS
    cascade_variant: str = DEFAULT_CASCADE_VARIANT
    # Frames reconciled together (one Cascade run); bounds memory, and more frames per
    # run amortise the per-round-trip cost.
    cascade_group_frames: int = 128
    # Per-frame check after each Cascade run (0 bits: off), and how many extra Cascade
    # runs a frame whose tag differs gets before both sides drop it.
    frame_tag_bits: int = DEFAULT_FRAME_TAG_BITS
    frame_retries: int = DEFAULT_FRAME_RETRIES
    timeout_s: float = 60.0

    @property
    def tag_bits(self) -> int:
        return math.ceil(math.log2(1.0 / self.eps_cor))


@dataclass
class SessionResult:
    aborted: bool = False
    abort_reason: str = ""
    sifted_bits: int = 0  # Z-basis (key) detections after sifting
    test_bits: int = 0  # X-basis detections after sifting
    n_z: tuple[int, int, int] = (0, 0, 0)
    n_x: tuple[int, int, int] = (0, 0, 0)
    m_x: tuple[int, int, int] = (0, 0, 0)
    qber_x: float = 0.0
    key_bits_reconciled: int = 0
    corrected_errors: int = 0  # known to Bob only
    leaked_ec_bits: int = 0
    leaked_verify_bits: int = 0
    leaked_frame_check_bits: int = 0  # per-frame tags (also part of leaked_ec_bits)
    frames_checked_bad: int = 0  # frames whose tag differed after their first run
    frames_dropped: int = 0  # still wrong after the retries: removed from the key
    cascade_round_trips: int = 0
    verified: bool | None = None
    estimate: DecoyEstimate | None = None
    final_key: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    bytes_sent: int = 0
    messages_sent: int = 0


class _Party:
    def __init__(self, post: PostParams, rng: np.random.Generator) -> None:
        self.post = post
        self._rng = rng
        self._out: deque[bytes] = deque()
        self.result = SessionResult()
        self.done = False
        self._last = 0.0

    def messages_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        self.result.messages_sent += len(out)
        self.result.bytes_sent += sum(len(x) for x in out)
        return out

    def check_timeout(self, now: float) -> None:
        if not self.done and now - self._last > self.post.timeout_s:
            self._abort("peer silent for longer than the timeout")

    def _send(self, msg: m.Message) -> None:
        self._out.append(msg.encode())

    def _abort(self, reason: str) -> None:
        self.result.aborted = True
        self.result.abort_reason = reason
        self.result.final_key = np.zeros(0, np.uint8)
        self.done = True

    def _sift_counts(self, a_basis: np.ndarray, b_basis: np.ndarray,
                     intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kernel = native.load("bb84")
        if (kernel is not None and a_basis.dtype == b_basis.dtype == intensity.dtype
                == np.uint8 and a_basis.ndim == b_basis.ndim == intensity.ndim == 1
                and a_basis.size == b_basis.size == intensity.size):
            # One pass instead of five comparisons, two flatnonzero and two bincounts.
            n = a_basis.size
            zbuf = np.empty(n, np.int64)
            xbuf = np.empty(n, np.int64)
            nz, nx, cz, cx = kernel.sift_select(
                np.ascontiguousarray(a_basis), np.ascontiguousarray(b_basis),
                np.ascontiguousarray(intensity), Z_BASIS, X_BASIS, zbuf, xbuf)
            r = self.result
            r.n_z, r.n_x = cz, cx
            r.sifted_bits, r.test_bits = nz, nx
            return zbuf[:nz], xbuf[:nx]
        return self._sift_counts_reference(a_basis, b_basis, intensity)

    def _sift_counts_reference(self, a_basis: np.ndarray, b_basis: np.ndarray,
                               intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        match = a_basis == b_basis
        zsel = np.flatnonzero(match & (a_basis == Z_BASIS))
        xsel = np.flatnonzero(match & (a_basis == X_BASIS))
        r = self.result
        r.n_z = tuple(int(v) for v in np.bincount(intensity[zsel], minlength=3)[:3])
        r.n_x = tuple(int(v) for v in np.bincount(intensity[xsel], minlength=3)[:3])
        r.sifted_bits = int(zsel.size)
        r.test_bits = int(xsel.size)
        return zsel, xsel

    def _pick(self, idx: np.ndarray | None, basis: np.ndarray, intensity: np.ndarray,
              bit: np.ndarray, other: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The compiled sifting of one party (bb84.sift_pick): (basis and intensity per
        announced slot, or empty for Bob; key bits; test bits; test intensities), the
        counts set as `_sift_counts` does; None when the kernel is off or an array is
        not 1-D uint8 (the numpy path then runs)."""
        kernel = native.load("bb84")
        arrs = (basis, intensity, bit, other)
        if kernel is None or any(a.dtype != np.uint8 or a.ndim != 1 for a in arrs):
            return None
        if idx is not None and (idx.dtype != np.int64 or idx.ndim != 1):
            return None
        n = other.size
        if not basis.size == intensity.size == bit.size or (idx is None and bit.size != n):
            return None  # the reference's own behaviour, not the kernel's error
        ob = np.empty(n if idx is not None else 0, np.uint8)
        oi = np.empty_like(ob)
        key = np.empty(n, np.uint8)
        xbits = np.empty(n, np.uint8)
        xint = np.empty(n, np.uint8)
        c = np.ascontiguousarray
        nz, nx, cz, cx = kernel.sift_pick(
            idx is not None, c(idx) if idx is not None else b"", c(basis), c(intensity),
            c(bit), c(other), Z_BASIS, X_BASIS, ob, oi, key, xbits, xint)
        r = self.result
        r.n_z, r.n_x = cz, cx
        r.sifted_bits, r.test_bits = nz, nx
        return ob, oi, key[:nz], xbits[:nx], xint[:nx]

    def _frames(self, key: np.ndarray) -> np.ndarray:
        # Equal-length frames; the < F leftover bits are dropped (and charged in ell).
        n = key.size
        f = max(1, -(-n // self.post.frame_bits))
        nf = n // f
        return key[: f * nf].reshape(f, nf)

    def _estimate(self) -> DecoyEstimate:
        r = self.result
        est = decoy_bounds(np.array(r.n_z), np.array(r.n_x), np.array(r.m_x),
                           self.post.mus, self.post.probs, self.post.eps_sec)
        r.estimate = est
        return est

    def _final_length(self) -> int:
        r = self.result
        assert r.estimate is not None
        dropped = r.sifted_bits - r.key_bits_reconciled
        ell = key_length(r.estimate, r.leaked_ec_bits, self.post.eps_sec, self.post.eps_cor)
        # The dropped bits might all have been single-photon events: charge them fully.
        return max(math.floor(ell - dropped), 0)


class AliceProtocol(_Party):
    def __init__(self, record: AliceRecord, post: PostParams, rng: np.random.Generator) -> None:
        super().__init__(post, rng)
        self._rec = record
        self._state = "detections"
        self._key: np.ndarray | None = None
        self._cascade: ReconcileAlice | None = None

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        self._last = now
        if self.done:
            raise m.MessageError("message after the session ended")
        msg = m.decode(data)
        if isinstance(msg, (m.CascadeHello, m.ParityQuery, m.CascadeDone,
                            m.FrameCheckResult)):
            if self._state != "cascade":
                raise m.MessageError("Cascade message out of order")
            if self._cascade is None or self._cascade.done:
                # Only a CascadeHello starts a group (ReconcileAlice checks the type).
                if self._group >= len(self._groups) or not isinstance(msg, m.CascadeHello):
                    raise m.MessageError(f"unexpected {type(msg).__name__}")
                self._cascade = ReconcileAlice(self._groups[self._group], self._rng,
                                               self.post.frame_tag_bits,
                                               self.post.frame_retries)
                self._group += 1
            rec = self._cascade
            rec.receive_decoded(msg, now)  # decoded once, above, to route it
            for out in rec.messages_to_send():
                self._out.append(out)
            if rec.done:
                self._leak += rec.revealed_bits
                self.result.leaked_frame_check_bits += rec.tag_bits_revealed
                self.result.frames_dropped += int((~rec.keep).sum())
                self._kept.append(self._groups[self._group - 1][rec.keep])
                if self._group == len(self._groups):
                    self._after_cascade()
            return
        handler = {
            ("detections", m.Detections): self._on_detections,
            ("detections", m.PackedDetections): self._on_detections,
            ("test", m.TestBits): self._on_test_bits,
            ("verify", m.VerifyResult): self._on_verify,
        }.get((self._state, type(msg)))
        if handler is None:
            raise m.MessageError(f"unexpected {type(msg).__name__} in state {self._state}")
        handler(msg)

    def _on_detections(self, msg: m.Detections) -> None:
        idx = self._rec.lookup(msg.slots)
        rec = self._rec
        if msg.bases.size == idx.size:
            picked = self._pick(idx, rec.basis, rec.intensity, rec.bit, msg.bases)
            if picked is not None:
                a_basis, intensity, self._key, self._x_bits, self._x_int = picked
                self._send(m.SiftReply(a_basis, intensity))
                self._state = "test"
                return
        self._on_detections_reference(msg, idx)

    def _on_detections_reference(self, msg: m.Detections, idx: np.ndarray) -> None:
        a_basis = self._rec.basis[idx]
        intensity = self._rec.intensity[idx]
        self._send(m.SiftReply(a_basis, intensity))
        zsel, xsel = self._sift_counts(a_basis, msg.bases, intensity)
        self._key = self._rec.bit[idx[zsel]]
        self._x_bits = self._rec.bit[idx[xsel]]
        self._x_int = intensity[xsel]
        self._state = "test"

    def _on_test_bits(self, msg: m.TestBits) -> None:
        if msg.bits.size != self._x_bits.size:
            raise m.MessageError("test-bit count differs from the sifted X set")
        err = msg.bits != self._x_bits
        r = self.result
        r.m_x = tuple(int(v) for v in np.bincount(self._x_int[err], minlength=3)[:3])
        r.qber_x = float(err.mean()) if err.size else 0.0
        reason = ""
        if r.sifted_bits == 0 or r.test_bits == 0:
            reason = "no sifted detections"
        elif r.qber_x > self.post.qber_abort:
            reason = (f"test-basis QBER {r.qber_x:.4f} above the abort threshold "
                      f"{self.post.qber_abort:g}")
        else:
            est = self._estimate()
            if est.s_z1 <= 0:
                reason = "decoy estimate: no single-photon events can be guaranteed"
            elif key_length(est, 0.0, self.post.eps_sec, self.post.eps_cor) <= 0:
                reason = "finite-key length not positive even before error correction"
        self._send(m.EstimationResult(r.m_x, reason))
        if reason:
            self._abort(reason)
            return
        assert self._key is not None
        frames = self._frames(self._key)
        self._key = frames.ravel()
        r.key_bits_reconciled = int(self._key.size)
        g = self.post.cascade_group_frames
        self._groups = [frames[i : i + g] for i in range(0, frames.shape[0], g)]
        self._group = 0
        self._leak = 0
        self._kept: list[np.ndarray] = []
        self._state = "cascade"

    def _after_cascade(self) -> None:
        r = self.result
        self._key = np.concatenate(self._kept).ravel()
        r.key_bits_reconciled = int(self._key.size)
        r.leaked_ec_bits = self._leak
        t = self.post.tag_bits
        seed = self._rng.integers(0, 2, self._key.size + t - 1, dtype=np.uint8)
        tag = toeplitz_hash(self._key, seed, t)
        msg = m.VerifyHash(seed, tag)
        r.leaked_verify_bits = msg.revealed_bits()
        self._send(msg)
        self._state = "verify"

    def _on_verify(self, msg: m.VerifyResult) -> None:
        r = self.result
        r.verified = msg.ok
        if not msg.ok:
            self._send(m.PrivacyAmp(0, np.zeros(0, np.uint8), "verification hash mismatch"))
            self._abort("verification hash mismatch")
            return
        ell = self._final_length()
        if ell <= 0:
            reason = "finite-key length not positive after error correction"
            self._send(m.PrivacyAmp(0, np.zeros(0, np.uint8), reason))
            self._abort(reason)
            return
        assert self._key is not None
        seed = self._rng.integers(0, 2, self._key.size + ell - 1, dtype=np.uint8)
        self._send(m.PrivacyAmp(ell, seed))
        r.final_key = privacy_amplification(self._key, seed, ell)
        self.done = True


class BobProtocol(_Party):
    def __init__(self, record: BobRecord, post: PostParams, rng: np.random.Generator) -> None:
        super().__init__(post, rng)
        self._rec = record
        self._state = "sift"
        self._key: np.ndarray | None = None
        self._cascade: ReconcileBob | None = None
        self._send(m.PackedDetections(record.slots, record.basis))

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        self._last = now
        if self.done:
            raise m.MessageError("message after the session ended")
        msg = m.decode(data)
        if isinstance(msg, (m.ParityReply, m.FrameCheck)):
            if self._state != "cascade" or self._cascade is None:
                raise m.MessageError(f"{type(msg).__name__} out of order")
            rec = self._cascade
            rec.receive_decoded(msg, now)  # decoded once, above, to route it
            for out in rec.messages_to_send():
                self._out.append(out)
            if rec.done:
                r = self.result
                r.leaked_ec_bits += rec.revealed_bits
                r.leaked_frame_check_bits += rec.tag_bits_revealed
                r.cascade_round_trips += rec.round_trips
                r.frames_checked_bad += rec.first_run_bad
                r.frames_dropped += int((~rec.keep).sum())
                self._corrected.append(rec.bits[rec.keep])
                self._raw_kept.append(self._groups[self._group - 1][rec.keep])
                if self._group < len(self._groups):
                    self._start_group()
                else:
                    self._key = np.concatenate(self._corrected).ravel()
                    raw = np.concatenate(self._raw_kept).ravel()
                    r.key_bits_reconciled = int(self._key.size)
                    r.corrected_errors = int(np.count_nonzero(self._key != raw))
                    self._state = "verify"
            return
        handler = {
            ("sift", m.SiftReply): self._on_sift,
            ("estimate", m.EstimationResult): self._on_estimate,
            ("verify", m.VerifyHash): self._on_verify_hash,
            ("pa", m.PrivacyAmp): self._on_pa,
        }.get((self._state, type(msg)))
        if handler is None:
            raise m.MessageError(f"unexpected {type(msg).__name__} in state {self._state}")
        handler(msg)

    def _on_sift(self, msg: m.SiftReply) -> None:
        if msg.bases.size != self._rec.slots.size:
            raise m.MessageError("sift reply length differs from the detections sent")
        rec = self._rec
        picked = self._pick(None, msg.bases, msg.intensities, rec.bit, rec.basis)
        if picked is not None:
            _, _, self._key, x_bits, self._x_int = picked
            self._send(m.TestBits(x_bits))
            self._state = "estimate"
            return
        zsel, xsel = self._sift_counts(msg.bases, self._rec.basis, msg.intensities)
        self._key = self._rec.bit[zsel]
        self._x_int = msg.intensities[xsel]
        self._send(m.TestBits(self._rec.bit[xsel]))
        self._state = "estimate"

    def _on_estimate(self, msg: m.EstimationResult) -> None:
        r = self.result
        r.m_x = msg.errors
        r.qber_x = sum(msg.errors) / r.test_bits if r.test_bits else 0.0
        if msg.abort_reason:
            self._abort(msg.abort_reason)
            return
        self._estimate()
        assert self._key is not None
        frames = self._frames(self._key)
        self._raw_key = frames.ravel().copy()
        r.key_bits_reconciled = int(self._raw_key.size)
        g = self.post.cascade_group_frames
        self._groups = [frames[i : i + g] for i in range(0, frames.shape[0], g)]
        self._group = 0
        self._corrected: list[np.ndarray] = []
        self._raw_kept: list[np.ndarray] = []
        self._state = "cascade"
        self._start_group()

    def _start_group(self) -> None:
        guess = max(self.result.qber_x, MIN_QBER_GUESS)
        # The first run's permutation seed is drawn as before the per-frame check.
        self._cascade = ReconcileBob(self._groups[self._group], guess,
                                     self.post.cascade_variant, self._rng,
                                     self.post.frame_tag_bits, self.post.frame_retries)
        self._group += 1
        for out in self._cascade.messages_to_send():
            self._out.append(out)

    def _on_verify_hash(self, msg: m.VerifyHash) -> None:
        assert self._key is not None
        t = self.post.tag_bits
        if msg.tag.size != t or msg.seed.size != self._key.size + t - 1:
            raise m.MessageError("verification seed or tag of the wrong length")
        ok = bool(np.array_equal(toeplitz_hash(self._key, msg.seed, t), msg.tag))
        self.result.verified = ok
        self.result.leaked_verify_bits = msg.revealed_bits()
        self._send(m.VerifyResult(ok))
        self._state = "pa"
        if not ok:
            self._abort("verification hash mismatch")

    def _on_pa(self, msg: m.PrivacyAmp) -> None:
        if msg.out_bits == 0:
            self._abort(msg.abort_reason or "Alice aborted privacy amplification")
            return
        ell = self._final_length()
        if ell != msg.out_bits:
            self._abort(f"final length disagreement (Alice {msg.out_bits}, Bob {ell})")
            return
        assert self._key is not None
        if msg.seed.size != self._key.size + ell - 1:
            raise m.MessageError("privacy amplification seed of the wrong length")
        self.result.final_key = privacy_amplification(self._key, msg.seed, ell)
        self.done = True
