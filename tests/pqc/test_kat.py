"""NIST known-answer tests (from `cryptography-vectors`) for every PQC backend.

All vectors of each file run: they take well under a second on the openssl backend.
"""

from __future__ import annotations

import pytest

from pqc import get_kem, get_mldsa
from pqc.backend import probe_liboqs
from tests.support.pqc_vectors import mldsa_vectors, mlkem_vectors

_LIBOQS = probe_liboqs()
BACKENDS = [
    "openssl",
    pytest.param("liboqs", marks=[
        pytest.mark.liboqs,
        pytest.mark.skipif(not _LIBOQS.usable,
                           reason=f"liboqs backend unavailable: {_LIBOQS.reason}"),
    ]),
]


def _flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [768, 1024])
def test_mlkem_kat(backend: str, level: int) -> None:
    kem = get_kem(f"ML-KEM-{level}", backend)
    vectors = mlkem_vectors(level)
    assert len(vectors) == 1000
    for vec in vectors:
        n = vec["count"]
        dk = kem.from_seed(vec["d"] + vec["z"])  # FIPS 203 seed order: d || z
        assert dk.encapsulation_key == vec["pk"], f"keygen, count {n}"
        assert dk.decapsulate(vec["ct"]) == vec["ss"], f"decaps, count {n}"
        # Implicit rejection: the file's invalid ciphertext gives its J(z || ct) secret.
        assert dk.decapsulate(vec["ct_n"]) == vec["ss_n"], f"implicit rejection, count {n}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlkem_modified_ciphertext_gives_other_secret(backend: str) -> None:
    kem = get_kem("ML-KEM-768", backend)
    for vec in mlkem_vectors(768)[:20]:
        dk = kem.from_seed(vec["d"] + vec["z"])
        for index in (0, len(vec["ct"]) // 2, len(vec["ct"]) - 1):
            secret = dk.decapsulate(_flip_bit(vec["ct"], index))
            assert len(secret) == 32
            assert secret != vec["ss"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [44, 65, 87])
def test_mldsa_kat(backend: str, level: int) -> None:
    scheme = get_mldsa(f"ML-DSA-{level}", backend)
    vectors = mldsa_vectors(level)
    assert len(vectors) == 100
    for vec in vectors:
        n = vec["count"]
        # The file's sm is signature || message.
        assert vec["smlen"] == scheme.signature_size + vec["mlen"]
        signature, message = vec["sm"][: scheme.signature_size], vec["sm"][scheme.signature_size:]
        assert message == vec["msg"]
        if backend == "openssl":
            # liboqs-python offers no ML-DSA keygen from a seed.
            assert scheme.from_seed(vec["xi"]).public_key == vec["pk"], f"keygen, count {n}"
        assert scheme.verify(vec["pk"], signature, message, vec["ctx"]), f"verify, count {n}"
        assert not scheme.verify(vec["pk"], _flip_bit(signature, n % len(signature)), message,
                                 vec["ctx"]), f"flipped signature bit, count {n}"
        assert not scheme.verify(vec["pk"], signature, _flip_bit(message, 0), vec["ctx"])
        assert not scheme.verify(vec["pk"], signature, message, b""), "context must matter"


@pytest.mark.liboqs
@pytest.mark.skipif(not _LIBOQS.usable, reason=f"liboqs backend unavailable: {_LIBOQS.reason}")
@pytest.mark.parametrize("level", [44, 65, 87])
def test_mldsa_liboqs_signs_with_kat_secret_key(level: int) -> None:
    from pqc._liboqs import LiboqsMlDsa

    liboqs = get_mldsa(f"ML-DSA-{level}", "liboqs")
    assert isinstance(liboqs, LiboqsMlDsa)
    openssl = get_mldsa(f"ML-DSA-{level}", "openssl")
    for vec in mldsa_vectors(level)[:10]:
        key = liboqs.from_expanded_secret_key(vec["sk"], vec["pk"])
        signature = key.sign(vec["msg"], vec["ctx"])
        assert openssl.verify(vec["pk"], signature, vec["msg"], vec["ctx"])
