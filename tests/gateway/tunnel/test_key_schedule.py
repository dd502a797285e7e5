"""The hybrid key combiner: a committed vector, an independent recomputation, and the
property that every input reaches every output."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from gateway.tunnel.key_schedule import (
    INITIAL_SALT,
    LABEL_CHAIN_KEY,
    HybridKeySchedule,
    record_key_iv,
)

SS = bytes(range(32))
K_QKD = bytes(range(100, 134))
TH_HELLO = bytes.fromhex("11" * 48)
TH_FINAL = bytes.fromhex("22" * 48)

# Committed test vector: salt = INITIAL_SALT (first session), the inputs above.
VECTOR = {
    "initiator_confirm": "486398fb2a07f2da3457a44ebe8f616fbf5d9d3990c4b7476699c9a00aa4c94a"
                         "e3adb71d9b1b5ec59c2bfe9e510833f8",
    "responder_confirm": "62a23e26815c92a6f1b09cb09eda3f81143296621aa5aba9b08a79743afc437a"
                         "63c3aaaf1a23383facc1890c6b40e383",
    "i2r_traffic": "a5f218aa9353407596e9789764ffe003278c23fa857a77dad61494de5cf8698b"
                   "66907f81646b232d46d42a012915c65e",
    "r2i_traffic": "9c5964058a1ec7992b28dac55e7424f9a508426999b7b71f3b69e0c0869cfd26"
                   "3b0fdfcfe1ac171b4a18fa60a72740b2",
    "chain_key": "8de46d492f9e468b028990f7ffdb352facb255d284e4716bda114d28463dd99c"
                 "eba1b723bf9f7f3beba5feff6b4bfea7",
    "next_psk": "c5c6e44e7bca7180234b30b259726051f697f77c0fe7fd3f0b3b9da5dcecd78b"
                "ae270b21dbf84d1c5eebedb8c1579f27",
    "i2r_key": "efff0f5cda6054ac4e270b2e780b52908ad45edcd70b0bfb96ad6a06c408b862",
    "i2r_iv": "eb2ad40d9e4d5c83483d3942",
}


def outputs(ss: bytes, k: bytes, salt: bytes | None, th_hello: bytes,
            th_final: bytes) -> dict[str, bytes]:
    sched = HybridKeySchedule(ss, k, salt)
    conf = sched.confirmation_keys(th_hello)
    keys = sched.session_keys(th_final)
    key, iv = record_key_iv(keys.i2r_traffic)
    return {"initiator_confirm": conf.initiator, "responder_confirm": conf.responder,
            "i2r_traffic": keys.i2r_traffic, "r2i_traffic": keys.r2i_traffic,
            "chain_key": keys.chain_key, "next_psk": keys.next_psk, "i2r_key": key,
            "i2r_iv": iv}


def test_committed_vector() -> None:
    got = {k: v.hex() for k, v in outputs(SS, K_QKD, None, TH_HELLO, TH_FINAL).items()}
    assert got == VECTOR


def test_matches_an_independent_hkdf() -> None:
    # RFC 5869 with SHA-384, computed with the cryptography package's HKDF-Expand and the
    # IKM built by hand from DESIGN.md: len16(ss) ‖ ss ‖ len16(k) ‖ k.
    ikm = len(SS).to_bytes(2, "big") + SS + len(K_QKD).to_bytes(2, "big") + K_QKD
    prk = hmac.new(INITIAL_SALT, ikm, hashlib.sha384).digest()
    info = len(LABEL_CHAIN_KEY).to_bytes(2, "big") + LABEL_CHAIN_KEY + TH_FINAL
    chain = HKDFExpand(hashes.SHA384(), 48, info).derive(prk)
    assert chain.hex() == VECTOR["chain_key"]


MUTATIONS = {
    "mlkem_secret": lambda a: {**a, "ss": bytes([a["ss"][0] ^ 1]) + a["ss"][1:]},
    "qkd_key": lambda a: {**a, "k": a["k"][:-1] + bytes([a["k"][-1] ^ 0x80])},
    "qkd_key_absent": lambda a: {**a, "k": b""},
    "salt_chain_key": lambda a: {**a, "salt": bytes(48)},
    "transcript_hello": lambda a: {**a, "th_hello": b"\x12" + a["th_hello"][1:]},
    "transcript_final": lambda a: {**a, "th_final": a["th_final"][:-1] + b"\x23"},
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_input_changes_its_outputs(name: str) -> None:
    base = {"ss": SS, "k": K_QKD, "salt": None, "th_hello": TH_HELLO, "th_final": TH_FINAL}
    before = outputs(**base)
    after = outputs(**MUTATIONS[name](base))
    # The hello transcript feeds only the confirmation keys and the final transcript
    # only the session keys; every secret input feeds every output.
    if name == "transcript_hello":
        affected = {"initiator_confirm", "responder_confirm"}
    elif name == "transcript_final":
        affected = set(before) - {"initiator_confirm", "responder_confirm"}
    else:
        affected = set(before)
    for key in before:
        if key in affected:
            assert before[key] != after[key], f"{name} did not change {key}"
        else:
            assert before[key] == after[key]


def test_inputs_are_not_ambiguous() -> None:
    # Moving a byte from the ML-KEM secret to the QKD key must change the result: the
    # length prefixes keep the concatenation unambiguous.
    a = HybridKeySchedule(SS, K_QKD).session_keys(TH_FINAL).chain_key
    b = HybridKeySchedule(SS[:-1], SS[-1:] + K_QKD).session_keys(TH_FINAL).chain_key
    assert a != b


def test_repr_hides_secrets() -> None:
    sched = HybridKeySchedule(SS, K_QKD)
    keys = sched.session_keys(TH_FINAL)
    for text in (repr(sched), repr(keys)):
        assert keys.chain_key.hex() not in text and "chain_key=b" not in text
