"""The optional liboqs backend (liboqs-python >= 0.14).

Imported by `pqc.factory`; `oqs` itself only when a primitive is built, through
`pqc.backend.import_oqs`, so the module imports (for type checks, tests) on machines
without liboqs.

liboqs-python copies inputs with `ctypes.create_string_buffer(data, size)`, which
silently zero-pads short inputs and raises on long ones; the generic layer in
`pqc.kem` / `pqc.sig` checks every length before anything reaches it.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from pqc.backend import PqcError, import_oqs
from pqc.kem import PARAMS, Kem, KemDecapsulationKey, encapsulation_key_is_canonical
from pqc.sig import MLDSA_PARAMS, MlDsa, MlDsaSigningKey


def _free(native: Any) -> None:
    # free() cleanses the secret key buffer before releasing the C struct; best effort,
    # since finalizers can run at interpreter shutdown.
    with contextlib.suppress(Exception):
        native.free()


def _new(factory: Any, name: str, *args: Any) -> Any:
    try:
        return factory(name, *args)
    except Exception as exc:  # MechanismNotSupportedError / NotEnabled don't subclass ValueError
        raise PqcError(f"liboqs does not provide {name} ({type(exc).__name__}); "
                       "rebuild liboqs with it enabled or use backend 'openssl'") from None


class _LiboqsDecapsulationKey(KemDecapsulationKey):
    def __init__(self, kem: Kem, native: Any, encapsulation_key: bytes) -> None:
        super().__init__(kem, encapsulation_key)
        self._native = native
        self._finalizer = weakref.finalize(self, _free, native)

    def _decapsulate(self, ciphertext: bytes) -> bytes:
        try:
            return bytes(self._native.decap_secret(ciphertext))
        except RuntimeError:
            raise PqcError(f"{self.name} ciphertext rejected by liboqs") from None


class LiboqsKem(Kem):
    def __init__(self, name: str) -> None:
        super().__init__(name, "liboqs")
        self._oqs = import_oqs()
        probe = _new(self._oqs.KeyEncapsulation, name)
        try:
            # Cross-check the library's sizes against FIPS 203 before trusting it.
            details = probe.details
            params = PARAMS[name]
            expected = (params.encapsulation_key_size, params.ciphertext_size,
                        params.decapsulation_key_size, self.shared_secret_size)
            actual = (details["length_public_key"], details["length_ciphertext"],
                      details["length_secret_key"], details["length_shared_secret"])
            if actual != expected:
                raise PqcError(f"liboqs {name} has unexpected sizes {actual}; expected "
                               f"{expected} (fix: upgrade liboqs)")
            self._has_seed_keygen = hasattr(probe, "generate_keypair_seed") and int(
                details.get("length_keypair_seed", 0)
            ) == self.seed_size
        finally:
            probe.free()

    def _generate(self) -> KemDecapsulationKey:
        native = _new(self._oqs.KeyEncapsulation, self.name)
        try:
            ek = bytes(native.generate_keypair())
        except Exception:
            native.free()
            raise
        return _LiboqsDecapsulationKey(self, native, ek)

    def _from_seed(self, seed: bytes) -> KemDecapsulationKey:
        if not self._has_seed_keygen:
            raise PqcError(f"the installed liboqs cannot derive {self.name} keys from a seed "
                           "(fix: upgrade to liboqs and liboqs-python >= 0.14)")
        native = _new(self._oqs.KeyEncapsulation, self.name)
        try:
            # liboqs's keypair_derand takes the FIPS 203 d || z order; checked by the KATs.
            ek = bytes(native.generate_keypair_seed(seed))
        except Exception:
            native.free()
            raise
        return _LiboqsDecapsulationKey(self, native, ek)

    def _encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        if not encapsulation_key_is_canonical(ek, self._params.k):
            raise PqcError(f"{self.name} encapsulation key is malformed (coefficients out "
                           "of range)")
        with _new(self._oqs.KeyEncapsulation, self.name) as native:
            try:
                ciphertext, shared_secret = native.encap_secret(ek)
            except RuntimeError:
                raise PqcError(f"{self.name} encapsulation key rejected by liboqs") from None
        return bytes(ciphertext), bytes(shared_secret)


class _LiboqsSigningKey(MlDsaSigningKey):
    def __init__(self, scheme: MlDsa, native: Any, public_key: bytes) -> None:
        super().__init__(scheme, public_key)
        self._native = native
        self._finalizer = weakref.finalize(self, _free, native)

    def _sign(self, message: bytes, context: bytes) -> bytes:
        try:
            if context:
                return bytes(self._native.sign_with_ctx_str(message, context))
            return bytes(self._native.sign(message))
        except RuntimeError:
            raise PqcError(f"liboqs failed to sign with {self.name}") from None


class LiboqsMlDsa(MlDsa):
    def __init__(self, name: str) -> None:
        super().__init__(name, "liboqs")
        self._oqs = import_oqs()
        probe = _new(self._oqs.Signature, name)
        try:
            details = probe.details
            params = MLDSA_PARAMS[name]
            expected = (params.public_key_size, params.signature_size, params.secret_key_size)
            actual = (details["length_public_key"], details["length_signature"],
                      details["length_secret_key"])
            if actual != expected:
                raise PqcError(f"liboqs {name} has unexpected sizes {actual}; expected "
                               f"{expected} (fix: upgrade liboqs)")
        finally:
            probe.free()

    def _generate(self) -> MlDsaSigningKey:
        native = _new(self._oqs.Signature, self.name)
        try:
            public_key = bytes(native.generate_keypair())
        except Exception:
            native.free()
            raise
        return _LiboqsSigningKey(self, native, public_key)

    def _from_seed(self, seed: bytes) -> MlDsaSigningKey:
        raise PqcError("liboqs-python cannot derive ML-DSA keys from a seed "
                       "(fix: use backend 'openssl' for seeded keys)")

    def from_expanded_secret_key(self, secret_key: bytes, public_key: bytes) -> MlDsaSigningKey:
        """A signing key from liboqs's expanded secret key (FIPS 204 skEncode form)."""
        params = MLDSA_PARAMS[self.name]
        if len(secret_key) != params.secret_key_size or len(public_key) != params.public_key_size:
            raise PqcError(f"{self.name} expanded secret key must be {params.secret_key_size} "
                           f"bytes and public key {params.public_key_size} bytes")
        native = _new(self._oqs.Signature, self.name, bytes(secret_key))
        return _LiboqsSigningKey(self, native, bytes(public_key))

    def _verify(self, public_key: bytes, signature: bytes, message: bytes,
                context: bytes) -> bool:
        with _new(self._oqs.Signature, self.name) as native:
            try:
                if context:
                    return bool(native.verify_with_ctx_str(message, signature, context,
                                                           public_key))
                return bool(native.verify(message, signature, public_key))
            except RuntimeError:
                return False
