"""ML-KEM (FIPS 203) behind one small interface, over the `openssl` or `liboqs` backend.

    kem = get_kem("ML-KEM-768")                         # pqc.get_kem
    dk = kem.generate()                                  # responder / key owner
    ct, ss = kem.encapsulate(dk.encapsulation_key)       # peer
    assert dk.decapsulate(ct) == ss

Every input from the wire is length-checked here, so both backends reject malformed
encapsulation keys and ciphertexts the same way (`PqcError`). A well-formed but wrong
ciphertext is *not* an error: ML-KEM's implicit rejection returns a pseudo-random
secret, which is why the handshake needs explicit key confirmation.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mlkem

from pqc.backend import PqcError

KEM_ALGORITHMS = ("ML-KEM-768", "ML-KEM-1024")

SEED_SIZE = 64  # d || z (FIPS 203 ML-KEM.KeyGen_internal inputs)
SHARED_SECRET_SIZE = 32


@dataclass(frozen=True)
class KemParams:
    name: str
    k: int  # module rank
    encapsulation_key_size: int
    ciphertext_size: int
    decapsulation_key_size: int  # expanded form (liboqs); openssl keeps only the seed


PARAMS = {
    "ML-KEM-768": KemParams("ML-KEM-768", 3, 1184, 1088, 2400),
    "ML-KEM-1024": KemParams("ML-KEM-1024", 4, 1568, 1568, 3168),
}

_Q = 3329


def encapsulation_key_is_canonical(ek: bytes, k: int) -> bool:
    """FIPS 203 §7.2 modulus check: every 12-bit coefficient of t̂ must be < q.

    OpenSSL does this itself; it is repeated for liboqs so both backends reject the
    same keys whatever liboqs version is installed.
    """
    poly_bytes = ek[: 384 * k]
    for i in range(0, len(poly_bytes), 3):
        b0, b1, b2 = poly_bytes[i], poly_bytes[i + 1], poly_bytes[i + 2]
        if (b0 | (b1 & 0x0F) << 8) >= _Q or (b1 >> 4 | b2 << 4) >= _Q:
            return False
    return True


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise PqcError(f"{what} must be bytes, got {type(value).__name__}")


class KemDecapsulationKey(ABC):
    """A private ML-KEM key. Holds secret state: never log it; the repr shows only
    the algorithm, backend and a hash of the public encapsulation key."""

    def __init__(self, kem: Kem, encapsulation_key: bytes) -> None:
        self._kem = kem
        self.encapsulation_key = encapsulation_key

    @property
    def name(self) -> str:
        return self._kem.name

    @property
    def backend(self) -> str:
        return self._kem.backend

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """Return the shared secret. A tampered ciphertext of the right length yields
        an unrelated secret (implicit rejection), not an error."""
        ct = _as_bytes(ciphertext, "ML-KEM ciphertext")
        if len(ct) != self._kem.ciphertext_size:
            raise PqcError(f"{self.name} ciphertext must be {self._kem.ciphertext_size} bytes, "
                           f"got {len(ct)}")
        return self._decapsulate(ct)

    @abstractmethod
    def _decapsulate(self, ciphertext: bytes) -> bytes: ...

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.encapsulation_key).hexdigest()[:16]
        return f"<KemDecapsulationKey {self.name} backend={self.backend} ek-sha256={digest}…>"

    def __reduce__(self) -> Any:
        # Pickling would copy the private key somewhere nobody meant it to go.
        raise TypeError("KemDecapsulationKey cannot be pickled")


class Kem(ABC):
    """One ML-KEM parameter set on one backend. Stateless; safe to share."""

    shared_secret_size = SHARED_SECRET_SIZE
    seed_size = SEED_SIZE

    def __init__(self, name: str, backend: str) -> None:
        params = PARAMS[name]
        self.name = name
        self.backend = backend
        self.encapsulation_key_size = params.encapsulation_key_size
        self.ciphertext_size = params.ciphertext_size
        self._params = params

    def generate(self) -> KemDecapsulationKey:
        """A fresh random key pair."""
        return self._generate()

    def from_seed(self, seed: bytes) -> KemDecapsulationKey:
        """The key pair FIPS 203 derives from the 64-byte seed d || z."""
        raw = _as_bytes(seed, "ML-KEM seed")
        if len(raw) != SEED_SIZE:
            raise PqcError(f"{self.name} seed must be {SEED_SIZE} bytes (d || z), got {len(raw)}")
        return self._from_seed(raw)

    def encapsulate(self, encapsulation_key: bytes) -> tuple[bytes, bytes]:
        """Encapsulate to the peer's key. Returns (ciphertext, shared_secret) — note
        the order differs from `cryptography`'s own (shared_secret, ciphertext)."""
        ek = _as_bytes(encapsulation_key, "ML-KEM encapsulation key")
        if len(ek) != self.encapsulation_key_size:
            raise PqcError(f"{self.name} encapsulation key must be "
                           f"{self.encapsulation_key_size} bytes, got {len(ek)}")
        return self._encapsulate(ek)

    @abstractmethod
    def _generate(self) -> KemDecapsulationKey: ...

    @abstractmethod
    def _from_seed(self, seed: bytes) -> KemDecapsulationKey: ...

    @abstractmethod
    def _encapsulate(self, ek: bytes) -> tuple[bytes, bytes]: ...

    def __repr__(self) -> str:
        return f"<Kem {self.name} backend={self.backend}>"


# --- openssl backend (the `cryptography` package) -------------------------------------

_OPENSSL_CLASSES: dict[str, tuple[Any, Any]] = {
    "ML-KEM-768": (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
    "ML-KEM-1024": (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
}


class _OpenSSLDecapsulationKey(KemDecapsulationKey):
    def __init__(self, kem: Kem, private_key: Any) -> None:
        super().__init__(kem, private_key.public_key().public_bytes_raw())
        self._private_key = private_key

    def _decapsulate(self, ciphertext: bytes) -> bytes:
        try:
            return bytes(self._private_key.decapsulate(ciphertext))
        except ValueError:
            # Only reachable for a malformed ciphertext; the length was checked already.
            raise PqcError(f"{self.name} ciphertext rejected by the backend") from None


class _OpenSSLKem(Kem):
    def __init__(self, name: str) -> None:
        super().__init__(name, "openssl")
        self._private_cls, self._public_cls = _OPENSSL_CLASSES[name]

    def _generate(self) -> KemDecapsulationKey:
        return _OpenSSLDecapsulationKey(self, self._private_cls.generate())

    def _from_seed(self, seed: bytes) -> KemDecapsulationKey:
        try:
            key = self._private_cls.from_seed_bytes(seed)
        except ValueError:
            raise PqcError(f"{self.name} seed rejected by the backend") from None
        return _OpenSSLDecapsulationKey(self, key)

    def _encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        try:
            public_key = self._public_cls.from_public_bytes(ek)
        except ValueError:
            # The length is right, so this is the FIPS 203 modulus check failing.
            raise PqcError(f"{self.name} encapsulation key is malformed (coefficients out "
                           "of range)") from None
        shared_secret, ciphertext = public_key.encapsulate()
        return bytes(ciphertext), bytes(shared_secret)
