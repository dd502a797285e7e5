"""The KME over real loopback TLS with certificates from init_pki."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkd.etsi014.client import EtsiClient, KmeNoKey, KmeRejected, KmeUnavailable
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme

API = "/api/v1/keys"


def client_ctx(pki: Path, site: str | None, leaf: str = "sae-client",
               cert_pki: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "tls-ca.crt"))
    if site is not None:
        cp = cert_pki or pki
        ctx.load_cert_chain(cp / site / f"{leaf}.crt", cp / site / f"{leaf}.key")
    return ctx


async def raw(pki: Path, site: str, kme: RunningKme, method: str, path: str, *,
              params: dict[str, str] | None = None, json_body: Any = None,
              data: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request as `site`-gw; (status, parsed JSON body)."""
    conn = aiohttp.TCPConnector(ssl=client_ctx(pki, site))
    async with aiohttp.ClientSession(connector=conn) as s, s.request(
        method, kme.url + API + path, params=params, json=json_body, data=data
    ) as resp:
        assert resp.content_type == "application/json"
        return resp.status, json.loads(await resp.read())


def assert_keys(obj: dict[str, Any], number: int, size: int) -> list[tuple[str, bytes]]:
    assert set(obj) == {"keys"} and len(obj["keys"]) == number
    out = []
    for item in obj["keys"]:
        assert set(item) == {"key_ID", "key"}
        assert str(uuid.UUID(item["key_ID"])) == item["key_ID"]
        key = base64.b64decode(item["key"], validate=True)
        assert len(key) * 8 == size
        out.append((item["key_ID"], key))
    return out


def assert_error(status: int, obj: Any, expected: int) -> None:
    assert status == expected, obj
    assert isinstance(obj["message"], str) and obj["message"]
    assert isinstance(obj["details"], list)


# ------------------------------------------------------------------------ endpoints


async def test_status(kmes: dict[str, RunningKme], pki: Path) -> None:
    status, obj = await raw(pki, "site-a", kmes["a"], "GET", "/site-b-gw/status")
    assert status == 200
    assert obj["source_KME_ID"] == "kme-site-a" and obj["target_KME_ID"] == "kme-site-b"
    assert obj["master_SAE_ID"] == "site-a-gw" and obj["slave_SAE_ID"] == "site-b-gw"
    assert (obj["key_size"], obj["min_key_size"], obj["max_key_size"]) == (256, 64, 1024)
    assert obj["max_key_count"] == 1000 and obj["max_key_per_request"] == 16
    assert obj["stored_key_count"] == 1000 and obj["max_SAE_ID_count"] == 0


async def test_enc_get_post_and_dec_get_post_agree(kmes: dict[str, RunningKme],
                                                   pki: Path) -> None:
    a, b = kmes["a"], kmes["b"]
    st, obj = await raw(pki, "site-a", a, "GET", "/site-b-gw/enc_keys",
                        params={"number": "2", "size": "128"})
    assert st == 200
    got_get = assert_keys(obj, 2, 128)
    st, obj = await raw(pki, "site-a", a, "POST", "/site-b-gw/enc_keys",
                        json_body={"number": 3, "size": 512, "extension_optional": [{"x": 1}]})
    assert st == 200
    got_post = assert_keys(obj, 3, 512)
    assert len({kid for kid, _ in got_get + got_post}) == 5

    kid, key = got_get[0]
    st, obj = await raw(pki, "site-b", b, "GET", "/site-a-gw/dec_keys", params={"key_ID": kid})
    assert st == 200 and assert_keys(obj, 1, 128) == [(kid, key)]

    st, obj = await raw(pki, "site-b", b, "POST", "/site-a-gw/dec_keys",
                        json_body={"key_IDs": [{"key_ID": k} for k, _ in got_post]})
    assert st == 200 and assert_keys(obj, 3, 512) == got_post


async def test_full_flow_with_client_both_directions(kmes: dict[str, RunningKme],
                                                     sae: Callable[..., EtsiClient]) -> None:
    async with sae("site-a", kmes["a"]) as a_gw, sae("site-b", kmes["b"]) as b_gw:
        enc = await a_gw.get_enc_keys("site-b-gw", number=3, size=256)
        dec = await b_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc], size=256)
        assert dec == enc
        # Reverse direction: site-b-gw is master at its own KME.
        enc = await b_gw.get_enc_keys("site-a-gw")
        dec = await a_gw.get_dec_keys("site-b-gw", [enc[0].key_id])
        assert dec == enc
        status = await a_gw.status("site-b-gw")
        assert status["stored_key_count"] <= status["max_key_count"]


