"""`get_kem` / `get_mldsa`: a primitive by name on the chosen backend.

Kept apart from `pqc.kem` and `pqc.sig` so that the liboqs glue, which builds on those
two, is imported by this module alone and no import runs in a circle. Importing it
never imports `oqs` (only constructing a liboqs primitive does).
"""

from __future__ import annotations

from pqc._liboqs import LiboqsKem, LiboqsMlDsa
from pqc.backend import PqcError, resolve_backend
from pqc.kem import KEM_ALGORITHMS, PARAMS, Kem, _OpenSSLKem
from pqc.sig import MLDSA_ALGORITHMS, MLDSA_PARAMS, MlDsa, _OpenSSLMlDsa


def get_kem(name: str = "ML-KEM-768", backend: str = "auto") -> Kem:
    """The KEM `name` (one of KEM_ALGORITHMS) on `backend` (`auto|openssl|liboqs`)."""
    if name not in PARAMS:
        raise PqcError(f"unknown KEM {name!r}; use one of {', '.join(KEM_ALGORITHMS)}")
    if resolve_backend(backend) == "liboqs":
        return LiboqsKem(name)
    return _OpenSSLKem(name)


def get_mldsa(name: str = "ML-DSA-65", backend: str = "auto") -> MlDsa:
    """Raw-bytes ML-DSA `name` (one of MLDSA_ALGORITHMS) on `backend`."""
    if name not in MLDSA_PARAMS:
        raise PqcError(f"unknown ML-DSA parameter set {name!r}; "
                       f"use one of {', '.join(MLDSA_ALGORITHMS)}")
    if resolve_backend(backend) == "liboqs":
        return LiboqsMlDsa(name)
    return _OpenSSLMlDsa(name)
