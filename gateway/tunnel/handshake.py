"""The hybrid handshake: ML-KEM + QKD key exchange, PKI authentication, key confirmation.

One `Handshake` object runs one handshake for one role. It is sans-I/O: the caller feeds
it decoded handshake messages and the current time, and collects the messages it wants
sent (`outgoing`) and its events. The two requests it cannot answer itself, fetching
QKD keys from the KME, surface as events and come back through `supply_qkd_keys` /
`qkd_keys_unavailable`.

Initial handshake (auth = "pki"), I = initiator (the gateway that connected), R = responder::

    I: enc_keys at I's KME -> key IDs; fresh ML-KEM key pair (ek, dk)
    I -> R  ClientHello   version, epoch, auth, PSK epoch slot, offered KEMs, KEM,
                          I's allowed modes, both identities, I's SAE ID, nonce_i, ek,
                          QKD key size, key IDs and QKD status, stream window
    R: dec_keys at R's KME for exactly those key IDs; (ct, ss) = Encaps(ek)
    R -> I  ServerHello   version, KEM, mode, QKD status, R's allowed modes, R's identity,
                          nonce_r, ct, stream window
            Certificate        R's chain
            CertificateVerify  Sign_R("responder signature" ‖ TH)
            Finished           HMAC(responder confirm key, TH)
    I -> R  Certificate, CertificateVerify (Sign_I("initiator signature" ‖ TH)), Finished
    R -> I  HandshakeDone, the first record under the new keys

TH is the running SHA-384 over every message, each length-prefixed, in the order sent,
after a fixed protocol label. ClientHello and ServerHello together carry everything
DESIGN.md requires in TH; the confirmation keys are bound to TH after ServerHello, the
traffic keys, the next chain key and the next PSK to TH after the initiator's Finished.

Re-handshakes inside a live tunnel (auth = "chain") use the same two hellos with a fresh
ML-KEM key pair and fresh QKD keys, take the previous session's chain key as HKDF salt,
and replace the signatures by the Finished MACs: only the holder of the chain key can
produce them, and the messages travel inside the authenticated tunnel anyway.

After the first PKI session (auth = "psk"): every confirmed session derives the next
authentication PSK, numbered by the responder (ServerHello `next_psk_epoch`). A new
tunnel's ClientHello names the PSK epoch it authenticates with; the PSK is the HKDF salt,
and the two Finished MACs replace the signatures, so only holders of that PSK *and* of the
session's QKD key and ML-KEM secret complete it. gateway/runtime/psk_store.py keeps the epochs and
explains why no interruption leaves the two sides apart for good.

A responder under load answers a ClientHello without a valid cookie with a plaintext
HelloRetryRequest (cookie) and keeps no state (TunnelConnection's `cookie_gate`); the
initiator sends the same hello again with the cookie, and the transcript starts over.

Optional one-time MAC mode (policy `its_mac`): two more QKD keys per handshake key
Wegman–Carter MACs (gateway/tunnel/otmac.py) over the whole transcript, carried in the two
Finished messages, so the handshake's authentication also holds against an adversary
with unbounded computing power, as long as the QKD keys are secret.

ML-KEM-only ("mlkem-only") needs both policies to allow it and each side's own KME to
have no key or be unreachable (the QKD statuses in the hellos, so in TH); a key ID the
KME refuses, or that this gateway saw before, fails the handshake instead
(docs/protocol.md, "Degraded mode").

Application data flows only after the HandshakeDone record, that is after both
Finished MACs have been checked: key confirmation in both directions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum, auto
from typing import Any, Protocol

from cryptography import x509

from gateway.errors import GatewayError
from gateway.pki.files import PeerCertificateError
from gateway.pki.verify import parse_peer_certificate, verify_peer_certificate
from gateway.tunnel import events as ev
from gateway.tunnel import otmac
from gateway.tunnel.constants import (
    AUTH_CHAIN,
    AUTH_PKI,
    AUTH_PSK,
    FLAG_ITS_MAC,
    FLAG_PSK,
    KNOWN_FLAGS,
    LABEL_PSK_BINDER,
    MAX_COOKIE,
    MAX_QKD_KEYS,
    MODE_HYBRID,
    MODE_MLKEM_ONLY,
    MSG_ALERT,
    MSG_CERTIFICATE,
    MSG_CERTIFICATE_VERIFY,
    MSG_CLIENT_HELLO,
    MSG_FINISHED,
    MSG_HANDSHAKE_DONE,
    MSG_HELLO_RETRY,
    MSG_SERVER_HELLO,
    NONCE_LEN,
    PROTOCOL_VERSION,
    QKD_NO_KEY,
    QKD_OK,
    QKD_UNREACHABLE,
    SIG_LABEL_INITIATOR,
    SIG_LABEL_RESPONDER,
    TRANSCRIPT_LABEL,
)
from gateway.tunnel.key_schedule import (
    HASH_LEN,
    HybridKeySchedule,
    SessionKeys,
    expand_label,
    finished_mac,
    transcript_hasher,
)
from gateway.tunnel.otmac import check_one_time_tag, one_time_tag
from gateway.tunnel.steptimes import step
from gateway.tunnel.wire import DecodeError, ErrorCode, Reader, Writer
from pqc import PqcError
from pqc import sig as pqc_sig
from pqc.factory import get_kem

MODES = (MODE_HYBRID, MODE_MLKEM_ONLY)

QKD_DEGRADED = (QKD_NO_KEY, QKD_UNREACHABLE)
QKD_STATUSES = (QKD_OK, *QKD_DEGRADED)


MSG_NAMES = {
    MSG_CLIENT_HELLO: "ClientHello",
    MSG_SERVER_HELLO: "ServerHello",
    MSG_CERTIFICATE: "Certificate",
    MSG_CERTIFICATE_VERIFY: "CertificateVerify",
    MSG_FINISHED: "Finished",
    MSG_HANDSHAKE_DONE: "HandshakeDone",
    MSG_ALERT: "Alert",
    MSG_HELLO_RETRY: "HelloRetryRequest",
}


class HandshakeError(GatewayError):
    """The handshake failed; `code` goes into the alert, `reason` into logs."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ClientHello:
    version: str
    epoch: int
    auth: str
    psk_epoch: int
    kems_offered: tuple[str, ...]
    kem: str
    allowed_modes: tuple[str, ...]
    initiator_id: str
    responder_id: str
    initiator_sae_id: str
    nonce: bytes
    encapsulation_key: bytes
    qkd_key_size_bits: int
    qkd_key_ids: tuple[str, ...]
    stream_window: int
    flags: int = 0
    psk_binder: bytes = b""  # auth "psk": proves the PSK before the responder does any work
    cookie: bytes = b""
    qkd_status: str = QKD_OK  # QKD_OK with key IDs, else why the initiator's KME gave none

    def encode(self) -> bytes:
        w = Writer().u8(MSG_CLIENT_HELLO).text(self.version).u64(self.epoch).text(self.auth)
        w.u64(self.psk_epoch).texts(self.kems_offered).text(self.kem)
        w.texts(self.allowed_modes).text(self.initiator_id).text(self.responder_id)
        w.text(self.initiator_sae_id).blob(self.nonce).blob(self.encapsulation_key)
        w.u16(self.qkd_key_size_bits).texts(self.qkd_key_ids).text(self.qkd_status)
        w.u32(self.stream_window).u8(self.flags).blob(self.psk_binder).blob(self.cookie)
        return w.getvalue()

    def binder_input(self) -> bytes:
        """What the PSK binder covers: the whole hello except the binder and cookie."""
        return hashlib.sha384(replace(self, psk_binder=b"", cookie=b"").encode()).digest()

    def digest_without_cookie(self) -> bytes:
        """What a cookie is bound to: the hello as it was before any HelloRetryRequest."""
        return hashlib.sha384(replace(self, cookie=b"").encode()).digest()

    @classmethod
    def decode(cls, data: bytes) -> ClientHello:
        r = Reader(data, "ClientHello")
        if r.u8("type") != MSG_CLIENT_HELLO:
            raise DecodeError("ClientHello: wrong message type")
        msg = cls(
            version=r.text("version"), epoch=r.u64("epoch"), auth=r.text("auth"),
            psk_epoch=r.u64("psk_epoch"), kems_offered=r.texts("kems_offered", 8),
            kem=r.text("kem"), allowed_modes=r.texts("allowed_modes", 4),
            initiator_id=r.text("initiator_id"), responder_id=r.text("responder_id"),
            initiator_sae_id=r.text("initiator_sae_id"), nonce=r.blob("nonce", 64),
            encapsulation_key=r.blob("encapsulation_key", 4096),
            qkd_key_size_bits=r.u16("qkd_key_size_bits"),
            qkd_key_ids=r.texts("qkd_key_ids", MAX_QKD_KEYS, 64),
            qkd_status=r.text("qkd_status", 16),
            stream_window=r.u32("stream_window"), flags=r.u8("flags"),
            psk_binder=r.blob("psk_binder", 64), cookie=r.blob("cookie", MAX_COOKIE),
        )
        r.end()
        return msg