async def test_key_is_bound_to_its_pair(kmes: dict[str, RunningKme],
                                        sae: Callable[..., EtsiClient]) -> None:
    async with sae("site-a", kmes["a"]) as a_gw, sae("site-c", kmes["a"]) as c_gw:
        to_b = (await a_gw.get_enc_keys("site-b-gw"))[0]
        c_to_b = (await c_gw.get_enc_keys("site-b-gw"))[0]
        to_d = (await a_gw.get_enc_keys("site-d-gw"))[0]
    assert len({to_b.key, c_to_b.key, to_d.key}) == 3


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("method", "kw", "needle"), [
    ("GET", {"params": {"size": "100"}}, "multiple of 8"),
    ("GET", {"params": {"size": "2048"}}, "max_key_size"),
    ("GET", {"params": {"size": "32"}}, "min_key_size"),
    ("GET", {"params": {"number": "17"}}, "max_key_per_request"),
    ("POST", {"json_body": {"number": 17}}, "max_key_per_request"),
    ("POST", {"json_body": {"size": 260}}, "multiple of 8"),
    ("POST", {"json_body": {"extension_mandatory": [{"abc_route_type": "direct"}]}},
     "extension_mandatory"),
    ("POST", {"json_body": {"additional_slave_SAE_IDs": ["site-d-gw"]}}, "max_SAE_ID_count"),
    ("POST", {"data": b'{"number": 1'}, "JSON"),
    ("POST", {"data": b"[]"}, "object"),
])
async def test_enc_keys_bad_requests(kmes: dict[str, RunningKme], pki: Path, method: str,
                                     kw: dict[str, Any], needle: str) -> None:
    st, obj = await raw(pki, "site-a", kmes["a"], method, "/site-b-gw/enc_keys", **kw)
    assert_error(st, obj, 400)
    assert needle in json.dumps(obj)


async def test_unknown_slave_and_unregistered_caller(kmes: dict[str, RunningKme],
                                                     pki: Path) -> None:
    for path in ("/site-x-gw/enc_keys", "/site-c-gw/enc_keys", "/site-x-gw/status"):
        st, obj = await raw(pki, "site-a", kmes["a"], "GET", path)
        assert_error(st, obj, 400)
        assert "unknown slave" in obj["message"]
    # site-b-gw has a valid certificate but is not a local SAE of KME-A.
    for path in ("/site-a-gw/enc_keys", "/site-a-gw/status", "/site-a-gw/dec_keys"):
        st, obj = await raw(pki, "site-b", kmes["a"], "GET", path)
        assert_error(st, obj, 401)
        assert "not registered" in obj["message"]


async def test_unknown_route_and_method_answer_json(kmes: dict[str, RunningKme],
                                                    pki: Path) -> None:
    st, obj = await raw(pki, "site-a", kmes["a"], "GET", "/site-b-gw/nothing")
    assert_error(st, obj, 404)
    st, obj = await raw(pki, "site-a", kmes["a"], "DELETE", "/site-b-gw/enc_keys")
    assert_error(st, obj, 405)


