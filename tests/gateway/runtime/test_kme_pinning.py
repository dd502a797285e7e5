"""The gateway pins its own KME (issue 9.5): `[kme] id` (default "kme-<site_id>") must be
the name in the KME's TLS certificate, the connection is TLS 1.3, and /status shows
what was negotiated (version, cipher, whether the hybrid ML-KEM group was available).

Real KMEs and gateways in this event loop, real TLS with client certificates. The
attack at the ETSI client level (a KME with another site's certificate from the same CA)
is in tests/qkd/etsi014/test_client_pinning.py; here: a gateway whose KME does not
carry the expected name fails closed, and the control with the right name comes up."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest

from gateway.config import GatewayConfig
from tests.support.mitm_relay import Sites


async def _status(sites: Sites, site: str) -> dict:
    url = f"http://127.0.0.1:{sites.gateways[site].admin_port}/status"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def test_gateway_pins_its_kme_and_shows_tls_in_status(sites: Sites) -> None:
    await sites.start()
    await sites.wait_tunnel()
    status = await _status(sites, "site-a")
    tls = status["kme_tls"]
    assert tls["kme_id"] == "kme-site-a" and tls["pinned"] and tls["peer"] == "kme-site-a"
    assert tls["version"] == "TLSv1.3" and tls["min_version"] == "1.3"
    assert isinstance(tls["hybrid_group_offered"], bool) and tls["openssl"]
    if not tls["hybrid_group_offered"]:
        assert tls["group"] is None and "no ML-KEM group" in tls["note"]


async def test_kme_without_the_pinned_name_fails_closed(sites: Sites) -> None:
    # Site A expects "kme-site-c": its real KME (certificate for kme-site-a) is refused,
    # so no QKD key and no tunnel (fail closed; degraded mode is off).
    await sites.start(a={"kme_id": "kme-site-c"})
    with pytest.raises(AssertionError, match="timed out"):
        await sites.wait_tunnel(timeout=3.0)
    status = await _status(sites, "site-a")
    assert status["peer"]["tunnel"] == "down"
    assert status["kme_tls"]["version"] is None  # no handshake with the KME completed
    refusals = [e for e in sites.logs if e.get("event") == "kme.enc_keys_failed"
                and "not this site's KME 'kme-site-c'" in e.get("error", "")]
    assert refusals, "the refusal should say why"
    assert any(e.get("code_name") == "QKD_UNAVAILABLE" for e in sites.logs)


def test_config_default_and_explicit_kme_id(tmp_path: Path, pki_dir: Path) -> None:
    repo = Path(__file__).resolve().parents[3]
    shutil.copytree(pki_dir, tmp_path / "pki")
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "site-a.toml"
    text = (repo / "configs" / "site-a.toml").read_text()
    cfg.write_text(text)
    loaded = GatewayConfig.load(cfg)
    assert loaded.kme_name == "kme-site-a" and loaded.kme_min_tls == "1.3"
    cfg.write_text(text.replace('id = "kme-site-a"\n', ""))
    assert GatewayConfig.load(cfg).kme_name == "kme-site-a"  # the default
    cfg.write_text(text.replace('# tls_min_version = "1.3"', 'tls_min_version = "1.0"'))
    with pytest.raises(Exception, match=r"\[kme\] tls_min_version"):
        GatewayConfig.load(cfg)
