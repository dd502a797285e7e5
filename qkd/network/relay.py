"""Trusted-node key relay over k node-disjoint paths, one sans-I/O core per KME.

The source KME draws a fresh key from the OS CSPRNG, AMD-encodes it (qkd.network.amd:
E(K) = K | x | t), splits E(K) into k XOR shares (k-1 random, the last E(K) XOR the
others) and sends share i over path i. Each hop carries the share one-time-pad encrypted
under that hop's link key and authenticated with a Wegman-Carter tag under a fresh pad
from the same key; an intermediate node verifies, decrypts, re-encrypts under the next
hop's key and forwards. The destination XORs the k shares, checks the AMD tag, reports
KeyAssembled, and only once its KME says the key is stored (`key_stored`) sends an ACK
back along every path. The source reports KeyDeliverable after all k ACKs, so a master
SAE never holds a key its peer's KME does not.

A transit node that sends a validly tagged but changed share is caught by the AMD tag
(except with probability <= (n+1)/2^128) and the relay ends with INTEGRITY instead of
leaving the two ends with different keys; with k >= 2 each share is still uniform and
independent of the key, as no public function of the key travels.

Any check that fails (tag, replay, hop counter, path, link-key order, AMD tag, time)
ends the relay at that node with RelayFailed and ABORTs along the path both ways; the source
then aborts the other paths, and a destination that holds the key discards it.

Per-hop frame (big-endian; `kind` selects the message dataclass below):

    version u8 | kind u8 | key_offset u64 | key_id 16 | share_index u8 | share_count u8
    | hop u8 | key_bytes u16 | master_sae: len u8 + ASCII | slave_sae: len u8 + ASCII
    | path: count u8 + count x (len u8 + ASCII) | body: len u16 + bytes | tag 16

(version 2; a SHARE's body is the ciphertext of a share of E(K): key_bytes + 32.)

`hop` is the receiver's position in `path`. The tag covers a label, the sender's and
receiver's names and every byte before it, under pad = link key[key_offset : +16]; a
SHARE's ciphertext is the share XOR link key[key_offset + 16 : + key_bytes + 32].
"""

from __future__ import annotations

import secrets
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from qkd.link.wegman_carter import HashKey, check_tag, make_tag
from qkd.network import amd
from qkd.network.constants import (
    ABORT_BODY_BYTES,
    AMD_BYTES,
    DEST_TIMEOUT_S,
    KEY_ID_BYTES,
    MAX_ACTIVE_RELAYS,
    MAX_FRAME_BYTES,
    MAX_KEY_BYTES,
    MAX_PATH_NODES,
    MAX_SHARES,
    MIN_KEY_BYTES,
    PAD_BYTES,
    RELAY_TIMEOUT_S,
    RELAY_VERSION,
    SEEN_TTL_S,
    TAG_BYTES,
)
from qkd.network.errors import NetErrorCode, NetworkError
from qkd.network.topology import Path, Reader, _name, valid_name

_LABEL = b"qkdgw relay v1\x00"


class Kind(IntEnum):
    SHARE = 1  # source -> destination, carries an encrypted share
    ACK = 2  # destination -> source: the destination stored the key
    ABORT_FWD = 3  # towards the destination: the relay has ended
    ABORT_BACK = 4  # towards the source: the relay has ended


_BACKWARD = (Kind.ACK, Kind.ABORT_BACK)


# ------------------------------------------------------------------ messages
# Common part C = 31 + len(master) + len(slave) + sum(1 + len(node)) over the path bytes
# (version, kind, offset, key id, index, count, hop, key_bytes, three length bytes).


