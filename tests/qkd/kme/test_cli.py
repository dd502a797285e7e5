"""`qkdgw kme --config FILE --port-file PATH` as a real process: start, serve, SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from qkd.etsi014.client import EtsiClient
from tests.support.kme_processes import kme_toml


async def test_kme_process_serves_and_stops_cleanly(tmp_path: Path, pki: Path) -> None:
    config = tmp_path / "kme-a.toml"
    config.write_text(kme_toml(pki, "a", tmp_path / "a.sqlite3"))
    port_file = tmp_path / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())",
        "kme", "--config", str(config), "--port-file", str(port_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for _ in range(200):
            if port_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert port_file.exists(), "KME did not write its port file"
        port = int(port_file.read_text())
        async with EtsiClient(f"https://127.0.0.1:{port}", ca_file=pki / "tls-ca.crt",
                              cert_file=pki / "site-a" / "sae-client.crt",
                              key_file=pki / "site-a" / "sae-client.key") as gw:
            keys = await gw.get_enc_keys("site-b-gw", number=2)
            assert (await gw.status("site-b-gw"))["source_KME_ID"] == "kme-site-a"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()
    assert not port_file.exists()
    logs = (out + err).decode()
    assert "NO quantum security" in logs
    assert "kme_started" in logs and str(port) in logs and "kme_stopped" in logs
    for k in keys:
        assert k.key_id in logs                            # IDs are logged...
        assert k.key.hex() not in logs                     # ...key bytes never
        assert base64.b64encode(k.key).decode() not in logs


def test_bad_config_is_one_line_exit_2(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "kme.toml"
    config.write_text("[kme]\nid = 3\n")
    assert main(["kme", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "[kme] id" in err and "Traceback" not in err
