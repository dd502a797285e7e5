"""Events the sans-I/O tunnel connection reports to whoever drives it.

Small and immutable. All but `NextPskDerived` are free of secret bytes and safe to log as
they are; that one carries the next PSK, which its repr leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Event:
    """Base class of every tunnel event."""


@dataclass(frozen=True)
class QkdKeysRequested(Event):
    """The initiator needs fresh QKD keys for the peer SAE (ETSI 014 enc_keys).

    Answer with `TunnelConnection.supply_qkd_keys` or `qkd_keys_unavailable`."""

    handshake_id: int
    peer_sae_id: str
    number: int
    size_bits: int


@dataclass(frozen=True)
class QkdKeysToFetch(Event):
    """The responder must fetch the QKD keys the initiator named (ETSI 014 dec_keys)."""

    handshake_id: int
    master_sae_id: str
    key_ids: tuple[str, ...]
    size_bits: int


@dataclass(frozen=True)
class QkdStatusToCheck(Event):
    """The responder got a hello without key IDs (the initiator's KME had none) and both
    sides allow ML-KEM-only: ask this side's own KME whether it has `number` keys of
    `size_bits` for the peer (ETSI 014 status). Answer with
    `TunnelConnection.local_qkd_status`."""

    handshake_id: int
    peer_sae_id: str
    number: int
    size_bits: int


@dataclass(frozen=True)
class OwnCertificateRefused(Event):
    """This side would have presented an expired, not yet valid or revoked certificate of
    its own; the handshake fails instead. `detail` names the file and the fix."""

    kind: str
    detail: str


@dataclass(frozen=True)
class UnexpectedError(Event):
    """Processing input raised an exception no layer turned into its own error. The
    connection closed with INTERNAL_ERROR and an alert; this says what to look at (a
    bug here, or input a parser lets through), without the input's bytes."""

    where: str  # "receive" (peer bytes) or "handshake" (a KME answer, a timer, a start)
    exc_type: str
    message: str
    location: str  # file:line of the innermost frame


@dataclass(frozen=True)
class HandshakeCompleted(Event):
    epoch: int
    peer_identity: str
    auth: str  # "pki", "psk" or "chain" (a re-handshake inside the tunnel)
    mode: str  # "hybrid" or, only where both sides allow it, "mlkem-only"
    kem: str
    qkd_key_ids: tuple[str, ...]
    rekey: bool
    psk_epoch: int = 0  # the PSK epoch that authenticated it (auth "psk"), else 0
    its_mac: bool = False  # also authenticated with one-time MACs keyed by QKD bits
    # What each side's own KME said ("ok", or why ML-KEM-only: "no-key", "unreachable").
    qkd_status: str = "ok"
    peer_qkd_status: str = "ok"


@dataclass(frozen=True)
class NextPskDerived(Event):
    """A handshake produced the next authentication PSK. Persist it before sending the
    bytes that follow this event (`data_to_send`): the initiator's Finished or the
    responder's HandshakeDone tells the peer this side now holds it.

    `confirmed`: the responder has checked the initiator's Finished, so both sides hold
    the key. The initiator gets False here and a `PskConfirmed` once HandshakeDone
    arrives. `used_epoch` is the PSK epoch that authenticated this handshake (0: PKI or
    a re-handshake inside the tunnel)."""

    epoch: int
    psk: bytes = field(repr=False)
    used_epoch: int = 0
    confirmed: bool = False
    bootstrap: bool = False  # the handshake was PKI-authenticated: a (re)start of the chain


@dataclass(frozen=True)
class PskRejected(Event):
    """Initiator: the responder does not know (or no longer accepts) the PSK epoch we
    offered. The alert saying so is unauthenticated: drop only a PSK the responder never
    confirmed, and fall back to PKI only where policy allows a re-bootstrap."""

    epoch: int


@dataclass(frozen=True)
class PskConfirmed(Event):
    """Initiator: the responder confirmed the session, so it holds PSK `epoch` too."""

    epoch: int


@dataclass(frozen=True)
class TunnelReady(Event):
    """Application data may flow: the handshake is confirmed in both directions."""


@dataclass(frozen=True)
class KeyUpdated(Event):
    direction: str  # "send" or "receive"
    generation: int


@dataclass(frozen=True)
class StreamOpened(Event):
    """The peer opened a stream to one of our services."""

    stream_id: int
    service: str


@dataclass(frozen=True)
class StreamDataReceived(Event):
    stream_id: int
    data: bytes | memoryview = field(repr=False)  # read-only view, safe to keep


@dataclass(frozen=True)
class StreamEnded(Event):
    """The peer finished sending on this stream (authenticated end, not truncation)."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset(Event):
    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True)
class StreamWindowOpened(Event):
    """The peer granted more send window on this stream."""

    stream_id: int


@dataclass(frozen=True)
class ConnectionTerminated(Event):
    code: int
    reason: str
    clean: bool  # True only for an authenticated close with NO_ERROR
    by_peer: bool
