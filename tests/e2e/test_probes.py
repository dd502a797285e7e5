"""/readyz and /healthz on the gateway's admin endpoint, on real processes: the listening
gateway is alive but not ready until a peer has made the tunnel, then both are ready;
when the tunnel drops, readiness goes with it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from gateway.tools.testbed import Testbed, TestbedOptions


def _get(port: int, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_ready_follows_the_tunnel(tmp_path: Path) -> None:
    with Testbed(tmp_path, TestbedOptions(connect_wait=1.0)) as bed:
        bed.prepare()
        bed.start_kmes()
        sink = bed.start_sink()
        bed.start_gateway("site-b", "site-a", connect=None, services={"sink": sink})
        b = bed.ports["admin-site-b"]
        assert _get(b, "/healthz") == (200, {"alive": True})
        assert _get(b, "/readyz") == (503, {"ready": False, "reason": "tunnel down"})
        bed.start_gateway("site-a", "site-b", connect=bed.ports["tunnel-site-b"],
                          listeners={"sink": 0})
        bed.wait_tunnel()
        a = bed.ports["admin-site-a"]
        for port in (a, b):
            assert _get(port, "/readyz") == (200, {"ready": True, "reason": "tunnel up"})
        bed.stop("gateway-site-a")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _get(b, "/readyz")[0] != 503:
            time.sleep(0.1)
        assert _get(b, "/readyz")[0] == 503
        assert _get(b, "/healthz")[0] == 200
