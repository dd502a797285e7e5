"""Property-based fuzzing of ETSI GS QKD 014 JSON at both ends.

Server: a real KME (HTTPS, client certificates, SQLite) gets hypothesis-made enc_keys /
dec_keys bodies (JSON of every shape, huge numbers, deep nesting, duplicate fields,
non-UTF-8 bytes) and query strings. The answer is a 200 only for a request the
sans-I/O parser accepts, and then exactly the keys asked for; every other answer is a
4xx (or the 503 "no key") with an ETSI Error body {message, details?}; never a 500,
never key material in an error, and never a key delivered to a slave it was not made
for.

Client: `EtsiClient` talks to a fake TLS KME that answers with hypothesis-made
responses (mutated key containers, wrong base64, sizes, IDs, statuses). It either
returns exactly what a correct KME would have delivered for the request or raises one
of its documented `KmeError`s, never another exception and never a repaired key.

The long runs are marked slow."""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import math
import ssl
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkd.etsi014 import messages as etsi014
from qkd.etsi014.client import EtsiClient, KmeError, KmeNoKey, KmeProtocolError, KmeRejected
from qkd.etsi014.messages import EtsiError, Limits
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme
from tests.support.kme_processes import kme_toml

SHORT = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
LONG = settings(max_examples=3_000, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

PREFIX = etsi014.API_PREFIX
ERROR_STATUSES = {400, 401, 404, 405, 413}


class LoopThread:
    """An asyncio loop in a background thread, so synchronous hypothesis tests can talk
    to servers running in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


# --- strategies: JSON of every shape ------------------------------------------------------------

_text = st.text(max_size=30)
_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False), _text,
    st.sampled_from([0, 1, -1, 8, 16, 17, 63, 64, 256, 1024, 1032, 2**31, 2**63, "1", "256",
                     "", "site-b-gw", "site-a-gw", str(uuid.uuid4()),
                     str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}"]))
_json = st.recursive(_json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)), max_leaves=12)
_field_names = st.sampled_from([
    "number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
    "extension_optional", "key_IDs", "key_ID", "key_IDs_extension", "key_ID_extension",
    "keys", "message", "details"])


@st.composite
def _request_object(draw: st.DrawFn) -> Any:
    """Mostly Key request / Key IDs shaped objects with fuzzed values, sometimes anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(_json)
    obj: dict[str, Any] = {}
    for name in draw(st.lists(_field_names, max_size=4, unique=True)):
        if name == "key_IDs" and draw(st.booleans()):
            obj[name] = draw(st.lists(st.one_of(
                st.fixed_dictionaries({"key_ID": st.one_of(
                    st.uuids().map(str), _json_scalar)}),
                _json), max_size=4))
        else:
            obj[name] = draw(_json)
    return obj


@st.composite
def request_body(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))  # includes non-UTF-8
    if kind == 1:  # duplicate fields, which json.loads would silently merge
        name = draw(_field_names)
        a, b = draw(_json), draw(_json)
        return f'{{"{name}": {json.dumps(a)}, "{name}": {json.dumps(b)}}}'.encode()
    if kind == 2:  # numbers past every limit, and non-standard constants
        return draw(st.sampled_from([
            b'{"number": 1e400}', b'{"number": ' + b"9" * 5000 + b"}", b'{"size": -0}',
            b'{"number": NaN}', b'{"size": Infinity}', b"[" * 5000 + b"]" * 5000,
            b'{"number": 1, "size": 256}\x00', b"\xef\xbb\xbf{}", b'{"number":1}garbage']))
    body = json.dumps(draw(_request_object()), ensure_ascii=draw(st.booleans()))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]))
    return body.encode(encoding, "replace")


_query_value = st.one_of(_text, st.sampled_from(
    ["1", "0", "-1", "+1", "1.0", "1_0", "٣", "99999999999999", "256", "abc", "%zz", ""]),
    st.uuids().map(str))


@st.composite
def query_string(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 5)) == 0:  # raw, possibly broken percent-encoding
        return "".join(draw(st.lists(st.sampled_from([
            "a", "%", "%zz", "%FF", "%C3%BC", "%00", "%ED%A0%80", "=", "&", ";", "+", "number",
            "size", "key_ID", "1", "256", "0x10", "%2B1", "%20"]), max_size=12)))
    pairs = draw(st.lists(st.tuples(
        st.one_of(st.sampled_from(["number", "size", "key_ID", "key_IDs"]), _text),
        _query_value), max_size=4))
    return urllib.parse.urlencode(pairs)


