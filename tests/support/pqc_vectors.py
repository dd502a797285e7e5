"""Readers for the NIST known-answer files shipped in the `cryptography-vectors` package."""

from __future__ import annotations

import functools
import os

import cryptography_vectors


def _parse_rsp(relative_path: str) -> list[dict[str, str]]:
    """`key = value` blocks, one per `count = N`; values stay hex strings."""
    vectors: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    with cryptography_vectors.open_vector_file(relative_path, "r") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#") or line.startswith("["):
                continue
            key, sep, value = line.partition(" = ")
            if not sep:
                continue
            if key == "count":
                current = {"count": value}
                vectors.append(current)
            elif current is not None:
                current[key] = value
    return vectors


@functools.cache
def mlkem_vectors(level: int) -> list[dict[str, bytes]]:
    raw = _parse_rsp(os.path.join("asymmetric", "MLKEM", f"kat_MLKEM_{level}.rsp"))
    return [{k: (int(v) if k == "count" else bytes.fromhex(v)) for k, v in vec.items()}
            for vec in raw]  # type: ignore[misc]


@functools.cache
def mldsa_vectors(level: int) -> list[dict[str, bytes]]:
    raw = _parse_rsp(os.path.join("asymmetric", "MLDSA", f"kat_MLDSA_{level}_det_pure.rsp"))
    out = []
    for vec in raw:
        parsed: dict = {}
        for k, v in vec.items():
            parsed[k] = int(v) if k in ("count", "mlen", "smlen") else bytes.fromhex(v)
        out.append(parsed)
    return out
