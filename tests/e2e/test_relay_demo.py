"""`qkdgw demo --topology ring5` and `--compromise NODE` (issue 11): the whole demo as
a user runs it, KMEs and gateways as separate processes on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any


def _demo(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", *args,
                           "--streams", "2", "--stream-mb", "1", "--json"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_demo_ring5_splits_keys_over_two_unequal_paths() -> None:
    s = _demo("--topology", "ring5")
    assert s["ok"] is True and s["tunnel_mode"] == "hybrid" and s["k"] == 2
    assert s["sites"] == ["site-a", "site-b", "site-c", "site-d", "site-e"]
    assert s["bytes_verified"] == s["bytes_sent"] == 2 * 1024 * 1024
    assert s["relays_delivered"] >= 1 and s["relays_failed"] == 0
    assert sorted(s["paths"]["site-a-gw->site-c-gw"]) == [
        ["kme-site-a", "kme-site-b", "kme-site-c"],
        ["kme-site-a", "kme-site-e", "kme-site-d", "kme-site-c"]]
    # Every trusted node on either path paid one hop per key on each of its links.
    for node in ("site-b", "site-d", "site-e"):
        assert all(bits > 0 for bits in s["trusted_node_link_key_bits"][node].values())


def _no_key_bytes(s: dict[str, Any]) -> None:
    # Only 8-hex fingerprints and UUIDs (hex runs of at most 12): no key or share.
    assert not re.search(r"[0-9a-f]{13}", json.dumps(s))


def test_demo_compromise_single_path_node_gives_the_gateways_keys() -> None:
    s = _demo("--topology", "line", "--compromise", "site-b")
    c = s["compromise"]
    assert s["ok"] is True and c["as_expected"] is True and c["k"] == 1
    assert c["gateways_agree"] is True and c["keys_used_by_gateways"] >= 1
    # Every key the gateways used is rebuilt from site-b's files and traffic, and its
    # fingerprint is the one the gateways recorded for it.
    assert len(c["rebuilt"]) == c["keys_used_by_gateways"]
    assert all(r["match"] and r["rebuilt"] == r["used"] for r in c["rebuilt"])
    assert c["partial"] == [] and c["not_through_node"] == []
    assert "kme.toml" in c["files"] and "kme-site-b.sqlite3.relay" in c["files"]
    _no_key_bytes(s)


def test_demo_compromise_with_k2_node_holds_one_share_only() -> None:
    s = _demo("--topology", "ring", "--compromise", "site-b")
    c = s["compromise"]
    assert s["ok"] is True and c["as_expected"] is True and c["k"] == 2
    assert c["rebuilt"] == [] and c["keys_used_by_gateways"] >= 1
    assert len(c["partial"]) == c["keys_used_by_gateways"]
    for p in c["partial"]:
        assert p["shares_held"] == 1 and p["shares"] == 2
        assert p["share_fingerprint"] != p["used"]
    # Control: site-b's and site-d's files together do rebuild every key.
    assert c["control_all_trusted_nodes_rebuilt"] == c["keys_used_by_gateways"]
    assert c["control_match"] is True
    _no_key_bytes(s)


def test_demo_compromise_same_ring_with_k1_gives_the_keys() -> None:
    """The control on the same topology: only k differs from the test above."""
    s = _demo("--topology", "ring", "--k", "1", "--compromise", "site-b")
    c = s["compromise"]
    assert s["ok"] is True and c["k"] == 1 and c["keys_used_by_gateways"] >= 1
    assert len(c["rebuilt"]) == c["keys_used_by_gateways"]
    assert all(r["match"] for r in c["rebuilt"])


def test_demo_compromise_refuses_an_end_site_and_k2_on_a_line() -> None:
    run = [sys.executable, "-m", "gateway.cli", "demo", "--json"]
    end = subprocess.run([*run, "--topology", "ring", "--compromise", "site-c"],
                         capture_output=True, text=True, timeout=60)
    assert end.returncode == 2
    assert "--compromise site-c: give a trusted node of --topology ring (site-b, site-d)" \
        in end.stderr
    line = subprocess.run([*run, "--topology", "line", "--k", "2"],
                          capture_output=True, text=True, timeout=60)
    assert line.returncode == 2 and "--k 2 needs a ring" in line.stderr
    bare = subprocess.run([*run, "--compromise", "site-b"], capture_output=True,
                          text=True, timeout=60)
    assert bare.returncode == 2 and "need --topology" in bare.stderr
