"""The record layer: AES-256-GCM records with a key per direction and key phases.

Wire format of a record (5-byte header, authenticated as AAD when protected)::

    type (1) | flags (1) | length (3) | body (length bytes)

`type` is PLAINTEXT_HANDSHAKE (only before the first keys exist) or PROTECTED. The
body of a protected record is AES-256-GCM(inner_type ‖ payload) with the 16-byte tag;
hiding the inner type means a recording does not even show which records carry data.
The nonce is the direction's IV XOR the 64-bit record sequence number, which restarts
at zero with every new key and is never sent.

Flag bit 0 is the key phase (as in QUIC): the sender flips it on the first record under
a new key, either after a key update or when a re-handshake installs fresh hybrid keys.
A key update ratchets the traffic secret as TLS 1.3 does (next = Expand(current, "key
update"), key and IV expanded from the secret) and overwrites the old secret, so what
this layer holds after an update opens no record of an earlier generation. The receiver
holds the pending handshake secret if there is one and otherwise ratchets. TCP delivers
in order, so any record under a key the receiver already dropped is an attack, and
every authentication failure is fatal.

Secrets live in bytearrays owned by this layer and are zeroed when replaced or at
close; docs/protocol.md says what CPython can and cannot promise about erasure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA384
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from gateway.errors import GatewayError
from gateway.tunnel.constants import (
    FLAG_KEY_PHASE,
    HEADER_LEN,
    INNER_CLOSE,
    INNER_HANDSHAKE,
    INNER_STREAM,
    MAX_PAYLOAD,
    MAX_PLAINTEXT_BODY,
    MAX_PROTECTED_BODY,
    PLAINTEXT_HANDSHAKE,
    PROTECTED,
    TAG_LEN,
)
from gateway.tunnel.key_schedule import (
    AES_KEY_LEN,
    GCM_IV_LEN,
    HASH_LEN,
    LABEL_KEY_UPDATE,
    LABEL_RECORD_IV,
    LABEL_RECORD_KEY,
)
from gateway.tunnel.wire import DecodeError, ErrorCode

_INNER_TYPES = frozenset((INNER_HANDSHAKE, INNER_STREAM, INNER_CLOSE))
# Not on the wire: a plaintext record that arrived after the first receive key was
# installed but before anything was received under it. Only a plaintext Alert may be
# that: the responder refusing the initiator's last flight has no keys to protect it.
LATE_PLAINTEXT = 0x100


class RecordError(GatewayError):
    """Fatal record-layer failure; `code` goes into the close alert if one can be sent."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class RecordLimits:
    """When to update keys, and when a key must never be used again.

    With 64 KiB records a key protects at most 2^12 AES blocks per record. The soft
    limits trigger a cheap key update long before the hard limits, which keep the
    AES-GCM confidentiality and integrity advantages below 2^-57 (RFC 8446 §5.5 and the
    CFRG AEAD-limits draft: q·l ≤ 2^36 blocks per key for this bound)."""

    update_after_records: int = 1 << 20
    update_after_bytes: int = 1 << 34
    hard_max_records: int = 1 << 23
    hard_max_bytes: int = 1 << 36


def wipe(buf: bytearray) -> None:
    """Overwrite a secret in place (the bytes object it may have been copied from is
    out of reach; see docs/protocol.md)."""
    buf[:] = bytes(len(buf))


def _expand_into(secret: bytearray, label: bytes, out: bytearray) -> None:
    """`key_schedule.expand_label(secret, label, b"", len(out))`, written into `out`."""
    info = len(label).to_bytes(2, "big") + label
    HKDFExpand(SHA384(), len(out), info).derive_into(secret, out)


def _owned(secret: bytes | bytearray) -> bytearray:
    if len(secret) != HASH_LEN:
        raise ValueError(f"a traffic secret is {HASH_LEN} bytes")
    return bytearray(secret)