# --- the KME under test ----------------------------------------------------------------------


class KmeClient:
    """Raw HTTPS with the site-a-gw client certificate: any bytes, any path."""

    def __init__(self, port: int, pki: Path) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(pki / "tls-ca.crt"))
        self.ctx.load_cert_chain(pki / "site-a" / "sae-client.crt",
                                 pki / "site-a" / "sae-client.key")
        self.conn: http.client.HTTPSConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.port,
                                                        context=self.ctx, timeout=30)
            try:
                headers = {"Content-Type": content_type} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@pytest.fixture(scope="module")
def loop_thread() -> Any:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory, pki: Path,
        loop_thread: LoopThread) -> Any:
    work = tmp_path_factory.mktemp("fuzz-kme")
    path = work / "kme-a.toml"
    path.write_text(kme_toml(pki, "a", work / "kme-a.sqlite3"))
    config = KmeConfig.load(path)
    running: RunningKme = loop_thread.run(start_kme(config))
    yield running
    loop_thread.run(running.close())


@pytest.fixture(scope="module")
def client(kme: RunningKme, pki: Path) -> Any:
    c = KmeClient(kme.port, pki)
    yield c
    c.close()


@pytest.fixture(scope="module")
def foreign_key_ids(client: KmeClient) -> list[str]:
    """Real key IDs made for master site-a-gw: site-a-gw must never get them as a
    slave (they are site-b-gw's to fetch, at the other KME)."""
    status, body = client.request("POST", f"{PREFIX}/site-b-gw/enc_keys",
                                  etsi014.dumps({"number": 4, "size": 256}))
    assert status == 200, body  # positive control: a valid request gets its keys
    return [k["key_ID"] for k in json.loads(body)["keys"]]


def _check_error(status: int, body: bytes) -> None:
    assert status != 500 and status in ERROR_STATUSES | {503}, (status, body[:300])
    obj = json.loads(body)
    assert isinstance(obj, dict) and isinstance(obj.get("message"), str), body[:300]
    assert set(obj) <= {"message", "details"}, body[:300]
    assert isinstance(obj.get("details", []), list)
    assert "keys" not in obj and '"key"' not in body.decode()


def _expected_enc(body: bytes, limits: Limits) -> etsi014.KeyRequest | EtsiError:
    try:
        return etsi014.parse_enc_keys_post(body, limits)
    except EtsiError as exc:
        return exc


def check_enc_post(client: KmeClient, kme: RunningKme, body: bytes) -> None:
    limits = kme.config.limits
    status, answer = client.request("POST", f"{PREFIX}/site-b-gw/enc_keys", body)
    expected = _expected_enc(body, limits)
    if isinstance(expected, EtsiError):
        assert status == expected.status, (status, answer[:300], expected.message)
        _check_error(status, answer)
        return
    if status != 200:  # valid but not servable now (pool), still a proper error
        _check_error(status, answer)
        assert status in (400, 503)
        return
    keys = etsi014.parse_enc_keys_answer(etsi014.loads_strict(answer), expected.number,
                                         expected.size)
    assert len(keys) == expected.number


def check_dec(client: KmeClient, method: str, body: bytes | None, query: str = "") -> None:
    path = f"{PREFIX}/site-b-gw/dec_keys" + (f"?{query}" if query else "")
    status, answer = client.request(method, path, body)
    # Nothing here names a key made for (site-b-gw -> site-a-gw): never a 200.
    assert status != 200, answer[:300]
    _check_error(status, answer)


def test_error_oracle_positive_controls(client: KmeClient, kme: RunningKme,
                                        foreign_key_ids: list[str]) -> None:
    # The checks above really distinguish answers: a valid request delivers, a wrong
    # one is a 400 with a body that passes _check_error, a key made for someone else
    # a 401.
    check_enc_post(client, kme, b'{"number": 2, "size": 128}')
    status, body = client.request("POST", f"{PREFIX}/site-b-gw/enc_keys", b'{"number": "2"}')
    assert status == 400
    _check_error(status, body)
    with pytest.raises(AssertionError):
        _check_error(200, etsi014.dumps({"keys": []}))
    status, body = client.request("POST", f"{PREFIX}/site-b-gw/dec_keys",
                                  etsi014.dumps(etsi014.build_key_ids(foreign_key_ids[:1])))
    assert status == 401
    _check_error(status, body)


