"""Fixtures for the gateway tests: one PKI per test session (ML-DSA keygen is not free),
and the two relayed sites of tests.support.mitm_relay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway.pki import init_pki

if TYPE_CHECKING:
    from tests.support.mitm_relay import Sites


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




@pytest.fixture
async def sites(pki_dir: Path, tmp_path: Path) -> AsyncIterator[Sites]:
    """Two sites (KMEs, gateways, the relay between them) not yet started: each test
    starts them with the options it needs; they are closed afterwards."""
    from tests.support.mitm_relay import Sites  # imported when used: it pulls in the runtime

    s = Sites(pki_dir, tmp_path)
    try:
        yield s
    finally:
        await s.close()