@dataclass(frozen=True)
class Header:
    """What every relay message carries (the issue's key ID, end SAEs, path and hop
    counter); Share, Ack and Abort add their body."""

    key_id: bytes
    """16 bytes naming the relayed key (a UUID)."""
    share_index: int
    """Which share, 0 .. share_count-1; also which path it travels on."""
    share_count: int
    """k: shares, and node-disjoint paths, of this key."""
    hop: int
    """The receiver's position in `path` (counts down for ACK and backward ABORT)."""
    key_bytes: int
    """The key's (and every share's) length in bytes."""
    master_sae: str
    """The SAE the key is for at the source."""
    slave_sae: str
    """The SAE the key is for at the destination."""
    path: Path
    """Source KME first, destination KME last; the same on every hop of a share."""

    def header(self, hop: int) -> tuple[bytes, int, int, int, int, str, str, Path]:
        """These fields with another hop counter: the next hop's message header."""
        return (self.key_id, self.share_index, self.share_count, hop, self.key_bytes,
                self.master_sae, self.slave_sae, self.path)


@dataclass(frozen=True)
class Share(Header):
    """One XOR share of E(K) on one hop. Wire size: C + 2 + key_bytes + 32 (x, t) + 16
    (tag)."""

    ciphertext: bytes = field(repr=False)
    """Share XOR this hop's one-time pad (key_bytes + 32 bytes)."""


@dataclass(frozen=True)
class Ack(Header):
    """The destination stored the key; one per path. Wire size: C + 2 + 16 (tag)."""


@dataclass(frozen=True)
class Abort(Header):
    """The relay has ended at some node; travels on in `kind`'s direction.
    Wire size: C + 2 + 1 (the code) + 16 (tag)."""

    code: NetErrorCode
    """Why the relay ended (no detail: it crosses nodes)."""
    forward: bool
    """True towards the destination, False towards the source."""


Message = Share | Ack | Abort


def _kind(msg: Message) -> Kind:
    if isinstance(msg, Share):
        return Kind.SHARE
    if isinstance(msg, Ack):
        return Kind.ACK
    return Kind.ABORT_FWD if msg.forward else Kind.ABORT_BACK


def _check(msg: Message) -> None:
    def bad(what: str) -> NetworkError:
        return NetworkError(NetErrorCode.DECODE, f"relay message: {what}")

    if len(msg.key_id) != KEY_ID_BYTES:
        raise bad("key id length")
    if not 1 <= msg.share_count <= MAX_SHARES or not 0 <= msg.share_index < msg.share_count:
        raise bad("share index or count out of range")
    if not MIN_KEY_BYTES <= msg.key_bytes <= MAX_KEY_BYTES:
        raise bad(f"key length not in [{MIN_KEY_BYTES}, {MAX_KEY_BYTES}] bytes")
    if not 2 <= len(msg.path) <= MAX_PATH_NODES or len(set(msg.path)) != len(msg.path):
        raise bad("path length or a node repeated")
    if not all(valid_name(n) for n in (*msg.path, msg.master_sae, msg.slave_sae)):
        raise bad("a name is not valid")
    if not 0 <= msg.hop < len(msg.path):
        raise bad("hop counter outside the path")
    if isinstance(msg, Share) and len(msg.ciphertext) != msg.key_bytes + AMD_BYTES:
        raise bad(f"ciphertext length is not key_bytes + {AMD_BYTES}")


def encode_unsigned(msg: Message, key_offset: int) -> bytes:
    """Every byte of the frame but the tag (what the tag covers after the label)."""
    _check(msg)
    if isinstance(msg, Share):
        body = msg.ciphertext
    elif isinstance(msg, Abort):
        body = bytes([int(msg.code)])
    else:
        body = b""
    parts = [struct.pack(">BBQ", RELAY_VERSION, _kind(msg), key_offset), msg.key_id,
             struct.pack(">BBBH", msg.share_index, msg.share_count, msg.hop, msg.key_bytes),
             _name(msg.master_sae), _name(msg.slave_sae), bytes([len(msg.path)]),
             *(_name(n) for n in msg.path), struct.pack(">H", len(body)), body]
    return b"".join(parts)


