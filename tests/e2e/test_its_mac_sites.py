"""The one-time MAC mode between real processes: the KMEs hand out three keys per
handshake and the tunnel carries data."""

from __future__ import annotations

from pathlib import Path

from gateway.tools.testbed import Testbed, TestbedOptions
from tests.support.app_traffic import app_exchange


class ItsTestbed(Testbed):
    def gateway_config(self, site: str, peer: str, **kw: object) -> str:
        return super().gateway_config(site, peer, **kw) + "\n[auth]\nits_mac = true\n"  # type: ignore[arg-type]


def test_its_mac_tunnel_uses_three_qkd_keys_per_handshake(tmp_path: Path) -> None:
    with ItsTestbed(tmp_path, TestbedOptions(link="ideal")) as bed:
        bed.start_all()
        status = bed.wait_tunnel()
        assert status["peer"]["its_mac"] is True
        answer = app_exchange(bed.ports["listen-site-a-sink"], b"m" * 3000)
        assert int.from_bytes(answer[:8], "big") == 3000
        assert status["qkd_keys_consumed"] == 3 * status["handshakes"]
