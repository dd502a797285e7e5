"""PSK authentication with real processes: bootstrap by PKI once, then PSK after every
restart, also when either gateway is SIGKILLed at random moments during re-handshakes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from e2e_support import app_exchange

from gateway.testbed import Testbed, TestbedOptions


def _restart(bed: Testbed, site: str, peer: str, *, tunnel_port: int | None,
             connect: int | None, listeners: dict[str, int] | None = None,
             services: dict[str, int] | None = None) -> None:
    """Start a gateway again on the same state directory (and, for the listening side,
    the same tunnel port, so the dialling side finds it)."""
    text = bed.gateway_config(site, peer, connect=connect, listeners=listeners,
                              services=services)
    if tunnel_port is not None:
        text = text.replace('[tunnel]\nlisten = "127.0.0.1:0"',
                            f'[tunnel]\nlisten = "127.0.0.1:{tunnel_port}"')
    cfg = bed._write(f"{site}.toml", text)
    name = f"gateway-{site}"
    ready = bed.run / f"{name}.ready"
    ready.unlink(missing_ok=True)
    proc = bed._spawn(name, ["-m", "gateway.cli", "gateway", "--config", str(cfg),
                             "--ready-file", str(ready)])
    import json

    info: dict[str, Any] = json.loads(bed._wait_file(proc, ready))
    bed.ports[f"admin-{site}"] = int(info["admin"])
    for service, port in info.get("listeners", {}).items():
        bed.ports[f"listen-{site}-{service}"] = int(port)


def _kill(bed: Testbed, site: str) -> None:
    proc = bed.procs.pop(f"gateway-{site}")
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait()


def test_restarts_reconnect_by_psk_never_by_pki(tmp_path: Path) -> None:
    opts = TestbedOptions(link="ideal", rekey_interval=1.0, connect_wait=5.0)
    with Testbed(tmp_path, opts) as bed:
        bed.start_all()
        status = bed.wait_tunnel()
        assert status["peer"]["auth_mode"] == "pki"
        b_port = bed.ports["tunnel-site-b"]
        sink = bed.ports["sink"]
        rng = random.Random(20261127)
        auth_modes = []
        for round_no in range(6):
            # Let some in-tunnel re-handshakes run, then kill one side at a random
            # moment: before, during or after a re-handshake's PSK writes.
            time.sleep(rng.uniform(0.3, 2.2))
            victim = "site-a" if round_no % 2 == 0 else "site-b"
            _kill(bed, victim)
            if victim == "site-a":
                _restart(bed, "site-a", "site-b", tunnel_port=None, connect=b_port,
                         listeners={"sink": bed.ports["listen-site-a-sink"]})
            else:
                _restart(bed, "site-b", "site-a", tunnel_port=b_port, connect=None,
                         services={"sink": sink})
            status = bed.wait_tunnel(timeout=40)
            auth_modes.append(status["peer"]["auth_mode"])
            psk = status["peer"]["psk"]
            assert psk is not None and not psk["out_of_step"]
            answer = app_exchange(bed.ports["listen-site-a-sink"], b"r" * 5000)
            assert int.from_bytes(answer[:8], "big") == 5000
        assert auth_modes == ["psk"] * 6
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--url",
                              f"http://127.0.0.1:{bed.ports['admin-site-a']}"],
                             capture_output=True, text=True, timeout=30).stdout
        for line in ("tunnel up", "auth_mode        psk", "bootstrap_psk_epoch", "epoch",
                     "last_handshake", "next_rekey_in_s", "qkd_keys_consumed", "degraded",
                     "psk              epoch", "in step"):
            assert line in out, (line, out)
        st_a, st_b = bed.status("site-a")["peer"]["psk"], bed.status("site-b")["peer"]["psk"]
        assert st_a["bootstraps"] == st_b["bootstraps"] == 1  # the first tunnel only
        assert st_a["current_epoch"] > 6
    log_a = (tmp_path / "logs" / "gateway-site-a.log").read_text()
    assert '"auth": "psk"' in log_a or "auth=psk" in log_a
