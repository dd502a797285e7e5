"""The gateway's key budget on a live two-site testbed (separate processes): the pool its
KME reports, the consumption of its rekeys, the forecast, the age of the last handshake,
in /status, `qkdgw status` and /metrics alike."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.tools.testbed import Testbed, TestbedOptions


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_gateway_budget_follows_its_consumption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    monkeypatch.setenv("QKDGW_BUDGET_POLL_S", "0.3")
    # A rekey every second takes a QKD key each time; the ideal link tops the pool up, so
    # the gateway sees its own consumption and a production that balances it.
    opts = TestbedOptions(rekey_interval=1.0, key_rate=1000.0, max_key_count=1000)
    with Testbed(tmp_path, opts) as bed:
        bed.start_all()
        bed.wait_tunnel()
        deadline = time.monotonic() + 30
        budget: dict = {}
        while time.monotonic() < deadline:
            budget = bed.status("site-a")["budget"]
            pool = budget.get("pool")
            if pool and pool["samples"] >= 5 and (pool["consumption_rate"] or 0) > 0:
                break
            time.sleep(0.3)
        pool = budget["pool"]
        assert budget["peer"] == "site-b"
        assert pool["consumption_rate"] > 0, budget
        assert 0 <= pool["level"] <= 1000
        assert pool["words"].startswith(f"pool {pool['level']:.0f} keys")
        # Known once a handshake was seen, and younger than the gateway itself.
        assert budget["last_handshake_age_s"] is not None
        assert 0 <= budget["last_handshake_age_s"] <= bed.status("site-a")["uptime_s"]
        assert budget["kme_status"]["polls_ok"] >= 5
        assert budget["kme_status"]["polls_failed"] == 0
        assert budget["history"] and len(budget["history"][0]) == 2
        # The level is what the KME itself says (within the keys taken in between).
        kme_level = bed.kme_status("site-a")["stored_key_count"]
        assert abs(kme_level - bed.status("site-a")["budget"]["pool"]["level"]) <= 50

        text = bed.metrics("site-a")
        for name in ("qkdgw_key_pool_keys", "qkdgw_key_consumption_rate",
                     "qkdgw_key_production_rate", "qkdgw_key_pool_net_rate",
                     "qkdgw_key_pool_exhaustion_seconds",
                     "qkdgw_last_handshake_age_seconds",
                     "qkdgw_certificate_expiry_timestamp_seconds"):
            assert _metric(text, name) is not None, name
        assert _metric(text, "qkdgw_key_consumption_rate") > 0  # type: ignore[operator]
        assert 'qkdgw_kme_status_polls_total{outcome="ok"}' in text
        # The responder consumes the same keys (dec_keys) and says so too.
        assert bed.status("site-b")["budget"]["pool"]["consumption_rate"] is not None

        assert main(["status", "--url", f"http://127.0.0.1:{bed.ports['admin-site-a']}"]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.strip().startswith("key budget"))
        assert "pool " in line and " keys" in line
        assert "last handshake" in out and "s ago" in out


def test_budget_poll_failure_is_counted_not_fatal(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKDGW_BUDGET_POLL_S", "0.2")
    with Testbed(tmp_path, TestbedOptions(connect_wait=1.0)) as bed:
        bed.start_all()
        bed.wait_tunnel()
        bed.stop("kme-site-a")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ks = bed.status("site-a")["budget"]["kme_status"]
            if ks["polls_failed"] >= 2:
                break
            time.sleep(0.2)
        assert ks["polls_failed"] >= 2 and ks["last_error"], ks
        assert 'qkdgw_kme_status_polls_total{outcome="failed"}' in bed.metrics("site-a")