class _Direction:
    """One direction's current generation: its secret, AEAD and IV, nothing older."""

    __slots__ = ("_aead", "_iv", "bytes", "generation", "phase", "secret", "seq")

    def __init__(self, secret: bytearray, phase: int, generation: int) -> None:
        key = bytearray(AES_KEY_LEN)
        iv = bytearray(GCM_IV_LEN)
        _expand_into(secret, LABEL_RECORD_KEY, key)
        _expand_into(secret, LABEL_RECORD_IV, iv)
        self.secret = secret
        # AESGCM copies the key into OpenSSL, which clears it when the object is freed.
        self._aead: AESGCM | None = AESGCM(key)
        wipe(key)
        self._iv = int.from_bytes(iv, "big")
        wipe(iv)
        self.seq = 0
        self.bytes = 0
        self.phase = phase
        self.generation = generation

    def nonce(self) -> bytes:
        return (self._iv ^ self.seq).to_bytes(12, "big")

    @property
    def aead(self) -> AESGCM:
        if self._aead is None:
            raise RecordError(ErrorCode.INTERNAL_ERROR, "key already erased")
        return self._aead

    def ratchet(self) -> _Direction:
        """The next generation (a key update); this one is erased."""
        nxt = bytearray(HASH_LEN)
        _expand_into(self.secret, LABEL_KEY_UPDATE, nxt)
        out = _Direction(nxt, self.phase ^ 1, self.generation + 1)
        self.erase()
        return out

    def erase(self) -> None:
        wipe(self.secret)
        self._aead = None
        self._iv = 0


def _header(rtype: int, flags: int, length: int) -> bytes:
    return bytes((rtype, flags, length >> 16, (length >> 8) & 0xFF, length & 0xFF))


