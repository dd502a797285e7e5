"""Fixtures: a real PKI from `gateway.pki.init_pki` and KMEs running on loopback TLS
(topology in tests/support/kme_processes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.pki import init_pki
from qkd.etsi014.client import EtsiClient
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme
from tests.support.kme_processes import SITES, kme_toml


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "pki"
    init_pki(out, SITES, algorithm="ecdsa-p256")
    return out


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated PKI: same names, different CAs."""
    out = tmp_path_factory.mktemp("other-pki") / "pki"
    init_pki(out, SITES, algorithm="ecdsa-p256")
    return out


@pytest.fixture
def make_config(tmp_path: Path, pki: Path) -> Callable[..., KmeConfig]:
    def make(side: str, **kw: object) -> KmeConfig:
        db = kw.pop("db", tmp_path / f"kme-{side}.sqlite3")
        path = tmp_path / f"kme-{side}.toml"
        path.write_text(kme_toml(pki, side, db, **kw))  # type: ignore[arg-type]
        return KmeConfig.load(path)
    return make


@pytest.fixture
async def kmes(make_config: Callable[..., KmeConfig]) -> AsyncIterator[dict[str, RunningKme]]:
    a = await start_kme(make_config("a"))
    b = await start_kme(make_config("b"))
    try:
        yield {"a": a, "b": b}
    finally:
        await a.close()
        await b.close()


@pytest.fixture
def sae(pki: Path) -> Callable[[str, RunningKme], EtsiClient]:
    """sae("site-a", kme) -> an EtsiClient authenticated as site-a-gw."""
    def make(site: str, kme: RunningKme, *, cert_pki: Path | None = None,
             ca_pki: Path | None = None, timeout: float = 5.0) -> EtsiClient:
        cp = cert_pki or pki
        return EtsiClient(kme.url, ca_file=(ca_pki or pki) / "tls-ca.crt",
                          cert_file=cp / site / "sae-client.crt",
                          key_file=cp / site / "sae-client.key", timeout=timeout)
    return make
