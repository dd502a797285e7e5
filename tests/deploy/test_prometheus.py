"""deploy/prometheus/: the scrape config and alert rules pass `promtool check`, every
alert fires on its synthetic bad series and stays quiet otherwise (`promtool test
rules`), a broken rule is caught (positive control), and every metric a rule reads is
one the gateway or KME really exports (scraped from a live two-site testbed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.ops_testbed import ROOT, LiveSites, metric_names_in

PROM = ROOT / "deploy" / "prometheus"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed "
                                    "(Debian: apt-get install prometheus)")


def _run(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _alerts() -> dict[str, str]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


@needs_promtool
def test_promtool_check_rules_and_config() -> None:
    r = _run("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in r.stdout
    r = _run("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    r = _run("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in tests:
        for case in group["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = set(_alerts())
    assert len(alerts) >= 15
    assert alerts - firing == set(), "alerts without a firing test case"
    assert alerts - quiet == set(), "alerts without a non-firing test case"
    # The list, each covered by at least one rule.
    for word in ("PoolDry", "QberNearAbort", "LinkDown", "AuthPad", "Degraded",
                 "HandshakeFailures", "KmeRequestFailures", "PskOutOfStep", "PskEpochsApart",
                 "CertificateExpires", "CrlExpires"):
        assert any(word in a for a in alerts), word


@needs_promtool
@pytest.mark.parametrize(("old", "new"), [
    ("expr: qkdgw_degraded == 1", "expr: qkdgw_degraded == 2"),
    ("qkdgw_key_pool_exhaustion_seconds < 900", "qkdgw_key_pool_exhaustion_seconds < 60"),
    ("> 0.8", "> 0.95"),
    ("qkdgw_kme_link_reservation_pad_headroom_bytes < 256",
     "qkdgw_kme_link_reservation_pad_headroom_bytes < 64"),
])
def test_promtool_catches_a_broken_rule(tmp_path: Path, old: str, new: str) -> None:
    """Positive control: the same tests against a rule that no longer fires fail."""
    text = (PROM / "alerts.yml").read_text()
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, new, 1))
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    r = _run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def test_rules_read_only_exported_metrics(live_sites: LiveSites) -> None:
    names = live_sites.names
    used: set[str] = set()
    for alert, expr in _alerts().items():
        missing = metric_names_in(expr) - names
        assert not missing, f"{alert} reads metrics nobody exports: {sorted(missing)}"
        used |= metric_names_in(expr)
    assert len(used) >= 15
    # Positive control: the check sees a misspelt name.
    assert metric_names_in("qkdgw_key_pool_exhaustion_second < 900") - names


def test_scrape_config_targets_the_example_admin_ports() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    targets = {t for job in cfg["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    configs = ROOT / "configs"
    for name, port in (("site-a", 9101), ("site-b", 9102), ("kme-a", 9201), ("kme-b", 9202)):
        assert f"127.0.0.1:{port}" in (configs / f"{name}.toml").read_text()
        assert f"127.0.0.1:{port}" in targets
