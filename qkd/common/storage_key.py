"""The KME's local storage key: key material in the SQLite store is sealed under it.

One 32-byte random key per KME, in a file of its own (mode 0600, in a 0700 directory),
created on first start. Each stored key block is sealed with AES-256-GCM under a fresh
96-bit nonce with the block's key ID (and a label) as associated data, so a row copied
onto another key ID, or bytes edited on disk, fail to open instead of yielding a wrong
key. Keeping the storage key out of the database means a copied or backed-up database
alone reveals no key; whoever can read both files as the service user can, which is
why both are private to that user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qkd.common.errors import QkdError

STORAGE_KEY_BYTES = 32
_NONCE = 12
_AAD_LABEL = b"qkdgw kme key block v1\x00"


class StorageKeyError(QkdError):
    """The storage key file is missing, malformed or readable by others."""


class SealError(QkdError):
    """A sealed block does not open: wrong storage key, edited bytes or wrong key ID."""


def private_dir(path: Path) -> None:
    """Create `path` (and parents) as 0700; tighten an existing one we own."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)


def load_or_create(path: Path) -> bytes:
    """Read the storage key, or create it (O_EXCL, 0600) if the file does not exist."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load(path)
    try:
        key = os.urandom(STORAGE_KEY_BYTES)
        os.write(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    # The directory entry must be durable too, or a crash could leave a store sealed
    # under a key whose file vanished.
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return key


def _load(path: Path) -> bytes:
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StorageKeyError(f"{str(path)!r} is readable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise StorageKeyError(f"{str(path)!r} is not 64 hex digits") from None
    if len(key) != STORAGE_KEY_BYTES:
        raise StorageKeyError(f"{str(path)!r} holds {len(key)} bytes, expected "
                              f"{STORAGE_KEY_BYTES}")
    return key


class Sealer:
    """AES-256-GCM with the key ID as associated data. Never logs, repr hides the key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != STORAGE_KEY_BYTES:
            raise ValueError(f"storage key must be {STORAGE_KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(<storage key redacted>)"

    def seal(self, key_id: str, material: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, material, _AAD_LABEL + key_id.encode())

    def open(self, key_id: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:],
                                      _AAD_LABEL + key_id.encode())
        except (InvalidTag, ValueError):
            raise SealError(f"stored block {key_id} does not open under this KME's "
                            "storage key (edited, moved to another key ID, or the "
                            "storage key file was replaced)") from None