@SHORT
@given(body=request_body())
def test_kme_enc_keys_post_bodies(client: KmeClient, kme: RunningKme, body: bytes) -> None:
    check_enc_post(client, kme, body)


@SHORT
@given(body=request_body(), data=st.data())
def test_kme_dec_keys_post_bodies(client: KmeClient, foreign_key_ids: list[str],
                                  body: bytes, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        # A well-formed request naming real key IDs that are not this SAE's to fetch.
        ids = data.draw(st.lists(st.sampled_from(foreign_key_ids), min_size=1, max_size=3,
                                 unique=True))
        body = etsi014.dumps({"key_IDs": [{"key_ID": k} for k in ids]})
    check_dec(client, "POST", body)


@SHORT
@given(query=query_string(), method=st.sampled_from(["enc", "dec"]))
def test_kme_get_query_strings(client: KmeClient, kme: RunningKme, query: str,
                               method: str) -> None:
    if method == "dec":
        check_dec(client, "GET", None, query)
        return
    status, answer = client.request("GET", f"{PREFIX}/site-b-gw/enc_keys?{query}")
    if status == 200:
        parsed = urllib.parse.parse_qs(query, keep_blank_values=True)
        req = etsi014.parse_enc_keys_get(parsed, kme.config.limits)
        etsi014.parse_enc_keys_answer(etsi014.loads_strict(answer), req.number, req.size)
    else:
        _check_error(status, answer)


@SHORT
@given(sae=st.text(max_size=20), what=st.sampled_from(["enc_keys", "dec_keys", "status", "x"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
def test_kme_paths_and_methods(client: KmeClient, sae: str, what: str, method: str) -> None:
    path = f"{PREFIX}/{urllib.parse.quote(sae, safe='')}/{what}"
    body = b"{}" if method in ("POST", "PUT") else None
    status, answer = client.request(method, path, body)
    if status == 200:
        # Only a registered peer SAE on a real endpoint with a real method gets one.
        assert sae in ("site-b-gw", "site-d-gw") and what != "x" and method in ("GET", "POST")
        assert what == "status" or "keys" in json.loads(answer)
    else:
        _check_error(status, answer)


# --- the client against a KME that answers anything -----------------------------------------------


class FakeKme:
    """A TLS server that answers the next request with `reply` (status, body bytes)."""

    def __init__(self, pki: Path, loop_thread: LoopThread) -> None:
        self.reply: tuple[int, bytes, str] = (200, b"{}", "application/json")
        self.loop_thread = loop_thread
        self.pki = pki
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        status, body, ctype = self.reply
        return web.Response(status=status, body=body, content_type=ctype)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki / "site-a" / "kme-server.crt",
                            self.pki / "site-a" / "kme-server.key")
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture(scope="module")
def fake(pki: Path, loop_thread: LoopThread) -> Any:
    f = FakeKme(pki, loop_thread)
    loop_thread.run(f.start())
    yield f
    loop_thread.run(f.stop())


def call_client(fake: FakeKme, pki: Path,
                action: Callable[[EtsiClient], Coroutine[Any, Any, Any]]) -> Any:
    async def go() -> Any:
        async with EtsiClient(f"https://127.0.0.1:{fake.port}", ca_file=pki / "tls-ca.crt",
                              cert_file=pki / "site-a" / "sae-client.crt",
                              key_file=pki / "site-a" / "sae-client.key",
                              timeout=20) as c:
            return await action(c)
    return asyncio.run(go())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def key_container(draw: st.DrawFn, ids: list[str], size_bits: int) -> Any:
    """A correct container for `ids`, then zero or more damaging edits."""
    keys: list[Any] = [{"key_ID": k, "key": b64(draw(st.binary(min_size=size_bits // 8,
                                                               max_size=size_bits // 8)))}
                       for k in ids]
    container: Any = {"keys": keys}
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.integers(0, 13))
        items = container.get("keys") if isinstance(container, dict) else None
        if not isinstance(items, list) or not items:
            container = draw(_json)
            continue
        i = draw(st.integers(0, len(items) - 1))
        item = items[i]
        if edit == 0:
            items.pop(i)
        elif edit == 1:
            items.append(dict(item) if isinstance(item, dict) else item)
        elif edit == 2 and isinstance(item, dict):
            item["key_ID"] = draw(st.one_of(st.uuids().map(str), _json_scalar))
        elif edit == 3 and isinstance(item, dict):
            item["key"] = draw(st.one_of(_text, _json_scalar, st.binary(max_size=70).map(b64)))
        elif edit == 4 and isinstance(item, dict):
            try:
                raw = base64.b64decode(item.get("key", ""), validate=True)
            except (ValueError, TypeError, binascii.Error):
                raw = b"\x01\x02\x03"
            item["key"] = draw(st.sampled_from([
                b64(raw)[:-1], b64(raw) + "=", " " + b64(raw), b64(raw).replace("+", "-"),
                b64(raw + b"\x00"), b64(raw[:-1]), base64.urlsafe_b64encode(raw).decode(),
                b64(raw) + "\n", ""]))
        elif edit == 5 and isinstance(item, dict):
            item.pop(draw(st.sampled_from(["key", "key_ID"])), None)
        elif edit == 6:
            items[i] = draw(_json)
        elif edit == 7:
            container = {"keys": draw(_json)}
        elif edit == 8:
            container = draw(_json)
        elif edit == 9 and isinstance(item, dict):
            item[draw(_text)] = draw(_json)
        elif edit == 10:
            container[draw(_text)] = draw(_json)
        elif edit == 11:
            items.reverse()
        elif edit == 12 and isinstance(item, dict) and isinstance(item.get("key_ID"), str):
            item["key_ID"] = item["key_ID"].upper()
        elif edit == 13:
            items.insert(0, items.pop())
    return container


@st.composite
def kme_reply(draw: st.DrawFn, ids: list[str], size_bits: int) -> tuple[int, bytes, str]:
    kind = draw(st.integers(0, 9))
    ctype = draw(st.sampled_from(["application/json", "text/plain", "application/octet-stream"]))
    if kind == 0:
        return draw(st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 500, 502, 503])), \
            draw(st.one_of(st.binary(max_size=100), _json.map(etsi014.dumps))), ctype
    if kind == 1:  # error bodies, well-formed or not
        msg = draw(st.one_of(_text, st.just("no key available"), st.just("Out of keys")))
        body = etsi014.dumps({"message": msg, "details": draw(st.lists(_json, max_size=2))})
        return draw(st.sampled_from([400, 401, 503, 500, 418])), body, ctype
    if kind == 2:  # JSON-ish bytes that are not strict JSON
        good = json.dumps(draw(key_container(ids, size_bits)))
        return 200, draw(st.sampled_from([
            good.replace("{", '{"keys": [], ', 1), good + " x", good[:-1], "NaN",
            good.replace('"keys"', '"keys": 1, "keys"', 1), "\ufeff" + good,
        ])).encode(), ctype
    container = draw(key_container(ids, size_bits))
    return 200, json.dumps(container, ensure_ascii=draw(st.booleans())).encode(), ctype


def _sent_keys(body: bytes) -> dict[str, set[bytes]]:
    """Every (canonical key ID -> key bytes) the reply body carries, decoded leniently."""
    out: dict[str, set[bytes]] = {}
    try:
        obj = json.loads(body)
    except ValueError:
        return out
    items = obj.get("keys") if isinstance(obj, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        try:
            kid = etsi014.canonical_key_id(item.get("key_ID"))
            raw = base64.b64decode(item.get("key", ""), validate=True)
        except (ValueError, TypeError, binascii.Error):
            continue
        out.setdefault(kid, set()).add(raw)
    return out


def _check_client_outcome(outcome: Any, body: bytes, ids: list[str] | None, number: int,
                          size_bits: int) -> None:
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, KmeError), repr(outcome)
        text = str(outcome)
        for keys in _sent_keys(body).values():
            for raw in keys:
                assert len(raw) < 4 or b64(raw) not in text  # no key material echoed
        return
    sent = _sent_keys(body)
    assert len(outcome) == number
    assert len({k.key_id for k in outcome}) == number
    for k in outcome:
        assert len(k.key) * 8 == size_bits
        # Exactly what the KME sent under that ID, and that ID was sent once only.
        assert sent.get(etsi014.canonical_key_id(k.key_id)) == {k.key}
    if ids is not None:
        assert [k.key_id for k in outcome] == ids


async def _capture(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        return await coro
    except Exception as exc:
        return exc


def run_enc(fake: FakeKme, pki: Path, reply: tuple[int, bytes, str], number: int,
            size_bits: int) -> Any:
    fake.reply = reply
    return call_client(fake, pki, lambda c: _capture(
        c.get_enc_keys("site-b-gw", number=number, size=size_bits)))


def run_dec(fake: FakeKme, pki: Path, reply: tuple[int, bytes, str], ids: list[str],
            size_bits: int) -> Any:
    fake.reply = reply
    return call_client(fake, pki, lambda c: _capture(
        c.get_dec_keys("site-b-gw", ids, size=size_bits)))


def test_client_oracle_positive_controls(fake: FakeKme, pki: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(2)]
    good = etsi014.dumps({"keys": [{"key_ID": k, "key": b64(bytes([i]) * 32)}
                                   for i, k in enumerate(ids)]})
    keys = run_dec(fake, pki, (200, good, "application/json"), ids, 256)
    _check_client_outcome(keys, good, ids, 2, 256)
    assert [k.key for k in keys] == [b"\x00" * 32, b"\x01" * 32]
    # A reply the client must refuse is refused with its own error type...
    short = etsi014.dumps({"keys": [{"key_ID": ids[0], "key": b64(b"\x00" * 31)}]})
    assert isinstance(run_enc(fake, pki, (200, short, "application/json"), 1, 256),
                      KmeProtocolError)
    assert isinstance(run_enc(fake, pki, (503, etsi014.dumps(etsi014.build_error(
        "no key available")), "application/json"), 1, 256), KmeNoKey)
    assert isinstance(run_enc(fake, pki, (400, b"{}", "application/json"), 1, 256),
                      KmeRejected)
    # ...and the outcome check would catch a client that repaired a wrong key.
    wrong = [etsi014.QkdKey(ids[0], b"\x07" * 32)]
    with pytest.raises(AssertionError):
        _check_client_outcome(wrong, good, ids[:1], 1, 256)


@st.composite
def _request_shape(draw: st.DrawFn) -> tuple[int, int]:
    return draw(st.integers(1, 3)), draw(st.sampled_from([64, 128, 256]))


@SHORT
@given(shape=_request_shape(), data=st.data())
def test_client_enc_keys_replies(fake: FakeKme, pki: Path, shape: tuple[int, int],
                                 data: st.DataObject) -> None:
    number, size_bits = shape
    ids = [str(uuid.uuid4()) for _ in range(number)]
    reply = data.draw(kme_reply(ids, size_bits))
    outcome = run_enc(fake, pki, reply, number, size_bits)
    _check_client_outcome(outcome, reply[1] if reply[0] == 200 else b"", None, number,
                          size_bits)


@SHORT
@given(shape=_request_shape(), data=st.data())
def test_client_dec_keys_replies(fake: FakeKme, pki: Path, shape: tuple[int, int],
                                 data: st.DataObject) -> None:
    number, size_bits = shape
    ids = [str(uuid.uuid4()) for _ in range(number)]
    reply = data.draw(kme_reply(ids, size_bits))
    outcome = run_dec(fake, pki, reply, ids, size_bits)
    _check_client_outcome(outcome, reply[1] if reply[0] == 200 else b"", ids, number,
                          size_bits)


@pytest.mark.slow
@LONG
@given(body=request_body(), query=query_string(), data=st.data())
def test_kme_long_run(client: KmeClient, kme: RunningKme, foreign_key_ids: list[str],
                      body: bytes, query: str, data: st.DataObject) -> None:
    check_enc_post(client, kme, body)
    check_dec(client, "POST", body)
    check_dec(client, "GET", None, query)


@pytest.mark.slow
@LONG
@given(shape=_request_shape(), data=st.data())
def test_client_long_run(fake: FakeKme, pki: Path, shape: tuple[int, int],
                         data: st.DataObject) -> None:
    number, size_bits = shape
    ids = [str(uuid.uuid4()) for _ in range(number)]
    reply = data.draw(kme_reply(ids, size_bits))
    if data.draw(st.booleans()):
        outcome = run_dec(fake, pki, reply, ids, size_bits)
        _check_client_outcome(outcome, reply[1] if reply[0] == 200 else b"", ids, number,
                              size_bits)
    else:
        outcome = run_enc(fake, pki, reply, number, size_bits)
        _check_client_outcome(outcome, reply[1] if reply[0] == 200 else b"", None, number,
                              size_bits)


def test_json_strategy_covers_its_corners() -> None:
    # The strategies can produce what the module docstring promises (not a tautology:
    # a narrowed strategy would fail this).
    assert math.isinf(json.loads("1e400"))
    with pytest.raises(ValueError):
        etsi014.loads_strict(b'{"a": 1, "a": 2}')
    with pytest.raises(ValueError):
        etsi014.loads_strict(b"\xff\xfe{}")
