"""The ETSI 014 client authenticates *its site's* KME, not any server the TLS CA signed
(issue 9.5), over TLS 1.3 unless told otherwise. Real KME processes in-process on
loopback TLS with client certificates.

The attack: a KME holding another site's certificate from the same TLS CA (kme-site-c,
say a compromised neighbour), configured to serve site-a-gw, answers in place of
kme-site-a. Pinned on "kme-site-a", the client refuses it in the TLS handshake; the
control (pinning off, the old "any certificate from the CA") takes its keys."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qkd.etsi014.client import EtsiClient, KmeUnavailable, certificate_names
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme
from tests.support.kme_processes import kme_toml


@pytest.fixture
async def impostor(tmp_path: Path, pki: Path) -> AsyncIterator[RunningKme]:
    """Site A's KME config, but with site C's server certificate (same TLS CA)."""
    text = kme_toml(pki, "a", tmp_path / "impostor.sqlite3")
    text = text.replace(f"{pki}/site-a/kme-server.", f"{pki}/site-c/kme-server.")
    path = tmp_path / "impostor.toml"
    path.write_text(text)
    kme = await start_kme(KmeConfig.load(path))
    try:
        yield kme
    finally:
        await kme.close()


def _client(pki: Path, url: str, **kw: object) -> EtsiClient:
    return EtsiClient(url, ca_file=pki / "tls-ca.crt", cert_file=pki / "site-a" /
                      "sae-client.crt", key_file=pki / "site-a" / "sae-client.key",
                      **kw)  # type: ignore[arg-type]


async def test_pinned_client_talks_to_its_own_kme_over_tls13(
        kmes: dict[str, RunningKme], pki: Path) -> None:
    async with _client(pki, kmes["a"].url, kme_id="kme-site-a") as c:
        keys = await c.get_enc_keys("site-b-gw", 1)
        info = c.tls_info()
    assert len(keys) == 1
    assert info["version"] == "TLSv1.3" and info["pinned"] and info["peer"] == "kme-site-a"
    assert info["min_version"] == "1.3" and "openssl" in info


async def test_kme_of_another_site_from_the_same_ca_is_refused(
        impostor: RunningKme, pki: Path) -> None:
    async with _client(pki, impostor.url, kme_id="kme-site-a") as c:
        with pytest.raises(KmeUnavailable) as info:
            await c.get_enc_keys("site-b-gw", 1)
    assert "kme-site-c" in str(info.value) and "'kme-site-a'" in str(info.value)


async def test_control_without_pinning_the_impostor_hands_out_keys(
        impostor: RunningKme, pki: Path) -> None:
    async with _client(pki, impostor.url, kme_id=None) as c:
        keys = await c.get_enc_keys("site-b-gw", 1)
        assert c.tls_info()["peer"] == "kme-site-c"
    assert len(keys) == 1


async def _tls12_server(pki: Path) -> tuple[asyncio.Server, str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "site-a" / "kme-server.crt", pki / "site-a" / "kme-server.key")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    handshakes: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        handshakes.append(obj.version() if obj else "?")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                     b"connection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    server.handshakes = handshakes  # type: ignore[attr-defined]
    port = server.sockets[0].getsockname()[1]
    return server, f"https://127.0.0.1:{port}"


async def test_tls12_only_kme_is_refused_unless_allowed(pki: Path) -> None:
    server, url = await _tls12_server(pki)
    try:
        async with _client(pki, url, kme_id="kme-site-a") as c:
            with pytest.raises(KmeUnavailable):
                await c.status("site-b-gw")
        assert server.handshakes == []  # type: ignore[attr-defined]
        # Control: allowed explicitly, TLS 1.2 is negotiated (the fake KME then says 503).
        async with _client(pki, url, kme_id="kme-site-a", min_tls="1.2") as c:
            with pytest.raises(KmeUnavailable):
                await c.status("site-b-gw")
            assert c.tls_info()["version"] == "TLSv1.2"
        assert server.handshakes == ["TLSv1.2"]  # type: ignore[attr-defined]
    finally:
        server.close()
        await server.wait_closed()


def test_certificate_names_reads_cn_and_dns_sans() -> None:
    cert = {"subject": ((("commonName", "kme-site-a"),),),
            "subjectAltName": (("DNS", "localhost"), ("IP Address", "127.0.0.1"))}
    assert certificate_names(cert) == ["kme-site-a", "localhost"]
    assert certificate_names({}) == []


