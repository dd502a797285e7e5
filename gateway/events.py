"""Events the sans-I/O tunnel connection reports to whoever drives it.

Small, immutable, and free of secret bytes: they are safe to log as they are.
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
class HandshakeCompleted(Event):
    epoch: int
    peer_identity: str
    auth: str  # "pki", "psk" or "chain" (a re-handshake inside the tunnel)
    mode: str  # "hybrid" or, only where both sides allow it, "mlkem-only"
    kem: str
    qkd_key_ids: tuple[str, ...]
    rekey: bool


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
