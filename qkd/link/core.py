"""One KME's side of the BB84 link, sans-I/O: classical frames, pulse frames and the
time go in; frames to send and events come out. `qkd.link.bb84` moves the bytes.

Classical channel frames (each carried in a u32 length prefix by the adapter):

    control  type u8 | pad offset u64 | tag 16 | JSON body
    HELLO    type u8 | pad offset u64 | tag 16 | has_alt u8 | alt offset u64 | alt tag 16
             | JSON body (both tags over the same message; see below)
    pp       type u8 | post-processing message (qkd.sim.messages encoding)

A control frame's tag is a Wegman–Carter tag under its own one-time pad over
label | type | body. Post-processing frames (about 2000 per round) carry no tag of
their own: each direction's frames are appended to a per-round transcript, and the
round is closed by two control frames whose tags cover the whole transcript:

    Alice                                   Bob
    ROUND_START(r, nonce)        ------>    (pulse frame r arrives on the quantum channel)
                     <------ pp ------>     sifting, estimation, Cascade, verify, PA
                                 <------    TRANSCRIPT(r, outcome)   tag over b2a frames
    COMMIT(r, key_bits, refill)  ------>    tag over a2b frames; Bob deposits the blocks
                                 <------    COMMIT_ACK(r)
    Alice deposits the same blocks under the same key IDs.

Nothing is deposited before both transcript tags verified, so a tampered or forged
frame stops the round without yielding key: it either breaks the protocol (abort) or
fails a transcript tag (abort, counted as an authentication failure). Control tags
use the pads down to the reserve; rounds stop there, so an attacker who makes every
round abort cannot exhaust the key the link needs to restart.

Each committed round first refills the pad streams (Alice names how much in COMMIT)
and, the first time, replaces the bootstrap hash key and pads by link output.
RESERVE / RESERVE_ACK carry key reservations between the KMEs (see qkd.kme.service).

Heavy steps (Alice's pulse emission, Bob's measurement, each post-processing step)
are *work items*: the core queues them (`take_work`), the adapter runs them off the
core's lock and hands the result back (`work_done`). Every other call is short, so a
reservation never waits behind a round's number crunching.

Commit points, so that a crash anywhere leaves both sides able to agree again:

- Bob commits when a valid COMMIT arrives: in one state (persisted by the adapter
  before COMMIT_ACK leaves) he applies the pads, advances `committed` and records the
  blocks as a *pending deposit*.
- Alice's COMMIT is persisted with her state as a *pending commit* before it leaves.
  COMMIT_ACK, or a HELLO whose `committed` covers the round, commits it; a HELLO
  below it or an ABORT rolls it back. Bob's HELLO may already be tagged under the pads
  the round installs, so it is also checked against those.

Connections: Alice, who dials, sends HELLO first; Bob signs his own only once hers
verified, so a stranger opening TCP connections to Bob makes him spend no pad, and
(`accept_hello`) a new connection replaces the live one only with a valid HELLO. With
a pending commit of the rekeying round Alice cannot know which keys Bob is on, so her
HELLO carries a second tag under the pads that round installs (the *alt* tag; the pad
it used is recorded in the pending commit, so it is never used again).
- A pending deposit is stored by the adapter (idempotently, so a replay after a
  crash is harmless) and cleared with `deposit_done`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import secrets
import struct
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkd.common.errors import QkdError
from qkd.link import quantum
from qkd.link.constants import (
    ABORT,
    ALT_TAG_FORMAT,
    BLOCK_ID_LABEL,
    BOOT,
    BOOT_ACK,
    BOOT_ACK_FORMAT,
    BOOT_FORMAT,
    BOOT_MAC_INFO,
    BOOT_MAC_LABEL,
    BOOT_SESSION_BYTES,
    BOOTSTRAP_PAD_BYTES,
    COMMIT,
    COMMIT_ACK,
    CTRL_HEADER_FORMAT,
    CTRL_LABEL,
    FRAME_NAMES,
    HELLO,
    LOW_PAD_BYTES,
    MAX_ABORT_REASON_IN,
    MAX_ABORT_REASON_OUT,
    MAX_NONCE_HEX,
    MAX_RESERVE_KEY_BITS,
    MAX_RESERVE_KEYS,
    MAX_TEXT_FIELD,
    NONCE_BYTES,
    PP,
    RESERVE,
    RESERVE_ACK,
    RESERVE_PAD_BYTES,
    ROUND_NEED_BYTES,
    ROUND_PAD_BYTES,
    ROUND_START,
    TARGET_PAD_BYTES,
    TOPUP_MAX_SHARE,
    TOPUP_PAD_BYTES,
    TRANSCRIPT,
    UNBOOTSTRAPPED,
)
from qkd.link.csprng import SecretRng
from qkd.link.quantum import (
    FrameError,
    PulseFrame,
    Random,
    SealError,
    SparseSlotRecord,
    emit,
    measure,
    seal_frame,
    unseal,
)
from qkd.link.wegman_carter import (
    HASH_KEY_BYTES,
    PAD_BYTES,
    TAG_BYTES,
    AuthError,
    AuthKeys,
    HashKey,
    make_tag,
)
from qkd.sim.params import LinkParams
from qkd.sim.protocol import AliceProtocol, BobProtocol, PostParams

# Bootstrap nonce exchange (first start of a pair, or after `qkdgw link-reset`):
#   BOOT      type u8 | nonce_a 16 | HMAC-SHA256(K, "a" | nonce_a)
#   BOOT_ACK  type u8 | nonce_a 16 | nonce_b 16 | HMAC-SHA256(K, "b" | nonce_a | nonce_b)
# K = HKDF(link secret, "boot mac"). The bootstrap hash key and pads are then derived
# from the link secret *and* both nonces, so no two bootstraps share a pad (a frame
# recorded under one never verifies under another). Alice's fresh nonce in the ACK's
# MAC makes an old ACK useless to a replayer; Bob's makes the keys fresh for him.
_BOOT = struct.Struct(BOOT_FORMAT)
_BOOT_ACK = struct.Struct(BOOT_ACK_FORMAT)
_LABEL = CTRL_LABEL
_CTRL = struct.Struct(CTRL_HEADER_FORMAT)
_ALT = struct.Struct(ALT_TAG_FORMAT)
_NAMES = FRAME_NAMES
# The first committed round pays for the hash key (HASH_KEY_BYTES) and refills
# TARGET_PAD_BYTES per direction, so it must produce at least HASH_KEY_BYTES +
# 2 * TARGET_PAD_BYTES to switch off the bootstrap key. Each reservation costs one pad
# per direction; the reserve and round margins keep a round (and so the refill)
# possible whatever the reservations do (values and units in qkd.link.constants).

# Test hook, never set in service: True brings back the old behaviour, where every
# secret of a round (bits, bases, intensities, seeds, nonces) came from the numpy
# generator the core was given, so identical seeds gave identical keys. Only the
# positive control of tests/qkd/link/test_secrets.py sets it.
_TEST_SEEDED_SECRETS = False


def _secret_source(rng: np.random.Generator) -> Random:
    """Where a round's secret draws come from: the OS (SecretRng), not `rng`."""
    return rng if _TEST_SEEDED_SECRETS else SecretRng()


