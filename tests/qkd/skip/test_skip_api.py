"""SKIP beside ETSI 014 on real loopback KMEs: both APIs hand out the same keys, each
key once per end whichever API fetches it, and bad input gets named errors."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkd.etsi014.client import EtsiClient, KmeProtocolError, KmeRejected
from qkd.etsi014.messages import QkdKey, SchemaError
from qkd.kme.service import RunningKme
from qkd.skip import messages as skip
from qkd.skip.client import SkipClient


def _ctx(pki: Path, site: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "tls-ca.crt"))
    ctx.load_cert_chain(pki / site / "sae-client.crt", pki / site / "sae-client.key")
    return ctx


async def raw(pki: Path, site: str, kme: RunningKme, path: str,
              params: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = aiohttp.TCPConnector(ssl=_ctx(pki, site))
    async with aiohttp.ClientSession(connector=conn) as s, s.get(
            kme.url + path, params=params) as resp:
        return resp.status, json.loads(await resp.read())


@pytest.fixture
def skip_sae(pki: Path) -> Callable[[str, RunningKme], SkipClient]:
    def make(site: str, kme: RunningKme) -> SkipClient:
        return SkipClient(kme.url, ca_file=pki / "tls-ca.crt",
                          cert_file=pki / site / "sae-client.crt",
                          key_file=pki / site / "sae-client.key")
    return make


async def test_capabilities_name_the_caller_and_its_remotes(
        kmes: dict[str, RunningKme], pki: Path) -> None:
    status, body = await raw(pki, "site-a", kmes["a"], "/capabilities")
    assert status == 200, body
    assert body["localSystemID"] == "site-a-gw"
    assert body["remoteSystemID"] == ["site-b-gw", "site-d-gw"]
    assert (body["minKeySize"], body["defaultKeySize"], body["maxKeySize"]) == (64, 256, 1024)


@pytest.mark.parametrize(("master_api", "slave_api"),
                         [("skip", "etsi"), ("etsi", "skip"), ("skip", "skip")])
async def test_both_ends_get_the_same_key_over_either_api(
        kmes: dict[str, RunningKme], sae: Callable[..., EtsiClient],
        skip_sae: Callable[..., SkipClient], master_api: str, slave_api: str) -> None:
    make = {"skip": skip_sae, "etsi": sae}
    async with make[master_api]("site-a", kmes["a"]) as a, \
            make[slave_api]("site-b", kmes["b"]) as b:
        (mk,) = await a.get_enc_keys("site-b-gw", 1, 512)
        (sk,) = await b.get_dec_keys("site-a-gw", [mk.key_id])
    assert len(mk.key) == 64 and sk == mk


async def test_a_key_is_delivered_once_across_the_two_apis(
        kmes: dict[str, RunningKme], sae: Callable[..., EtsiClient],
        skip_sae: Callable[..., SkipClient], pki: Path) -> None:
    async with sae("site-a", kmes["a"]) as a, sae("site-b", kmes["b"]) as b_etsi, \
            skip_sae("site-b", kmes["b"]) as b_skip:
        k1, k2 = await a.get_enc_keys("site-b-gw", 2)
        # Positive control: each ID can be fetched once, by either API.
        assert (await b_skip.get_dec_keys("site-a-gw", [k1.key_id]))[0] == k1
        assert (await b_etsi.get_dec_keys("site-a-gw", [k2.key_id]))[0] == k2
        with pytest.raises(KmeRejected, match="already delivered") as etsi_again:
            await b_etsi.get_dec_keys("site-a-gw", [k1.key_id])
        assert etsi_again.value.status == 400
    status, body = await raw(pki, "site-b", kmes["b"], f"/key/{skip.skip_key_id(k2.key_id)}",
                             {"remoteSystemID": "site-a-gw"})
    assert status == 404 and "already delivered" in body["message"]


async def test_a_key_is_only_for_its_own_pair(kmes: dict[str, RunningKme],
                                              skip_sae: Callable[..., SkipClient],
                                              pki: Path) -> None:
    async with skip_sae("site-a", kmes["a"]) as a:
        (k,) = await a.get_enc_keys("site-b-gw")
    # site-d-gw is at KME-B too, but the key was made for site-b-gw.
    status, body = await raw(pki, "site-d", kmes["b"], f"/key/{skip.skip_key_id(k.key_id)}",
                             {"remoteSystemID": "site-a-gw"})
    assert status == 401 and "key" not in body, body
    async with skip_sae("site-b", kmes["b"]) as b:
        assert (await b.get_dec_keys("site-a-gw", [k.key_id]))[0] == k


@pytest.mark.parametrize(("path", "params", "status", "field"), [
    ("/key", {}, 400, "remoteSystemID"),
    ("/key", {"remoteSystemID": "site-c-gw"}, 400, "remoteSystemID"),  # local, not remote
    ("/key", {"remoteSystemID": "site-b-gw", "size": "100"}, 400, "size"),
    ("/key", {"remoteSystemID": "site-b-gw", "size": "2048"}, 400, "size"),
    ("/key", {"remoteSystemID": "site-b-gw", "size": "+256"}, 400, "size"),
    ("/key", {"remoteSystemID": "site-b-gw", "number": "2"}, 400, "number"),
    ("/key/xyz", {"remoteSystemID": "site-b-gw"}, 400, "keyId"),
    ("/key/" + "0" * 31, {"remoteSystemID": "site-b-gw"}, 400, "keyId"),
    ("/key/" + uuid.uuid4().hex, {"remoteSystemID": "site-b-gw"}, 404, "keyId"),
])
async def test_bad_requests_get_errors_naming_the_field(
        kmes: dict[str, RunningKme], pki: Path, path: str, params: dict[str, str],
        status: int, field: str) -> None:
    got, body = await raw(pki, "site-a", kmes["a"], path, params)
    assert got == status, body
    assert field in body["message"] or any(field in json.dumps(d) for d in body["details"])
    assert "key" not in body


async def test_status_over_skip_has_no_pool_count(kmes: dict[str, RunningKme],
                                                  skip_sae: Callable[..., SkipClient]) -> None:
    async with skip_sae("site-a", kmes["a"]) as a:
        st = await a.status("site-b-gw")
        assert st["key_size"] == 256 and st["stored_key_count"] is None
        with pytest.raises(KmeProtocolError, match="remote system"):
            await a.status("site-z-gw")


def test_key_answer_checks() -> None:
    kid = str(uuid.uuid4())
    good = skip.build_key(QkdKey(kid, bytes(range(32))))
    assert skip.parse_key_answer(good, 256, kid) == QkdKey(kid, bytes(range(32)))
    bad = [
        (good | {"key": good["key"][:-2]}, "bits"),          # short key
        (good | {"key": good["key"] + "0"}, "hex"),          # odd length
        (good | {"key": "zz" * 32}, "hex"),
        (good | {"keyId": uuid.uuid4().hex}, "another keyId"),
        (good | {"keyId": kid}, "32 hexadecimal"),            # ETSI form, not SKIP's
        ([good], "object"),
    ]
    for obj, match in bad:
        with pytest.raises(SchemaError, match=match):
            skip.parse_key_answer(obj, 256, kid)
