"""A gateway can take its QKD keys over Cisco SKIP (`[kme] api = "skip"`) instead of
ETSI 014: real KMEs and gateways on loopback TLS, the tunnel up in hybrid mode with the
same QKD key at both ends, whichever API each site uses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from qkd.etsi014.client import EtsiClient
from qkd.skip.client import SkipClient
from tests.support.mitm_relay import Sites


@pytest.mark.parametrize(("api_a", "api_b"), [("skip", "skip"), ("skip", "etsi014")])
async def test_tunnel_runs_on_keys_fetched_over_skip(sites: Sites, api_a: str,
                                                     api_b: str) -> None:
    await sites.start(a={"kme_api": api_a}, b={"kme_api": api_b})
    await sites.wait_tunnel()
    kinds = {"skip": SkipClient, "etsi014": EtsiClient}
    assert type(sites.a.kme) is kinds[api_a] and type(sites.b.kme) is kinds[api_b]
    payload = b"over SKIP keys " * 500
    assert (await sites.exchange(payload)).outcome(payload) == "ok"
    ta, tb = sites.tunnel_of("site-a"), sites.tunnel_of("site-b")
    # Hybrid: both ends mixed in a QKD key (a mismatch would have failed the handshake).
    assert ta.conn.stats.qkd_keys_consumed >= 1 and tb.conn.stats.qkd_keys_consumed >= 1
    delivered = [e for e in sites.logs if e.get("event") == "keys_delivered"]
    assert {e["role"] for e in delivered} == {"master", "slave"}


def test_config_takes_api_and_names_the_field_when_wrong(tmp_path: Path,
                                                         pki_dir: Path) -> None:
    repo = Path(__file__).resolve().parents[3]
    shutil.copytree(pki_dir, tmp_path / "pki")
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "site-a.toml"
    text = (repo / "configs" / "site-a.toml").read_text()
    cfg.write_text(text)
    assert GatewayConfig.load(cfg).kme_api == "etsi014"
    cfg.write_text(text.replace('# api = "etsi014"', 'api = "skip"'))
    assert GatewayConfig.load(cfg).kme_api == "skip"
    cfg.write_text(text.replace('# api = "etsi014"', 'api = "kmip"'))
    with pytest.raises(Exception, match=r"\[kme\] api") as err:
        GatewayConfig.load(cfg)
    assert "skip" in str(err.value)
