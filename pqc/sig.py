"""Signatures for the handshake: ML-DSA (FIPS 204), plus Ed25519 and ECDSA P-256 for
operators whose PKI requires a classical algorithm.

Two layers:

* `sign` / `verify` / `algorithm_of_public_key` work on `cryptography` key objects,
  i.e. the keys that come out of X.509 certificates and PKCS#8 files. ML-DSA is used
  in its pure form with an empty context; ECDSA P-256 with SHA-256.
* `pqc.get_mldsa(name, backend)` (in `pqc.factory`) is raw-bytes ML-DSA on either
  backend (`openssl` or `liboqs`), used for known-answer tests and cross-backend checks.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from pqc.backend import PqcError

SIG_ALGORITHMS = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87", "Ed25519", "ECDSA-P256")
MLDSA_ALGORITHMS = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")

MLDSA_SEED_SIZE = 32  # xi
MAX_CONTEXT_SIZE = 255  # FIPS 204: ctx is at most 255 bytes


@dataclass(frozen=True)
class MlDsaParams:
    name: str
    public_key_size: int
    signature_size: int
    secret_key_size: int  # expanded form (liboqs); openssl keeps only the seed


MLDSA_PARAMS = {
    "ML-DSA-44": MlDsaParams("ML-DSA-44", 1312, 2420, 2560),
    "ML-DSA-65": MlDsaParams("ML-DSA-65", 1952, 3309, 4032),
    "ML-DSA-87": MlDsaParams("ML-DSA-87", 2592, 4627, 4896),
}

_MLDSA_CLASSES: dict[str, tuple[Any, Any]] = {
    "ML-DSA-44": (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
    "ML-DSA-65": (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
    "ML-DSA-87": (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
}

_ECDSA_P256 = ec.ECDSA(hashes.SHA256())


def _algorithm_of(key: Any, private: bool) -> str | None:
    index = 0 if private else 1
    for name, classes in _MLDSA_CLASSES.items():
        if isinstance(key, classes[index]):
            return name
    ed_cls = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if isinstance(key, ed_cls):
        return "Ed25519"
    ec_cls = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if isinstance(key, ec_cls) and isinstance(key.curve, ec.SECP256R1):
        return "ECDSA-P256"
    return None


def _describe(key: Any) -> str:
    curve = getattr(key, "curve", None)
    return type(key).__name__ + (f" ({curve.name})" if curve is not None else "")


def algorithm_of_public_key(pub: Any) -> str:
    """The SIG_ALGORITHMS name of a `cryptography` public key; PqcError if unsupported."""
    name = _algorithm_of(pub, private=False)
    if name is None:
        raise PqcError(f"unsupported signature key type {_describe(pub)}; "
                       f"use one of {', '.join(SIG_ALGORITHMS)}")
    return name


def algorithm_of_private_key(private_key: Any) -> str:
    """The SIG_ALGORITHMS name of a `cryptography` private key; PqcError if unsupported."""
    name = _algorithm_of(private_key, private=True)
    if name is None:
        raise PqcError(f"unsupported signature key type {_describe(private_key)}; "
                       f"use one of {', '.join(SIG_ALGORITHMS)}")
    return name


def generate_private_key(algorithm: str) -> Any:
    """A new `cryptography` private key for one of SIG_ALGORITHMS."""
    if algorithm in _MLDSA_CLASSES:
        return _MLDSA_CLASSES[algorithm][0].generate()
    if algorithm == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ECDSA-P256":
        return ec.generate_private_key(ec.SECP256R1())
    raise PqcError(f"unknown signature algorithm {algorithm!r}; "
                   f"use one of {', '.join(SIG_ALGORITHMS)}")


def sign(private_key: Any, message: bytes) -> bytes:
    """Sign `message` with a `cryptography` private key (ML-DSA pure with an empty
    context, Ed25519, or ECDSA P-256 with SHA-256, DER-encoded)."""
    algorithm = algorithm_of_private_key(private_key)
    if algorithm == "ECDSA-P256":
        return private_key.sign(message, _ECDSA_P256)
    return private_key.sign(message)


def verify(public_key: Any, signature: bytes, message: bytes) -> bool:
    """True iff `signature` is valid for `message` under `public_key`.

    A bad or malformed signature returns False and never raises; an unsupported key
    type raises PqcError (that is a configuration problem, not a forged message).
    """
    algorithm = algorithm_of_public_key(public_key)
    if not isinstance(signature, bytes | bytearray | memoryview):
        return False
    try:
        if algorithm == "ECDSA-P256":
            public_key.verify(signature, message, _ECDSA_P256)
        else:
            public_key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- raw-bytes ML-DSA over either backend ----------------------------------------------


def _check_context(context: bytes) -> bytes:
    if not isinstance(context, bytes | bytearray | memoryview):
        raise PqcError(f"ML-DSA context must be bytes, got {type(context).__name__}")
    if len(context) > MAX_CONTEXT_SIZE:
        raise PqcError(f"ML-DSA context must be at most {MAX_CONTEXT_SIZE} bytes, "
                       f"got {len(context)}")
    return bytes(context)


class MlDsaSigningKey(ABC):
    """A private ML-DSA key as raw bytes API. The repr shows no secret."""

    def __init__(self, scheme: MlDsa, public_key: bytes) -> None:
        self._scheme = scheme
        self.public_key = public_key

    @property
    def name(self) -> str:
        return self._scheme.name

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        return self._sign(bytes(message), _check_context(context))

    @abstractmethod
    def _sign(self, message: bytes, context: bytes) -> bytes: ...

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.public_key).hexdigest()[:16]
        return (f"<MlDsaSigningKey {self.name} backend={self._scheme.backend} "
                f"pk-sha256={digest}…>")

    def __reduce__(self) -> Any:
        raise TypeError("MlDsaSigningKey cannot be pickled")


class MlDsa(ABC):
    """One ML-DSA parameter set on one backend (pure ML-DSA, context string allowed)."""

    seed_size = MLDSA_SEED_SIZE

    def __init__(self, name: str, backend: str) -> None:
        params = MLDSA_PARAMS[name]
        self.name = name
        self.backend = backend
        self.public_key_size = params.public_key_size
        self.signature_size = params.signature_size

    def generate(self) -> MlDsaSigningKey:
        return self._generate()

    def from_seed(self, seed: bytes) -> MlDsaSigningKey:
        """The key pair FIPS 204 ML-DSA.KeyGen_internal derives from the 32-byte xi."""
        if not isinstance(seed, bytes | bytearray | memoryview) or len(seed) != MLDSA_SEED_SIZE:
            size = len(seed) if isinstance(seed, bytes | bytearray | memoryview) else "?"
            raise PqcError(f"{self.name} seed must be {MLDSA_SEED_SIZE} bytes, got {size}")
        return self._from_seed(bytes(seed))

    def verify(self, public_key: bytes, signature: bytes, message: bytes,
               context: bytes = b"") -> bool:
        """True iff valid. Malformed signatures return False; a public key of the wrong
        size or a bad context raises PqcError (the caller's bug, not the peer's)."""
        if not isinstance(public_key, bytes | bytearray | memoryview) or (
            len(public_key) != self.public_key_size
        ):
            raise PqcError(f"{self.name} public key must be {self.public_key_size} bytes")
        ctx = _check_context(context)
        if not isinstance(signature, bytes | bytearray | memoryview) or (
            len(signature) != self.signature_size
        ):
            return False
        return self._verify(bytes(public_key), bytes(signature), bytes(message), ctx)

    @abstractmethod
    def _generate(self) -> MlDsaSigningKey: ...

    @abstractmethod
    def _from_seed(self, seed: bytes) -> MlDsaSigningKey: ...

    @abstractmethod
    def _verify(self, public_key: bytes, signature: bytes, message: bytes,
                context: bytes) -> bool: ...

    def __repr__(self) -> str:
        return f"<MlDsa {self.name} backend={self.backend}>"


class _OpenSSLSigningKey(MlDsaSigningKey):
    def __init__(self, scheme: MlDsa, private_key: Any) -> None:
        super().__init__(scheme, private_key.public_key().public_bytes_raw())
        self._private_key = private_key

    def _sign(self, message: bytes, context: bytes) -> bytes:
        return self._private_key.sign(message, context)


class _OpenSSLMlDsa(MlDsa):
    def __init__(self, name: str) -> None:
        super().__init__(name, "openssl")
        self._private_cls, self._public_cls = _MLDSA_CLASSES[name]

    def _generate(self) -> MlDsaSigningKey:
        return _OpenSSLSigningKey(self, self._private_cls.generate())

    def _from_seed(self, seed: bytes) -> MlDsaSigningKey:
        return _OpenSSLSigningKey(self, self._private_cls.from_seed_bytes(seed))

    def _verify(self, public_key: bytes, signature: bytes, message: bytes,
                context: bytes) -> bool:
        try:
            key = self._public_cls.from_public_bytes(public_key)
        except ValueError:
            raise PqcError(f"{self.name} public key is malformed") from None
        try:
            key.verify(signature, message, context)
        except InvalidSignature:
            return False
        return True
