"""The hybrid key combiner: one fresh ML-KEM secret and one fresh QKD key into session keys.

    PRK    = HKDF-Extract(salt, IKM)         salt = previous chain key, or INITIAL_SALT
    IKM    = u16(len ss) ‖ ss_mlkem ‖ u16(len k) ‖ k_qkd
    out(L) = HKDF-Expand(PRK, u16(len L) ‖ L ‖ TH, size)      one distinct label L per output

Both secrets go through HMAC as one length-prefixed string, so the PRK is pseudorandom
as long as *either* input is (the dual-PRF argument behind ETSI TS 103 744 CatKDF and
the TLS 1.3 hybrid design); the inputs are never XORed and the QKD key is never used
as a traffic key directly. Each output is bound to the transcript hash TH, so two
sessions with different transcripts never share keys even if a KEM or QKD input repeated.

The confirmation keys are derived from the transcript up to the two hellos; everything
used after the handshake (traffic secrets, the next chain key, the next PSK) from the
final transcript, which also covers the authentication messages.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.hashes import SHA384
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from gateway.tunnel.constants import (
    AES_KEY_LEN,
    GCM_IV_LEN,
    HASH_LEN,
    HASH_NAME,
    INITIAL_SALT,
    LABEL_CHAIN_KEY,
    LABEL_I2R_TRAFFIC,
    LABEL_INITIATOR_CONFIRM,
    LABEL_KEY_UPDATE,
    LABEL_NEXT_PSK,
    LABEL_R2I_TRAFFIC,
    LABEL_RECORD_IV,
    LABEL_RECORD_KEY,
    LABEL_RESPONDER_CONFIRM,
)


def _u16(n: int) -> bytes:
    if not 0 <= n < 1 << 16:
        raise ValueError("length does not fit in 16 bits")
    return n.to_bytes(2, "big")


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return HKDF.extract(SHA384(), salt, ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(SHA384(), length, info).derive(prk)


def expand_label(prk: bytes, label: bytes, context: bytes, length: int) -> bytes:
    return hkdf_expand(prk, _u16(len(label)) + label + context, length)


def combine_secrets(ss_mlkem: bytes, k_qkd: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-Extract over both secrets; returns the PRK (keep it secret)."""
    if len(ss_mlkem) == 0:
        raise ValueError("the ML-KEM shared secret is empty")
    ikm = _u16(len(ss_mlkem)) + ss_mlkem + _u16(len(k_qkd)) + k_qkd
    return hkdf_extract(salt if salt is not None else INITIAL_SALT, ikm)


@dataclass(frozen=True)
class ConfirmationKeys:
    initiator: bytes = field(repr=False)
    responder: bytes = field(repr=False)


@dataclass(frozen=True)
class SessionKeys:
    i2r_traffic: bytes = field(repr=False)
    r2i_traffic: bytes = field(repr=False)
    chain_key: bytes = field(repr=False)
    next_psk: bytes = field(repr=False)


class HybridKeySchedule:
    """The key schedule of one handshake. Holds the PRK; `repr` shows nothing secret."""

    def __init__(self, ss_mlkem: bytes, k_qkd: bytes, salt: bytes | None = None) -> None:
        self._prk = combine_secrets(ss_mlkem, k_qkd, salt)

    def __repr__(self) -> str:
        return "HybridKeySchedule(<secret>)"

    def confirmation_keys(self, th_hello: bytes) -> ConfirmationKeys:
        return ConfirmationKeys(
            initiator=expand_label(self._prk, LABEL_INITIATOR_CONFIRM, th_hello, HASH_LEN),
            responder=expand_label(self._prk, LABEL_RESPONDER_CONFIRM, th_hello, HASH_LEN),
        )

    def session_keys(self, th_final: bytes) -> SessionKeys:
        return SessionKeys(
            i2r_traffic=expand_label(self._prk, LABEL_I2R_TRAFFIC, th_final, HASH_LEN),
            r2i_traffic=expand_label(self._prk, LABEL_R2I_TRAFFIC, th_final, HASH_LEN),
            chain_key=expand_label(self._prk, LABEL_CHAIN_KEY, th_final, HASH_LEN),
            next_psk=expand_label(self._prk, LABEL_NEXT_PSK, th_final, HASH_LEN),
        )


def record_key_iv(traffic_secret: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM key and IV for one direction."""
    return (
        expand_label(traffic_secret, LABEL_RECORD_KEY, b"", AES_KEY_LEN),
        expand_label(traffic_secret, LABEL_RECORD_IV, b"", GCM_IV_LEN),
    )


def next_traffic_secret(traffic_secret: bytes) -> bytes:
    """The secret after a key update; the old one cannot be computed from it."""
    return expand_label(traffic_secret, LABEL_KEY_UPDATE, b"", HASH_LEN)


def finished_mac(confirm_key: bytes, transcript_hash: bytes) -> bytes:
    return hmac.new(confirm_key, transcript_hash, HASH_NAME).digest()


def transcript_hasher() -> hashlib._Hash:
    return hashlib.new(HASH_NAME)
