"""A man in the middle on the gateway ↔ KME link (ETSI GS QKD 014 over HTTPS with
client certificates): it can neither read nor alter the QKD keys (issue 5).

Positive controls: the same relay reads and alters keys sent as plain HTTP, and a
relay holding the KME's TLS key can hand the gateway keys of its own choosing.
"""

from __future__ import annotations

import base64
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from qkd.common.tcp_relay import A2B, B2A, Hook, RelayConnection, TcpRelay
from qkd.etsi014.client import EtsiClient, KmeError, KmeUnavailable
from qkd.etsi014.messages import QkdKey, build_key_container
from tests.support.mitm_relay import Sites


class ByteRelay(TcpRelay):
    """Plain TCP relay that records both directions and may flip one byte of the
    server's answer at `flip_at` (an offset into the server -> client stream)."""

    def __init__(self, target_port: int, flip_at: int | None = None) -> None:
        super().__init__(("127.0.0.1", target_port), hooks=self._hooks)
        self.flip_at = flip_at
        self.to_server = bytearray()
        self.to_client = bytearray()

    def _hooks(self, conn: RelayConnection) -> dict[str, Hook]:
        def to_server(data: bytes) -> list[bytes]:
            self.to_server += data
            return [data]

        def to_client(data: bytes) -> list[bytes]:
            start = len(self.to_client)
            self.to_client += data
            if self.flip_at is not None and start <= self.flip_at < len(self.to_client):
                b = bytearray(data)
                b[self.flip_at - start] ^= 0x01
                data = bytes(b)
            return [data]

        return {A2B: to_server, B2A: to_client}


@pytest.fixture
async def sites(pki_dir: Path, tmp_path: Path) -> AsyncIterator[Sites]:
    s = Sites(pki_dir, tmp_path)
    await s.start_kmes()
    try:
        yield s
    finally:
        await s.close()


def client(pki: Path, port: int) -> EtsiClient:
    return EtsiClient(f"https://127.0.0.1:{port}", ca_file=pki / "tls-ca.crt",
                      cert_file=pki / "site-a" / "sae-client.crt",
                      key_file=pki / "site-a" / "sae-client.key")


def visible(wire: bytes, key: QkdKey) -> bool:
    return (key.key in wire or base64.b64encode(key.key) in wire
            or key.key_id.encode() in wire)


async def _plain_http_kme(keys: list[QkdKey]) -> tuple[web.AppRunner, int]:
    """The same ETSI 014 answer without TLS: what the relay would see without it."""
    async def enc_keys(_request: web.Request) -> web.Response:
        return web.json_response(build_key_container(keys))

    app = web.Application()
    app.router.add_post("/api/v1/keys/{sae}/enc_keys", enc_keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_relay_on_the_kme_link_reads_and_alters_nothing(
        sites: Sites, pki_dir: Path) -> None:
    relay = ByteRelay(sites.kmes["site-a"].port)
    await relay.start()
    async with client(pki_dir, relay.port) as c:
        (key,) = await c.get_enc_keys("site-b-gw", 1, 256)
    assert relay.to_client and not visible(bytes(relay.to_client + relay.to_server), key)
    # One flipped byte in the KME's answer (inside the TLS records) is an error, not a
    # different key.
    flipper = ByteRelay(sites.kmes["site-a"].port, flip_at=len(relay.to_client) - 40)
    await flipper.start()
    async with client(pki_dir, flipper.port) as c:
        with pytest.raises(KmeError):
            await c.get_enc_keys("site-b-gw", 1, 256)
    # Positive control: the same key as plain HTTP is read and altered by the relay.
    runner, port = await _plain_http_kme([key])
    try:
        spy = ByteRelay(port)
        await spy.start()
        url = f"http://127.0.0.1:{spy.port}/api/v1/keys/site-b-gw/enc_keys"
        async with aiohttp.ClientSession() as http, http.post(url, json={}) as resp:
            await resp.read()
        assert visible(bytes(spy.to_client), key)
        encoded = base64.b64encode(key.key)
        alphabet = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
        # A character whose low bit flipped is still base64 (B<->C, 8<->9, ...), so the
        # altered answer decodes: the client takes a different key, unnoticed.
        pos = next(i for i in range(3, len(encoded) - 2) if encoded[i] ^ 1 in alphabet)
        offset = bytes(spy.to_client).index(encoded) + pos
        tamper = ByteRelay(port, flip_at=offset)
        await tamper.start()
        url = f"http://127.0.0.1:{tamper.port}/api/v1/keys/site-b-gw/enc_keys"
        async with aiohttp.ClientSession() as http, http.post(url, json={}) as resp:
            got = base64.b64decode((await resp.json())["keys"][0]["key"])
        assert got != key.key and len(got) == len(key.key)
        for r in (spy, tamper):
            await r.close()
    finally:
        await runner.cleanup()
    for r in (relay, flipper):
        await r.close()


async def _fake_kme(cert: Path, key: Path, keys: list[QkdKey]) -> tuple[web.AppRunner, int]:
    async def enc_keys(_request: web.Request) -> web.Response:
        return web.json_response(build_key_container(keys))

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_post("/api/v1/keys/{sae}/enc_keys", enc_keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_impostor_kme_is_refused_unless_it_holds_the_kme_tls_key(
        sites: Sites, pki_dir: Path, other_pki_dir: Path) -> None:
    chosen = [QkdKey(str(uuid.uuid4()), b"\x42" * 32)]
    # A relay terminating TLS with a certificate from another CA: the gateway refuses.
    runner, port = await _fake_kme(other_pki_dir / "site-a" / "kme-server.crt",
                                   other_pki_dir / "site-a" / "kme-server.key", chosen)
    try:
        async with client(pki_dir, port) as c:
            with pytest.raises(KmeUnavailable):
                await c.get_enc_keys("site-b-gw", 1, 256)
    finally:
        await runner.cleanup()
    # Positive control: with the KME's own TLS key the relay passes as the KME and the
    # gateway takes the attacker's key.
    runner, port = await _fake_kme(pki_dir / "site-a" / "kme-server.crt",
                                   pki_dir / "site-a" / "kme-server.key", chosen)
    try:
        async with client(pki_dir, port) as c:
            (got,) = await c.get_enc_keys("site-b-gw", 1, 256)
        assert got.key == chosen[0].key
    finally:
        await runner.cleanup()