class RecordLayer:
    """Seals outgoing and opens incoming records for one tunnel connection."""

    def __init__(self, limits: RecordLimits | None = None) -> None:
        self.limits = limits or RecordLimits()
        self._send: _Direction | None = None
        self._recv: _Direction | None = None
        self._pending_recv: bytearray | None = None
        self._late_plaintext_ok = False

    def __repr__(self) -> str:
        return (f"RecordLayer(send_gen={self.send_generation}, "
                f"recv_gen={self.recv_generation})")

    # -- key installation -------------------------------------------------------

    @property
    def send_ready(self) -> bool:
        return self._send is not None

    @property
    def recv_ready(self) -> bool:
        return self._recv is not None

    @property
    def send_generation(self) -> int:
        return -1 if self._send is None else self._send.generation

    @property
    def recv_phase(self) -> int | None:
        return None if self._recv is None else self._recv.phase

    @property
    def recv_generation(self) -> int:
        return -1 if self._recv is None else self._recv.generation

    def install_send(self, secret: bytes | bytearray) -> None:
        """Start sealing with a new handshake secret from the next record on. The layer
        keeps its own copy; the caller erases `secret` if it is a bytearray it owns."""
        old = self._send
        if old is None:
            self._send = _Direction(_owned(secret), 0, 0)
        else:
            self._send = _Direction(_owned(secret), old.phase ^ 1, old.generation + 1)
            old.erase()

    def install_recv(self, secret: bytes | bytearray) -> None:
        """A new handshake secret for records the peer sends from now on.

        Before the first keys exist it applies at once; later it waits for the peer's
        key-phase flip, since records under the old key may still be in flight."""
        if self._recv is None:
            self._recv = _Direction(_owned(secret), 0, 0)
            self._late_plaintext_ok = True
        else:
            if self._pending_recv is not None:
                wipe(self._pending_recv)
            self._pending_recv = _owned(secret)

    def update_send_key(self) -> None:
        """A cheap key update: ratchet the send secret and erase the old one."""
        assert self._send is not None
        self._send = self._send.ratchet()

    def erase(self) -> None:
        """Zero every secret this layer holds (the connection is over)."""
        for d in (self._send, self._recv):
            if d is not None:
                d.erase()
        if self._pending_recv is not None:
            wipe(self._pending_recv)
            self._pending_recv = None

    def send_update_due(self) -> bool:
        d = self._send
        return d is not None and (d.seq >= self.limits.update_after_records
                                  or d.bytes >= self.limits.update_after_bytes)

    # -- sealing ------------------------------------------------------------------

    def seal_plaintext_handshake(self, payload: bytes) -> bytes:
        if self._send is not None:
            raise RecordError(ErrorCode.INTERNAL_ERROR, "plaintext record after keys exist")
        if len(payload) > MAX_PLAINTEXT_BODY:
            raise RecordError(ErrorCode.INTERNAL_ERROR, "handshake message too large")
        return _header(PLAINTEXT_HANDSHAKE, 0, len(payload)) + payload

    def seal(self, inner_type: int, payload: bytes) -> bytearray:
        return self.seal_parts(inner_type, (payload,))

    def seal_parts(self, inner_type: int, parts: Sequence[bytes]) -> bytearray:
        """One protected record whose payload is the concatenation of `parts`."""
        d = self._send
        if d is None:
            raise RecordError(ErrorCode.INTERNAL_ERROR, "no send key yet")
        plaintext = b"".join((bytes((inner_type,)), *parts))
        n = len(plaintext) - 1
        if n > MAX_PAYLOAD:
            raise RecordError(ErrorCode.INTERNAL_ERROR, "record payload too large")
        if d.seq >= self.limits.hard_max_records or d.bytes >= self.limits.hard_max_bytes:
            raise RecordError(ErrorCode.KEY_LIMIT, "send key reached its usage limit")
        body_len = n + 1 + TAG_LEN
        header = _header(PROTECTED, d.phase, body_len)
        # Ciphertext and tag go straight after the header in the buffer that is handed
        # to the socket: no copy after encryption.
        out = bytearray(HEADER_LEN + body_len)
        out[:HEADER_LEN] = header
        d.aead.encrypt_into(d.nonce(), plaintext, header, memoryview(out)[HEADER_LEN:])
        d.seq += 1
        d.bytes += n
        return out

    # -- opening --------------------------------------------------------------------

    def open(self, rtype: int, flags: int, header: bytes, body: memoryview | bytes,
             ) -> tuple[int, memoryview | bytes]:
        """Authenticate and decrypt one record; returns (inner_type, payload)."""
        if rtype == PLAINTEXT_HANDSHAKE:
            if self._recv is not None and not self._late_plaintext_ok:
                raise RecordError(ErrorCode.PROTOCOL_ERROR,
                                  "plaintext record received after keys were established")
            if flags != 0:
                raise RecordError(ErrorCode.DECODE_ERROR, "plaintext record with flags set")
            return (INNER_HANDSHAKE if self._recv is None else LATE_PLAINTEXT), bytes(body)
        if rtype != PROTECTED:
            raise RecordError(ErrorCode.DECODE_ERROR, f"unknown record type {rtype}")
        d = self._recv
        if d is None:
            raise RecordError(ErrorCode.PROTOCOL_ERROR, "protected record before keys exist")
        if flags & ~FLAG_KEY_PHASE:
            raise RecordError(ErrorCode.DECODE_ERROR, "unknown record flags")
        phase = flags & FLAG_KEY_PHASE
        if phase != d.phase:
            if self._pending_recv is not None:
                secret, self._pending_recv = self._pending_recv, None
                d.erase()
                d = self._recv = _Direction(secret, phase, d.generation + 1)
            else:
                d = self._recv = d.ratchet()
        if len(body) < 1 + TAG_LEN:
            raise RecordError(ErrorCode.DECODE_ERROR, "protected record too short")
        if d.seq >= self.limits.hard_max_records or d.bytes >= self.limits.hard_max_bytes:
            raise RecordError(ErrorCode.KEY_LIMIT, "peer kept using a key past its limit")
        plaintext = bytearray(len(body) - TAG_LEN)
        try:
            d.aead.decrypt_into(d.nonce(), body, header, plaintext)
        except InvalidTag:
            raise RecordError(ErrorCode.BAD_RECORD_MAC, "record authentication failed") from None
        d.seq += 1
        d.bytes += len(plaintext) - 1
        self._late_plaintext_ok = False
        inner = plaintext[0]
        if inner not in _INNER_TYPES:
            raise RecordError(ErrorCode.DECODE_ERROR, f"unknown inner record type {inner}")
        # A read-only view: stream data is handed on without another copy, and the
        # buffer is fresh per record, so nothing overwrites what a consumer still holds.
        return inner, memoryview(plaintext).toreadonly()[1:]