def decode_frame(data: bytes) -> tuple[Message, int, bytes, bytes]:
    """(message, key_offset, tag, signed bytes). Strict: one encoding per frame, and
    only NetworkError(DECODE) for anything that is not one."""
    if len(data) > MAX_FRAME_BYTES:
        raise NetworkError(NetErrorCode.DECODE, f"frame longer than {MAX_FRAME_BYTES} bytes")
    r = Reader(data)
    version, kind_raw = r.u8(), r.u8()
    if version != RELAY_VERSION or kind_raw not in tuple(Kind):
        raise NetworkError(NetErrorCode.DECODE, "relay frame: unknown version or kind")
    kind = Kind(kind_raw)
    offset = r.u64()
    key_id = r.take(KEY_ID_BYTES)
    index, count, hop = r.u8(), r.u8(), r.u8()
    key_bytes = r.u16()
    master, slave = r.name("master SAE"), r.name("slave SAE")
    n = r.u8()
    if not 2 <= n <= MAX_PATH_NODES:
        raise NetworkError(NetErrorCode.DECODE, "relay frame: path length")
    path = tuple(r.name("path node") for _ in range(n))
    body = r.take(r.u16())
    signed_len = r.offset
    tag = r.take(TAG_BYTES)
    r.end("relay frame")
    common = (key_id, index, count, hop, key_bytes, master, slave, path)
    msg: Message
    if kind is Kind.SHARE:
        msg = Share(*common, ciphertext=body)
    elif kind is Kind.ACK:
        if body:
            raise NetworkError(NetErrorCode.DECODE, "relay frame: ACK with a body")
        msg = Ack(*common)
    else:
        if len(body) != ABORT_BODY_BYTES or body[0] not in tuple(NetErrorCode):
            raise NetworkError(NetErrorCode.DECODE, "relay frame: ABORT code")
        msg = Abort(*common, code=NetErrorCode(body[0]), forward=kind is Kind.ABORT_FWD)
    _check(msg)
    return msg, offset, tag, bytes(data[:signed_len])


# ------------------------------------------------------------ link-key supply


class LinkKeySupplier(Protocol):
    """A node's link keys, one pair of streams per neighbour (the KME's link pools).

    Both ends of a hop hold the same bytes; each direction has its own stream with
    absolute byte offsets, so no byte is used twice by either side."""

    def hash_key(self, neighbour: str) -> HashKey:
        """The reusable Wegman-Carter hash key of the link to `neighbour`."""
        ...

    def take(self, neighbour: str, nbytes: int) -> tuple[int, bytes]:
        """The next `nbytes` of the outgoing stream and their offset (NetworkError
        LINK_KEY when exhausted)."""
        ...

    def peek(self, neighbour: str, offset: int, nbytes: int) -> bytes:
        """Incoming bytes at `offset`; NetworkError(LINK_KEY) if below the watermark
        (used, or a reordered frame) or not held. Changes nothing."""
        ...

    def consume(self, neighbour: str, offset: int, nbytes: int) -> None:
        """Mark incoming bytes up to `offset + nbytes` used (after the tag verified)."""
        ...


class _Stream:
    __slots__ = ("data", "next")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.next = 0  # outgoing: next offset to hand out; incoming: watermark


