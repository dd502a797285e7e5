"""ML-KEM interface behaviour on the default backend."""

from __future__ import annotations

import pickle

import pytest

from pqc import KEM_ALGORITHMS, Kem, KemDecapsulationKey, PqcError, get_kem
from pqc.kem import PARAMS, encapsulation_key_is_canonical


@pytest.fixture(params=KEM_ALGORITHMS)
def kem(request: pytest.FixtureRequest) -> Kem:
    return get_kem(request.param)


def test_default_is_mlkem768_on_openssl() -> None:
    kem = get_kem()
    assert (kem.name, kem.backend) == ("ML-KEM-768", "openssl")
    assert get_kem(backend="openssl").backend == "openssl"


def test_roundtrip_and_sizes(kem: Kem) -> None:
    dk = kem.generate()
    assert isinstance(dk, KemDecapsulationKey)
    assert len(dk.encapsulation_key) == kem.encapsulation_key_size
    ciphertext, secret = kem.encapsulate(dk.encapsulation_key)
    assert len(ciphertext) == kem.ciphertext_size
    assert len(secret) == kem.shared_secret_size == 32
    assert dk.decapsulate(ciphertext) == secret
    # Fresh randomness per encapsulation.
    assert kem.encapsulate(dk.encapsulation_key) != (ciphertext, secret)


def test_sizes_match_fips203() -> None:
    assert (get_kem("ML-KEM-768").encapsulation_key_size, get_kem("ML-KEM-768").ciphertext_size
            ) == (1184, 1088)
    assert (get_kem("ML-KEM-1024").encapsulation_key_size, get_kem("ML-KEM-1024").ciphertext_size
            ) == (1568, 1568)


def test_from_seed_is_deterministic(kem: Kem) -> None:
    seed = bytes(range(64))
    a, b = kem.from_seed(seed), kem.from_seed(bytearray(seed))
    assert a.encapsulation_key == b.encapsulation_key
    assert kem.from_seed(bytes(64)).encapsulation_key != a.encapsulation_key
    ciphertext, secret = kem.encapsulate(a.encapsulation_key)
    assert b.decapsulate(ciphertext) == secret


@pytest.mark.parametrize("size", [0, 32, 63, 65])
def test_bad_seed_length(kem: Kem, size: int) -> None:
    with pytest.raises(PqcError, match="seed must be 64 bytes"):
        kem.from_seed(bytes(size))


@pytest.mark.parametrize("delta", [-1, 1, -100])
def test_encapsulation_key_wrong_length(kem: Kem, delta: int) -> None:
    ek = kem.generate().encapsulation_key
    bad = ek[:delta] if delta < 0 else ek + b"\x00" * delta
    expected = f"encapsulation key must be {len(ek)} bytes, got {len(bad)}"
    with pytest.raises(PqcError, match=expected):
        kem.encapsulate(bad)


def test_encapsulation_key_out_of_range_coefficient(kem: Kem) -> None:
    ek = bytearray(kem.generate().encapsulation_key)
    ek[0], ek[1] = 0xFF, ek[1] | 0x0F  # first coefficient = 4095 >= q
    with pytest.raises(PqcError, match="malformed"):
        kem.encapsulate(bytes(ek))


def test_encapsulation_key_not_bytes(kem: Kem) -> None:
    with pytest.raises(PqcError, match="must be bytes"):
        kem.encapsulate("00" * kem.encapsulation_key_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("delta", [-1, 1])
def test_ciphertext_wrong_length(kem: Kem, delta: int) -> None:
    dk = kem.generate()
    ciphertext, _ = kem.encapsulate(dk.encapsulation_key)
    bad = ciphertext[:delta] if delta < 0 else ciphertext + b"\x00"
    with pytest.raises(PqcError, match=f"ciphertext must be {len(ciphertext)} bytes"):
        dk.decapsulate(bad)


def test_wrong_key_gives_different_secret_without_error(kem: Kem) -> None:
    ciphertext, secret = kem.encapsulate(kem.generate().encapsulation_key)
    other = kem.generate()
    assert other.decapsulate(ciphertext) != secret


def test_repr_shows_no_secret(kem: Kem) -> None:
    seed = bytes(range(64))
    dk = kem.from_seed(seed)
    text = repr(dk) + str(dk)
    assert kem.name in text and "openssl" in text
    assert seed.hex()[:16] not in text
    assert dk.encapsulation_key.hex()[:16] not in text  # only a hash of it


def test_decapsulation_key_cannot_be_pickled(kem: Kem) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(kem.generate())


def test_unknown_algorithm_and_backend() -> None:
    with pytest.raises(PqcError, match="unknown KEM 'ML-KEM-512'"):
        get_kem("ML-KEM-512")
    with pytest.raises(PqcError, match="unknown PQC backend 'oqs'"):
        get_kem("ML-KEM-768", backend="oqs")


def test_canonical_check_matches_fips203_bounds() -> None:
    k = PARAMS["ML-KEM-768"].k
    ek = get_kem().generate().encapsulation_key
    assert encapsulation_key_is_canonical(ek, k)
    # Coefficient 3328 (q - 1) is allowed, 3329 is not; test both halves of a 3-byte pair.
    low_max = bytes([0x00, 0x0D]) + ek[2:]  # first coeff = 0xD00 = 3328
    assert encapsulation_key_is_canonical(low_max, k)
    low_q = bytes([0x01, 0x0D]) + ek[2:]  # 0xD01 = 3329
    assert not encapsulation_key_is_canonical(low_q, k)
    high_q = ek[:1] + bytes([(ek[1] & 0x0F) | 0x10, 0xD0]) + ek[3:]  # second coeff = 0xD01
    assert not encapsulation_key_is_canonical(high_q, k)
    # The trailing 32-byte rho is not coefficient data.
    assert encapsulation_key_is_canonical(ek[:-32] + b"\xff" * 32, k)
