"""The KMEs as processes on the emulated BB84 link: keys the gateways use, and an
eavesdropper on the quantum channel stopping key production so the tunnel fails closed.

Rounds of 1.2e7 pulses over 10 km keep each round near two seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.tools.testbed import Testbed, TestbedError, TestbedOptions
from tests.support.app_traffic import app_exchange as _app_exchange

FAST = dict(link="bb84", distance_km=10.0, pulses=12_000_000, connect_wait=2.0)


def test_gateways_use_keys_from_the_bb84_link(tmp_path: Path) -> None:
    with Testbed(tmp_path, TestbedOptions(**FAST)) as bed:  # type: ignore[arg-type]
        bed.start_all()
        bed.wait_tunnel()
        answer = _app_exchange(bed.ports["listen-site-a-sink"], b"x" * 5000)
        assert int.from_bytes(answer[:8], "big") == 5000
        link_a, link_b = bed.link_status("site-a"), bed.link_status("site-b")
        assert link_a["rounds_committed"] >= 1 and link_a["auth_failures"] == 0
        assert 0.0 < link_a["last_qber"] < 0.03
        assert link_a["auth_mode"] == link_b["auth_mode"] == "qkd"
        status = bed.status("site-a")
        assert status["qkd_keys_consumed"] >= 1
        # The standard fields stay standard; the link's figures are an extension.
        st = bed.kme_status("site-a")
        assert 0 < st["stored_key_count"] <= st["max_key_count"]
    log_a = (tmp_path / "logs" / "kme-site-a.log").read_text()
    log_b = (tmp_path / "logs" / "kme-site-b.log").read_text()
    # The master's KME told the peer before answering; the slave fetched those keys.
    assert "keys_reserved_by_peer" in log_b
    assert '"role": "slave"' in log_b and '"role": "master"' in log_a


def test_intercept_resend_aborts_rounds_and_the_tunnel_fails_closed(tmp_path: Path) -> None:
    opts = TestbedOptions(**FAST, eve="intercept-resend")  # type: ignore[arg-type]
    with Testbed(tmp_path, opts) as bed:
        bed.start_all()
        deadline = time.monotonic() + 40
        link: dict[str, object] = {}
        while time.monotonic() < deadline:
            link = bed.link_status("site-a")
            if link["rounds_aborted"]:
                break
            time.sleep(0.2)
        assert link["rounds_aborted"] and not link["rounds_committed"]
        assert "QBER" in str(link["last_abort_reason"])
        assert float(link["last_qber"]) > 0.2  # type: ignore[arg-type]
        assert bed.kme_status("site-a")["stored_key_count"] == 0
        with pytest.raises(TestbedError):
            bed.wait_tunnel(timeout=3)
        assert _app_exchange(bed.ports["listen-site-a-sink"], b"hello") == b""
        assert bed.status("site-a")["handshakes"] == 0
        assert 'qkdgw_kme_errors_total{kind="no_key"}' in bed.metrics("site-a")
    eve_log = (tmp_path / "logs" / "eve.log").read_text()
    assert "eve_frame" in eve_log


@pytest.mark.slow
def test_demo_late_eve_drains_the_pool_and_fails_closed() -> None:
    """`qkdgw demo --eve intercept-resend`: Eve strikes once the tunnel runs on link key;
    the link detects her (QBER), stops making key, the small pool runs dry through the
    re-handshakes and the gateways fail closed, with the reason given."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--eve",
                           "intercept-resend", "--distance-km", "10", "--pulses",
                           "12000000", "--json"], capture_output=True, text=True, timeout=400)
    s = json.loads(proc.stdout)
    assert proc.returncode == 0 and s["ok"], s
    assert s["bytes_before_eve"] > 0 and s["rekeys_before_eve"] >= 2
    assert s["eve_started_seconds"] < s["detection_seconds"] < s["fail_closed_seconds"]
    assert s["pool_dry_seconds"] <= s["fail_closed_seconds"]
    assert s["rounds_committed_after_eve"] <= 1 and s["link"]["last_qber"] > 0.2
    assert "no key" in s["gateway_reason"] and "QBER" in s["link"]["last_abort_reason"]
