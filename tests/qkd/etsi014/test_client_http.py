"""EtsiClient's own HTTP/1.1 transport against a raw TLS server that frames its answers
every legal way and some illegal ones: keep-alive, chunked bodies, limits, a KME that
closes an idle connection, and the rule that a POST is never sent twice."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qkd.etsi014.client import EtsiClient, KmeProtocolError, KmeUnavailable
from qkd.etsi014.constants import MAX_ANSWER_BYTES

STATUS = json.dumps({
    "source_KME_ID": "kme-site-a", "target_KME_ID": "kme-site-b",
    "master_SAE_ID": "site-a-gw", "slave_SAE_ID": "site-b-gw", "key_size": 256,
    "stored_key_count": 10, "max_key_count": 100, "max_key_per_request": 10,
    "max_key_size": 1024, "min_key_size": 64, "max_SAE_ID_count": 0}).encode()
KEY_ID = "b0a4b8a0-4f6c-4d4f-9a53-8f3c3f1c0a11"
ENC = json.dumps({"keys": [{"key_ID": KEY_ID,
                            "key": "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo="}]}).encode()


def framed(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Raw:
    """Answers the n-th request (over all connections) with answers[n](request bytes)."""

    url: str = ""
    answers: list[Callable[[bytes], bytes | None]] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    close_after: set[int] = field(default_factory=set)  # close after answering these


@pytest.fixture
async def raw(pki: Path) -> AsyncIterator[Raw]:
    state = Raw()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                request = head + await reader.readexactly(length)
                n = len(state.requests)
                state.requests.append(request)
                answer = state.answers[min(n, len(state.answers) - 1)](request)
                if answer is None:  # hang up without a word
                    break
                writer.write(answer)
                await writer.drain()
                if n in state.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "site-a" / "kme-server.crt", pki / "site-a" / "kme-server.key")
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    state.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        server.close()


def client(pki: Path, url: str, timeout: float = 5.0) -> EtsiClient:
    return EtsiClient(url, ca_file=pki / "tls-ca.crt",
                      cert_file=pki / "site-a" / "sae-client.crt",
                      key_file=pki / "site-a" / "sae-client.key", timeout=timeout)


async def test_keep_alive_reuses_one_connection(raw: Raw, pki: Path) -> None:
    raw.answers = [lambda _r: framed(STATUS)]
    async with client(pki, raw.url) as c:
        for _ in range(5):
            assert (await c.status("site-b-gw"))["stored_key_count"] == 10
    assert raw.connections == 1 and len(raw.requests) == 5
    first = raw.requests[0].decode()
    assert first.startswith("GET /api/v1/keys/site-b-gw/status HTTP/1.1\r\n")
    assert f"\r\nHost: {raw.url.removeprefix('https://')}\r\n" in first


async def test_request_bytes_of_a_post(raw: Raw, pki: Path) -> None:
    raw.answers = [lambda _r: framed(ENC)]
    async with client(pki, raw.url) as c:
        (key,) = await c.get_enc_keys("site-b-gw")
    assert key.key_id == KEY_ID
    head, _, body = raw.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/v1/keys/site-b-gw/enc_keys HTTP/1.1\r\n")
    assert b"\r\nContent-Type: application/json" in head
    assert json.loads(body) == {"number": 1, "size": 256}


async def test_connection_close_and_http10_are_not_reused(raw: Raw, pki: Path) -> None:
    raw.answers = [lambda _r: framed(STATUS, "Connection: close"),
                   lambda _r: framed(STATUS).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
                   lambda _r: framed(STATUS)]
    raw.close_after = {0, 1}
    async with client(pki, raw.url) as c:
        for _ in range(3):
            await c.status("site-b-gw")
    assert raw.connections == 3


@pytest.mark.parametrize("pieces", [[STATUS], [STATUS[:7], STATUS[7:50], STATUS[50:]]])
async def test_chunked_answer(raw: Raw, pki: Path, pieces: list[bytes]) -> None:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
              + b"0\r\nX-Trailer: 1\r\n\r\n")
    raw.answers = [lambda _r: answer]
    async with client(pki, raw.url) as c:
        for _ in range(2):  # and the connection is still usable after the trailer
            assert (await c.status("site-b-gw"))["key_size"] == 256
    assert raw.connections == 1


async def test_answer_until_eof(raw: Raw, pki: Path) -> None:
    raw.answers = [lambda _r: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + STATUS]
    raw.close_after = {0}
    async with client(pki, raw.url) as c:
        assert (await c.status("site-b-gw"))["max_key_count"] == 100


@pytest.mark.parametrize(("answer", "match"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER_BYTES + 1),
     "larger than"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n"
     % (MAX_ANSWER_BYTES + 1), "larger than"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
     "conflicting"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
     "both"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer coding"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "header larger"),
    (b"ICY 200 OK\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "malformed header"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "shorter"),
])
async def test_bad_framing_is_a_protocol_error(raw: Raw, pki: Path, answer: bytes,
                                               match: str) -> None:
    raw.answers = [lambda _r: answer]
    raw.close_after = {0}
    async with client(pki, raw.url) as c:
        with pytest.raises(KmeProtocolError, match=match) as exc:
            await c.status("site-b-gw")
    assert raw.url in str(exc.value)


async def test_interim_answer_is_skipped(raw: Raw, pki: Path) -> None:
    raw.answers = [lambda _r: b"HTTP/1.1 100 Continue\r\n\r\n" + framed(STATUS)]
    async with client(pki, raw.url) as c:
        assert (await c.status("site-b-gw"))["key_size"] == 256


async def test_idle_connection_closed_by_the_kme(raw: Raw, pki: Path) -> None:
    """The KME closes a kept-alive connection: a GET goes again on a new connection, a
    POST does not (it may have been acted on) and fails as unavailable."""
    raw.answers = [lambda _r: framed(STATUS)]
    raw.close_after = {0}
    async with client(pki, raw.url) as c:
        await c.status("site-b-gw")
        await asyncio.sleep(0.05)  # the close reaches the client: stale, not reused
        await c.status("site-b-gw")
    assert raw.connections == 2 and len(raw.requests) == 2
    # Now a KME that takes the request and hangs up without answering, on a reused
    # connection: GET retried once, POST never.
    raw.requests.clear()
    raw.connections = 0
    raw.close_after = set()
    raw.answers = [lambda _r: framed(STATUS), lambda _r: None, lambda _r: framed(STATUS)]
    async with client(pki, raw.url) as c:
        await c.status("site-b-gw")
        await c.status("site-b-gw")  # answered on the second try
    assert len(raw.requests) == 3 and raw.connections == 2
    raw.requests.clear()
    raw.connections = 0
    raw.answers = [lambda _r: framed(STATUS), lambda _r: None, lambda _r: framed(ENC)]
    async with client(pki, raw.url) as c:
        await c.status("site-b-gw")
        with pytest.raises(KmeUnavailable, match="without answering"):
            await c.get_enc_keys("site-b-gw")
    assert len(raw.requests) == 2  # the POST went out once


async def test_concurrent_requests_use_separate_connections(raw: Raw, pki: Path) -> None:
    raw.answers = [lambda _r: framed(STATUS)]
    async with client(pki, raw.url) as c:
        results = await asyncio.gather(*(c.status("site-b-gw") for _ in range(4)))
        # Then the idle ones serve the next requests: no new connection.
        opened = raw.connections
        await asyncio.gather(*(c.status("site-b-gw") for _ in range(4)))
    assert len(results) == 4 and opened == 4 and raw.connections == 4