class InMemoryLinkKeys:
    """LinkKeySupplier over fixed byte strings, for tests and benchmarks. `links()`
    builds one per node with the same bytes at both ends of every link."""

    def __init__(self) -> None:
        self._out: dict[str, _Stream] = {}
        self._in: dict[str, _Stream] = {}
        self._hash: dict[str, HashKey] = {}
        self.bits_taken: dict[str, int] = {}  # link-key bits sent, per neighbour

    def __repr__(self) -> str:
        return f"InMemoryLinkKeys(neighbours={sorted(self._out)}, <keys redacted>)"

    @staticmethod
    def links(pairs: list[tuple[str, str]], nbytes: int,
              rng: Callable[[int], bytes] = secrets.token_bytes,
              ) -> dict[str, InMemoryLinkKeys]:
        from qkd.link.wegman_carter import HASH_KEY_BYTES

        out: dict[str, InMemoryLinkKeys] = {}
        for a, b in pairs:
            ka, kb = out.setdefault(a, InMemoryLinkKeys()), out.setdefault(b, InMemoryLinkKeys())
            a2b, b2a, hk = rng(nbytes), rng(nbytes), HashKey(rng(HASH_KEY_BYTES))
            ka._out[b], kb._in[a] = _Stream(a2b), _Stream(a2b)
            kb._out[a], ka._in[b] = _Stream(b2a), _Stream(b2a)
            ka._hash[b] = kb._hash[a] = hk
        return out

    def neighbours(self) -> list[str]:
        return sorted(self._out)

    def material(self, neighbour: str) -> tuple[bytes, bytes]:
        """(outgoing, incoming) stream bytes: what a compromised node holds."""
        return self._out[neighbour].data, self._in[neighbour].data

    def _stream(self, table: dict[str, _Stream], neighbour: str) -> _Stream:
        try:
            return table[neighbour]
        except KeyError:
            raise NetworkError(NetErrorCode.UNKNOWN_NODE,
                               f"no link key for neighbour {neighbour!r}") from None

    def hash_key(self, neighbour: str) -> HashKey:
        self._stream(self._out, neighbour)
        return self._hash[neighbour]

    def take(self, neighbour: str, nbytes: int) -> tuple[int, bytes]:
        s = self._stream(self._out, neighbour)
        if s.next + nbytes > len(s.data):
            raise NetworkError(NetErrorCode.LINK_KEY, f"link key to {neighbour!r} exhausted")
        off = s.next
        s.next += nbytes
        self.bits_taken[neighbour] = self.bits_taken.get(neighbour, 0) + 8 * nbytes
        return off, s.data[off : off + nbytes]

    def peek(self, neighbour: str, offset: int, nbytes: int) -> bytes:
        s = self._stream(self._in, neighbour)
        if offset < s.next or offset + nbytes > len(s.data):
            raise NetworkError(NetErrorCode.LINK_KEY, f"link key from {neighbour!r} at "
                               f"offset {offset} already used or not held")
        return s.data[offset : offset + nbytes]

    def consume(self, neighbour: str, offset: int, nbytes: int) -> None:
        s = self._stream(self._in, neighbour)
        s.next = max(s.next, offset + nbytes)


# ------------------------------------------------------------------- events


@dataclass(frozen=True)
class ShareStored:
    """The destination holds one more share of a key (no bytes in the event)."""

    key_id: str
    """The relayed key's id (UUID text)."""
    share_index: int
    """Which share arrived."""


@dataclass(frozen=True)
class _KeyEvent:
    key_id: str
    """The relayed key's id (UUID text)."""
    master_sae: str
    """The SAE at the source the key is for."""
    slave_sae: str
    """The SAE at the destination the key is for."""


@dataclass(frozen=True)
class KeyAssembled(_KeyEvent):
    """The destination has every share: store the key, then call `key_stored`; only
    then do the ACKs leave, so the source never releases a key not stored here."""

    source: str
    """The source KME."""
    key: bytes = field(repr=False)
    """The key; never logged."""


@dataclass(frozen=True)
class KeyDeliverable(_KeyEvent):
    """Every share was acknowledged: the source may hand the key to the master SAE."""

    destination: str
    """The destination KME."""
    link_key_bits: int
    """Link-key bits the relay used over all hops and shares."""
    key: bytes = field(repr=False)
    """The key; never logged."""


@dataclass(frozen=True)
class RelayFailed:
    """The relay ended at this node without a key (the key, if held, is erased)."""

    key_id: str
    """The relayed key's id (UUID text)."""
    role: str
    """"source", "transit" or "destination": this node's part."""
    code: NetErrorCode
    """Why."""
    reason: str
    """For people; no key bytes."""


@dataclass(frozen=True)
class KeyDiscarded:
    """The destination had assembled (and maybe stored) the key, then the relay was
    aborted: delete it from the store."""

    key_id: str
    """The relayed key's id (UUID text)."""


@dataclass(frozen=True)
class FrameRejected:
    """A frame this node could not attribute to a relay it takes part in; dropped."""

    neighbour: str
    """The link it came in on."""
    code: NetErrorCode
    """Why."""
    reason: str
    """For people; no key bytes."""


Event = ShareStored | KeyAssembled | KeyDeliverable | RelayFailed | KeyDiscarded | FrameRejected


# ---------------------------------------------------------------- the core


