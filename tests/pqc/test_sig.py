"""Signatures on `cryptography` key objects, and raw-bytes ML-DSA."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, mldsa, rsa

from pqc import (
    MLDSA_ALGORITHMS,
    SIG_ALGORITHMS,
    PqcError,
    algorithm_of_private_key,
    algorithm_of_public_key,
    generate_private_key,
    get_mldsa,
    sign,
    verify,
)

MESSAGE = b"transcript hash \x00\x01\x02"


@pytest.fixture(scope="module", params=SIG_ALGORITHMS)
def keypair(request: pytest.FixtureRequest) -> tuple[str, object]:
    return request.param, generate_private_key(request.param)


def test_sign_verify(keypair: tuple[str, object]) -> None:
    algorithm, private_key = keypair
    public_key = private_key.public_key()  # type: ignore[attr-defined]
    assert algorithm_of_public_key(public_key) == algorithm
    assert algorithm_of_private_key(private_key) == algorithm
    signature = sign(private_key, MESSAGE)
    assert verify(public_key, signature, MESSAGE)
    assert not verify(public_key, signature, MESSAGE + b"x")
    flipped = bytearray(signature)
    flipped[len(flipped) // 2] ^= 0x01
    assert not verify(public_key, bytes(flipped), MESSAGE)


def test_other_key_rejects(keypair: tuple[str, object]) -> None:
    algorithm, private_key = keypair
    other = generate_private_key(algorithm).public_key()
    assert not verify(other, sign(private_key, MESSAGE), MESSAGE)


@pytest.mark.parametrize("signature", [b"", b"\x00", b"\x30\x03\x02\x01", b"\xff" * 5000])
def test_garbage_signature_returns_false(keypair: tuple[str, object], signature: bytes) -> None:
    _, private_key = keypair
    assert verify(private_key.public_key(), signature, MESSAGE) is False  # type: ignore[attr-defined]


def test_non_bytes_signature_returns_false(keypair: tuple[str, object]) -> None:
    _, private_key = keypair
    assert verify(private_key.public_key(), "sig", MESSAGE) is False  # type: ignore[arg-type,attr-defined]


def test_mldsa_is_pure_with_empty_context() -> None:
    private_key = mldsa.MLDSA65PrivateKey.generate()
    signature = sign(private_key, MESSAGE)
    private_key.public_key().verify(signature, MESSAGE, b"")  # raises if not
    raw = get_mldsa("ML-DSA-65")
    public = private_key.public_key().public_bytes_raw()
    assert raw.verify(public, signature, MESSAGE, b"")
    assert not raw.verify(public, signature, MESSAGE, b"ctx")


def test_ecdsa_uses_sha256() -> None:
    from cryptography.hazmat.primitives import hashes

    private_key = ec.generate_private_key(ec.SECP256R1())
    signature = sign(private_key, MESSAGE)
    private_key.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("factory", [
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: ed448.Ed448PrivateKey.generate(),
    lambda: rsa.generate_private_key(65537, 1024),
])
def test_unsupported_key_types_raise(factory) -> None:  # type: ignore[no-untyped-def]
    private_key = factory()
    with pytest.raises(PqcError, match="unsupported signature key type"):
        algorithm_of_public_key(private_key.public_key())
    with pytest.raises(PqcError, match="unsupported signature key type"):
        sign(private_key, MESSAGE)
    with pytest.raises(PqcError, match="unsupported signature key type"):
        verify(private_key.public_key(), b"sig", MESSAGE)


def test_generate_unknown_algorithm() -> None:
    with pytest.raises(PqcError, match="unknown signature algorithm"):
        generate_private_key("RSA-2048")


@pytest.mark.parametrize("name", MLDSA_ALGORITHMS)
def test_raw_mldsa_roundtrip(name: str) -> None:
    scheme = get_mldsa(name)
    key = scheme.generate()
    assert len(key.public_key) == scheme.public_key_size
    signature = key.sign(MESSAGE, b"qkdgw")
    assert len(signature) == scheme.signature_size
    assert scheme.verify(key.public_key, signature, MESSAGE, b"qkdgw")
    assert not scheme.verify(key.public_key, signature, MESSAGE)
    assert not scheme.verify(key.public_key, signature[:-1], MESSAGE, b"qkdgw")
    assert not scheme.verify(key.public_key, b"", MESSAGE, b"qkdgw")


def test_raw_mldsa_input_errors() -> None:
    scheme = get_mldsa("ML-DSA-44")
    key = scheme.from_seed(bytes(32))
    assert "ML-DSA-44" in repr(key) and bytes(32).hex() not in repr(key)
    with pytest.raises(PqcError, match="seed must be 32 bytes"):
        scheme.from_seed(bytes(31))
    with pytest.raises(PqcError, match="context must be at most 255 bytes"):
        key.sign(MESSAGE, bytes(256))
    with pytest.raises(PqcError, match="context must be at most 255 bytes"):
        scheme.verify(key.public_key, bytes(scheme.signature_size), MESSAGE, bytes(256))
    with pytest.raises(PqcError, match="public key must be 1312 bytes"):
        scheme.verify(key.public_key[:-1], bytes(scheme.signature_size), MESSAGE)
    with pytest.raises(PqcError, match="unknown ML-DSA parameter set"):
        get_mldsa("ML-DSA-128")
