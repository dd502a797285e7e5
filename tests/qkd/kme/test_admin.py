"""The KME's admin endpoint ([admin] listen): /status JSON and Prometheus /metrics,
off unless configured, no key material in either. The BB84 figures in it (QBER, rounds,
authentication failures, reservations) are checked on real processes in
tests/qkd/link/test_tamper.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from qkd.common.confload import ConfigError
from qkd.etsi014 import messages as etsi014
from qkd.etsi014.client import EtsiClient
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme

ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'


async def _get(port: int, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def test_admin_status_and_metrics(make_config: Callable[..., KmeConfig],
                                        sae: Callable[..., EtsiClient]) -> None:
    kme: RunningKme = await start_kme(make_config("a", extra=ADMIN))
    try:
        assert kme.admin_port
        async with sae("site-a", kme) as gw:
            keys = await gw.get_enc_keys("site-b-gw", number=3)
        code, ctype, body = await _get(kme.admin_port, "/status")
        assert code == 200 and ctype.startswith("application/json")
        assert '"kme_id": "kme-site-a"' in body and '"link_type": "ideal"' in body
        code, ctype, text = await _get(kme.admin_port, "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        assert "qkdgw_kme_pool_max_blocks 1000.0" in text
        assert (await _get(kme.admin_port, "/nothing"))[0] == 404
        # No key material: neither the bytes (hex, base64) nor the key IDs appear.
        for k in keys:
            for needle in (k.key.hex(), base64.b64encode(k.key).decode(), k.key_id):
                assert needle not in body and needle not in text
        # Positive control: the same search finds a key in the ETSI answer it came in.
        answer = json.dumps(etsi014.build_key_container(keys))
        assert base64.b64encode(keys[0].key).decode() in answer
    finally:
        await kme.close()


async def test_admin_off_when_absent(make_config: Callable[..., KmeConfig]) -> None:
    kme = await start_kme(make_config("a"))
    try:
        assert kme.admin_port is None and kme.admin_runner is None
    finally:
        await kme.close()


@pytest.mark.parametrize(("value", "match"), [('"kme.example:9201"', "not an IP address"),
                                              ('"127.0.0.1"', "listen")])
def test_bad_admin_listen_names_the_field(make_config: Callable[..., KmeConfig], value: str,
                                          match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        make_config("a", extra=f"[admin]\nlisten = {value}\n")
    assert "[admin]" in str(exc.value) or "admin" in str(exc.value)


def test_example_configs_admin_addresses_differ(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3] / "configs"
    a = (root / "kme-a.toml").read_text()
    b = (root / "kme-b.toml").read_text()
    assert "[admin]" in a and "[admin]" in b
    assert "9201" in a and "9202" in b
