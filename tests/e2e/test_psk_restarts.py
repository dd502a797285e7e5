"""PSK authentication with real processes: bootstrap by PKI once, then PSK after every
restart, also when either gateway is SIGKILLed at random moments during re-handshakes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.tools.testbed import Testbed, TestbedOptions
from tests.support.app_traffic import app_exchange


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
                bed.start_gateway("site-a", "site-b", connect=b_port,
                                  listeners={"sink": bed.ports["listen-site-a-sink"]})
            else:
                bed.start_gateway("site-b", "site-a", connect=None, listen_port=b_port,
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
