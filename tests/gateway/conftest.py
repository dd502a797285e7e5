"""Fixtures for the gateway tests: one PKI per test session (ML-DSA keygen is not free)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.pki import init_pki


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "pki"
    init_pki(out, ["site-a", "site-b", "site-c"], algorithm="ml-dsa-65")
    return out


@pytest.fixture(scope="session")
def other_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki2") / "pki"
    init_pki(out, ["site-a", "site-b"], algorithm="ml-dsa-65")
    return out


