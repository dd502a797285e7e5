"""End to end on a real Prometheus (Debian's `prometheus`, on loopback): it scrapes a live
two-site testbed (KMEs on the emulated BB84 link, gateways rekeying every second) with the
project's own alert rules. Before the attack no alert fires; then an intercept-resend
eavesdropper starts on the quantum channel, and the QBER and pool-exhaustion alerts fire
(read from Prometheus's API) while the tunnel is still up, i.e. before it fails closed.

Slow (about two minutes: the pool alert has `for: 1m`)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.tools.testbed import TestbedOptions
from tests.support.ops_testbed import FAST, ROOT, OpsTestbed

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def _firing(port: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for a in _api(port, "alerts")["alerts"]:
        if a["state"] == "firing":
            out.setdefault(a["labels"]["alertname"], []).append(a)
    return out


def test_real_prometheus_alerts_before_the_tunnel_fails_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKDGW_BUDGET_POLL_S", "1")
    # A small pool and a rekey a second: once Eve stops production, the pool lasts a
    # few minutes, so the forecast drops under the alert's 15 minutes at once.
    opts = TestbedOptions(**FAST, rekey_interval=1.0, max_key_count=200,  # type: ignore[arg-type]
                          eve="intercept-resend", eve_after=float("inf"))
    with OpsTestbed(tmp_path / "bed", opts) as bed:
        bed.start_all()
        bed.wait_tunnel(timeout=60)
        # Prometheus with the shipped config, pointed at this testbed's ports.
        cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        cfg["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "alerts.yml")]
        ports = {"site-a": {"gateway": bed.ports["admin-site-a"],
                            "kme": bed.kme_admin_port("site-a")},
                 "site-b": {"gateway": bed.ports["admin-site-b"],
                            "kme": bed.kme_admin_port("site-b")}}
        for job in cfg["scrape_configs"]:
            for sc in job["static_configs"]:
                sc["targets"] = [f"127.0.0.1:{ports[sc['labels']['site']][sc['labels']['role']]}"]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        web = _free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
        prom = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    targets = _api(web, "targets")["activeTargets"]
                    if len(targets) == 4 and all(t["health"] == "up" for t in targets):
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            else:
                raise AssertionError("Prometheus did not scrape all four targets:\n"
                                     + (tmp_path / "prometheus.log").read_text()[-2000:])
            # Quiet before the attack (the link makes key, the pool holds).
            time.sleep(10)
            before = _firing(web)
            for name in ("QkdQberNearAbort", "QkdGatewayPoolDrySoon", "QkdKmePoolDrySoon",
                         "QkdTunnelDown", "QkdDegradedMode", "QkdLinkDown"):
                assert name not in before, (name, before[name])
            level_before = bed.status("site-a")["budget"]["pool"]["level"]
            bed.arm_eve()
            t0 = time.monotonic()
            firing: dict[str, list[dict[str, Any]]] = {}
            while time.monotonic() - t0 < 180:
                firing = _firing(web)
                if "QkdQberNearAbort" in firing and "QkdGatewayPoolDrySoon" in firing:
                    break
                time.sleep(1)
            assert "QkdQberNearAbort" in firing, firing
            assert "QkdGatewayPoolDrySoon" in firing, (
                firing, bed.status("site-a")["budget"])
            # Before it fails closed: the tunnel is up, in hybrid mode, with key left.
            status = bed.status("site-a")
            assert status["peer"]["tunnel"] == "up" and status["peer"]["mode"] == "hybrid"
            assert status["budget"]["pool"]["level"] > 0
            # Drained since Eve started. The smoothed trend word is not asserted: it has
            # been seen "rising" here with no round committed (docs/kme.md, known gaps).
            assert status["budget"]["pool"]["level"] < level_before, status["budget"]
            qber = firing["QkdQberNearAbort"][0]
            assert float(qber["value"]) > 0.8
            dry = firing["QkdGatewayPoolDrySoon"][0]
            assert dry["labels"]["site"] in ("site-a", "site-b")
            assert float(dry["value"]) < 900
            print(f"alerts firing {time.monotonic() - t0:.0f} s after Eve started; "
                  f"pool {status['budget']['pool']['words']}")
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
            log.close()
