"""A stand-in for liboqs-python's `oqs` module, for machines without liboqs.

It follows liboqs-python 0.14+'s documented API (KeyEncapsulation, Signature, their
`details`, `create_string_buffer` padding of short inputs and rejection of long ones,
RuntimeError on failure) on top of `cryptography`, so the tests exercise the glue in
`pqc._liboqs` — argument order, tuple order, length handling, freeing. It is not a
test of liboqs itself: the `liboqs`-marked tests do that where the library exists.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

# What the loader saw: the tests check pqc.backend set it before importing us.
LOADED_WITH_INSTALL_PATH = os.environ.get("OQS_INSTALL_PATH")
freed: list[str] = []


class MechanismNotSupportedError(Exception):
    def __init__(self, alg_name: str) -> None:
        self.alg_name = alg_name
        self.message = f"{alg_name} is not supported by OQS"


_KEMS: dict[str, tuple[Any, Any, int, int, int]] = {
    "ML-KEM-768": (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey, 1184, 2400, 1088),
    "ML-KEM-1024": (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey, 1568, 3168, 1568),
}
_SIGS: dict[str, tuple[Any, Any, int, int, int]] = {
    "ML-DSA-44": (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey, 1312, 2560, 2420),
    "ML-DSA-65": (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey, 1952, 4032, 3309),
    "ML-DSA-87": (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey, 2592, 4896, 4627),
}


def _string_buffer(data: bytes, size: int) -> bytes:
    # ctypes.create_string_buffer(data, size): long input raises, short input is padded.
    if len(data) > size:
        raise ValueError("byte string too long")
    return bytes(data) + bytes(size - len(data))


class KeyEncapsulation:
    def __init__(self, alg_name: str, secret_key: bytes | None = None) -> None:
        if alg_name not in _KEMS:
            raise MechanismNotSupportedError(alg_name)
        self.alg_name = alg_name
        self._priv, self._pub, pk, sk, ct = _KEMS[alg_name]
        self.details = {"name": alg_name, "length_public_key": pk, "length_secret_key": sk,
                        "length_ciphertext": ct, "length_shared_secret": 32,
                        "length_keypair_seed": 64}
        self._key: Any = None

    def __enter__(self) -> KeyEncapsulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def generate_keypair(self) -> bytes:
        self._key = self._priv.generate()
        return self._key.public_key().public_bytes_raw()

    def generate_keypair_seed(self, seed: bytes) -> bytes:
        if len(seed) != 64:
            raise ValueError(f"Seed length must be 64 bytes, got {len(seed)} bytes")
        self._key = self._priv.from_seed_bytes(seed)
        return self._key.public_key().public_bytes_raw()

    def encap_secret(self, public_key: bytes) -> tuple[bytes, bytes]:
        data = _string_buffer(public_key, self.details["length_public_key"])
        try:
            shared_secret, ciphertext = self._pub.from_public_bytes(data).encapsulate()
        except ValueError:
            raise RuntimeError("Can not encapsulate secret") from None
        return ciphertext, shared_secret

    def decap_secret(self, ciphertext: bytes) -> bytes:
        return self._key.decapsulate(_string_buffer(ciphertext, self.details["length_ciphertext"]))

    def free(self) -> None:
        freed.append(self.alg_name)


class Signature:
    def __init__(self, alg_name: str, secret_key: bytes | None = None) -> None:
        if alg_name not in _SIGS:
            raise MechanismNotSupportedError(alg_name)
        if secret_key is not None:
            raise NotImplementedError("the fake cannot load expanded ML-DSA secret keys")
        self.alg_name = alg_name
        self._priv, self._pub, pk, sk, sig = _SIGS[alg_name]
        self.details = {"name": alg_name, "length_public_key": pk, "length_secret_key": sk,
                        "length_signature": sig}
        self._key: Any = None

    def __enter__(self) -> Signature:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def generate_keypair(self) -> bytes:
        self._key = self._priv.generate()
        return self._key.public_key().public_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def sign_with_ctx_str(self, message: bytes, context: bytes) -> bytes:
        return self._key.sign(message, context)

    def verify(self, message: bytes, signature: bytes, public_key: bytes) -> bool:
        return self.verify_with_ctx_str(message, signature, b"", public_key)

    def verify_with_ctx_str(self, message: bytes, signature: bytes, context: bytes,
                            public_key: bytes) -> bool:
        key = self._pub.from_public_bytes(_string_buffer(public_key,
                                                         self.details["length_public_key"]))
        try:
            key.verify(signature, message, context)
        except InvalidSignature:
            return False
        return True

    def free(self) -> None:
        freed.append(self.alg_name)