@dataclass
class _Relay:
    """One key's state at one node; `shares`/`key` are secrets (erased at the end)."""

    role: str
    key_id: bytes
    master: str
    slave: str
    count: int
    key_bytes: int
    deadline: float
    paths: dict[int, Path] = field(default_factory=dict)
    shares: dict[int, bytes] = field(default_factory=dict, repr=False)
    key: bytes = field(default=b"", repr=False)
    acked: set[int] = field(default_factory=set)
    done: bool = False
    """This node's part succeeded: late duplicates are ignored."""
    ended: bool = False
    """Failed or aborted here."""
    assembled: bool = False
    expires: float = 0.0
    spent: dict[tuple[int, str], int] = field(default_factory=dict)
    """Link-key bits this node sent under, per (share index, next node)."""

    def header(self, index: int, hop: int, path: Path
               ) -> tuple[bytes, int, int, int, int, str, str, Path]:
        """The Header fields of this relay's message on share `index`, hop `hop`."""
        return (self.key_id, index, self.count, hop, self.key_bytes, self.master,
                self.slave, path)


def relay_cost_bits(paths: list[Path] | tuple[Path, ...], key_bytes: int) -> int:
    """Link-key bits a successful relay uses: per hop of every path, the tag pad and the
    pad of the share of E(K) (key_bytes + 32 for x and t) forward, and the ACK's tag
    pad back: 8 * (16 + key_bytes + 32 + 16) bits per hop."""
    hops = sum(len(p) - 1 for p in paths)
    return 8 * hops * (PAD_BYTES + key_bytes + AMD_BYTES + PAD_BYTES)


def _amd_accepts(encoded: bytes) -> bool:
    # One place for the AMD check (tests switch it off for the positive control that
    # shows what it prevents).
    return amd.tag_matches(encoded)


