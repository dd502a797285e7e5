"""EtsiClient against a fake TLS KME that answers wrong things on purpose."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from qkd.etsi014.client import (
    EtsiClient,
    KmeError,
    KmeNoKey,
    KmeProtocolError,
    KmeRejected,
    KmeUnavailable,
    QkdKey,
)

KEY = b"\x5a" * 32


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Fake:
    """Answers every request with `reply(request_json)` -> (status, body bytes)."""

    url: str = ""
    reply: Callable[[Any], tuple[int, bytes]] = lambda _req: (200, b"{}")
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    delay: float = 0.0


@pytest.fixture
async def fake(pki: Path) -> AsyncIterator[Fake]:
    state = Fake()

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        state.requests.append((request.method, request.path, body))
        if state.delay:
            await asyncio.sleep(state.delay)
        status, payload = state.reply(body)
        return web.Response(status=status, body=payload, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "site-a" / "kme-server.crt", pki / "site-a" / "kme-server.key")
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=ctx).start()
    state.url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


def client(pki: Path, url: str, timeout: float = 5.0) -> EtsiClient:
    return EtsiClient(url, ca_file=pki / "tls-ca.crt",
                      cert_file=pki / "site-a" / "sae-client.crt",
                      key_file=pki / "site-a" / "sae-client.key", timeout=timeout)


def container(*items: tuple[str, str]) -> bytes:
    return json.dumps({"keys": [{"key_ID": i, "key": k} for i, k in items]}).encode()


def echo_ids(key: str = b64(KEY)) -> Callable[[Any], tuple[int, bytes]]:
    """A correct dec_keys KME: answers the asked-for IDs."""
    return lambda req: (200, container(*((item["key_ID"], key) for item in req["key_IDs"])))


async def test_good_answers(fake: Fake, pki: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(2)]
    fake.reply = lambda _req: (200, container(*((i, b64(KEY)) for i in ids)))
    async with client(pki, fake.url) as c:
        keys = await c.get_enc_keys("site-b-gw", number=2, size=256)
        assert keys == [QkdKey(i, KEY) for i in ids]
        method, path, body = fake.requests[-1]
        assert (method, path, body) == ("POST", "/api/v1/keys/site-b-gw/enc_keys",
                                        {"number": 2, "size": 256})
        fake.reply = echo_ids()
        wanted = [str(uuid.uuid4()) for _ in range(3)]
        got = await c.get_dec_keys("site-b-gw", wanted, size=256)
        assert [k.key_id for k in got] == wanted
        assert fake.requests[-1][2] == {"key_IDs": [{"key_ID": k} for k in wanted]}


async def test_dec_answer_in_other_order_is_returned_in_asked_order(fake: Fake,
                                                                    pki: Path) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    fake.reply = lambda _req: (200, container((b, b64(b"\x02" * 32)), (a, b64(b"\x01" * 32))))
    async with client(pki, fake.url) as c:
        got = await c.get_dec_keys("site-b-gw", [a, b])
    assert got == [QkdKey(a, b"\x01" * 32), QkdKey(b, b"\x02" * 32)]


U1, U2 = str(uuid.uuid4()), str(uuid.uuid4())


@pytest.mark.parametrize("payload", [
    b"not json",
    b"",
    b"[]",
    b'{"keys": "x"}',
    container((U1, b64(KEY))),                              # one key, two asked
    container((U1, b64(KEY)), (U2, b64(KEY)), (str(uuid.uuid4()), b64(KEY))),
    container((U1, b64(KEY)), (U1, b64(KEY))),              # duplicate ID
    container((U1, b64(KEY)), (U1.upper(), b64(KEY))),      # duplicate, other case
    container((U1, b64(KEY)), ("not-a-uuid", b64(KEY))),
    container((U1, b64(KEY)), (U2, b64(KEY[:31]))),         # wrong size
    container((U1, b64(KEY)), (U2, b64(KEY + b"x"))),
    container((U1, b64(KEY)), (U2, "%%%%")),                 # bad base64
    container((U1, b64(KEY)), (U2, b64(KEY)[:-2])),          # truncated base64
    b'{"keys": [{"key_ID": "' + U1.encode() + b'", "key": "' + b64(KEY).encode()
    + b'", "key": "x"}]}',                                  # duplicate JSON field
])
async def test_enc_garbage_is_protocol_error(fake: Fake, pki: Path, payload: bytes) -> None:
    fake.reply = lambda _req: (200, payload)
    async with client(pki, fake.url) as c:
        with pytest.raises(KmeProtocolError) as ei:
            await c.get_enc_keys("site-b-gw", number=2, size=256)
    assert fake.url in str(ei.value)
    assert b64(KEY) not in str(ei.value)


@pytest.mark.parametrize("answer", [
    lambda req: (200, container((str(uuid.uuid4()), b64(KEY)))),          # other ID
    lambda req: (200, container((req["key_IDs"][0]["key_ID"], b64(KEY)),
                                (str(uuid.uuid4()), b64(KEY)))),          # one extra
    lambda req: (200, container()),                                        # none
    lambda req: (200, container((req["key_IDs"][0]["key_ID"], b64(KEY[:16])))),  # size
])
async def test_dec_wrong_ids_or_size_is_protocol_error(
        fake: Fake, pki: Path, answer: Callable[[Any], tuple[int, bytes]]) -> None:
    fake.reply = answer
    async with client(pki, fake.url) as c:
        with pytest.raises(KmeProtocolError):
            await c.get_dec_keys("site-b-gw", [str(uuid.uuid4())], size=256)


async def test_replayed_key_id_is_protocol_error(fake: Fake, pki: Path) -> None:
    fake.reply = lambda _req: (200, container((U1, b64(KEY))))
    async with client(pki, fake.url) as c:
        await c.get_enc_keys("site-b-gw")
        with pytest.raises(KmeProtocolError, match="again"):
            await c.get_enc_keys("site-b-gw")
        fake.reply = echo_ids()
        with pytest.raises(KmeProtocolError, match="again"):
            await c.get_dec_keys("site-b-gw", [U1])


async def test_error_statuses(fake: Fake, pki: Path) -> None:
    def err(status: int, message: str) -> Callable[[Any], tuple[int, bytes]]:
        return lambda _req: (status, json.dumps({"message": message, "details": []}).encode())

    async with client(pki, fake.url) as c:
        fake.reply = err(503, "no key available")
        with pytest.raises(KmeNoKey):
            await c.get_enc_keys("site-b-gw")
        fake.reply = err(503, "Not enough keys in the key store")
        with pytest.raises(KmeNoKey):
            await c.get_enc_keys("site-b-gw")
        fake.reply = err(503, "database is on fire")
        with pytest.raises(KmeUnavailable) as unavailable:
            await c.get_enc_keys("site-b-gw")
        assert not isinstance(unavailable.value, KmeNoKey)
        fake.reply = err(400, "size is not a multiple of 8")
        with pytest.raises(KmeRejected) as ei:
            await c.get_enc_keys("site-b-gw")
        assert ei.value.status == 400 and ei.value.message == "size is not a multiple of 8"
        fake.reply = lambda _req: (401, b"<html>nope</html>")
        with pytest.raises(KmeRejected) as ei:
            await c.status("site-b-gw")
        assert ei.value.status == 401
        fake.reply = lambda _req: (302, b"")
        with pytest.raises(KmeProtocolError):
            await c.status("site-b-gw")
        fake.reply = lambda _req: (200, json.dumps({"slave_SAE_ID": "site-b-gw"}).encode())
        with pytest.raises(KmeProtocolError):
            await c.status("site-b-gw")


async def test_timeout_and_refused(fake: Fake, pki: Path) -> None:
    fake.delay = 1.0
    async with client(pki, fake.url, timeout=0.2) as c:
        with pytest.raises(KmeUnavailable, match="no answer"):
            await c.status("site-b-gw")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                 # nothing listens there now
    async with client(pki, f"https://127.0.0.1:{port}") as c:
        with pytest.raises(KmeUnavailable, match=str(port)):
            await c.status("site-b-gw")


async def test_input_validation(pki: Path) -> None:
    with pytest.raises(ValueError):
        client(pki, "http://127.0.0.1:1")
    c = client(pki, "https://127.0.0.1:1")
    for call in (lambda: c.get_enc_keys("site-b-gw", number=0),
                 lambda: c.get_enc_keys("site-b-gw", size=12),
                 lambda: c.get_enc_keys("bad/id"),
                 lambda: c.get_dec_keys("site-b-gw", []),
                 lambda: c.get_dec_keys("site-b-gw", ["nope"]),
                 lambda: c.get_dec_keys("site-b-gw", [U1, U1])):
        with pytest.raises(ValueError):
            await call()
    await c.close()


def test_unreadable_client_cert_is_kme_error(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(KmeError, match="client certificate"):
        EtsiClient("https://127.0.0.1:1", ca_file=pki / "tls-ca.crt",
                   cert_file=tmp_path / "missing.crt", key_file=tmp_path / "missing.key")


def test_qkdkey_repr_has_no_key_bytes() -> None:
    key = QkdKey(U1, bytes.fromhex("deadbeef" * 8))
    text = repr(key) + str(key)
    assert U1 in text
    assert "deadbeef" not in text and "\\xde" not in text and "key=" not in text