@dataclass(frozen=True)
class ServerHello:
    version: str
    kem: str
    mode: str
    allowed_modes: tuple[str, ...]
    responder_id: str
    nonce: bytes
    ciphertext: bytes
    stream_window: int
    next_psk_epoch: int = 0  # the epoch of the PSK this session derives; 0: PSK is off
    qkd_status: str = QKD_OK  # QKD_OK for hybrid, else what the responder's own KME said

    def encode(self) -> bytes:
        w = Writer().u8(MSG_SERVER_HELLO).text(self.version).text(self.kem).text(self.mode)
        w.text(self.qkd_status).texts(self.allowed_modes).text(self.responder_id)
        w.blob(self.nonce).blob(self.ciphertext).u32(self.stream_window).u64(self.next_psk_epoch)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> ServerHello:
        r = Reader(data, "ServerHello")
        if r.u8("type") != MSG_SERVER_HELLO:
            raise DecodeError("ServerHello: wrong message type")
        msg = cls(
            version=r.text("version"), kem=r.text("kem"), mode=r.text("mode"),
            qkd_status=r.text("qkd_status", 16), allowed_modes=r.texts("allowed_modes", 4),
            responder_id=r.text("responder_id"),
            nonce=r.blob("nonce", 64), ciphertext=r.blob("ciphertext", 4096),
            stream_window=r.u32("stream_window"), next_psk_epoch=r.u64("next_psk_epoch"),
        )
        r.end()
        return msg


def encode_hello_retry(cookie: bytes) -> bytes:
    """The responder's stateless answer to a ClientHello without a valid cookie."""
    return Writer().u8(MSG_HELLO_RETRY).blob(cookie).getvalue()


def decode_hello_retry(data: bytes) -> bytes:
    r = Reader(data, "HelloRetryRequest")
    if r.u8("type") != MSG_HELLO_RETRY:
        raise DecodeError("HelloRetryRequest: wrong message type")
    cookie = r.blob("cookie", MAX_COOKIE)
    r.end()
    if not cookie:
        raise DecodeError("HelloRetryRequest: empty cookie")
    return cookie


def encode_certificate(chain_der: Sequence[bytes]) -> bytes:
    return Writer().u8(MSG_CERTIFICATE).blobs(list(chain_der)).getvalue()


def decode_certificate(data: bytes) -> tuple[bytes, ...]:
    r = Reader(data, "Certificate")
    if r.u8("type") != MSG_CERTIFICATE:
        raise DecodeError("Certificate: wrong message type")
    chain = r.blobs("certificates", 4, 32768)
    r.end()
    if not chain:
        raise DecodeError("Certificate: empty chain")
    return chain


def encode_certificate_verify(algorithm: str, signature: bytes) -> bytes:
    return Writer().u8(MSG_CERTIFICATE_VERIFY).text(algorithm).blob(signature).getvalue()


def decode_certificate_verify(data: bytes) -> tuple[str, bytes]:
    r = Reader(data, "CertificateVerify")
    if r.u8("type") != MSG_CERTIFICATE_VERIFY:
        raise DecodeError("CertificateVerify: wrong message type")
    out = r.text("algorithm", 32), r.blob("signature", 16384)
    r.end()
    return out


def encode_finished(mac: bytes, its_tag: bytes = b"") -> bytes:
    return Writer().u8(MSG_FINISHED).blob(mac).blob(its_tag).getvalue()


def decode_finished(data: bytes) -> tuple[bytes, bytes]:
    r = Reader(data, "Finished")
    if r.u8("type") != MSG_FINISHED:
        raise DecodeError("Finished: wrong message type")
    mac = r.blob("mac", 64)
    its_tag = r.blob("its_tag", 16)
    r.end()
    return mac, its_tag


HANDSHAKE_DONE = bytes((MSG_HANDSHAKE_DONE,))


