"""Gateways at non-adjacent sites (issue 11): site A and site C of a line A - B - C,
each with its own KME process, build the hybrid tunnel with QKD keys relayed through
KME B, and carry checked traffic. ETSI 014 is unchanged for the gateways."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from gateway.pki import init_pki
from gateway.tools.testbed import Testbed, TestbedOptions
from tests.support.app_traffic import app_exchange
from tests.support.network_kmes import Network


def test_gateways_at_a_and_c_tunnel_over_relayed_keys(tmp_path: Path) -> None:
    bed = Testbed(tmp_path / "bed", TestbedOptions(rekey_interval=2.0))
    init_pki(bed.pki, ["site-a", "site-b", "site-c"], algorithm=bed.options.algorithm)
    bed.prepare()  # directories only: the pki exists, its KME configs go unused
    net = Network(bed.pki, tmp_path, ["site-a", "site-b", "site-c"],
                  [("site-a", "site-b"), ("site-b", "site-c")])
    try:
        bed.ports["kme-site-a"] = net.procs["site-a"].port
        bed.ports["kme-site-c"] = net.procs["site-c"].port
        sink = bed.start_sink()
        bed.start_gateway("site-c", "site-a", connect=None, services={"sink": sink})
        bed.start_gateway("site-a", "site-c", connect=bed.ports["tunnel-site-c"],
                          listeners={"sink": 0})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            a, c = bed.status("site-a"), bed.status("site-c")
            if a["peer"]["tunnel"] == c["peer"]["tunnel"] == "up":
                break
            time.sleep(0.2)
        assert a["peer"]["tunnel"] == "up", bed.procs["gateway-site-a"].tail()
        assert a["peer"]["mode"] == "hybrid" and a["peer"]["degraded"] is False
        payload = bytes(range(256)) * 40
        answer = app_exchange(bed.ports["listen-site-a-sink"], payload)
        assert answer == len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest()
        # The QKD keys really were relayed: A started relays, C stored and handed them out.
        time.sleep(2.5)  # at least one rekey (2 s) with a fresh relayed key
        a_net = net.status("site-a")["network"]
        c_net = net.status("site-c")["network"]
        assert a_net["relay"]["relays_delivered"] >= 2
        assert c_net["relayed_keys"]["delivered_to_slave"] >= 2
        assert a_net["relay"]["relays_failed"] == 0
        assert bed.status("site-a")["peer"]["qkd_keys_consumed"] >= 1
    finally:
        bed.stop()
        net.stop()


def test_demo_topology_ring_json() -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--topology", "ring",
                           "--streams", "2", "--stream-mb", "1", "--json"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    s = json.loads(proc.stdout)
    assert s["ok"] is True and s["tunnel_mode"] == "hybrid" and s["k"] == 2
    assert s["bytes_verified"] == s["bytes_sent"] == 2 * 1024 * 1024
    assert s["relays_delivered"] >= 1 and s["relays_failed"] == 0
    assert sorted(s["paths"]["site-a-gw->site-c-gw"]) == [
        ["kme-site-a", "kme-site-b", "kme-site-c"], ["kme-site-a", "kme-site-d", "kme-site-c"]]
    # Both trusted nodes carried a share of every key (one hop on each of their links).
    for node in ("site-b", "site-d"):
        assert all(bits > 0 for bits in s["trusted_node_link_key_bits"][node].values())