async def test_dec_keys_rules(kmes: dict[str, RunningKme], pki: Path,
                              sae: Callable[..., EtsiClient]) -> None:
    a, b = kmes["a"], kmes["b"]
    async with sae("site-a", a) as a_gw:
        kid = (await a_gw.get_enc_keys("site-b-gw"))[0].key_id

    # Wrong caller: site-d-gw is registered at KME-B, but the key is for site-b-gw.
    st, obj = await raw(pki, "site-d", b, "GET", "/site-a-gw/dec_keys", params={"key_ID": kid})
    assert_error(st, obj, 401)
    assert obj["details"] == [{"key_ID": kid}]
    # Path names another master than the one the key was made for.
    st, obj = await raw(pki, "site-b", b, "GET", "/site-c-gw/dec_keys", params={"key_ID": kid})
    assert_error(st, obj, 400)
    # The master cannot redeem its own key at its own KME (site-b-gw is not local there).
    st, obj = await raw(pki, "site-a", a, "GET", "/site-b-gw/dec_keys", params={"key_ID": kid})
    assert_error(st, obj, 401)
    # Forged: a random UUID, and a real ID with one bit flipped.
    flipped = str(uuid.UUID(int=uuid.UUID(kid).int ^ 1))
    for bogus in (str(uuid.uuid4()), flipped):
        st, obj = await raw(pki, "site-b", b, "POST", "/site-a-gw/dec_keys",
                            json_body={"key_IDs": [{"key_ID": bogus}]})
        assert_error(st, obj, 400)
        assert "unknown" in obj["message"]

    # None of the refusals consumed the key: the right slave gets it once...
    st, obj = await raw(pki, "site-b", b, "GET", "/site-a-gw/dec_keys", params={"key_ID": kid})
    assert st == 200
    # ...and never again, alone or inside a batch.
    st, obj = await raw(pki, "site-b", b, "GET", "/site-a-gw/dec_keys", params={"key_ID": kid})
    assert_error(st, obj, 400)
    assert "already delivered" in obj["message"]
    async with sae("site-a", a) as a_gw:
        fresh = (await a_gw.get_enc_keys("site-b-gw"))[0].key_id
    st, obj = await raw(pki, "site-b", b, "POST", "/site-a-gw/dec_keys",
                        json_body={"key_IDs": [{"key_ID": fresh}, {"key_ID": kid}]})
    assert_error(st, obj, 400)
    assert obj["details"] == [{"key_ID": kid}]
    # The batch was all-or-nothing: the fresh key is still deliverable.
    st, obj = await raw(pki, "site-b", b, "GET", "/site-a-gw/dec_keys",
                        params={"key_ID": fresh})
    assert st == 200


@pytest.mark.parametrize(("kw"), [
    {"data": b"{"},
    {"json_body": {"key_IDs": [{"key_ID": "nope"}]}},
    {"json_body": {"key_IDs": []}},
    {"json_body": {"key_IDs": [{"key_ID": str(uuid.uuid4())}] * 2}},
])
async def test_dec_keys_bad_requests(kmes: dict[str, RunningKme], pki: Path,
                                     kw: dict[str, Any]) -> None:
    st, obj = await raw(pki, "site-b", kmes["b"], "POST", "/site-a-gw/dec_keys", **kw)
    assert_error(st, obj, 400)


async def test_client_maps_rejections(kmes: dict[str, RunningKme],
                                      sae: Callable[..., EtsiClient]) -> None:
    async with sae("site-b", kmes["b"]) as b_gw:
        with pytest.raises(KmeRejected) as ei:
            await b_gw.get_dec_keys("site-a-gw", [str(uuid.uuid4())])
    assert ei.value.status == 400 and "unknown" in ei.value.message
    assert kmes["b"].url in str(ei.value)


# ---------------------------------------------------------------------------- TLS


async def _no_http_answer(url: str, ctx: ssl.SSLContext) -> None:
    """The request fails at the TLS/connection level: no HTTP status ever arrives."""
    conn = aiohttp.TCPConnector(ssl=ctx)
    async with aiohttp.ClientSession(connector=conn) as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with s.get(url + API + "/site-b-gw/status") as resp:
                pytest.fail(f"got an HTTP answer {resp.status}")


async def test_client_without_certificate_cannot_connect(kmes: dict[str, RunningKme],
                                                         pki: Path) -> None:
    await _no_http_answer(kmes["a"].url, client_ctx(pki, None))


async def test_certificate_from_other_ca_cannot_connect(
        kmes: dict[str, RunningKme], pki: Path, other_pki: Path,
        sae: Callable[..., EtsiClient]) -> None:
    # Same CN (site-a-gw), other CA.
    await _no_http_answer(kmes["a"].url, client_ctx(pki, "site-a", cert_pki=other_pki))
    async with sae("site-a", kmes["a"], cert_pki=other_pki) as gw:
        with pytest.raises(KmeUnavailable):
            await gw.status("site-b-gw")


async def test_server_certificate_cannot_be_used_as_client(kmes: dict[str, RunningKme],
                                                           pki: Path) -> None:
    # kme-server.crt chains to the right CA but lacks the clientAuth usage.
    await _no_http_answer(kmes["a"].url, client_ctx(pki, "site-b", leaf="kme-server"))


