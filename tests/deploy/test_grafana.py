"""deploy/grafana/: the site and link dashboards query only metrics the code exports
(names scraped from a live two-site testbed), every query is valid PromQL (promtool),
and together they show what the issue asks for."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.ops_testbed import ROOT, LiveSites, metric_names_in

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _queries(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query."""
    for p in _panels(dash["panels"]):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r}", t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            yield f"variable {v['name']}", q


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_two_dashboards_well_formed() -> None:
    assert {p.name for p in DASHBOARDS} == {"qkdgw-site.json", "qkdgw-link.json"}
    for path in DASHBOARDS:
        dash = _load(path)
        ids = [p["id"] for p in _panels(dash["panels"])]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
        for p in _panels(dash["panels"]):
            assert {"x", "y", "w", "h"} <= set(p["gridPos"])
            if p["type"] != "row":
                assert p["targets"], f"{path.name}: panel {p['title']!r} has no query"
                assert p["datasource"]["uid"] == "${datasource}"
        # Air-gapped sites: nothing is fetched from elsewhere.
        assert "http://" not in path.read_text() and "https://" not in path.read_text()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_query_only_exported_metrics(path: Path, live_sites: LiveSites) -> None:
    names = live_sites.names
    used: set[str] = set()
    for where, expr in _queries(_load(path)):
        found = metric_names_in(expr)
        assert found, f"{path.name}: {where} queries no qkdgw metric: {expr}"
        missing = found - names
        assert not missing, f"{path.name}: {where} queries unknown metrics {sorted(missing)}"
        used |= found
    assert len(used) >= 10
    # Positive control: a misspelt name is seen as missing.
    assert metric_names_in('qkdgw_tunnel_upp{site="a"}') - names


def test_dashboards_show_what_the_issue_asks() -> None:
    site = " ".join(e for _, e in _queries(_load(GRAFANA / "qkdgw-site.json")))
    link = " ".join(e for _, e in _queries(_load(GRAFANA / "qkdgw-link.json")))
    for needed in ("qkdgw_key_pool_keys", "qkdgw_key_production_rate",
                   "qkdgw_key_consumption_rate", "qkdgw_key_pool_exhaustion_seconds",
                   "qkdgw_handshakes_total", "qkdgw_tunnel_bytes_total", "qkdgw_degraded"):
        assert needed in site, needed
    for needed in ("qkdgw_kme_pool_keys", "qkdgw_kme_key_production_rate",
                   "qkdgw_kme_key_consumption_rate", "qkdgw_kme_pool_exhaustion_seconds",
                   "qkdgw_kme_link_qber", "qkdgw_handshakes_total", "qkdgw_tunnel_bytes_total",
                   "qkdgw_degraded"):
        assert needed in link, needed


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query as a recording rule, checked by promtool (Grafana's $variables replaced
    by a value; label_values() is Grafana's, its metric selector is checked)."""
    rules = []
    for path in DASHBOARDS:
        for i, (_where, expr) in enumerate(_queries(_load(path))):
            q = expr.replace("$site", "site-a").replace("$link", "site-a--site-b")
            if q.startswith("label_values("):
                q = q[len("label_values("):].rsplit(",", 1)[0]
            rules.append({"record": f"check:{path.stem.replace('-', '_')}:{i}", "expr": q})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", "rules.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # Positive control: promtool rejects a broken query.
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "rate(qkdgw_x[5m]"}]}]}))
    r = subprocess.run(["promtool", "check", "rules", "bad.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