def _round_nonce(rng: np.random.Generator) -> bytes:
    return rng.bytes(16) if _TEST_SEEDED_SECRETS else secrets.token_bytes(16)


class LinkProtocolError(QkdError):
    """The peer broke the link protocol (not a tag failure); the adapter drops the
    connection. Never carries key bytes."""


# Control-frame fields are checked strictly even though the frame is authenticated: a
# misbehaving (or buggy) peer's bad frame must end as the peer's protocol error, never
# as an OverflowError, an assert or a float where an integer belongs.
_U63 = (1 << 63) - 1


def _int(msg: dict[str, Any], name: str, lo: int = 0, hi: int = _U63) -> int:
    v = msg.get(name)
    if type(v) is not int or not lo <= v <= hi:
        raise LinkProtocolError(f"control frame field {name!r} is not an integer in "
                                f"[{lo}, {hi}]")
    return v


def _bool(msg: dict[str, Any], name: str) -> bool:
    v = msg.get(name)
    if type(v) is not bool:
        raise LinkProtocolError(f"control frame field {name!r} is not a boolean")
    return v


def _str(msg: dict[str, Any], name: str, limit: int = MAX_TEXT_FIELD) -> str:
    v = msg.get(name)
    if type(v) is not str or len(v) > limit:
        raise LinkProtocolError(f"control frame field {name!r} is not a string of at "
                                f"most {limit} characters")
    return v


def _reserve_keys(msg: dict[str, Any]) -> list[tuple[str, list[str], int]]:
    keys = msg.get("keys")
    out: list[tuple[str, list[str], int]] = []
    if type(keys) is not list or len(keys) > MAX_RESERVE_KEYS:
        raise LinkProtocolError("RESERVE field 'keys' is not a list")
    for k in keys:
        if not (type(k) is list and len(k) == 3 and type(k[0]) is str
                and type(k[1]) is list and all(type(b) is str for b in k[1])
                and type(k[2]) is int and 0 < k[2] <= MAX_RESERVE_KEY_BITS):
            raise LinkProtocolError("RESERVE field 'keys' holds a malformed entry")
        out.append((k[0], list(k[1]), k[2]))
    return out


# ------------------------------------------------------------------------ events

@dataclass(frozen=True)
class RoundStarted:
    round: int


@dataclass(frozen=True)
class RoundAborted:
    round: int
    reason: str
    auth_failure: bool = False
    qber: float | None = None


@dataclass(frozen=True)
class KeyBlocks:
    """A round's key, cut into blocks: Bob gets it as a deposit request (answer with
    `commit_done`), Alice once Bob has acknowledged. repr hides the material."""

    round: int
    blocks: list[tuple[str, bytes]] = field(repr=False)
    key_bits: int
    pulses: int
    qber: float


@dataclass(frozen=True)
class DepositRequested(KeyBlocks):
    """A committed round's blocks to store (either side); answer with `deposit_done`.
    `discarded` blocks did not fit under the pool limit and were dropped on both
    sides."""

    discarded: int = 0


@dataclass(frozen=True)
class RoundCommitted(KeyBlocks):
    """The round's blocks are stored (after `deposit_done`)."""

    discarded: int = 0


@dataclass
class Work:
    """A heavy step of a round; run `run()` anywhere (no core state is touched but the
    round's own), then hand the outcome to `LinkCore.work_done`."""

    kind: str  # "measure" or "pp"
    round: _Round = field(repr=False)
    fn: Callable[[], Any] = field(repr=False)
    result: Any = field(default=None, repr=False)
    error: Exception | None = None

    def run(self) -> Work:
        try:
            self.result = self.fn()
        except ValueError as exc:  # MessageError, FrameError: the peer's fault
            self.error = exc
        except Exception as exc:  # a bug; the type only (no data from inside)
            self.error = RuntimeError(f"internal error ({type(exc).__name__})")
        return self


@dataclass
class PreparedRound:
    """Alice's pulses for round `number`, made off the lock (`LinkCore.prepare_round`)."""

    number: int
    record: SparseSlotRecord = field(repr=False)
    frame: bytes = field(repr=False)  # sealed for the wire
    proto: AliceProtocol = field(repr=False)
    rng: np.random.Generator = field(repr=False)
    nonce: bytes = field(default=b"", repr=False)  # the round's ROUND_START nonce


@dataclass(frozen=True)
class ReservationRequested:
    request: int
    master: str
    slave: str
    keys: list[tuple[str, list[str], int]]  # key ID, block IDs, size in bits


@dataclass(frozen=True)
class ReservationAnswered:
    request: int
    ok: bool
    reason: str


@dataclass(frozen=True)
class PeerReady:
    committed: int


Event = (RoundStarted | RoundAborted | DepositRequested | RoundCommitted
         | ReservationRequested | ReservationAnswered | PeerReady)


def params_fingerprint(params: LinkParams, key_size: int) -> str:
    """Both KMEs must run the same physics and post-processing; HELLO compares this."""
    d = params.to_dict()
    d.pop("eve", None)
    d.pop("eve_fraction", None)
    d["key_size"] = key_size
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def post_params(params: LinkParams) -> PostParams:
    return PostParams(mus=params.intensities, probs=params.intensity_probs,
                      eps_sec=params.eps_sec, eps_cor=params.eps_cor,
                      qber_abort=params.qber_abort, frame_bits=params.frame_bits,
                      cascade_variant=params.cascade_variant)


def block_ids(nonce: bytes, round_no: int, count: int) -> list[str]:
    """Key IDs both sides derive for a round's blocks (version-8 UUIDs)."""
    out = []
    for i in range(count):
        b = bytearray(hashlib.sha256(BLOCK_ID_LABEL + nonce
                                     + struct.pack("<QI", round_no, i)).digest()[:16])
        b[6] = (b[6] & 0x0F) | 0x80
        b[8] = (b[8] & 0x3F) | 0x80
        out.append(str(uuid.UUID(bytes=bytes(b))))
    return out


@dataclass
class _Round:
    number: int
    nonce: bytes
    pulses: int
    proto: AliceProtocol | BobProtocol | None = None
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    peer_outcome: dict[str, Any] | None = None
    started: float = 0.0
    closing: bool = False
    pending: dict[str, Any] | None = None  # Alice: COMMIT sent, waiting for the ACK
    pending_since: float = 0.0
    rng: np.random.Generator | None = None
    busy: bool = False  # a work item of this round is out
    measuring: bool = False  # Bob: the measurement is queued or running
    room: int | None = None  # Alice: blocks the pool can still take


@dataclass
class LinkStats:
    rounds_started: int = 0
    rounds_committed: int = 0
    rounds_aborted: int = 0
    auth_failures: int = 0
    key_bits: int = 0
    pulses: int = 0
    last_qber: float | None = None
    last_abort_reason: str = ""
    last_round_key_bits: int = 0
    blocks_discarded: int = 0
    reservations_lapsed: int = 0  # a RESERVE left unanswered: pads too low to sign