async def test_client_refuses_kme_from_other_ca(kmes: dict[str, RunningKme],
                                                other_pki: Path,
                                                sae: Callable[..., EtsiClient]) -> None:
    async with sae("site-a", kmes["a"], ca_pki=other_pki) as gw:
        with pytest.raises(KmeUnavailable):
            await gw.get_enc_keys("site-b-gw")


# -------------------------------------------------------------- persistence, pool


async def test_restart_keeps_deliveries_and_counters(make_config: Callable[..., KmeConfig],
                                                     sae: Callable[..., EtsiClient]) -> None:
    cfg_a, cfg_b = make_config("a"), make_config("b")
    a, b = await start_kme(cfg_a), await start_kme(cfg_b)
    try:
        async with sae("site-a", a) as a_gw, sae("site-b", b) as b_gw:
            first = await a_gw.get_enc_keys("site-b-gw", number=2)
            await b_gw.get_dec_keys("site-a-gw", [first[0].key_id])
    finally:
        await a.close()
        await b.close()

    a, b = await start_kme(cfg_a), await start_kme(cfg_b)
    try:
        assert await a.service.store.next_counter("site-a-gw", "site-b-gw") == 2
        async with sae("site-a", a) as a_gw, sae("site-b", b) as b_gw:
            with pytest.raises(KmeRejected, match="already delivered"):
                await b_gw.get_dec_keys("site-a-gw", [first[0].key_id])
            later = await a_gw.get_enc_keys("site-b-gw", number=2)
            assert not {k.key_id for k in later} & {k.key_id for k in first}
            assert not {k.key for k in later} & {k.key for k in first}
            # The undelivered key from before the restart is still redeemable once.
            got = await b_gw.get_dec_keys("site-a-gw", [first[1].key_id, later[0].key_id])
            assert got == [first[1], later[0]]
    finally:
        await a.close()
        await b.close()


async def test_pool_dry_gives_no_key(make_config: Callable[..., KmeConfig],
                                     sae: Callable[..., EtsiClient]) -> None:
    kme = await start_kme(make_config("a", key_rate="0"))
    try:
        async with sae("site-a", kme) as gw:
            assert (await gw.status("site-b-gw"))["stored_key_count"] == 0
            with pytest.raises(KmeNoKey):
                await gw.get_enc_keys("site-b-gw")
        assert await kme.service.store.next_counter("site-a-gw", "site-b-gw") == 0
    finally:
        await kme.close()


async def test_pool_fills_at_key_rate_and_runs_dry(make_config: Callable[..., KmeConfig],
                                                   sae: Callable[..., EtsiClient]) -> None:
    now = [0.0]
    kme = await start_kme(make_config("a", key_rate="2", max_key_count=8,
                                      max_key_per_request=4),
                          clock=lambda: now[0])
    try:
        async with sae("site-a", kme) as gw:
            assert (await gw.status("site-b-gw"))["stored_key_count"] == 0
            now[0] = 100.0
            status = await gw.status("site-b-gw")
            assert status["stored_key_count"] == status["max_key_count"] == 8
            await gw.get_enc_keys("site-b-gw", number=2, size=512)   # 4 pool keys
            assert (await gw.status("site-b-gw"))["stored_key_count"] == 4
            await gw.get_enc_keys("site-b-gw", number=4)
            with pytest.raises(KmeNoKey):
                await gw.get_enc_keys("site-b-gw")
            now[0] = 100.5
            assert len(await gw.get_enc_keys("site-b-gw")) == 1
    finally:
        await kme.close()


async def test_concurrent_requests_never_share_a_key(kmes: dict[str, RunningKme],
                                                     sae: Callable[..., EtsiClient]) -> None:
    async with sae("site-a", kmes["a"]) as a_gw, sae("site-b", kmes["b"]) as b_gw:
        batches = await asyncio.gather(*(a_gw.get_enc_keys("site-b-gw", number=3)
                                         for _ in range(15)))
        keys = [k for batch in batches for k in batch]
        assert len({k.key_id for k in keys}) == len({k.key for k in keys}) == 45
        kid = keys[0].key_id
        clients = [sae("site-b", kmes["b"]) for _ in range(8)]
        try:
            outcomes = await asyncio.gather(*(c.get_dec_keys("site-a-gw", [kid])
                                              for c in clients), return_exceptions=True)
        finally:
            for c in clients:
                await c.close()
        assert sum(isinstance(o, list) for o in outcomes) == 1
        assert all(isinstance(o, KmeRejected) for o in outcomes if not isinstance(o, list))
        assert b_gw is not None


