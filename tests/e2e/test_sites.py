"""Both sites as separate processes on loopback: the demo, failures, bad peers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.tools.testbed import Testbed, TestbedError, TestbedOptions
from tests.support.app_traffic import app_exchange as _app_exchange


def _wait(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_demo_command_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--streams", "4",
                           "--stream-mb", "1", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True
    assert summary["streams"] == 4
    assert summary["bytes_sent"] == summary["bytes_verified"] == 4 * 1024 * 1024
    assert summary["handshakes"] >= 1 and summary["qkd_keys_consumed"] >= 1
    # Gateway A was restarted on its state: the new tunnel authenticated by PSK.
    assert summary["restart"]["auth_mode"] == "psk" and summary["restart"]["psk_epoch"] >= 1
    assert summary["restart"]["bytes_verified"] == 1024 * 1024
    for key in ("throughput_mbps", "rekeys"):
        assert key in summary


def test_fail_closed_when_the_kme_has_no_key(tmp_path: Path) -> None:
    with Testbed(tmp_path, TestbedOptions(key_rate=0, connect_wait=1.0)) as bed:
        bed.start_all()
        with pytest.raises(TestbedError):
            bed.wait_tunnel(timeout=4)
        assert bed.status("site-a")["peer"]["tunnel"] == "down"
        # An application connection is refused (reset), never carried unprotected.
        assert _app_exchange(bed.ports["listen-site-a-sink"], b"hello") == b""
        assert 'qkdgw_kme_errors_total{kind="no_key"}' in bed.metrics("site-a")
        assert bed.status("site-a")["handshakes"] == 0
    log = (tmp_path / "logs" / "gateway-site-a.log").read_text()
    assert "kme.enc_keys_failed" in log
    # It keeps trying (with backoff), so the tunnel comes up once the KME has key again.
    # Without a key it does not even dial: the peer never sees a half-made handshake.
    assert log.count("kme.enc_keys_failed") >= 2
    assert "tunnel.connected" not in log


def test_kme_going_down_stops_the_tunnel_at_the_next_rekey(tmp_path: Path) -> None:
    with Testbed(tmp_path, TestbedOptions(rekey_interval=1.0, connect_wait=1.0)) as bed:
        bed.start_all()
        bed.wait_tunnel()
        answer = _app_exchange(bed.ports["listen-site-a-sink"], b"x" * 1000)
        assert int.from_bytes(answer[:8], "big") == 1000  # positive control: works first
        bed.stop("kme-site-a")
        assert _wait(lambda: bed.status("site-a")["peer"]["tunnel"] == "down")
        assert 'kind="unavailable"' in bed.metrics("site-a")
        assert _app_exchange(bed.ports["listen-site-a-sink"], b"y" * 1000) == b""


def test_garbage_peer_is_dropped_and_counted(tmp_path: Path) -> None:
    with Testbed(tmp_path) as bed:
        bed.start_all()
        bed.wait_tunnel()
        with socket.create_connection(("127.0.0.1", bed.ports["tunnel-site-b"])) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
            s.settimeout(10)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        # B answered with at most an alert and closed; the real tunnel is unaffected.
        assert len(data) < 400
        assert bed.status("site-b")["peer"]["tunnel"] == "up"
        assert 'qkdgw_tunnel_closes_total{clean="false",code="2"}' in bed.metrics("site-b")
        answer = _app_exchange(bed.ports["listen-site-a-sink"], b"z" * 10)
        assert int.from_bytes(answer[:8], "big") == 10


def test_unknown_service_is_reset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    with Testbed(tmp_path) as bed:
        bed.start_all(extra_listeners=("nosuch",))
        bed.wait_tunnel()
        assert main(["status", "--url", f"http://127.0.0.1:{bed.ports['admin-site-a']}"]) == 0
        out = capsys.readouterr().out
        assert "tunnel up" in out and "auth_mode        pki" in out and "epoch" in out
        assert _app_exchange(bed.ports["listen-site-a-nosuch"], b"hello") == b""
        answer = _app_exchange(bed.ports["listen-site-a-sink"], b"ok")
        assert int.from_bytes(answer[:8], "big") == 2
    assert "stream.unknown_service" in (tmp_path / "logs" / "gateway-site-b.log").read_text()
