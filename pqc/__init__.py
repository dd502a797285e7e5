"""Post-quantum primitives behind one small interface.

`pqc.kem` (ML-KEM), `pqc.sig` (ML-DSA, Ed25519, ECDSA P-256) and backend selection
(`pqc.backend`: `openssl` via the `cryptography` package, always present; `liboqs` when
its shared library is installed). Importing this package never imports `oqs`.
"""

from pqc.backend import (
    BACKENDS,
    PqcError,
    available_backends,
    liboqs_available,
    resolve_backend,
)
from pqc.factory import get_kem, get_mldsa
from pqc.kem import KEM_ALGORITHMS, Kem, KemDecapsulationKey
from pqc.sig import (
    MLDSA_ALGORITHMS,
    SIG_ALGORITHMS,
    MlDsa,
    MlDsaSigningKey,
    algorithm_of_private_key,
    algorithm_of_public_key,
    generate_private_key,
    sign,
    verify,
)

__all__ = [
    "BACKENDS",
    "KEM_ALGORITHMS",
    "MLDSA_ALGORITHMS",
    "SIG_ALGORITHMS",
    "Kem",
    "KemDecapsulationKey",
    "MlDsa",
    "MlDsaSigningKey",
    "PqcError",
    "algorithm_of_private_key",
    "algorithm_of_public_key",
    "available_backends",
    "generate_private_key",
    "get_kem",
    "get_mldsa",
    "liboqs_available",
    "resolve_backend",
    "sign",
    "verify",
]