def encode_alert(code: int, reason: str) -> bytes:
    """A plaintext alert, only sent before keys exist: unauthenticated, informational.

    The reason may quote what the peer sent (a certificate's name), so it is made
    printable and cut to 200 bytes of UTF-8 here: the peer's decoder refuses control
    characters and long fields, and would otherwise see a decode error, not the alert."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in reason)
    short = printable.encode()[:200].decode("utf-8", "ignore")
    return Writer().u8(MSG_ALERT).u16(code).text(short).getvalue()


def decode_alert(data: bytes) -> tuple[int, str]:
    r = Reader(data, "Alert")
    if r.u8("type") != MSG_ALERT:
        raise DecodeError("Alert: wrong message type")
    out = r.u16("code"), r.text("reason", 800)
    r.end()
    return out


def message_type(data: bytes) -> int:
    if not data:
        raise DecodeError("empty handshake message")
    return data[0]


# ------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class OwnCertificateProblem:
    """Why this side must not present its own certificate now: `kind` is "expired",
    "not_yet_valid" or "revoked"; `detail` names the file and the fix (for the log)."""

    kind: str
    detail: str


def validity_problem(chain: Sequence[x509.Certificate],
                     now: datetime) -> OwnCertificateProblem | None:
    """The first certificate of `chain` outside its validity at `now`, if any."""
    for cert in chain:
        if now > cert.not_valid_after_utc:
            return OwnCertificateProblem(
                "expired", f"certificate {cert.subject.rfc4514_string()} expired at "
                f"{cert.not_valid_after_utc.isoformat()} (fix: `qkdgw pki renew`)")
        if now < cert.not_valid_before_utc:
            return OwnCertificateProblem(
                "not_yet_valid", f"certificate {cert.subject.rfc4514_string()} is not valid "
                f"before {cert.not_valid_before_utc.isoformat()} (fix: check this host's clock)")
    return None


@dataclass(frozen=True)
class Credentials:
    """This gateway's PKI identity: signing key, certificate chain, and the trusted CA."""

    private_key: Any = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    trust_anchor: x509.Certificate
    crl_check: Callable[[x509.Certificate], str | None] | None = None
    # Whether our own chain may be presented at `now` (validity, and revocation by the
    # loaded CRL); gateway/runtime/credentials.py supplies one whose messages name the files.
    own_check: Callable[[datetime], OwnCertificateProblem | None] | None = None

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        from cryptography.hazmat.primitives.serialization import Encoding

        return tuple(c.public_bytes(Encoding.DER) for c in self.chain)

    def presentation_problem(self, now: datetime) -> OwnCertificateProblem | None:
        if self.own_check is not None:
            return self.own_check(now)
        return validity_problem(self.chain, now)


@dataclass(frozen=True)
class HandshakePolicy:
    """What this side accepts; both sides' policies are bound into TH."""

    kems: tuple[str, ...] = ("ML-KEM-768",)
    allowed_modes: tuple[str, ...] = (MODE_HYBRID,)
    qkd_key_size_bits: int = 256
    qkd_keys_per_handshake: int = 1
    pqc_backend: str = "auto"
    # Information-theoretic mode: two more QKD keys per handshake key one-time MACs over
    # the whole transcript, one per direction (gateway/tunnel/otmac.py).
    its_mac: bool = False

    def __post_init__(self) -> None:
        if MODE_HYBRID not in self.allowed_modes:
            raise ValueError("the hybrid mode is always allowed")
        for m in self.allowed_modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}")
        if self.its_mac and self.qkd_key_size_bits < 256:
            raise ValueError("the one-time MAC mode needs QKD keys of at least 256 bits")
        if self.its_mac and self.degraded_allowed:
            # Without QKD keys there is nothing to key the one-time MACs with.
            raise ValueError("the one-time MAC mode excludes the ML-KEM-only mode")

    @property
    def qkd_keys_total(self) -> int:
        """QKD keys fetched per handshake: session keys plus the two one-time MAC keys."""
        return self.qkd_keys_per_handshake + (2 if self.its_mac else 0)

    @property
    def degraded_allowed(self) -> bool:
        return MODE_MLKEM_ONLY in self.allowed_modes


@dataclass(frozen=True)
class PskKey:
    """An authentication PSK and its epoch number (the number travels, the key never)."""

    epoch: int
    key: bytes = field(repr=False)


class PskBook(Protocol):
    """This side's PSK state for its one peer, as the handshake reads it. The reads are
    answered from memory; the writes arrive as `NextPskDerived` / `PskConfirmed` events
    (gateway/runtime/psk_store.py keeps them in SQLite)."""

    def offer(self) -> PskKey | None:
        """Initiator: the PSK to authenticate with next; None means bootstrap by PKI."""

    def lookup(self, epoch: int) -> PskKey | None:
        """Responder: the PSK of this epoch if it may still be used, else None."""

    def next_epoch(self) -> int:
        """Responder: the epoch number the next derived PSK gets (above all known)."""

    def pki_allowed(self) -> bool:
        """Responder: whether a PKI bootstrap is acceptable now (no PSK state yet, or a
        re-bootstrap the operator allowed)."""


@dataclass(frozen=True)
class HandshakeParams:
    local_identity: str
    peer_identity: str
    local_sae_id: str
    peer_sae_id: str
    credentials: Credentials | None
    policy: HandshakePolicy
    stream_window: int = 1 << 20
    # None: PSK authentication is off (every connection bootstraps by PKI).
    psk_book: PskBook | None = None


@dataclass(frozen=True)
class HandshakeResult:
    keys: SessionKeys
    epoch: int
    auth: str
    mode: str
    kem: str
    qkd_key_ids: tuple[str, ...]
    peer_identity: str
    peer_stream_window: int
    session_id: str  # hex of the initiator's nonce, public; names the session in logs
    psk_epoch: int = 0  # the PSK epoch that authenticated the session (auth "psk")
    next_psk_epoch: int = 0  # the epoch of the PSK this session derived; 0: none
    its_mac: bool = False
    # What each side's own KME said (QKD_STATUSES); both are in TH. Not QKD_OK only in
    # the mlkem-only mode, and then both are degraded reasons.
    qkd_status: str = QKD_OK
    peer_qkd_status: str = QKD_OK


@dataclass(frozen=True)
class KeyLogEntry:
    """What a key log writes for one session: the two secret inputs of the combiner.

    Only ever produced when the operator turned the key log on."""

    session_id: str
    epoch: int
    mlkem_shared_secret: bytes = field(repr=False)
    qkd_key: bytes = field(repr=False)


class _State(Enum):
    IDLE = auto()
    WAIT_QKD_ENC = auto()
    WAIT_SERVER_HELLO = auto()
    WAIT_PEER_CERTIFICATE = auto()
    WAIT_PEER_CERTIFICATE_VERIFY = auto()
    WAIT_PEER_FINISHED = auto()
    WAIT_CLIENT_HELLO = auto()
    WAIT_QKD_DEC = auto()
    WAIT_QKD_STATUS = auto()
    WAIT_HANDSHAKE_DONE = auto()
    COMPLETE = auto()
    FAILED = auto()


def psk_binder(psk: bytes, hello: ClientHello) -> bytes:
    """HMAC over the hello under a key derived from the PSK (like TLS 1.3's binder).
    A replayed hello carries a valid binder, but then its QKD key IDs are spent."""
    return hmac.new(expand_label(psk, LABEL_PSK_BINDER, b"", HASH_LEN), hello.binder_input(),
                    "sha384").digest()


def _join_qkd_keys(keys: Sequence[bytes]) -> bytes:
    # Several QKD keys enter the combiner as one length-prefixed string, so the split
    # between them is unambiguous.
    return b"".join(len(k).to_bytes(2, "big") + k for k in keys)


@dataclass(frozen=True)
class _PreparedFlight:
    """A responder's hybrid server flight built ahead (`Handshake.prepare`)."""

    shared_secret: bytes
    th_server_hello: bytes
    messages: list[bytes]  # ServerHello [, Certificate, CertificateVerify]
    transcript: Any  # the transcript hash after them
    server_hello: ServerHello