def _uuid(key_id: bytes) -> str:
    return str(uuid.UUID(bytes=key_id))


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class RelayNode:
    """One KME's relay core. Feed `receive_data(neighbour, data, now)` and
    `handle_timer(now)`; collect `data_to_send()` and `next_event()`."""

    def __init__(self, name: str, keys: LinkKeySupplier,
                 rng: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.name = name
        self._keys = keys
        self._rng = rng  # the OS CSPRNG; tests inject scripted bytes
        self._relays: dict[bytes, _Relay] = {}
        # Message ids seen, per key id, so a finished relay's ids go in one step.
        self._seen: dict[bytes, set[tuple[int, int, int]]] = {}
        self._out: list[tuple[str, bytes]] = []
        self._events: list[Event] = []
        self.stats: dict[str, int] = {"started": 0, "delivered": 0, "assembled": 0,
                                      "failed": 0, "rejected": 0, "ignored": 0}
        self.failures: dict[NetErrorCode, int] = {}

    def __repr__(self) -> str:
        return f"RelayNode({self.name!r}, relays={len(self._relays)})"

    # ---------------------------------------------------------------- outputs

    def data_to_send(self) -> list[tuple[str, bytes]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def link_key_use(self, key_id: str) -> dict[tuple[int, str], int]:
        """Link-key bits this node spent on one relay, per (share index, next node),
        while it still remembers the relay (SEEN_TTL_S after its end)."""
        r = self._relays.get(uuid.UUID(key_id).bytes)
        return dict(r.spent) if r else {}

    def get_timer(self) -> float | None:
        """When to call handle_timer next: a live relay's deadline, or when a finished
        one may be forgotten (so its key ids and state do not pile up)."""
        due = [r.expires if (r.done or r.ended) else r.deadline
               for r in self._relays.values()]
        return min(due) if due else None

    # ----------------------------------------------------------------- source

    def start_relay(self, master_sae: str, slave_sae: str, paths: list[Path],
                    key_bytes: int, now: float) -> str:
        """Make a fresh key and send its k = len(paths) shares; returns the key id."""
        if not paths or len(paths) > MAX_SHARES:
            raise NetworkError(NetErrorCode.PATH, f"1 to {MAX_SHARES} paths needed")
        dest = paths[0][-1]
        inner: set[str] = set()
        for p in paths:
            if p[0] != self.name or p[-1] != dest or inner & set(p[1:-1]):
                raise NetworkError(NetErrorCode.PATH, "paths must run from this node to one "
                                   "destination and share no intermediate node")
            inner |= set(p[1:-1])
        if len(self._relays) >= MAX_ACTIVE_RELAYS:
            raise NetworkError(NetErrorCode.STATE, "too many relays in progress")
        key_id = self._rng(KEY_ID_BYTES)
        key = self._rng(key_bytes)
        encoded = amd.encode(key, self._rng)
        shares = [self._rng(len(encoded)) for _ in paths[1:]]
        last = encoded
        for s in shares:
            last = _xor(last, s)
        shares.append(last)
        relay = _Relay("source", key_id, master_sae, slave_sae, len(paths), key_bytes,
                       now + RELAY_TIMEOUT_S, dict(enumerate(paths)), key=key)
        for i, p in enumerate(paths):
            _check(Share(*relay.header(i, 1, p), ciphertext=bytes(len(encoded))))
        self._relays[key_id] = relay
        self.stats["started"] += 1
        try:
            for i, p in enumerate(paths):
                self._send_share(relay, i, p, 1, shares[i])
        except NetworkError as exc:
            # A first hop without key: end at once (aborting the shares already sent)
            # rather than leave them to time out.
            self._fail(relay, exc.code, exc.reason)
            raise
        return _uuid(key_id)

    def _send_share(self, r: _Relay, index: int, path: Path, hop: int, share: bytes) -> None:
        to = path[hop]
        off, material = self._keys.take(to, PAD_BYTES + len(share))
        r.spent[(index, to)] = r.spent.get((index, to), 0) + 8 * len(material)
        msg = Share(*r.header(index, hop, path), ciphertext=_xor(share, material[PAD_BYTES:]))
        self._emit(to, msg, off, material[:PAD_BYTES])

    def _send(self, r: _Relay, msg: Ack | Abort, to: str) -> None:
        try:
            off, pad = self._keys.take(to, PAD_BYTES)
        except NetworkError:
            return  # no key for the ACK/ABORT: the other side times out
        key = (msg.share_index, to)
        r.spent[key] = r.spent.get(key, 0) + 8 * len(pad)
        self._emit(to, msg, off, pad)

    def _emit(self, to: str, msg: Message, off: int, pad: bytes) -> None:
        unsigned = encode_unsigned(msg, off)
        tag = make_tag(self._keys.hash_key(to), pad, _LABEL + _name(self.name) + _name(to)
                       + unsigned)
        self._out.append((to, unsigned + tag))

    # ------------------------------------------------------------------ input

    def receive_data(self, neighbour: str, data: bytes, now: float) -> None:
        try:
            msg, off, tag, signed = decode_frame(data)
        except NetworkError as exc:
            self._reject(neighbour, exc)
            return
        pos = msg.hop
        if msg.path[pos] != self.name:
            self._reject(neighbour, NetworkError(NetErrorCode.HOP, "hop counter does not "
                                                 "point at this node"))
            return
        sender_pos = pos + 1 if _kind(msg) in _BACKWARD else pos - 1
        if not 0 <= sender_pos < len(msg.path) or msg.path[sender_pos] != neighbour:
            self._fail_or_reject(msg, neighbour, NetErrorCode.HOP,
                                 "hop counter does not match the link the frame came on")
            return
        mid = (int(_kind(msg)), msg.share_index, pos)
        if mid in self._seen.get(msg.key_id, ()):
            self._fail_or_reject(msg, neighbour, NetErrorCode.REPLAY, "message seen before")
            return
        n = PAD_BYTES + (len(msg.ciphertext) if isinstance(msg, Share) else 0)
        try:
            material = self._keys.peek(neighbour, off, n)
        except NetworkError as exc:
            self._fail_or_reject(msg, neighbour, exc.code, exc.reason)
            return
        label = _LABEL + _name(neighbour) + _name(self.name)
        if not check_tag(self._keys.hash_key(neighbour), material[:PAD_BYTES],
                         label + signed, tag):
            self._fail_or_reject(msg, neighbour, NetErrorCode.AUTH, "tag did not verify")
            return
        self._keys.consume(neighbour, off, n)
        self._seen.setdefault(msg.key_id, set()).add(mid)
        r = self._relays.get(msg.key_id)
        if r is not None and (r.master, r.slave, r.count, r.key_bytes) != (
                msg.master_sae, msg.slave_sae, msg.share_count, msg.key_bytes):
            self._fail(r, NetErrorCode.PATH, "a message disagrees with the relay's header")
            return
        if r is not None and msg.share_index in r.paths and r.paths[msg.share_index] != msg.path:
            self._fail(r, NetErrorCode.PATH, "a share's path changed on the way")
            return
        if isinstance(msg, Abort):
            self._on_abort(r, msg)
        elif isinstance(msg, Share):
            self._on_share(r, msg, material[PAD_BYTES:], now)
        else:
            self._on_ack(r, msg)

    def _reject(self, neighbour: str, exc: NetworkError) -> None:
        self.stats["rejected"] += 1
        self._events.append(FrameRejected(neighbour, exc.code, exc.reason))

    def _fail_or_reject(self, msg: Message, neighbour: str, code: NetErrorCode,
                        reason: str) -> None:
        r = self._relays.get(msg.key_id)
        if isinstance(msg, Abort) or r is None or r.done or r.ended:
            # Never answer an ABORT with ABORTs, and never undo a part this node finished
            # (the other end may already hold the key): a late duplicate is dropped.
            self.stats["ignored" if r is not None else "rejected"] += 1
            self._events.append(FrameRejected(neighbour, code, reason))
            return
        self._fail(r, code, reason)

    def _on_share(self, r: _Relay | None, msg: Share, otp: bytes, now: float) -> None:
        share = _xor(msg.ciphertext, otp)
        last = msg.hop == len(msg.path) - 1
        if r is None:
            if len(self._relays) >= MAX_ACTIVE_RELAYS:
                self.stats["rejected"] += 1
                return
            r = _Relay("destination" if last else "transit", msg.key_id, msg.master_sae,
                       msg.slave_sae, msg.share_count, msg.key_bytes,
                       now + (DEST_TIMEOUT_S if last else RELAY_TIMEOUT_S))
            self._relays[msg.key_id] = r
        if r.ended or r.done or r.role == "source" or (r.role == "destination") != last:
            self._fail(r, NetErrorCode.STATE, "a share that does not fit this relay")
            return
        if r.role == "destination":
            inner = {n for p in r.paths.values() for n in p[1:-1]}
            if msg.share_index in r.shares or inner & set(msg.path[1:-1]) or any(
                    p[0] != msg.path[0] for p in r.paths.values()):
                self._fail(r, NetErrorCode.PATH, "shares' paths are not node-disjoint")
                return
        r.paths[msg.share_index] = msg.path
        if r.role == "transit":
            try:
                self._send_share(r, msg.share_index, msg.path, msg.hop + 1, share)
            except NetworkError as exc:  # the next hop's link key ran dry
                self._fail(r, exc.code, exc.reason)
            return
        r.shares[msg.share_index] = share
        self._events.append(ShareStored(_uuid(r.key_id), msg.share_index))
        if len(r.shares) == r.count:
            encoded = bytes(r.key_bytes + AMD_BYTES)
            for s in r.shares.values():
                encoded = _xor(encoded, s)
            r.shares.clear()
            if not _amd_accepts(encoded):
                # A share was changed on its way (validly tagged by a compromised
                # node): the key here is not the source's. Nothing was stored yet.
                encoded = b""
                self._fail(r, NetErrorCode.INTEGRITY, "the assembled key fails its AMD tag")
                return
            key = encoded[: r.key_bytes]
            r.assembled = True
            self.stats["assembled"] += 1
            self._events.append(KeyAssembled(_uuid(r.key_id), r.master, r.slave,
                                             msg.path[0], key))

    def key_stored(self, key_id: str, now: float) -> bool:
        """The destination KME stored the key: acknowledge it along every path. False
        if the relay ended meanwhile (its KeyDiscarded event follows: delete the key)."""
        r = self._relays.get(uuid.UUID(key_id).bytes)
        if r is None or r.role != "destination" or not r.assembled or r.done:
            raise NetworkError(NetErrorCode.STATE, f"no assembled key {key_id} to acknowledge")
        if r.ended:
            return False
        r.done = True
        r.expires = now + SEEN_TTL_S
        for i, p in sorted(r.paths.items()):
            self._send(r, Ack(*r.header(i, len(p) - 2, p)), p[-2])
        return True

    def _on_ack(self, r: _Relay | None, msg: Ack) -> None:
        if r is None or r.ended or msg.share_index not in r.paths:
            self.stats["ignored"] += 1
            return
        if r.role == "transit":
            r.done = True
            r.expires = r.deadline + SEEN_TTL_S
            self._send(r, Ack(*msg.header(msg.hop - 1)), msg.path[msg.hop - 1])
            return
        if r.role != "source" or msg.hop != 0:
            self._fail(r, NetErrorCode.STATE, "an ACK that does not fit this relay")
            return
        r.acked.add(msg.share_index)
        if len(r.acked) == r.count and not r.done:
            r.done = True
            r.expires = r.deadline + SEEN_TTL_S
            self.stats["delivered"] += 1
            key, r.key = r.key, b""
            self._events.append(KeyDeliverable(
                _uuid(r.key_id), r.master, r.slave, r.paths[0][-1],
                relay_cost_bits(list(r.paths.values()), r.key_bytes), key))

    def _on_abort(self, r: _Relay | None, msg: Abort) -> None:
        if r is None:
            self.stats["ignored"] += 1
            return
        if r.role == "transit":
            # Pass it on even after this node's part succeeded: the ends must agree.
            nxt = msg.hop + 1 if msg.forward else msg.hop - 1
            if 0 <= nxt < len(msg.path):
                self._send(r, Abort(*msg.header(nxt), msg.code, msg.forward),
                           msg.path[nxt])
            if not r.ended:
                self._end(r, NetErrorCode.PEER_ABORT, f"aborted upstream ({msg.code.name})")
            return
        if r.role == "destination" and r.ended:
            return
        if r.role == "source" and (r.done or r.ended):
            self.stats["ignored"] += 1
            return
        self._fail(r, NetErrorCode.PEER_ABORT, f"aborted on path {msg.share_index} "
                   f"({msg.code.name})", skip=msg.share_index)

    # --------------------------------------------------------------- failures

    def _fail(self, r: _Relay, code: NetErrorCode, reason: str, skip: int = -1) -> None:
        """End the relay here and tell the rest of every path this node knows."""
        for i, p in sorted(r.paths.items()):
            if i == skip:
                continue
            pos = p.index(self.name)
            for nxt, forward in ((pos + 1, True), (pos - 1, False)):
                if (r.role == "source" and not forward) or (r.role == "destination" and forward):
                    continue
                if 0 <= nxt < len(p):
                    self._send(r, Abort(*r.header(i, nxt, p), code, forward), p[nxt])
        self._end(r, code, reason)

    def _end(self, r: _Relay, code: NetErrorCode, reason: str) -> None:
        had_key = r.role == "destination" and r.assembled
        r.ended = True
        r.key = b""
        r.shares.clear()
        r.expires = max(r.deadline, 0.0) + SEEN_TTL_S
        self.stats["failed"] += 1
        self.failures[code] = self.failures.get(code, 0) + 1
        self._events.append(RelayFailed(_uuid(r.key_id), r.role, code, reason))
        if had_key:
            self._events.append(KeyDiscarded(_uuid(r.key_id)))

    def handle_timer(self, now: float) -> None:
        """Fail relays past their deadline; forget finished ones after SEEN_TTL_S."""
        for key_id, r in list(self._relays.items()):
            if not (r.done or r.ended) and now >= r.deadline:
                # A destination still waiting for shares, or a source for ACKs.
                if r.role == "transit":
                    self._end(r, NetErrorCode.TIMEOUT, "no ACK in time")
                else:
                    self._fail(r, NetErrorCode.TIMEOUT, "relay did not finish in time")
            elif (r.done or r.ended) and r.expires and now >= r.expires:
                del self._relays[key_id]
                self._seen.pop(key_id, None)
