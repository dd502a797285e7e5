"""Byte encodings shared by the handshake, record and stream layers.

Every variable-length field is length-prefixed and every parser is strict: it reads
exactly what the message holds, bounds-checks each length before slicing and raises
`DecodeError` (never IndexError or UnicodeError) on anything malformed.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from gateway.errors import GatewayError


class ErrorCode(IntEnum):
    """Close and alert codes on the wire (u16)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    DECODE_ERROR = 2
    BAD_RECORD_MAC = 3
    HANDSHAKE_FAILURE = 4
    BAD_CERTIFICATE = 5
    ACCESS_DENIED = 6
    POLICY_MISMATCH = 7
    QKD_UNAVAILABLE = 8
    INTERNAL_ERROR = 9
    TIMEOUT = 10
    KEY_LIMIT = 11
    UNSUPPORTED = 12
    TRUNCATED = 13
    FLOW_CONTROL = 14
    UNKNOWN_PSK = 15
    QKD_KEY_REJECTED = 16  # a named QKD key ID was replayed, unknown or already delivered


class DecodeError(GatewayError, ValueError):
    """A peer's bytes do not parse; the message says which field."""


class Writer:
    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(struct.pack(">B", v))
        return self

    def u16(self, v: int) -> Writer:
        self._parts.append(struct.pack(">H", v))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(struct.pack(">I", v))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(struct.pack(">Q", v))
        return self

    def blob(self, b: bytes) -> Writer:
        self._parts.append(struct.pack(">I", len(b)))
        self._parts.append(bytes(b))
        return self

    def text(self, s: str) -> Writer:
        return self.blob(s.encode("utf-8"))

    def texts(self, items: list[str] | tuple[str, ...]) -> Writer:
        self.u16(len(items))
        for item in items:
            self.text(item)
        return self

    def blobs(self, items: list[bytes] | tuple[bytes, ...]) -> Writer:
        self.u16(len(items))
        for item in items:
            self.blob(item)
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int, field: str) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise DecodeError(f"{self._what}: truncated at field {field!r}")
        out = self._data[self._pos:end]
        self._pos = end
        return bytes(out)

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self._take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self._take(8, field))[0])

    def blob(self, field: str, max_len: int = 1 << 16) -> bytes:
        n = self.u32(field)
        if n > max_len:
            raise DecodeError(f"{self._what}: field {field!r} is {n} bytes, limit {max_len}")
        return self._take(n, field)

    def text(self, field: str, max_len: int = 256) -> str:
        raw = self.blob(field, max_len)
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"{self._what}: field {field!r} is not UTF-8") from None
        if not s.isprintable():
            raise DecodeError(f"{self._what}: field {field!r} has control characters")
        return s

    def texts(self, field: str, max_items: int = 64, max_len: int = 256) -> tuple[str, ...]:
        n = self.u16(field)
        if n > max_items:
            raise DecodeError(f"{self._what}: {n} items in {field!r}, limit {max_items}")
        return tuple(self.text(field, max_len) for _ in range(n))

    def blobs(self, field: str, max_items: int = 8, max_len: int = 1 << 16) -> tuple[bytes, ...]:
        n = self.u16(field)
        if n > max_items:
            raise DecodeError(f"{self._what}: {n} items in {field!r}, limit {max_items}")
        return tuple(self.blob(field, max_len) for _ in range(n))

    def end(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError(f"{self._what}: {len(self._data) - self._pos} trailing bytes")
