"""`qkdgw demo --topology ring5` and `--compromise NODE` (issue 11): the whole demo as
a user runs it, KMEs and gateways as separate processes on loopback."""

from __future__ import annotations

import json
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