def _check_header(rtype: int, length: int) -> None:
    if rtype not in (PLAINTEXT_HANDSHAKE, PROTECTED):
        raise DecodeError(f"unknown record type {rtype}")
    limit = MAX_PLAINTEXT_BODY if rtype == PLAINTEXT_HANDSHAKE else MAX_PROTECTED_BODY
    if length > limit:
        raise DecodeError(f"record of {length} bytes exceeds the limit {limit}")
    if length == 0:
        raise DecodeError("zero-length record")


class RecordReader:
    """Cuts a TCP byte stream into records.

    A record that arrives whole inside one read is handed out as a view into that
    (immutable) read, without a copy; only a record split across reads is assembled,
    once its header is known into a buffer of exactly its size, so each of its bytes is
    copied once."""

    def __init__(self) -> None:
        # The start of a record split across reads: the header bytes until the header
        # is complete, then the whole record's buffer, filled up to `_filled`.
        self._partial = bytearray()
        self._record: bytearray | None = None
        self._filled = 0
        self._chunk: memoryview = memoryview(b"")
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos < len(self._chunk):
            # The previous read was not consumed: keep it, rare (reader not drained).
            self._chunk = memoryview(bytes(self._chunk[self._pos :]) + data)
        else:
            self._chunk = memoryview(data)
        self._pos = 0

    @property
    def buffered(self) -> int:
        held = self._filled if self._record is not None else len(self._partial)
        return held + len(self._chunk) - self._pos

    def next_record(self) -> tuple[int, int, bytes, memoryview] | None:
        """(type, flags, header, body) of the next complete record, or None."""
        if self._partial or self._record is not None:
            return self._continue_partial()
        buf, pos = self._chunk, self._pos
        avail = len(buf) - pos
        if avail < HEADER_LEN:
            self._partial += buf[pos:]
            self._pos = len(buf)
            return None
        rtype, flags = buf[pos], buf[pos + 1]
        length = (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]
        _check_header(rtype, length)
        end = pos + HEADER_LEN + length
        if len(buf) < end:
            self._start_record(HEADER_LEN + length, buf[pos:])
            self._pos = len(buf)
            return None
        self._pos = end
        return rtype, flags, bytes(buf[pos : pos + HEADER_LEN]), buf[pos + HEADER_LEN : end]

    def _start_record(self, size: int, first: memoryview | bytearray) -> None:
        record = self._record = bytearray(size)
        record[: len(first)] = first
        self._filled = len(first)

    def _continue_partial(self) -> tuple[int, int, bytes, memoryview] | None:
        if self._record is None:
            part = self._partial
            need = HEADER_LEN - len(part)
            end = min(self._pos + need, len(self._chunk))
            part += self._chunk[self._pos : end]
            self._pos = end
            if len(part) < HEADER_LEN:
                return None
            length = (part[2] << 16) | (part[3] << 8) | part[4]
            _check_header(part[0], length)
            self._start_record(HEADER_LEN + length, part)
            part.clear()
        record = self._record
        assert record is not None
        end = min(self._pos + len(record) - self._filled, len(self._chunk))
        n = end - self._pos
        record[self._filled : self._filled + n] = self._chunk[self._pos : end]
        self._filled += n
        self._pos = end
        if self._filled < len(record):
            return None
        # The buffer is handed out and never written again: a new one for the next.
        self._record = None
        self._filled = 0
        view = memoryview(record)
        return record[0], record[1], bytes(view[:HEADER_LEN]), view[HEADER_LEN:]
