"""One KME's side of the BB84 link, sans-I/O: classical frames, pulse frames and the
time go in; frames to send and events come out. `qkd.link.bb84` moves the bytes.

Classical channel frames (each carried in a u32 length prefix by the adapter):

    control  type u8 | pad offset u64 | tag 16 | JSON body
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
RESERVE / RESERVE_ACK carry key reservations between the KMEs (see qkd.kme).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkd.link.quantum import FrameError, PulseFrame, SlotRecord, emit, measure
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

HELLO, ROUND_START, PP, TRANSCRIPT, COMMIT, COMMIT_ACK, RESERVE, RESERVE_ACK, ABORT = range(1, 10)
_NAMES = {HELLO: "HELLO", ROUND_START: "ROUND_START", PP: "PP", TRANSCRIPT: "TRANSCRIPT",
          COMMIT: "COMMIT", COMMIT_ACK: "COMMIT_ACK", RESERVE: "RESERVE",
          RESERVE_ACK: "RESERVE_ACK", ABORT: "ABORT"}
_LABEL = b"qkdgw link v1\x00"
_CTRL = struct.Struct("<BQ16s")
# Pads per direction a refill tops the streams up to; the first committed round also
# pays for the hash key (HASH_KEY_BYTES), so a round must produce at least
# HASH_KEY_BYTES + 2 * TARGET_PAD_BYTES to switch off the bootstrap key.
TARGET_PAD_BYTES = 32 * PAD_BYTES
RESERVE_PAD_BYTES = 8 * PAD_BYTES
BOOTSTRAP_PAD_BYTES = 256 * PAD_BYTES


class LinkProtocolError(Exception):
    """The peer broke the link protocol (not a tag failure); the adapter drops the
    connection. Never carries key bytes."""


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
    pass


@dataclass(frozen=True)
class RoundCommitted(KeyBlocks):
    pass


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
        b = bytearray(hashlib.sha256(b"qkdgw bb84 block v1" + nonce
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


class LinkCore:
    """One side ("alice" drives rounds and emits pulses, "bob" measures)."""

    def __init__(self, role: str, auth: AuthKeys, params: LinkParams, key_size_bits: int,
                 rng: np.random.Generator, *, committed: int = 0) -> None:
        if role not in ("alice", "bob"):
            raise ValueError("role must be 'alice' or 'bob'")
        if key_size_bits % 8:
            raise ValueError("key size must be a multiple of 8")
        self.role = role
        self.auth = auth
        self.params = params
        self.post = post_params(params)
        self.block_bytes = key_size_bits // 8
        self.fingerprint = params_fingerprint(params, key_size_bits)
        self._rng = rng
        self.committed = committed  # last round whose blocks this side holds
        self._last_round = committed
        self.stats = LinkStats()
        self._out: deque[bytes] = deque()
        self._quantum: deque[bytes] = deque()
        self._events: deque[Event] = deque()
        self._round: _Round | None = None
        self._alice_record: SlotRecord | None = None
        self._pulse_frames: dict[int, bytes] = {}
        self._pending_commit: dict[str, Any] | None = None
        self.peer_ready = False
        self.auth_dirty = False

    def __repr__(self) -> str:
        return f"LinkCore(role={self.role!r}, committed={self.committed})"

    # ------------------------------------------------------------- I/O surface

    def frames_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    def quantum_to_send(self) -> list[bytes]:
        out = list(self._quantum)
        self._quantum.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def round_active(self) -> bool:
        return self._round is not None

    def connection_made(self) -> None:
        """A (new) classical connection: send HELLO; any round in flight is lost."""
        if self._round is not None and self._round.pending is None:
            self._abort_local("connection to the peer KME lost", notify=False)
        self.peer_ready = False
        self._pulse_frames.clear()
        self._send_ctrl(HELLO, {"role": self.role, "params": self.fingerprint,
                                "watermark_in": self.auth.watermark_in,
                                "committed": self.committed}, for_round=False)

    def receive_frame(self, data: bytes, now: float) -> None:
        if not data:
            raise LinkProtocolError("empty frame")
        kind = data[0]
        if kind == PP:
            self._on_pp(data[1:], now)
            return
        if kind not in _NAMES or len(data) < _CTRL.size:
            raise LinkProtocolError(f"unknown or truncated frame type {kind}")
        _, offset, tag = _CTRL.unpack_from(data)
        body = data[_CTRL.size:]
        extra = b""
        rnd = self._round
        if kind in (TRANSCRIPT, COMMIT) and rnd is not None:
            extra = bytes(rnd.received)
        try:
            self.auth.verify(offset, _LABEL + bytes([kind]) + body + extra, tag)
        except AuthError as exc:
            self.auth_dirty = True
            self.stats.auth_failures += 1
            # A forged or altered control frame ends the round in flight (if any); it
            # is never acted on.
            if rnd is not None:
                self._abort_local(f"{_NAMES[kind]} failed authentication ({exc})",
                                  auth=True)
            else:
                self._events.append(RoundAborted(-1, f"{_NAMES[kind]} failed "
                                                  f"authentication ({exc})", True))
            return
        self.auth_dirty = True
        try:
            msg = json.loads(body)
        except ValueError:
            raise LinkProtocolError(f"{_NAMES[kind]} body is not JSON") from None
        if not isinstance(msg, dict):
            raise LinkProtocolError(f"{_NAMES[kind]} body is not an object")
        handler = {HELLO: self._on_hello, ROUND_START: self._on_round_start,
                   TRANSCRIPT: self._on_transcript, COMMIT: self._on_commit,
                   COMMIT_ACK: self._on_commit_ack, RESERVE: self._on_reserve,
                   RESERVE_ACK: self._on_reserve_ack, ABORT: self._on_abort}[kind]
        try:
            handler(msg, now)
        except (KeyError, TypeError, ValueError) as exc:
            raise LinkProtocolError(f"bad {_NAMES[kind]} ({type(exc).__name__})") from None

    def receive_pulses(self, data: bytes, now: float) -> None:
        """Bob: a pulse frame from the quantum channel (maybe rewritten by Eve)."""
        if self.role != "bob":
            raise LinkProtocolError("Alice does not receive pulses")
        # The round number sits in the header (magic 4, version 1, round u32); a
        # malformed frame is kept under whatever it claims and fails decoding later.
        number = struct.unpack_from("<I", data, 5)[0] if len(data) >= 9 else -1
        self._pulse_frames[number] = data
        # Keep only the newest few: an old frame whose round was aborted is useless.
        for k in sorted(self._pulse_frames)[:-2]:
            del self._pulse_frames[k]
        self._maybe_measure(now)

    def check_timeout(self, now: float) -> None:
        rnd = self._round
        if rnd is not None and rnd.pending is None and now - rnd.started > self.post.timeout_s:
            self._abort_local("round timed out (peer or quantum channel silent)")

    # ------------------------------------------------------------ Alice: rounds

    def start_round(self, now: float) -> None:
        if self.role != "alice":
            raise ValueError("only Alice starts rounds")
        if self._round is not None or not self.peer_ready:
            raise ValueError("a round is already running or the peer is not ready")
        self._last_round = max(self._last_round, self.committed) + 1
        number = self._last_round
        nonce = self._rng.bytes(16)
        params = self.params
        record, frame = emit(params, number & 0xFFFFFFFF, self._rng)
        self._round = _Round(number, nonce, params.pulses, started=now)
        self._alice_record = record
        try:
            self._send_ctrl(ROUND_START, {"round": number, "nonce": nonce.hex(),
                                          "pulses": params.pulses}, for_round=True)
        except AuthError as exc:
            self._round = None
            self._events.append(RoundAborted(number, f"cannot start a round: {exc}"))
            return
        self._round.proto = AliceProtocol(record, self.post, self._rng)
        self._quantum.append(frame.encode())
        self.stats.rounds_started += 1
        self._events.append(RoundStarted(number))

    # ------------------------------------------------------ reservations (both)

    def request_reservation(self, request: int, master: str, slave: str,
                            keys: list[tuple[str, list[str], int]]) -> None:
        self._send_ctrl(RESERVE, {"request": request, "master": master, "slave": slave,
                                  "keys": keys}, for_round=False)

    def answer_reservation(self, request: int, ok: bool, reason: str = "") -> None:
        self._send_ctrl(RESERVE_ACK, {"request": request, "ok": ok, "reason": reason},
                        for_round=False)

    def _on_reserve(self, msg: dict[str, Any], now: float) -> None:
        keys = [(str(k), [str(b) for b in bids], int(size)) for k, bids, size in msg["keys"]]
        self._events.append(ReservationRequested(int(msg["request"]), str(msg["master"]),
                                                 str(msg["slave"]), keys))

    def _on_reserve_ack(self, msg: dict[str, Any], now: float) -> None:
        self._events.append(ReservationAnswered(int(msg["request"]), bool(msg["ok"]),
                                                str(msg["reason"])))

    # ---------------------------------------------------------------- handlers

    def _on_hello(self, msg: dict[str, Any], now: float) -> None:
        if msg["role"] == self.role:
            raise LinkProtocolError(f"both KMEs are configured as {self.role!r}; set "
                                    "[link] role = \"alice\" on one and \"bob\" on the other")
        if msg["params"] != self.fingerprint:
            raise LinkProtocolError("the peer KME runs different [link] parameters; "
                                    "use the same physical and protocol values on both")
        # The peer has seen our pads up to its watermark (e.g. we restarted from an
        # older state): never reuse them.
        self.auth.advance_out(int(msg["watermark_in"]))
        peer_committed = int(msg["committed"])
        pend = self._pending_commit
        if pend is not None:
            self._pending_commit = None
            if peer_committed >= pend["round"]:
                self._finish_alice_commit(pend)
            else:
                self.stats.rounds_aborted += 1
                self._events.append(RoundAborted(pend["round"], "commit not acknowledged "
                                                 "before the connection dropped"))
        self._round = None
        self.peer_ready = True
        self._events.append(PeerReady(peer_committed))

    def _on_round_start(self, msg: dict[str, Any], now: float) -> None:
        if self.role != "bob":
            raise LinkProtocolError("ROUND_START sent to Alice")
        if self._round is not None:
            self._abort_local("peer started a new round before this one ended",
                              notify=False)
        pulses = int(msg["pulses"])
        if pulses != self.params.pulses:
            raise LinkProtocolError("ROUND_START pulse count differs from [link] pulses")
        self._round = _Round(int(msg["round"]), bytes.fromhex(msg["nonce"]), pulses,
                             started=now)
        self.stats.rounds_started += 1
        self._events.append(RoundStarted(self._round.number))
        self._maybe_measure(now)

    def _maybe_measure(self, now: float) -> None:
        rnd = self._round
        if rnd is None or rnd.proto is not None:
            return
        data = self._pulse_frames.pop(rnd.number & 0xFFFFFFFF, None)
        if data is None:
            return
        try:
            frame = PulseFrame.decode(data)
            if frame.pulses != rnd.pulses:
                raise FrameError("pulse frame size differs from ROUND_START")
        except FrameError as exc:
            self._abort_local(f"quantum channel: {exc}")
            return
        record = measure(frame, self.params, self._rng)
        rnd.proto = BobProtocol(record, self.post, self._rng)
        self._flush_pp()

    def _on_pp(self, payload: bytes, now: float) -> None:
        rnd = self._round
        if rnd is None or (rnd.closing and self.role == "alice"):
            return  # stale frame of an aborted round
        rnd.received += struct.pack("<I", len(payload)) + payload
        proto = rnd.proto
        if proto is None:
            self._abort_local("post-processing message before the pulses arrived")
            return
        if not proto.done:
            try:
                proto.receive_message(payload, now)
            except ValueError as exc:
                self._abort_local(f"post-processing: {exc}")
                return
        self._flush_pp()

    def _flush_pp(self) -> None:
        rnd = self._round
        assert rnd is not None and rnd.proto is not None
        for msg in rnd.proto.messages_to_send():
            rnd.sent += struct.pack("<I", len(msg)) + msg
            self._out.append(bytes([PP]) + msg)
        if not rnd.proto.done or rnd.closing:
            return
        if self.role == "bob":
            rnd.closing = True
            res = rnd.proto.result
            self._send_ctrl(TRANSCRIPT, {"round": rnd.number, "aborted": res.aborted,
                                         "key_bits": int(res.final_key.size)},
                            for_round=False, extra=bytes(rnd.sent))
        elif rnd.peer_outcome is not None:
            self._alice_close()

    def _on_transcript(self, msg: dict[str, Any], now: float) -> None:
        rnd = self._round
        if self.role != "alice" or rnd is None or int(msg["round"]) != rnd.number:
            return
        rnd.peer_outcome = msg
        if rnd.proto is not None and rnd.proto.done and not rnd.closing:
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
            refill = max(0, TARGET_PAD_BYTES - min(out_lvl, in_lvl))
            refill = min(-(-refill // PAD_BYTES) * PAD_BYTES,
                         (len(material) // (2 * PAD_BYTES)) * PAD_BYTES)
        body = {"round": rnd.number, "key_bits": key_bits, "rekey": rekey, "refill": refill}
        self._send_ctrl(COMMIT, body, for_round=False, extra=bytes(rnd.sent))
        rnd.pending = {"round": rnd.number, "nonce": rnd.nonce, "material": material,
                       "rekey": rekey, "refill": refill, "pulses": rnd.pulses,
                       "qber": res.qber_x, "reason": res.abort_reason
                       or ("Bob aborted" if rnd.peer_outcome["aborted"] else "")}
        self._pending_commit = rnd.pending

    def _on_commit(self, msg: dict[str, Any], now: float) -> None:
        rnd = self._round
        if self.role != "bob" or rnd is None or int(msg["round"]) != rnd.number:
            return
        assert rnd.proto is not None
        res = rnd.proto.result
        key_bits = int(msg["key_bits"])
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
        self._pending_commit = {"round": rnd.number, "nonce": rnd.nonce,
                                "material": material, "rekey": bool(msg["rekey"]),
                                "refill": int(msg["refill"]), "pulses": rnd.pulses,
                                "qber": res.qber_x}
        blocks = self._cut(self._pending_commit)
        self._events.append(DepositRequested(rnd.number, blocks, len(material) * 8,
                                             rnd.pulses, res.qber_x))

    def commit_done(self, round_no: int, ok: bool = True) -> None:
        """Bob: the deposit of `round_no` is on disk (or failed): acknowledge, then
        refill the pads from the round's key."""
        pend = self._pending_commit
        if pend is None or pend["round"] != round_no:
            return
        self._pending_commit = None
        self._round = None
        if not ok:
            self._abort_local("could not store the round's key", notify=True,
                              number=round_no)
            return
        self._send_ctrl(COMMIT_ACK, {"round": round_no}, for_round=False)
        self._apply_pads(pend)
        self.committed = round_no
        self._count_commit(pend)

    def _on_commit_ack(self, msg: dict[str, Any], now: float) -> None:
        pend = self._pending_commit
        if self.role != "alice" or pend is None or int(msg["round"]) != pend["round"]:
            return
        self._pending_commit = None
        self._finish_alice_commit(pend)

    def _finish_alice_commit(self, pend: dict[str, Any]) -> None:
        self._round = None
        if not pend["material"]:
            self._count_abort(pend["round"], pend["reason"] or "no key", qber=pend["qber"])
            return
        blocks = self._cut(pend)
        self._apply_pads(pend)
        self.committed = pend["round"]
        self._count_commit(pend)
        self._events.append(RoundCommitted(pend["round"], blocks, len(pend["material"]) * 8,
                                           pend["pulses"], pend["qber"]))

    def _on_abort(self, msg: dict[str, Any], now: float) -> None:
        rnd = self._round
        if rnd is None or int(msg["round"]) != rnd.number:
            return
        if rnd.pending is not None:
            self._pending_commit = None
        self._abort_local(f"peer aborted: {msg['reason']}", notify=False)

    # ----------------------------------------------------------------- helpers

    def _cut(self, pend: dict[str, Any]) -> list[tuple[str, bytes]]:
        skip = (HASH_KEY_BYTES + 2 * pend["refill"]) if pend["rekey"] else 2 * pend["refill"]
        rest = pend["material"][skip:]
        n = len(rest) // self.block_bytes
        ids = block_ids(pend["nonce"], pend["round"], n)
        bb = self.block_bytes
        return [(ids[i], rest[i * bb:(i + 1) * bb]) for i in range(n)]

    def _apply_pads(self, pend: dict[str, Any]) -> None:
        mat = pend["material"]
        refill = pend["refill"]
        if pend["rekey"]:
            hk = HashKey(mat[:HASH_KEY_BYTES])
            self.auth.replace_pads(mat[HASH_KEY_BYTES:HASH_KEY_BYTES + 2 * refill], hk, "qkd")
        elif refill:
            self.auth.refill(mat[:2 * refill])
        self.auth_dirty = True

    def _count_commit(self, pend: dict[str, Any]) -> None:
        s = self.stats
        s.rounds_committed += 1
        s.key_bits += len(pend["material"]) * 8
        s.pulses += pend["pulses"]
        s.last_qber = pend["qber"]
        s.last_round_key_bits = len(pend["material"]) * 8

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
        if rnd is not None and rnd.proto is not None and rnd.proto.result.test_bits:
            qber = rnd.proto.result.qber_x
        self._round = None
        self._pending_commit = None
        if notify:
            with contextlib.suppress(AuthError):
                self._send_ctrl(ABORT, {"round": num, "reason": reason[:200]},
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


def bootstrap_auth(role: str, psk: bytes) -> AuthKeys:
    """Fresh authentication keys from the pre-shared bootstrap key (first start only)."""
    from qkd.link.wegman_carter import bootstrap_material

    keys = AuthKeys(role, HashKey(bootstrap_material(psk, b"hash key", HASH_KEY_BYTES)),
                    reserve=RESERVE_PAD_BYTES, mode="bootstrap")
    keys.refill(bootstrap_material(psk, b"pads", 2 * BOOTSTRAP_PAD_BYTES))
    return keys


__all__ = ["LinkCore", "bootstrap_auth", "make_tag"]