class Handshake:
    """One handshake, initiator or responder side."""

    def __init__(
        self,
        *,
        initiator: bool,
        params: HandshakeParams,
        epoch: int,
        auth: str,
        salt: bytes | None,
        handshake_id: int = 0,
        rng: Callable[[int], bytes] = os.urandom,
        keylog: Callable[[KeyLogEntry], None] | None = None,
        psk: PskKey | None = None,
    ) -> None:
        """`auth` is "pki" for a responder's first handshake on a connection; its
        ClientHello then picks PKI or PSK. An initiator in "psk" mode passes `psk`."""
        if auth not in (AUTH_PKI, AUTH_CHAIN, AUTH_PSK):
            raise ValueError(f"unknown auth mode {auth!r}")
        if auth == AUTH_PKI and params.credentials is None:
            raise ValueError("PKI authentication needs credentials")
        if auth == AUTH_CHAIN and salt is None:
            raise ValueError("a chained re-handshake needs the previous chain key")
        if auth == AUTH_PSK and (psk is None or not initiator or params.psk_book is None):
            raise ValueError("PSK authentication is chosen by an initiator with a PSK book")
        self.initiator = initiator
        self.params = params
        self.epoch = epoch
        self.auth = auth
        self.handshake_id = handshake_id
        self._salt = psk.key if psk is not None else salt
        self._psk_epoch = psk.epoch if psk is not None else 0
        self._retried = False
        self._next_psk: PskKey | None = None
        # The whole transcript, kept only for the one-time MACs (which need the messages
        # themselves, not a computational hash of them).
        self._transcript: bytearray | None = bytearray() if params.policy.its_mac else None
        self._rng = rng
        self._keylog = keylog
        self._state = _State.IDLE if initiator else _State.WAIT_CLIENT_HELLO
        self._th = transcript_hasher()
        self._th.update(TRANSCRIPT_LABEL)
        self.outgoing: list[bytes] = []
        self.events: list[ev.Event] = []
        self.result: HandshakeResult | None = None
        self._kem = get_kem(params.policy.kems[0], params.policy.pqc_backend)
        self._dk: Any = None
        self._ch: ClientHello | None = None
        self._sh: ServerHello | None = None
        self._qkd_keys: list[tuple[str, bytes]] = []
        self._qkd_status = QKD_OK
        self._schedule: HybridKeySchedule | None = None
        self._confirm: Any = None
        self._ss: bytes = b""
        self._peer_cert: x509.Certificate | None = None
        self._clock_now: datetime | None = None
        # Responder: the hybrid server flight `prepare` built while the KME was asked:
        # (ML-KEM shared secret, TH after ServerHello, the messages held back).
        self._prepared: _PreparedFlight | None = None

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        return f"Handshake({role}, epoch={self.epoch}, auth={self.auth}, state={self._state.name})"

    @property
    def complete(self) -> bool:
        return self._state is _State.COMPLETE

    # -- transcript ------------------------------------------------------------------

    def _absorb(self, msg: bytes) -> None:
        prefix = len(msg).to_bytes(4, "big")
        if self._transcript is not None:
            self._check_its_transcript(len(self._transcript) + len(prefix) + len(msg))
        self._th.update(prefix)
        self._th.update(msg)
        if self._transcript is not None:
            self._transcript += prefix
            self._transcript += msg

    def _check_its_transcript(self, size: int) -> None:
        """The one-time MACs' forgery bound is documented for transcripts up to
        MAX_MESSAGE_BYTES; a longer one (a padded certificate chain) is refused."""
        if size > otmac.MAX_MESSAGE_BYTES:
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE,
                             f"the transcript would be {size} bytes, more than the "
                             f"{otmac.MAX_MESSAGE_BYTES} the one-time MAC's forgery bound "
                             "covers (fix: a shorter certificate chain)")

    def _send(self, msg: bytes) -> None:
        self._absorb(msg)
        self.outgoing.append(msg)

    def _th_now(self) -> bytes:
        return self._th.copy().digest()

    def _fail(self, code: ErrorCode, reason: str) -> HandshakeError:
        self._state = _State.FAILED
        return HandshakeError(code, reason)

    # -- initiator ---------------------------------------------------------------------

    def start(self) -> None:
        """Initiator: ask for the QKD keys that will go into this session."""
        if not self.initiator or self._state is not _State.IDLE:
            raise RuntimeError("start() is for a fresh initiator handshake")
        pol = self.params.policy
        self._state = _State.WAIT_QKD_ENC
        self.events.append(ev.QkdKeysRequested(
            self.handshake_id, self.params.peer_sae_id, pol.qkd_keys_total,
            pol.qkd_key_size_bits))

    def prepare(self, now: datetime | None = None) -> None:
        """While this side's KME request is out, do the work that does not depend on
        its answer, so the answer finds it done (the KME round trip and this CPU work
        overlap). Initiator: the ML-KEM key pair. Responder fetching the key IDs the
        initiator named: the hybrid server flight up to Finished (encapsulation,
        ServerHello and, for PKI, Certificate and signature), absorbed into the
        transcript but held back; with key IDs named, that flight or a failure are the
        only outcomes, and on a failure nothing of it is sent. Optional: without it
        the same work runs when the keys arrive."""
        if self._state is _State.WAIT_QKD_ENC:
            if self._dk is None:
                with step("ml_kem"):
                    self._dk = self._kem.from_seed(self._rng(64))
            return
        if (self._state is not _State.WAIT_QKD_DEC or self._prepared is not None
                or self._transcript is not None):  # one-time MAC mode: keep it simple
            return
        self._clock_now = now
        creds = self.params.credentials
        if self.auth == AUTH_PKI and (creds is None
                                      or creds.presentation_problem(self._now()) is not None):
            return  # the normal path reports it, with its event
        # Built on a copy of the transcript: until it is used, nothing has changed.
        sent, self.outgoing = self.outgoing, []
        th = self._th
        self._th = th.copy()
        try:
            ss = self._send_server_hello(MODE_HYBRID, QKD_OK)
            th_server_hello = self._th_now()
            if self.auth == AUTH_PKI:
                self._send_signature(SIG_LABEL_RESPONDER)
            assert self._sh is not None
            self._prepared = _PreparedFlight(ss, th_server_hello, self.outgoing, self._th,
                                             self._sh)
        finally:
            self.outgoing = sent
            self._th = th
            self._sh = None

    def supply_qkd_keys(self, keys: Sequence[tuple[str, bytes]],
                        now: datetime | None = None) -> None:
        """The KME's answer: (key_ID, key) pairs, exactly as many as were asked for.
        `now` is the wall clock at its arrival: a flight prepared earlier is re-checked
        against it (a certificate may have expired while the request was out)."""
        if now is not None:
            self._clock_now = now
        pol = self.params.policy
        if self._state is _State.WAIT_QKD_ENC:
            if len(keys) != pol.qkd_keys_total:
                raise self._fail(ErrorCode.QKD_UNAVAILABLE, "KME returned the wrong key count")
            self._check_keys(keys)
            self._qkd_keys = list(keys)
            self._send_client_hello()
        elif self._state is _State.WAIT_QKD_DEC:
            assert self._ch is not None
            if tuple(k for k, _ in keys) != self._ch.qkd_key_ids:
                raise self._fail(ErrorCode.QKD_UNAVAILABLE,
                                 "KME returned other key IDs than the initiator named")
            self._check_keys(keys)
            self._qkd_keys = list(keys)
            self._send_server_flight(MODE_HYBRID)
        else:
            raise RuntimeError("no QKD keys were requested")

    def _check_keys(self, keys: Sequence[tuple[str, bytes]]) -> None:
        size = self.params.policy.qkd_key_size_bits // 8
        ids = [k for k, _ in keys]
        if len(set(ids)) != len(ids):
            raise self._fail(ErrorCode.QKD_UNAVAILABLE, "duplicate QKD key IDs")
        for _, key in keys:
            if len(key) != size:
                raise self._fail(ErrorCode.QKD_UNAVAILABLE, "QKD key of the wrong size")

    def qkd_keys_unavailable(self, reason: str, status: str = QKD_NO_KEY) -> None:
        """This side's own KME has no key (`status` QKD_NO_KEY) or cannot be reached
        (QKD_UNREACHABLE).

        Initiator: fail closed unless degraded mode is allowed here; then the hello names
        no key ID and says why (`status`, bound into TH). Responder, for key IDs the
        initiator named: always a failure. The initiator holds those keys and will not
        accept ML-KEM-only, so degrading here would only hand an attacker who spent the
        IDs (a replayed first flight) a way to pick the mode."""
        if status not in QKD_DEGRADED:
            raise ValueError(f"unknown QKD status {status!r}")
        pol = self.params.policy
        if self._state is _State.WAIT_QKD_ENC:
            if not pol.degraded_allowed:
                raise self._fail(ErrorCode.QKD_UNAVAILABLE,
                                 f"no QKD key and policy requires one: {reason}")
            self._qkd_keys = []
            self._qkd_status = status
            self._send_client_hello()
        elif self._state is _State.WAIT_QKD_DEC:
            self._dec_keys_failed(reason, status)
        else:
            raise RuntimeError("no QKD keys were requested")

    def _dec_keys_failed(self, reason: str, status: str) -> None:
        """Responder: the KME could not deliver the named keys. Fail, never degrade."""
        raise self._fail(ErrorCode.QKD_UNAVAILABLE,
                         f"the initiator's QKD keys could not be fetched from this site's "
                         f"KME ({status}: {reason}); no fallback to ML-KEM-only, since the "
                         "initiator holds them")

    def qkd_keys_rejected(self, reason: str) -> None:
        """The KME refused the request: a key ID that is unknown, already delivered,
        not issued for this pair, or replayed (the gateway's own key-ID memory), or a
        request the KME will not serve. Always a hard failure, never a reason to run
        without QKD."""
        if self._state is _State.WAIT_QKD_DEC:
            raise self._fail(ErrorCode.QKD_KEY_REJECTED,
                             f"QKD key ID(s) refused: {reason}")
        if self._state is _State.WAIT_QKD_ENC:
            raise self._fail(ErrorCode.QKD_UNAVAILABLE,
                             f"the KME refused to issue QKD keys: {reason}")
        raise RuntimeError("no QKD keys were requested")

    def local_qkd_status(self, status: str) -> None:
        """Responder, for a hello without key IDs: what this side's own KME says about
        keys for the peer. Only when it, too, has none (or cannot be reached) does the
        session run on ML-KEM alone; if it holds keys the QKD link is up and the
        initiator's claim does not hold here."""
        if self._state is not _State.WAIT_QKD_STATUS:
            raise RuntimeError("no QKD status was requested")
        if status == QKD_OK:
            raise self._fail(ErrorCode.QKD_UNAVAILABLE,
                             "the initiator brought no QKD key, but this site's KME holds "
                             "keys for it: ML-KEM-only refused (fix: check the initiator's "
                             "KME connection)")
        if status not in QKD_DEGRADED:
            raise ValueError(f"unknown QKD status {status!r}")
        self._send_server_flight(MODE_MLKEM_ONLY, status)

    def _send_client_hello(self) -> None:
        p, pol = self.params, self.params.policy
        if self._dk is None:  # else made by `prepare` while the KME was asked
            with step("ml_kem"):
                self._dk = self._kem.from_seed(self._rng(64))
        self._ch = ClientHello(
            version=PROTOCOL_VERSION, epoch=self.epoch, auth=self.auth,
            psk_epoch=self._psk_epoch,
            kems_offered=pol.kems, kem=self._kem.name, allowed_modes=pol.allowed_modes,
            initiator_id=p.local_identity, responder_id=p.peer_identity,
            initiator_sae_id=p.local_sae_id, nonce=self._rng(NONCE_LEN),
            encapsulation_key=self._dk.encapsulation_key,
            qkd_key_size_bits=pol.qkd_key_size_bits,
            qkd_key_ids=tuple(k for k, _ in self._qkd_keys), qkd_status=self._qkd_status,
            stream_window=p.stream_window, flags=self._flags(),
        )
        if self.auth == AUTH_PSK:
            assert self._salt is not None
            self._ch = replace(self._ch, psk_binder=psk_binder(self._salt, self._ch))
        self._send(self._ch.encode())
        self._state = _State.WAIT_SERVER_HELLO

    def _flags(self) -> int:
        flags = FLAG_PSK if self.params.psk_book is not None else 0
        return flags | (FLAG_ITS_MAC if self.params.policy.its_mac else 0)

    def _on_hello_retry(self, msg: bytes) -> None:
        """The responder wants proof we receive at our address: send the same hello
        again with its cookie. The transcript starts over, since the hello the session
        is built on is the one carrying the cookie."""
        cookie = decode_hello_retry(msg)
        if self._retried or self.auth == AUTH_CHAIN:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "unexpected second HelloRetryRequest")
        assert self._ch is not None
        self._retried = True
        self._ch = replace(self._ch, cookie=cookie)
        self._th = transcript_hasher()
        self._th.update(TRANSCRIPT_LABEL)
        if self._transcript is not None:
            self._transcript = bytearray()
        self._send(self._ch.encode())

    def _on_server_hello(self, msg: bytes) -> None:
        sh = ServerHello.decode(msg)
        ch = self._ch
        assert ch is not None
        if sh.version != PROTOCOL_VERSION:
            raise self._fail(ErrorCode.UNSUPPORTED, f"peer speaks {sh.version!r}")
        if sh.kem != ch.kem:
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE, "ServerHello names another KEM")
        if sh.responder_id != self.params.peer_identity:
            raise self._fail(ErrorCode.ACCESS_DENIED,
                             f"responder claims identity {sh.responder_id!r}, expected "
                             f"{self.params.peer_identity!r}")
        if sh.mode not in self.params.policy.allowed_modes or sh.mode not in sh.allowed_modes:
            raise self._fail(ErrorCode.POLICY_MISMATCH, f"mode {sh.mode!r} is not allowed")
        if sh.mode == MODE_HYBRID:
            if not ch.qkd_key_ids or sh.qkd_status != QKD_OK:
                raise self._fail(ErrorCode.POLICY_MISMATCH, "hybrid mode without QKD keys")
        else:
            self._refuse_mlkem_only_with_own_keys(ch)
            if sh.qkd_status not in QKD_DEGRADED:
                raise self._fail(ErrorCode.POLICY_MISMATCH,
                                 "ML-KEM-only mode without a reason from the responder's KME")
        if len(sh.nonce) != NONCE_LEN:
            raise self._fail(ErrorCode.DECODE_ERROR, "bad responder nonce length")
        if self.params.psk_book is not None:
            if sh.next_psk_epoch <= self._psk_epoch:
                raise self._fail(ErrorCode.POLICY_MISMATCH,
                                 f"responder names PSK epoch {sh.next_psk_epoch} for the next "
                                 f"PSK, not above the {self._psk_epoch} in use")
        elif sh.next_psk_epoch != 0:
            raise self._fail(ErrorCode.POLICY_MISMATCH, "responder derives a PSK; ours is off")
        self._sh = sh
        self._absorb(msg)
        try:
            with step("ml_kem"):
                ss = self._dk.decapsulate(sh.ciphertext)
        except PqcError as exc:
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE, f"bad ML-KEM ciphertext: {exc}") from None
        self._dk = None  # the decapsulation key is single-use: forward secrecy
        self._derive(ss, sh.mode)
        self._state = (_State.WAIT_PEER_CERTIFICATE if self.auth == AUTH_PKI
                       else _State.WAIT_PEER_FINISHED)

    def _refuse_mlkem_only_with_own_keys(self, ch: ClientHello) -> None:
        """An initiator that obtained QKD keys never accepts ML-KEM-only: the responder
        can only lack them if someone spent their IDs first (a replayed first flight)."""
        if ch.qkd_key_ids:
            raise self._fail(ErrorCode.POLICY_MISMATCH,
                             "the responder chose ML-KEM-only although this side brought QKD "
                             "keys: refused (a replayed first flight spends the key IDs)")

    # -- responder ---------------------------------------------------------------------

    def _on_client_hello(self, msg: bytes) -> None:
        ch = ClientHello.decode(msg)
        p, pol = self.params, self.params.policy
        if ch.version != PROTOCOL_VERSION:
            raise self._fail(ErrorCode.UNSUPPORTED, f"peer speaks {ch.version!r}")
        self._choose_auth(ch)
        if ch.epoch != self.epoch:
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE,
                             f"ClientHello for epoch {ch.epoch}, expected {self.epoch}")
        if ch.responder_id != p.local_identity:
            raise self._fail(ErrorCode.ACCESS_DENIED,
                             f"initiator wants to reach {ch.responder_id!r}, we are "
                             f"{p.local_identity!r}")
        if ch.initiator_id != p.peer_identity:
            raise self._fail(ErrorCode.ACCESS_DENIED,
                             f"initiator claims identity {ch.initiator_id!r}, expected "
                             f"{p.peer_identity!r}")
        if ch.initiator_sae_id != p.peer_sae_id:
            raise self._fail(ErrorCode.ACCESS_DENIED,
                             f"initiator SAE {ch.initiator_sae_id!r}, expected {p.peer_sae_id!r}")
        if ch.kem not in ch.kems_offered or ch.kem not in pol.kems:
            raise self._fail(ErrorCode.UNSUPPORTED, f"KEM {ch.kem!r} is not acceptable here")
        self._check_kem_choice(ch)
        if ch.kem != self._kem.name:
            self._kem = get_kem(ch.kem, pol.pqc_backend)
        if len(ch.encapsulation_key) != self._kem.encapsulation_key_size:
            raise self._fail(ErrorCode.DECODE_ERROR, "encapsulation key of the wrong size")
        if len(ch.nonce) != NONCE_LEN:
            raise self._fail(ErrorCode.DECODE_ERROR, "bad initiator nonce length")
        if MODE_HYBRID not in ch.allowed_modes or any(m not in MODES for m in ch.allowed_modes):
            raise self._fail(ErrorCode.POLICY_MISMATCH, "initiator's modes are not acceptable")
        if ch.qkd_key_size_bits != pol.qkd_key_size_bits:
            raise self._fail(ErrorCode.POLICY_MISMATCH,
                             f"QKD key size {ch.qkd_key_size_bits} bits, expected "
                             f"{pol.qkd_key_size_bits}")
        if ch.qkd_status not in QKD_STATUSES or (ch.qkd_status == QKD_OK) != bool(
                ch.qkd_key_ids):
            raise self._fail(ErrorCode.POLICY_MISMATCH,
                             f"QKD status {ch.qkd_status!r} does not match the "
                             f"{len(ch.qkd_key_ids)} key ID(s) named")
        self._ch = ch
        self._absorb(msg)
        if ch.qkd_key_ids:
            if len(ch.qkd_key_ids) != pol.qkd_keys_total:
                raise self._fail(ErrorCode.POLICY_MISMATCH, "wrong number of QKD key IDs")
            self._state = _State.WAIT_QKD_DEC
            self.events.append(ev.QkdKeysToFetch(
                self.handshake_id, p.peer_sae_id, ch.qkd_key_ids, pol.qkd_key_size_bits))
        else:
            if not (pol.degraded_allowed and MODE_MLKEM_ONLY in ch.allowed_modes):
                raise self._fail(ErrorCode.QKD_UNAVAILABLE,
                                 "initiator brought no QKD key and policy requires one")
            # Degraded only if this side's own KME has no key either (local_qkd_status).
            self._state = _State.WAIT_QKD_STATUS
            self.events.append(ev.QkdStatusToCheck(
                self.handshake_id, p.peer_sae_id, pol.qkd_keys_total, pol.qkd_key_size_bits))

    def _check_kem_choice(self, ch: ClientHello) -> None:
        """The chosen KEM must be the initiator's most preferred one that this side
        accepts: a hello that offers ML-KEM-1024 first but asks for 768 was rewritten."""
        preferred = next(k for k in ch.kems_offered if k in self.params.policy.kems)
        if ch.kem != preferred:
            raise self._fail(ErrorCode.POLICY_MISMATCH,
                             f"initiator offers {preferred} first but chose {ch.kem}: "
                             "refused as a downgrade")

    def _choose_auth(self, ch: ClientHello) -> None:
        """Responder: check the initiator's authentication choice against ours."""
        book = self.params.psk_book
        if ch.flags & ~KNOWN_FLAGS:
            raise self._fail(ErrorCode.UNSUPPORTED, f"unknown ClientHello flags {ch.flags:#x}")
        if bool(ch.flags & FLAG_PSK) != (book is not None):
            raise self._fail(ErrorCode.POLICY_MISMATCH,
                             "PSK authentication is on at one site only: set [auth] psk "
                             "the same on both")
        if bool(ch.flags & FLAG_ITS_MAC) != self.params.policy.its_mac:
            raise self._fail(ErrorCode.POLICY_MISMATCH,
                             "the one-time MAC mode is on at one site only: set [auth] "
                             "its_mac the same on both")
        if self.auth == AUTH_CHAIN:
            if ch.auth != AUTH_CHAIN or ch.psk_epoch != 0:
                raise self._fail(ErrorCode.HANDSHAKE_FAILURE,
                                 f"peer asked for {ch.auth!r} inside the tunnel, expected 'chain'")
            return
        if ch.auth == AUTH_PSK and book is not None:
            psk = book.lookup(ch.psk_epoch)
            if psk is None:
                raise self._fail(ErrorCode.UNKNOWN_PSK,
                                 f"PSK epoch {ch.psk_epoch} is unknown or no longer accepted")
            if not hmac.compare_digest(ch.psk_binder, psk_binder(psk.key, ch)):
                # Checked before the KME request and the encapsulation: whoever merely
                # read an epoch number off the wire costs us one HMAC, not a QKD key.
                raise self._fail(ErrorCode.HANDSHAKE_FAILURE,
                                 f"PSK binder for epoch {ch.psk_epoch} is invalid")
            self.auth = AUTH_PSK
            self._salt = psk.key
            self._psk_epoch = psk.epoch
        elif ch.auth == AUTH_PKI:
            if ch.psk_epoch != 0:
                raise self._fail(ErrorCode.DECODE_ERROR, "a PKI ClientHello names a PSK epoch")
            if book is not None and not book.pki_allowed():
                raise self._fail(ErrorCode.ACCESS_DENIED,
                                 "PKI bootstrap refused: this site already shares a PSK with "
                                 "the peer and policy forbids a re-bootstrap ([auth] "
                                 "pki_rebootstrap)")
        else:
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE,
                             f"peer asked for {ch.auth!r} authentication to start a tunnel")

    def _send_server_hello(self, mode: str, qkd_status: str) -> bytes:
        """Encapsulate to the initiator and send ServerHello; the ML-KEM shared secret."""
        ch = self._ch
        assert ch is not None
        try:
            with step("ml_kem"):
                ct, ss = self._kem.encapsulate(ch.encapsulation_key)
        except PqcError as exc:
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE, f"bad encapsulation key: {exc}") from None
        self._sh = ServerHello(
            version=PROTOCOL_VERSION, kem=self._kem.name, mode=mode,
            allowed_modes=self.params.policy.allowed_modes,
            responder_id=self.params.local_identity, nonce=self._rng(NONCE_LEN),
            ciphertext=ct, stream_window=self.params.stream_window,
            next_psk_epoch=self._next_psk_epoch(), qkd_status=qkd_status,
        )
        self._send(self._sh.encode())
        return bytes(ss)

    def _send_server_flight(self, mode: str, qkd_status: str = QKD_OK) -> None:
        prepared, self._prepared = self._prepared, None
        creds = self.params.credentials
        if prepared is not None and mode == MODE_HYBRID and qkd_status == QKD_OK and (
                self.auth != AUTH_PKI or (creds is not None and creds.presentation_problem(
                    self._now()) is None)):
            # Built by `prepare`: the same messages and transcript, only earlier.
            self._th, self._sh = prepared.transcript, prepared.server_hello
            self.outgoing.extend(prepared.messages)
            self._derive(prepared.shared_secret, mode, prepared.th_server_hello)
        else:
            # Anything else (another mode, a certificate that expired meanwhile) is
            # built from scratch; an unused prepared flight is dropped unsent.
            ss = self._send_server_hello(mode, qkd_status)
            self._derive(ss, mode)
            if self.auth == AUTH_PKI:
                self._send_signature(SIG_LABEL_RESPONDER)
        self._send_finished(self._confirm.responder)
        self._state = (_State.WAIT_PEER_CERTIFICATE if self.auth == AUTH_PKI
                       else _State.WAIT_PEER_FINISHED)

    # -- both ----------------------------------------------------------------------------

    def _next_psk_epoch(self) -> int:
        book = self.params.psk_book
        return book.next_epoch() if book is not None else 0

    def _its_keys(self) -> tuple[bytes, bytes] | None:
        """The one-time MAC keys (responder's, initiator's): the last two QKD keys."""
        if not self.params.policy.its_mac or len(self._qkd_keys) < 2:
            return None
        return self._qkd_keys[-2][1][:32], self._qkd_keys[-1][1][:32]

    def _send_finished(self, confirm_key: bytes) -> None:
        its = self._its_keys()
        tag = b""
        if its is not None:
            assert self._transcript is not None
            tag = one_time_tag(its[1] if self.initiator else its[0], bytes(self._transcript))
        self._send(encode_finished(finished_mac(confirm_key, self._th_now()), tag))

    def _derive(self, ss: bytes, mode: str, th: bytes | None = None) -> None:
        """The key schedule, confirmation keys bound to `th` (TH after ServerHello;
        now, unless given)."""
        session_keys = self._qkd_keys[:self.params.policy.qkd_keys_per_handshake]
        k_qkd = _join_qkd_keys([k for _, k in session_keys]) if mode == MODE_HYBRID else b""
        self._schedule = HybridKeySchedule(ss, k_qkd, self._salt)
        self._confirm = self._schedule.confirmation_keys(th if th is not None
                                                         else self._th_now())
        if self._keylog is not None:
            assert self._ch is not None
            self._keylog(KeyLogEntry(self._ch.nonce.hex(), self.epoch, ss, k_qkd))

    def _send_signature(self, label: bytes) -> None:
        creds = self.params.credentials
        assert creds is not None
        problem = creds.presentation_problem(self._now())
        if problem is not None:
            # Never present an expired or revoked certificate: the peer would refuse it
            # anyway, and a revoked one must not authenticate anything. The detail (file
            # and fix) goes to this side's log; the wire gets the kind only.
            self.events.append(ev.OwnCertificateRefused(problem.kind, problem.detail))
            role = "initiator" if self.initiator else "responder"
            raise self._fail(ErrorCode.BAD_CERTIFICATE,
                             f"the {role}'s own certificate is {problem.kind.replace('_', ' ')}"
                             "; it is not presented")
        self._send(encode_certificate(creds.chain_der))
        algorithm = pqc_sig.algorithm_of_public_key(creds.chain[0].public_key())
        with step("ml_dsa_sign"):
            signature = pqc_sig.sign(creds.private_key, label + self._th_now())
        self._send(encode_certificate_verify(algorithm, signature))

    def _on_certificate(self, msg: bytes) -> None:
        chain_der = decode_certificate(msg)
        creds = self.params.credentials
        assert creds is not None
        try:
            # parse_peer_certificate reads every field cryptography parses lazily, so a
            # malformed one fails here and not later in a log line or a check.
            chain = [parse_peer_certificate(der) for der in chain_der]
        except PeerCertificateError as exc:
            raise self._fail(ErrorCode.BAD_CERTIFICATE, str(exc)) from None
        now = self._now()
        try:
            with step("ml_dsa_cert_chain"):
                verify_peer_certificate(chain[0], creds.trust_anchor,
                                        self.params.peer_identity, now,
                                        intermediates=chain[1:])
        except PeerCertificateError as exc:
            raise self._fail(ErrorCode.BAD_CERTIFICATE,
                             f"peer certificate rejected: {exc}") from None
        if creds.crl_check is not None:
            # The leaf and any intermediates it came with: a revoked intermediate CA
            # revokes everything below it.
            for cert in chain:
                revoked = creds.crl_check(cert)
                if revoked:
                    raise self._fail(ErrorCode.BAD_CERTIFICATE, revoked)
        self._peer_cert = chain[0]
        self._absorb(msg)
        self._state = _State.WAIT_PEER_CERTIFICATE_VERIFY

    def _on_certificate_verify(self, msg: bytes) -> None:
        algorithm, signature = decode_certificate_verify(msg)
        assert self._peer_cert is not None
        try:
            pub = self._peer_cert.public_key()
            expected = pqc_sig.algorithm_of_public_key(pub)
        except (PqcError, ValueError, TypeError) as exc:
            raise self._fail(ErrorCode.BAD_CERTIFICATE,
                             f"peer certificate key is unusable: {exc}") from None
        if algorithm != expected:
            raise self._fail(ErrorCode.BAD_CERTIFICATE,
                             "signature algorithm does not match the certificate")
        label = SIG_LABEL_RESPONDER if self.initiator else SIG_LABEL_INITIATOR
        with step("ml_dsa_verify"):
            valid = pqc_sig.verify(pub, signature, label + self._th_now())
        if not valid:
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE, "peer's transcript signature is invalid")
        self._absorb(msg)
        self._state = _State.WAIT_PEER_FINISHED

    def _on_finished(self, msg: bytes) -> None:
        mac, its_tag = decode_finished(msg)
        key = self._confirm.responder if self.initiator else self._confirm.initiator
        if not hmac.compare_digest(mac, finished_mac(key, self._th_now())):
            raise self._fail(ErrorCode.HANDSHAKE_FAILURE,
                             "key confirmation failed: the peer derived other keys")
        its = self._its_keys()
        if its is not None:
            assert self._transcript is not None
            peer_key = its[0] if self.initiator else its[1]
            if not check_one_time_tag(peer_key, bytes(self._transcript), its_tag):
                raise self._fail(ErrorCode.HANDSHAKE_FAILURE,
                                 "the peer's one-time MAC over the transcript is invalid")
        elif its_tag:
            raise self._fail(ErrorCode.DECODE_ERROR, "unexpected one-time MAC in Finished")
        self._absorb(msg)
        if self.initiator:
            if self.auth == AUTH_PKI:
                self._send_signature(SIG_LABEL_INITIATOR)
            self._send_finished(self._confirm.initiator)
            self._finish()
            self._state = _State.WAIT_HANDSHAKE_DONE
        else:
            self._finish()
            self._state = _State.COMPLETE

    def _finish(self) -> None:
        assert self._schedule is not None and self._ch is not None and self._sh is not None
        keys = self._schedule.session_keys(self._th_now())
        self._schedule = None
        self._confirm = None
        peer_window = self._sh.stream_window if self.initiator else self._ch.stream_window
        its = self._its_keys() is not None
        self.result = HandshakeResult(
            keys=keys, epoch=self.epoch, auth=self.auth, mode=self._sh.mode, kem=self._sh.kem,
            qkd_key_ids=self._ch.qkd_key_ids, peer_identity=self.params.peer_identity,
            peer_stream_window=peer_window, session_id=self._ch.nonce.hex(),
            psk_epoch=self._psk_epoch, next_psk_epoch=self._sh.next_psk_epoch, its_mac=its,
            qkd_status=self._ch.qkd_status if self.initiator else self._sh.qkd_status,
            peer_qkd_status=self._sh.qkd_status if self.initiator else self._ch.qkd_status,
        )
        self._qkd_keys = []
        self._transcript = None
        if self.params.psk_book is not None and self._sh.next_psk_epoch:
            # The initiator has not yet seen the responder confirm; the responder has
            # checked the initiator's Finished, so both sides hold this PSK.
            self._next_psk = PskKey(self._sh.next_psk_epoch, keys.next_psk)
            self.events.append(ev.NextPskDerived(
                epoch=self._next_psk.epoch, psk=keys.next_psk, used_epoch=self._psk_epoch,
                confirmed=not self.initiator, bootstrap=self.auth == AUTH_PKI))

    def _now(self) -> datetime:
        return self._clock_now if self._clock_now is not None else datetime.now(UTC)

    def receive(self, msg: bytes, now: datetime | None = None) -> None:
        """One complete handshake message from the peer."""
        self._clock_now = now
        mtype = message_type(msg)
        expected = {
            _State.WAIT_CLIENT_HELLO: MSG_CLIENT_HELLO,
            _State.WAIT_SERVER_HELLO: (MSG_HELLO_RETRY if mtype == MSG_HELLO_RETRY
                                       else MSG_SERVER_HELLO),
            _State.WAIT_PEER_CERTIFICATE: MSG_CERTIFICATE,
            _State.WAIT_PEER_CERTIFICATE_VERIFY: MSG_CERTIFICATE_VERIFY,
            _State.WAIT_PEER_FINISHED: MSG_FINISHED,
            _State.WAIT_HANDSHAKE_DONE: MSG_HANDSHAKE_DONE,
        }.get(self._state)
        if mtype != expected:
            got = MSG_NAMES.get(mtype, f"type {mtype}")
            raise self._fail(ErrorCode.PROTOCOL_ERROR,
                             f"unexpected {got} in state {self._state.name}")
        try:
            if mtype == MSG_CLIENT_HELLO:
                self._on_client_hello(msg)
            elif mtype == MSG_SERVER_HELLO:
                self._on_server_hello(msg)
            elif mtype == MSG_HELLO_RETRY:
                self._on_hello_retry(msg)
            elif mtype == MSG_CERTIFICATE:
                self._on_certificate(msg)
            elif mtype == MSG_CERTIFICATE_VERIFY:
                self._on_certificate_verify(msg)
            elif mtype == MSG_FINISHED:
                self._on_finished(msg)
            else:
                if msg != HANDSHAKE_DONE:
                    raise DecodeError("HandshakeDone carries no body")
                self._state = _State.COMPLETE
                if self._next_psk is not None:
                    self.events.append(ev.PskConfirmed(self._next_psk.epoch))
                    self._next_psk = None
        except DecodeError as exc:
            raise self._fail(ErrorCode.DECODE_ERROR, str(exc)) from None