# ------------------------------------------------ ETSI 014 rules added in the audit


async def test_enc_keys_up_to_max_key_per_request_in_one_answer(
        kmes: dict[str, RunningKme], pki: Path) -> None:
    st, obj = await raw(pki, "site-a", kmes["a"], "POST", "/site-b-gw/enc_keys",
                        json_body={"number": 16, "size": 64,
                                   "extension_optional": [{"vendor_x": {"qos": 1}}]})
    assert st == 200
    assert len({kid for kid, _ in assert_keys(obj, 16, 64)}) == 16
    st, obj = await raw(pki, "site-a", kmes["a"], "GET", "/site-b-gw/enc_keys",
                        params={"number": "16"})
    assert st == 200 and len(assert_keys(obj, 16, 256)) == 16


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/site-b-gw/enc_keys", {"extension_optional": {"a": 1}}, "extension_optional"),
    ("/site-b-gw/enc_keys", {"extension_mandatory": {}}, "extension_mandatory"),
    ("/site-b-gw/enc_keys", {"number": 0}, "number"),
    ("/site-b-gw/enc_keys", {"number": True}, "number"),
    ("/site-b-gw/enc_keys", {"size": 256.5}, "size"),
    ("/site-b-gw/enc_keys", {"nuber": 1}, "nuber"),
    ("/site-a-gw/dec_keys", {"key_IDs": [{"key_ID": "6f2d1c9e-0000-4000-8000-000000000000",
                                          "key_ID_extension": 5}]}, "key_ID_extension"),
    ("/site-a-gw/dec_keys", {"key_IDs": [{"key_ID": "6f2d1c9e-0000-4000-8000-000000000000"}],
                             "key_IDs_extension": []}, "key_IDs_extension"),
    ("/site-a-gw/dec_keys", {"key_IDs": [{"key_ID": f"6f2d1c9e-0000-4000-8000-{i:012d}"}
                                         for i in range(17)]}, "max_key_per_request"),
    ("/site-a-gw/dec_keys", {"key_IDs": []}, "key_IDs"),
    ("/site-a-gw/dec_keys", {"key_IDs": [{"key_ID": "not-a-uuid"}]}, "key_IDs[0].key_ID"),
])
async def test_malformed_bodies_name_the_field(kmes: dict[str, RunningKme], pki: Path,
                                               path: str, body: Any, needle: str) -> None:
    side, site = ("a", "site-a") if "enc_keys" in path else ("b", "site-b")
    st, obj = await raw(pki, site, kmes[side], "POST", path, json_body=body)
    assert_error(st, obj, 400)
    assert needle in json.dumps(obj)


async def test_caller_identity_per_connection_on_keep_alive(kmes: dict[str, RunningKme],
                                                            pki: Path) -> None:
    """The caller's CNs are read once per TLS connection: alternating requests on two
    kept-alive connections with different certificates each name their own SAE, and
    a certificate of an unregistered SAE is refused on every request, not just the
    first one of its connection."""
    url = kmes["a"].url + API
    conns = {site: aiohttp.TCPConnector(ssl=client_ctx(pki, site), limit=1)
             for site in ("site-a", "site-c", "site-b")}
    sessions = {site: aiohttp.ClientSession(connector=c) for site, c in conns.items()}
    try:
        for _ in range(3):
            for site in ("site-a", "site-c"):
                async with sessions[site].get(url + "/site-b-gw/status") as r:
                    obj = json.loads(await r.read())
                assert r.status == 200 and obj["master_SAE_ID"] == f"{site}-gw"
            async with sessions["site-b"].get(url + "/site-a-gw/status") as r:
                obj = json.loads(await r.read())
            assert_error(r.status, obj, 401)
            assert "not registered" in obj["message"]
        # One TCP connection each (limit=1, keep-alive): the cache was really exercised.
        for c in conns.values():
            assert sum(len(v) for v in c._conns.values()) == 1
    finally:
        for s in sessions.values():
            await s.close()