class LinkCore:
    """One side ("alice" drives rounds and emits pulses, "bob" measures)."""

    def __init__(self, role: str, auth: AuthKeys, params: LinkParams, key_size_bits: int,
                 rng: np.random.Generator, *, link_secret: bytes, committed: int = 0,
                 saved: dict[str, Any] | None = None,
                 round_timeout_s: float | None = None) -> None:
        """`auth` from `bootstrap_auth` (tests), from the persisted state, or
        `unbootstrapped_auth(role)`: then the first connection runs the bootstrap nonce
        exchange (BOOT / BOOT_ACK) before any HELLO."""
        if role not in ("alice", "bob"):
            raise ValueError("role must be 'alice' or 'bob'")
        if key_size_bits % 8:
            raise ValueError("key size must be a multiple of 8")
        self.role = role
        self.auth = auth
        self.params = params
        self.post = post_params(params)
        if round_timeout_s is not None:
            self.post = dataclasses.replace(self.post, timeout_s=round_timeout_s)
        self.block_bytes = key_size_bits // 8
        self.fingerprint = params_fingerprint(params, key_size_bits)
        # Keys the quantum channel's AEAD per round (qkd.link.quantum.seal).
        self._link_secret = bytes(link_secret)
        self._rng = rng
        # Only prepare_round draws from this one: it runs off the lock, in parallel
        # with calls that use self._rng.
        self._prep_rng = np.random.default_rng(rng.integers(1 << 63))
        self.committed = committed  # last round whose blocks this side holds
        self._last_round = committed
        self.stats = LinkStats()
        self._out: deque[bytes] = deque()
        self._quantum: deque[bytes] = deque()
        self._events: deque[Event] = deque()
        self._work: deque[Work] = deque()
        self._round: _Round | None = None
        self._pulse_frames: dict[int, bytes] = {}
        # Alice: COMMIT sent, outcome unknown. Both: committed, blocks not yet stored.
        self._pending_commit: dict[str, Any] | None = None
        self._pending_deposit: dict[str, Any] | None = None
        self._now = 0.0
        self.peer_ready = False
        self.auth_dirty = False
        # Reservations of this connection in flight: ours waiting for the peer's
        # RESERVE_ACK, and the peer's we still owe an answer. Both spend pads to come.
        self._awaiting_acks: set[int] = set()
        self._owed_answers: set[int] = set()
        # Alice: rounds Bob refused in a row because his last deposit is not stored.
        self.peer_busy_aborts = 0
        self._boot_nonce: bytes | None = None  # Alice: her BOOT nonce in flight
        if saved:
            self._pending_commit = _load_pending(saved.get("pending_commit"))
            self._pending_deposit = _load_pending(saved.get("pending_deposit"))
            if self._pending_commit is not None and role != "alice":
                raise ValueError("only Alice has a pending commit")

    def __repr__(self) -> str:
        return f"LinkCore(role={self.role!r}, committed={self.committed})"

    # ------------------------------------------------------------- I/O surface

    def frames_to_send(self) -> list[bytes]:
        out = []
        while self._out:
            out.append(self._out.popleft())
        return out

    def quantum_to_send(self) -> list[bytes]:
        out = []
        while self._quantum:
            out.append(self._quantum.popleft())
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def take_work(self) -> Work | None:
        """The next heavy step to run off the lock (one per round at a time)."""
        while self._work:
            w = self._work[0]
            if w.round is not self._round:
                self._work.popleft()  # its round ended meanwhile
                continue
            if w.round.busy:
                return None
            w.round.busy = True
            return self._work.popleft()
        return None

    @property
    def has_work(self) -> bool:
        return bool(self._work)

    def work_done(self, work: Work, now: float) -> None:
        self._now = now
        rnd = work.round
        rnd.busy = False
        if rnd is not self._round:
            return  # the round was aborted while the step ran: drop its result
        if work.error is not None:
            what = "quantum channel" if work.kind == "measure" else "post-processing"
            sealed = isinstance(work.error, SealError)
            if sealed:
                self.stats.auth_failures += 1
            self._abort_local(f"{what}: {work.error}", auth=sealed)
            return
        if work.kind == "measure":
            rnd.proto = work.result
        try:
            self._flush_pp()
        except AuthError as exc:
            self._abort_local(f"cannot sign the round's transcript ({exc})")

    def export_state(self) -> dict[str, Any]:
        """What the adapter persists with the auth keys (sealed; holds key material)."""
        return {"committed": self.committed,
                "pending_commit": _dump_pending(self._pending_commit),
                "pending_deposit": _dump_pending(self._pending_deposit)}

    @property
    def round_active(self) -> bool:
        """A round, an unresolved commit or an unstored deposit: no new round yet."""
        return (self._round is not None or self._pending_commit is not None
                or self._pending_deposit is not None)

    @property
    def pending_commit_round(self) -> int | None:
        return None if self._pending_commit is None else int(self._pending_commit["round"])

    def resume(self) -> None:
        """After a restart: store the blocks of a round committed before the crash."""
        pend = self._pending_deposit
        if pend is not None:
            self._request_deposit(pend)

    def connection_made(self) -> None:
        """A new classical connection is the current one: any round in flight is lost,
        except a commit Alice has sent, which the HELLOs resolve. Alice (who dialled)
        sends HELLO; Bob waits for hers (`receive_frame` or `accept_hello`)."""
        self._reset_connection()
        if self.role == "alice":
            if self.auth.mode == UNBOOTSTRAPPED:
                self._boot_nonce = secrets.token_bytes(NONCE_BYTES)
                self._out.append(_BOOT.pack(BOOT, self._boot_nonce,
                                            _boot_mac(self._link_secret, b"a",
                                                      self._boot_nonce)))
            else:
                self._send_hello()

    def _reset_connection(self) -> None:
        if self._round is not None and self._round.pending is None:
            self._abort_local("connection to the peer KME lost", notify=False)
        self._round = None
        self.peer_ready = False
        self._pulse_frames.clear()
        # Answers on the old connection are lost; the peer times its requests out.
        self._awaiting_acks.clear()
        self._owed_answers.clear()

    def accept_hello(self, data: bytes, now: float) -> bool:
        """Bob: the first frame of a new, unauthenticated connection. Only a HELLO that
        verifies makes it the current connection (True: Bob's HELLO is queued for it);
        anything else changes nothing and spends no pad (False). LinkProtocolError: an
        authentic HELLO from a misconfigured peer."""
        if self.role != "bob":
            raise ValueError("only Bob accepts connections")
        self._now = now
        if data and data[0] == BOOT:
            return self._on_boot(data)
        if not data or data[0] != HELLO:
            return False
        try:
            frame = _parse_ctrl(data)
            msg = _hello_fields(frame.body)
        except LinkProtocolError:
            return False
        return self._receive_hello(frame, msg, now, new_connection=True)

    def _send_hello(self) -> None:
        raw = json.dumps({"role": self.role, "params": self.fingerprint,
                          "watermark_in": self.auth.watermark_in,
                          "committed": self.committed},
                         separators=(",", ":"), sort_keys=True).encode()
        message = _LABEL + bytes([HELLO]) + raw
        alt = (0, 0, bytes(TAG_BYTES))
        pend = self._pending_commit
        if (self.role == "alice" and pend is not None and pend["material"] and pend["rekey"]
                and not pend.get("pads_applied")):
            # Bob may have committed the rekeying round (new hash key and pads) or not:
            # tag under both. The alt pad is recorded in the pending commit, persisted
            # before this frame leaves, so it is skipped whichever way the round ends.
            trial = self._trial_auth(pend)
            alt_off, alt_tag = trial.sign(message, for_round=False)
            pend["trial_next_out"] = trial.next_out
            self.auth_dirty = True
            alt = (1, alt_off, alt_tag)
        offset, tag = self.auth.sign(message, for_round=False)
        self.auth_dirty = True
        self._out.append(_CTRL.pack(HELLO, offset, tag) + _ALT.pack(*alt) + raw)

    def _trial_auth(self, pend: dict[str, Any]) -> AuthKeys:
        """A copy of the keys as they will be once the pending round is committed."""
        trial = AuthKeys.import_state(self.auth.export_state())
        _apply_pads(trial, pend)
        trial.advance_out(int(pend.get("trial_next_out", 0)))
        return trial

    def receive_frame(self, data: bytes, now: float) -> None:
        if not data:
            raise LinkProtocolError("empty frame")
        self._now = now
        kind = data[0]
        if kind == PP:
            self._on_pp(data[1:], now)
            return
        if kind == BOOT_ACK:
            self._on_boot_ack(data)
            return
        if self.auth.mode == UNBOOTSTRAPPED:
            raise LinkProtocolError(f"{_NAMES.get(kind, kind)} before the bootstrap "
                                    "nonce exchange")
        frame = _parse_ctrl(data)
        if kind == HELLO:
            self._receive_hello(frame, _hello_fields(frame.body), now, new_connection=False)
            return
        body = frame.body
        extra = b""
        rnd = self._round
        if kind in (TRANSCRIPT, COMMIT) and rnd is not None:
            extra = bytes(rnd.received)
        message = _LABEL + bytes([kind]) + body + extra
        try:
            self.auth.verify(frame.offset, message, frame.tag)
        except AuthError as exc:
            self._auth_failed(kind, exc)
            return
        self.auth_dirty = True
        try:
            msg = json.loads(body)
        except ValueError:
            raise LinkProtocolError(f"{_NAMES[kind]} body is not JSON") from None
        if not isinstance(msg, dict):
            raise LinkProtocolError(f"{_NAMES[kind]} body is not an object")
        handler = {ROUND_START: self._on_round_start,
                   TRANSCRIPT: self._on_transcript, COMMIT: self._on_commit,
                   COMMIT_ACK: self._on_commit_ack, RESERVE: self._on_reserve,
                   RESERVE_ACK: self._on_reserve_ack, ABORT: self._on_abort}[kind]
        try:
            handler(msg, now)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            # A backstop: the handlers check their fields first (see `_int`).
            raise LinkProtocolError(f"bad {_NAMES[kind]} ({type(exc).__name__})") from None
        except AuthError as exc:
            # Out of pads for the answer (TRANSCRIPT, COMMIT, COMMIT_ACK): the round
            # ends here, cleanly, instead of the error killing the adapter's reader.
            self._abort_local(f"cannot sign {_NAMES[kind]}'s answer ({exc})")

    @property
    def can_bootstrap(self) -> bool:
        """Bob: no key of the current bootstrap has authenticated anything yet (a lost
        BOOT_ACK lets Alice start over; once her HELLO verified, never again)."""
        a = self.auth
        return (a.mode == UNBOOTSTRAPPED or (a.mode == "bootstrap" and a.used == 0
                                             and a.watermark_in == 0)) \
            and self.committed == 0 and self._pending_deposit is None

    def _on_boot(self, data: bytes) -> bool:
        """Bob: Alice's BOOT on a new connection. True: BOOT_ACK queued, the connection
        is the current one (Alice's HELLO under the new keys follows on it)."""
        if self.role != "bob" or len(data) != _BOOT.size:
            return False
        _, nonce_a, mac = _BOOT.unpack(data)
        if not hmac.compare_digest(mac, _boot_mac(self._link_secret, b"a", nonce_a)):
            self.stats.auth_failures += 1
            return False
        if not self.can_bootstrap:
            raise LinkProtocolError(
                "the peer KME asks to bootstrap the link again, but this KME holds link "
                "state from an earlier bootstrap; if the peer lost its state, reset the "
                "pair: stop both KMEs, run `qkdgw link-reset --config FILE --new-secret` "
                "on one and copy its new link secret to the other before "
                "`qkdgw link-reset --config FILE` there")
        self._reset_connection()
        nonce_b = secrets.token_bytes(NONCE_BYTES)
        self.auth = bootstrap_auth("bob", self._link_secret, nonce_a + nonce_b)
        self.auth_dirty = True
        self._out.append(_BOOT_ACK.pack(BOOT_ACK, nonce_a, nonce_b, _boot_mac(
            self._link_secret, b"b", nonce_a + nonce_b)))
        return True

    def _on_boot_ack(self, data: bytes) -> None:
        if self.role != "alice" or self._boot_nonce is None or len(data) != _BOOT_ACK.size:
            raise LinkProtocolError("unexpected BOOT_ACK")
        _, nonce_a, nonce_b, mac = _BOOT_ACK.unpack(data)
        if nonce_a != self._boot_nonce or not hmac.compare_digest(
                mac, _boot_mac(self._link_secret, b"b", nonce_a + nonce_b)):
            self.stats.auth_failures += 1
            raise LinkProtocolError("BOOT_ACK failed authentication (or answers another "
                                    "BOOT)")
        self._boot_nonce = None
        self.auth = bootstrap_auth("alice", self._link_secret, nonce_a + nonce_b)
        self.auth_dirty = True
        self._send_hello()

    def _auth_failed(self, kind: int, exc: AuthError) -> None:
        self.auth_dirty = True
        self.stats.auth_failures += 1
        rnd = self._round
        # A forged or altered control frame ends the round in flight (if any); it is
        # never acted on.
        if rnd is not None and rnd.pending is None:
            self._abort_local(f"{_NAMES[kind]} failed authentication ({exc})", auth=True)
        else:
            self._events.append(RoundAborted(-1, f"{_NAMES[kind]} failed "
                                              f"authentication ({exc})", True))

    def _receive_hello(self, frame: _CtrlFrame, msg: dict[str, Any], now: float, *,
                       new_connection: bool) -> bool:
        """Verify a HELLO and act on it. Every check that can refuse it runs before any
        state changes (keys, watermark, pending commit, the current connection)."""
        message = _LABEL + bytes([HELLO]) + frame.body
        candidates = [(self.auth, frame.offset, frame.tag, False)]
        if self.role == "bob" and frame.alt is not None:
            candidates.append((self.auth, frame.alt[0], frame.alt[1], False))
        pend = self._pending_commit
        if self.role == "alice" and pend is not None and pend["material"]:
            # Bob's HELLO may be tagged under the pads the pending round installs: if it
            # verifies only there, Bob has committed that round.
            candidates.append((self._trial_auth(pend), frame.offset, frame.tag, True))
        chosen = next((c for c in candidates if c[0].check(c[1], message, c[2])), None)
        if chosen is None:
            if new_connection:
                self.stats.auth_failures += 1  # a forged HELLO; the live link is untouched
                return False
            try:
                self.auth.verify(frame.offset, message, frame.tag)
            except AuthError as exc:
                self._auth_failed(HELLO, exc)
            return False
        auth, offset, tag, adopt = chosen
        if msg["role"] == self.role:
            raise LinkProtocolError(f"both KMEs are configured as {self.role!r}; set "
                                    "[link] role = \"alice\" on one and \"bob\" on the other")
        if msg["params"] != self.fingerprint:
            raise LinkProtocolError("the peer KME runs different [link] parameters; "
                                    "use the same physical and protocol values on both")
        if adopt and pend is not None and msg["committed"] < pend["round"]:
            raise LinkProtocolError("peer HELLO verified under the pads of a round it "
                                    "says it has not committed")
        if new_connection:
            self._reset_connection()
        auth.verify(offset, message, tag)
        self.auth_dirty = True
        if adopt:
            assert pend is not None
            self.auth = auth
            pend["pads_applied"] = True
        self._on_hello(msg, now)
        return self.peer_ready

    def receive_pulses(self, data: bytes, now: float) -> None:
        """Bob: a pulse frame from the quantum channel (maybe rewritten by Eve)."""
        if self.role != "bob":
            raise LinkProtocolError("Alice does not receive pulses")
        # The round number sits in the header (magic 4, version 1, round u32); the
        # frame is authenticated once the round's nonce is known (the measure step).
        if not quantum._TEST_PLAINTEXT:
            try:
                quantum.sealed_header(data)
            except FrameError as exc:
                raise LinkProtocolError(f"quantum channel: {exc}") from None
        number = struct.unpack_from("<I", data, 5)[0] if len(data) >= 9 else -1
        self._pulse_frames[number] = data
        # Keep only the newest few: an old frame whose round was aborted is useless.
        for k in sorted(self._pulse_frames)[:-2]:
            del self._pulse_frames[k]
        self._maybe_measure(now)

    def check_timeout(self, now: float) -> bool:
        """Abort a silent round. True: a commit has waited too long for its ACK; drop
        the connection, the HELLOs of the next one resolve it."""
        rnd = self._round
        if rnd is None:
            return False
        if rnd.pending is not None:
            return now - rnd.pending_since > self.post.timeout_s
        if now - rnd.started > self.post.timeout_s:
            self._abort_local("round timed out (peer or quantum channel silent)")
        return False

    # ------------------------------------------------------------ Alice: rounds

    def next_round_number(self) -> int:
        return max(self._last_round, self.committed) + 1

    def prepare_round(self, number: int) -> PreparedRound:
        """The heavy half of starting a round (pulse emission); touches no core state
        but its own generator, so the adapter runs it off the lock."""
        # `rng` is the physics (photon numbers); bits, bases, intensities and the
        # post-processing seeds come from the OS.
        rng = np.random.default_rng(self._prep_rng.integers(1 << 63))
        secret = _secret_source(rng)
        record, frame = emit(self.params, number & 0xFFFFFFFF, rng, secret)
        nonce = _round_nonce(rng)
        wire = seal_frame(self._link_secret, nonce, number, frame)
        return PreparedRound(number, record, wire,
                             AliceProtocol(record, self.post, secret),  # type: ignore[arg-type]
                             rng, nonce)

    def start_round(self, now: float, prepared: PreparedRound | None = None, *,
                    room: int | None = None) -> None:
        """Start round `prepared.number` (made inline if not given). `room`: blocks the
        pool can still take; the rest of the round's key is discarded on both sides."""
        if self.role != "alice":
            raise ValueError("only Alice starts rounds")
        if self.round_active or not self.peer_ready:
            raise ValueError("a round is already running or the peer is not ready")
        number = self.next_round_number()
        if not self.round_pads_ok:
            out_lvl, in_lvl = self.auth.levels()
            self._events.append(RoundAborted(
                number, f"cannot start a round: authentication pads low (a2b "
                f"{out_lvl // PAD_BYTES}, b2a {in_lvl // PAD_BYTES} pads, a round needs "
                f"{(self.auth.reserve + ROUND_NEED_BYTES) // PAD_BYTES} in each)"))
            return
        if prepared is None:
            prepared = self.prepare_round(number)
        elif prepared.number != number:
            raise ValueError("prepared round is stale")
        self._last_round = number
        nonce = prepared.nonce
        params = self.params
        self._round = _Round(number, nonce, params.pulses, started=now, rng=prepared.rng,
                             room=room)
        try:
            self._send_ctrl(ROUND_START, {"round": number, "nonce": nonce.hex(),
                                          "pulses": params.pulses}, for_round=True)
        except AuthError as exc:
            self._round = None
            self._events.append(RoundAborted(number, f"cannot start a round: {exc}"))
            return
        self._round.proto = prepared.proto
        self._quantum.append(prepared.frame)
        self.stats.rounds_started += 1
        self._events.append(RoundStarted(number))

    # ------------------------------------------------------ reservations (both)

    @property
    def pads_low(self) -> bool:
        """Few pads left in either direction: a round should run to refill them."""
        return min(self.auth.levels()) < self.auth.reserve + LOW_PAD_BYTES

    @property
    def round_pads_ok(self) -> bool:
        """Both directions hold the reserve plus a round's own tags (Alice knows Bob's
        outgoing level: it is her incoming one)."""
        need = self.auth.reserve + ROUND_NEED_BYTES
        return min(self.auth.levels()) >= need

    def _reservation_room(self, sign_out: int, expect_in: int) -> bool:
        """RESERVE and RESERVE_ACK only use pads above the reserve plus what a round
        needs, counting every reservation frame still to come in either direction, so
        no mix of reservations leaves the link unable to run the round that refills."""
        floor = self.auth.reserve + ROUND_PAD_BYTES
        out_lvl, in_lvl = self.auth.levels()
        return (out_lvl - sign_out * PAD_BYTES >= floor
                and in_lvl - expect_in * PAD_BYTES >= floor)

    def request_reservation(self, request: int, master: str, slave: str,
                            keys: list[tuple[str, list[str], int]]) -> None:
        """Raises AuthError (nothing sent) when the pads are down to what the next round
        needs: a flood of reservations must not leave the link unable to refill."""
        if not self._reservation_room(1 + len(self._owed_answers),
                                      1 + len(self._awaiting_acks)):
            raise AuthError("authentication pads low; reservations wait for the next "
                            "round to refill them")
        self._send_ctrl(RESERVE, {"request": request, "master": master, "slave": slave,
                                  "keys": keys}, for_round=False)
        self._awaiting_acks.add(request)

    def reservation_expired(self, request: int) -> None:
        """The adapter gave up waiting for the peer's answer to `request`."""
        self._awaiting_acks.discard(request)

    def answer_reservation(self, request: int, ok: bool, reason: str = "") -> bool:
        """Sign RESERVE_ACK. False: not sent (the request belongs to an old connection,
        or the pads are too low now); the peer times out, and a reservation recorded
        here for it must be released."""
        if request not in self._owed_answers:
            return False
        self._owed_answers.discard(request)
        if not self._reservation_room(1 + len(self._owed_answers), 0):
            self.stats.reservations_lapsed += 1
            return False
        self._send_ctrl(RESERVE_ACK, {"request": request, "ok": ok, "reason": reason},
                        for_round=False)
        return True

    def _on_reserve(self, msg: dict[str, Any], now: float) -> None:
        keys = _reserve_keys(msg)
        request = _int(msg, "request")
        master, slave = _str(msg, "master"), _str(msg, "slave")
        if request in self._owed_answers:
            return
        if not self._reservation_room(1 + len(self._owed_answers), 0):
            # Too few pads to answer: let it lapse (the peer times out and answers 503)
            # rather than sign into what the next round needs.
            self.stats.reservations_lapsed += 1
            return
        self._owed_answers.add(request)
        self._events.append(ReservationRequested(request, master, slave, keys))

    def _on_reserve_ack(self, msg: dict[str, Any], now: float) -> None:
        request = _int(msg, "request")
        ok, reason = _bool(msg, "ok"), _str(msg, "reason")
        self._awaiting_acks.discard(request)
        self._events.append(ReservationAnswered(request, ok, reason))

    # ---------------------------------------------------------------- handlers

    def _on_hello(self, msg: dict[str, Any], now: float) -> None:
        # The peer has seen our pads up to its watermark (e.g. we restarted from an
        # older state): never reuse them.
        self.auth.advance_out(int(msg["watermark_in"]))
        peer_committed = int(msg["committed"])
        pend = self._pending_commit
        if pend is not None:
            self._pending_commit = None
            if peer_committed >= pend["round"]:
                self._alice_commit(pend)
            else:
                self._count_abort(pend["round"], "commit not acknowledged before the "
                                  "connection dropped; rolled back on both sides")
        self._round = None
        if self.role == "bob":
            # Alice's HELLO verified: only now does Bob spend a pad on his own.
            try:
                self._send_hello()
            except AuthError as exc:
                raise LinkProtocolError(f"cannot answer HELLO ({exc}); re-bootstrap "
                                        "both KMEs") from None
        self.peer_ready = True
        self._events.append(PeerReady(peer_committed))

    def _on_round_start(self, msg: dict[str, Any], now: float) -> None:
        if self.role != "bob":
            raise LinkProtocolError("ROUND_START sent to Alice")
        if self._round is not None:
            self._abort_local("peer started a new round before this one ended",
                              notify=False)
        pulses = _int(msg, "pulses")
        if pulses != self.params.pulses:
            raise LinkProtocolError("ROUND_START pulse count differs from [link] pulses")
        number = _int(msg, "round", 1)
        nonce_hex = _str(msg, "nonce", MAX_NONCE_HEX)
        try:
            nonce = bytes.fromhex(nonce_hex)
        except ValueError:
            raise LinkProtocolError("ROUND_START nonce is not hex") from None
        if len(nonce) != NONCE_BYTES:
            raise LinkProtocolError(f"ROUND_START nonce is not {NONCE_BYTES} bytes")
        refusal = ""
        if self._pending_deposit is not None:
            # Committing another round now would replace the unstored one in the
            # persisted state: a crash would lose its blocks here but not at Alice.
            refusal = "the previous round's blocks are not stored yet"
        elif self.auth.levels()[0] < ROUND_NEED_BYTES + PAD_BYTES:
            refusal = "authentication pads low (b2a)"
        if refusal:
            with contextlib.suppress(AuthError):
                self._send_ctrl(ABORT, {"round": number, "reason": refusal,
                                        "busy": self._pending_deposit is not None},
                                for_round=False)
            self._count_abort(number, refusal)
            return
        self._round = _Round(number, nonce, pulses,
                             started=now,
                             rng=np.random.default_rng(self._rng.integers(1 << 63)))
        self.stats.rounds_started += 1
        self._events.append(RoundStarted(self._round.number))
        self._maybe_measure(now)

    def _maybe_measure(self, now: float) -> None:
        rnd = self._round
        if rnd is None or rnd.proto is not None or rnd.measuring:
            return
        data = self._pulse_frames.pop(rnd.number & 0xFFFFFFFF, None)
        if data is None:
            return
        rnd.measuring = True
        params, post, rng, pulses = self.params, self.post, rnd.rng, rnd.pulses
        link_secret, number, nonce = self._link_secret, rnd.number, rnd.nonce
        if rng is None:
            raise ValueError("round without a generator")  # cannot happen: set at start

        def step() -> BobProtocol:
            # Opening and decoding tens of MB is part of the heavy step: off the lock.
            frame = PulseFrame.decode(unseal(link_secret, data, number, nonce))
            if frame.pulses != pulses:
                raise FrameError("pulse frame size differs from ROUND_START")
            secret = _secret_source(rng)
            return BobProtocol(measure(frame, params, rng, secret), post,
                               secret)  # type: ignore[arg-type]

        self._work.append(Work("measure", rnd, step))

    def _on_pp(self, payload: bytes, now: float) -> None:
        rnd = self._round
        if rnd is None or (rnd.closing and self.role == "alice"):
            return  # stale frame of an aborted round
        rnd.received += struct.pack("<I", len(payload)) + payload
        if rnd.proto is None and not rnd.measuring:
            self._abort_local("post-processing message before the pulses arrived")
            return

        def step() -> None:
            proto = rnd.proto
            if proto is None:
                raise ValueError("post-processing message before the pulses arrived")
            if not proto.done:
                proto.receive_message(payload, now)

        self._work.append(Work("pp", rnd, step))

    def _flush_pp(self) -> None:
        rnd = self._round
        assert rnd is not None and rnd.proto is not None
        for msg in rnd.proto.messages_to_send():
            rnd.sent += struct.pack("<I", len(msg)) + msg
            self._out.append(bytes([PP]) + msg)
        if not rnd.proto.done or rnd.closing or self._work_pending_for(rnd):
            return
        if self.role == "bob":
            rnd.closing = True
            res = rnd.proto.result
            self._send_ctrl(TRANSCRIPT, {"round": rnd.number, "aborted": res.aborted,
                                         "key_bits": int(res.final_key.size)},
                            for_round=False, extra=bytes(rnd.sent))
        elif rnd.peer_outcome is not None:
            self._alice_close()

    def _work_pending_for(self, rnd: _Round) -> bool:
        return any(w.round is rnd for w in self._work)

    def _on_transcript(self, msg: dict[str, Any], now: float) -> None:
        rnd = self._round
        number = _int(msg, "round")
        aborted, key_bits = _bool(msg, "aborted"), _int(msg, "key_bits")
        if self.role != "alice" or rnd is None or number != rnd.number:
            return
        rnd.peer_outcome = {"round": number, "aborted": aborted, "key_bits": key_bits}
        if (rnd.proto is not None and rnd.proto.done and not rnd.closing
                and not rnd.busy and not self._work_pending_for(rnd)):
            self._alice_close()

    def _alice_close(self) -> None:
        rnd = self._round
        assert rnd is not None and rnd.proto is not None and rnd.peer_outcome is not None
        rnd.closing = True
        res = rnd.proto.result
        key_bits = 0 if res.aborted or rnd.peer_outcome["aborted"] else int(res.final_key.size)
        if key_bits and int(rnd.peer_outcome["key_bits"]) != key_bits:
            key_bits = 0
        material = np.packbits(res.final_key[: key_bits - key_bits % 8]).tobytes() \
            if key_bits else b""
        rekey = self.auth.mode != "qkd"
        out_lvl, in_lvl = self.auth.levels()
        if rekey:
            refill = TARGET_PAD_BYTES
            if len(material) < HASH_KEY_BYTES + 2 * refill:
                rekey, refill = False, 0  # not enough yet; stay on the bootstrap keys
            else:
                # A big first round may install more, as a later top-up would.
                spare = ((len(material) - HASH_KEY_BYTES)
                         // (TOPUP_MAX_SHARE * PAD_BYTES)) * PAD_BYTES
                refill = max(refill, min(TOPUP_PAD_BYTES, spare))
        else:
            refill = max(0, TOPUP_PAD_BYTES - min(out_lvl, in_lvl))
            refill = min(-(-refill // PAD_BYTES) * PAD_BYTES,
                         (len(material) // (TOPUP_MAX_SHARE * PAD_BYTES)) * PAD_BYTES)
        skip = (HASH_KEY_BYTES if rekey else 0) + 2 * refill
        available = max(0, len(material) - skip) // self.block_bytes
        blocks = available if rnd.room is None else min(available, max(0, rnd.room))
        body = {"round": rnd.number, "key_bits": key_bits, "rekey": rekey, "refill": refill,
                "blocks": blocks}
        rnd.pending = {"round": rnd.number, "nonce": rnd.nonce, "material": material,
                       "rekey": rekey, "refill": refill, "pulses": rnd.pulses,
                       "blocks": blocks, "qber": res.qber_x, "reason": res.abort_reason
                       or ("Bob aborted" if rnd.peer_outcome["aborted"] else "")}
        rnd.pending_since = self._now
        # Set before the COMMIT is signed, so the state the adapter persists before the
        # frame leaves already holds it.
        self._pending_commit = rnd.pending
        self._send_ctrl(COMMIT, body, for_round=False, extra=bytes(rnd.sent))

    def _on_commit(self, msg: dict[str, Any], now: float) -> None:
        rnd = self._round
        number = _int(msg, "round")
        key_bits = _int(msg, "key_bits")
        rekey, refill, blocks = _bool(msg, "rekey"), _int(msg, "refill"), _int(msg, "blocks")
        if self.role != "bob" or rnd is None or number != rnd.number:
            return
        if rnd.proto is None or not rnd.proto.done or not rnd.closing:
            # Alice may only close a round Bob has measured and sent TRANSCRIPT for.
            raise LinkProtocolError("COMMIT before this side finished the round")
        if refill % PAD_BYTES:
            raise LinkProtocolError("COMMIT refill is not a whole number of pads")
        res = rnd.proto.result
        if key_bits == 0:
            self._send_ctrl(COMMIT_ACK, {"round": rnd.number}, for_round=False)
            self._round = None
            self._count_abort(rnd.number, res.abort_reason or "Alice closed the round "
                              "without key", qber=res.qber_x)
            return
        if res.aborted or res.final_key.size != key_bits:
            self._abort_local("COMMIT names a key this side does not hold")
            return
        material = np.packbits(res.final_key[: key_bits - key_bits % 8]).tobytes()
        pend = {"round": rnd.number, "nonce": rnd.nonce, "material": material,
                "rekey": rekey, "refill": refill,
                "blocks": blocks, "pulses": rnd.pulses, "qber": res.qber_x}
        # Bob's commit point: the ACK is tagged under the old pads, then the round's
        # pads are installed; the adapter persists all of it before the ACK leaves.
        self._send_ctrl(COMMIT_ACK, {"round": rnd.number}, for_round=False)
        self._round = None
        self._commit(pend)

    def _on_commit_ack(self, msg: dict[str, Any], now: float) -> None:
        pend = self._pending_commit
        number = _int(msg, "round")
        if self.role != "alice" or pend is None or number != pend["round"]:
            return
        self._pending_commit = None
        self._alice_commit(pend)

    def _alice_commit(self, pend: dict[str, Any]) -> None:
        self._round = None
        if not pend["material"]:
            self._count_abort(pend["round"], pend["reason"] or "no key", qber=pend["qber"])
            return
        self._commit(pend)

    def _commit(self, pend: dict[str, Any]) -> None:
        if not pend.pop("pads_applied", False):
            _apply_pads(self.auth, pend)
        # The alt tag of a HELLO may already have used the round's first a2b pad.
        self.auth.advance_out(int(pend.pop("trial_next_out", 0)))
        self.auth_dirty = True
        self.committed = pend["round"]
        self.peer_busy_aborts = 0
        self._count_commit(pend)
        self._pending_deposit = pend
        self._request_deposit(pend)

    def _request_deposit(self, pend: dict[str, Any]) -> None:
        blocks, discarded = self._cut(pend)
        self._events.append(DepositRequested(pend["round"], blocks, len(pend["material"]) * 8,
                                             pend["pulses"], pend["qber"], discarded))

    def deposit_done(self, round_no: int, ok: bool = True) -> None:
        """The blocks of `round_no` are on disk (ok) or could not be stored (the adapter
        retries: the round is committed on both sides and stays so)."""
        pend = self._pending_deposit
        if pend is None or pend["round"] != round_no or not ok:
            return
        self._pending_deposit = None
        self.auth_dirty = True
        blocks, discarded = self._cut(pend)
        self._events.append(RoundCommitted(round_no, blocks, len(pend["material"]) * 8,
                                           pend["pulses"], pend["qber"], discarded))

    # Older name, kept for callers that still acknowledge a deposit this way.
    commit_done = deposit_done

    def _on_abort(self, msg: dict[str, Any], now: float) -> None:
        rnd = self._round
        number = _int(msg, "round", -_U63)
        reason = _str(msg, "reason", MAX_ABORT_REASON_IN)
        busy = msg.get("busy") is True
        if rnd is None or number != rnd.number:
            return
        if rnd.pending is not None:
            self._pending_commit = None
        if busy:
            self.peer_busy_aborts += 1
        self._abort_local(f"peer aborted: {reason}", notify=False)

    # ----------------------------------------------------------------- helpers

    def _cut(self, pend: dict[str, Any]) -> tuple[list[tuple[str, bytes]], int]:
        skip = (HASH_KEY_BYTES + 2 * pend["refill"]) if pend["rekey"] else 2 * pend["refill"]
        rest = pend["material"][skip:]
        n = len(rest) // self.block_bytes
        keep = min(n, int(pend["blocks"]))
        ids = block_ids(pend["nonce"], pend["round"], keep)
        bb = self.block_bytes
        return [(ids[i], rest[i * bb:(i + 1) * bb]) for i in range(keep)], n - keep

    def _count_commit(self, pend: dict[str, Any]) -> None:
        s = self.stats
        s.rounds_committed += 1
        s.key_bits += len(pend["material"]) * 8
        s.pulses += pend["pulses"]
        s.last_qber = pend["qber"]
        s.last_round_key_bits = len(pend["material"]) * 8
        s.blocks_discarded += self._cut(pend)[1]

    def _count_abort(self, number: int, reason: str, *, auth: bool = False,
                     qber: float | None = None) -> None:
        s = self.stats
        s.rounds_aborted += 1
        s.pulses += self.params.pulses
        s.last_abort_reason = reason
        s.last_round_key_bits = 0
        if qber is not None:
            s.last_qber = qber
        self._events.append(RoundAborted(number, reason, auth, qber))

    def _abort_local(self, reason: str, *, auth: bool = False, notify: bool = True,
                     number: int | None = None) -> None:
        rnd = self._round
        num = number if number is not None else (rnd.number if rnd is not None else -1)
        qber = None
        if (rnd is not None and rnd.proto is not None and not rnd.busy
                and rnd.proto.result.test_bits):
            qber = rnd.proto.result.qber_x
        self._round = None
        if rnd is not None and rnd.pending is not None:
            self._pending_commit = None
        if notify:
            with contextlib.suppress(AuthError):
                self._send_ctrl(ABORT, {"round": num, "reason": reason[:MAX_ABORT_REASON_OUT]},
                                for_round=False)
        self._count_abort(num, reason, auth=auth, qber=qber)

    def _send_ctrl(self, kind: int, body: dict[str, Any], *, for_round: bool,
                   extra: bytes = b"") -> None:
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        offset, tag = self.auth.sign(_LABEL + bytes([kind]) + raw + extra,
                                     for_round=for_round)
        assert len(tag) == TAG_BYTES
        self.auth_dirty = True
        self._out.append(_CTRL.pack(kind, offset, tag) + raw)


@dataclass(frozen=True)
class _CtrlFrame:
    kind: int
    offset: int
    tag: bytes = field(repr=False)
    alt: tuple[int, bytes] | None = field(repr=False)  # HELLO only
    body: bytes = field(repr=False)


def _parse_ctrl(data: bytes) -> _CtrlFrame:
    kind = data[0]
    if kind not in _NAMES or kind == PP or len(data) < _CTRL.size:
        raise LinkProtocolError(f"unknown or truncated frame type {kind}")
    _, offset, tag = _CTRL.unpack_from(data)
    if kind != HELLO:
        return _CtrlFrame(kind, offset, tag, None, data[_CTRL.size:])
    if len(data) < _CTRL.size + _ALT.size:
        raise LinkProtocolError("truncated HELLO")
    has_alt, alt_off, alt_tag = _ALT.unpack_from(data, _CTRL.size)
    return _CtrlFrame(kind, offset, tag, (alt_off, alt_tag) if has_alt else None,
                      data[_CTRL.size + _ALT.size:])


def _hello_fields(body: bytes) -> dict[str, Any]:
    """A HELLO body's fields, type-checked (not yet authenticated)."""
    try:
        msg = json.loads(body)
    except ValueError:
        raise LinkProtocolError("HELLO body is not JSON") from None
    if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
            and isinstance(msg.get("params"), str)
            and all(type(msg.get(k)) is int and 0 <= msg[k] <= _U63
                    for k in ("watermark_in", "committed"))):
        raise LinkProtocolError("bad HELLO (fields missing or of the wrong type)")
    return msg


def _apply_pads(auth: AuthKeys, pend: dict[str, Any]) -> None:
    """Install what a committed round pays for: a refill of both pad streams, or (the
    first time) a new hash key and fresh pads instead of the bootstrap ones."""
    mat = pend["material"]
    refill = pend["refill"]
    if pend["rekey"]:
        hk = HashKey(mat[:HASH_KEY_BYTES])
        auth.replace_pads(mat[HASH_KEY_BYTES:HASH_KEY_BYTES + 2 * refill], hk, "qkd")
    elif refill:
        auth.refill(mat[:2 * refill])


def _dump_pending(pend: dict[str, Any] | None) -> dict[str, Any] | None:
    if pend is None:
        return None
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in pend.items()}


def _load_pending(saved: Any) -> dict[str, Any] | None:
    if not saved:
        return None
    pend = dict(saved)
    pend["nonce"] = bytes.fromhex(pend["nonce"])
    pend["material"] = bytes.fromhex(pend["material"])
    return pend


def _boot_mac(psk: bytes, who: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    key = HKDFExpand(hashes.SHA256(), 32, BOOT_MAC_INFO).derive(psk)
    return hmac.new(key, BOOT_MAC_LABEL + who + data, "sha256").digest()


def bootstrap_auth(role: str, psk: bytes, session: bytes = b"") -> AuthKeys:
    """Bootstrap authentication keys from the pre-shared link secret and `session`,
    the two nonces of the BOOT exchange (nonce_a | nonce_b). Without `session` every
    bootstrap under one secret gets the same pads: only tests use that (in-memory
    pairs, and the positive control of the pad-reuse test)."""
    from qkd.link.wegman_carter import bootstrap_material

    if session and len(session) != BOOT_SESSION_BYTES:
        raise ValueError(f"bootstrap session must be both {NONCE_BYTES}-byte nonces")
    # The nonces go into the HKDF info through the label, so each session has its own
    # key stream; with no session the labels (and the keys) are the old ones.
    keys = AuthKeys(role, HashKey(bootstrap_material(psk, b"hash key" + session,
                                                     HASH_KEY_BYTES)),
                    reserve=RESERVE_PAD_BYTES, mode="bootstrap")
    keys.refill(bootstrap_material(psk, b"pads" + session, 2 * BOOTSTRAP_PAD_BYTES))
    return keys


def unbootstrapped_auth(role: str) -> AuthKeys:
    """Placeholder keys of a KME that has not run the bootstrap exchange: no pads, so
    it signs nothing until BOOT / BOOT_ACK installs the real ones."""
    return AuthKeys(role, HashKey(bytes(HASH_KEY_BYTES)), reserve=RESERVE_PAD_BYTES,
                    mode=UNBOOTSTRAPPED)


__all__ = ["LinkCore", "bootstrap_auth", "make_tag", "unbootstrapped_auth"]
