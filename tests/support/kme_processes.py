"""Shared helpers for the qkd tests (imported by conftest and test modules).

Topology used by the KME tests (4 sites so that "another local SAE" and "another
peer SAE" exist on both sides):

    KME-A (kme-site-a): local site-a-gw, site-c-gw   peer site-b-gw, site-d-gw
    KME-B (kme-site-b): local site-b-gw, site-d-gw   peer site-a-gw, site-c-gw
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.tools import kme_config

SITES = ["site-a", "site-b", "site-c", "site-d"]
SIDES = {
    "a": {"site": "site-a", "local": ["site-a-gw", "site-c-gw"],
          "peer_kme": "kme-site-b", "peer": ["site-b-gw", "site-d-gw"]},
    "b": {"site": "site-b", "local": ["site-b-gw", "site-d-gw"],
          "peer_kme": "kme-site-a", "peer": ["site-a-gw", "site-c-gw"]},
}


def _toml(fragment: str) -> dict[str, Any]:
    return tomllib.loads(fragment)


def bb84_link(pki: Path, role: str, *, peer: int = 0, quantum: int = 0,
              pulses: int = 12_000_000, distance_km: float = 10.0) -> str:
    """A [link] section for the BB84 link between two test KMEs (Bob listens on free
    ports; Alice dials `peer` / `quantum`). 10 km and 1.2e7 pulses: ~2 s rounds.
    Returned as TOML lines, which tests may extend before passing it as `link=`."""
    return kme_config.dumps(kme_config.bb84_link(
        pki / "link-secret.key", role, distance_km=distance_km, pulses=pulses,
        peer=peer, quantum=quantum))


def kme_toml(pki: Path, side: str, db: Path, *, key_rate: str = "inf",
             max_key_count: int = 1000, max_key_per_request: int = 16,
             extra_kme: str = "", link: str | None = None, extra: str = "") -> str:
    """The config of test KME `side` ("a" or "b"); `extra_kme` adds [kme] lines,
    `link` replaces the ideal [link] lines, `extra` adds tables (TOML text each)."""
    s = SIDES[side]
    site = s["site"]
    cfg = kme_config.kme_config(
        pki, site, db, local_saes=s["local"], peer_kme=s["peer_kme"], peer_saes=s["peer"],
        link=(_toml(link) if link is not None
              else kme_config.ideal_link(pki / "link-secret.key",
                                         _toml(f"v = {key_rate}")["v"])),
        kme={"key_size": 256, "min_key_size": 64, "max_key_size": 1024,
             "max_key_count": max_key_count, "max_key_per_request": max_key_per_request,
             **_toml(extra_kme)},
        sections=_toml(extra), log_level="debug")
    return kme_config.dumps(cfg)


class KmeProcess:
    """`qkdgw kme` as a real child process (for schemathesis and the crash tests)."""

    def __init__(self, config: Path, workdir: Path, name: str = "kme",
                 env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys

        self.port_file = workdir / f"{name}.port"
        self.port_file.unlink(missing_ok=True)
        self.log = workdir / f"{name}.log"
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "kme", "--config", str(config),
                 "--port-file", str(self.port_file)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True)
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 30.0) -> int:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists() and self.port_file.read_text().strip():
                return int(self.port_file.read_text())
            if self.popen.poll() is not None:
                raise RuntimeError(f"KME exited with {self.popen.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        raise RuntimeError("KME did not write its port file:\n"
                           + self.log.read_text(errors="replace")[-3000:])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def link_ports(self) -> dict[str, int]:
        """Bob's bound link ports (written next to the port file)."""
        import json

        path = self.port_file.with_name(self.port_file.name + ".link")
        return {k: int(v) for k, v in json.loads(path.read_text()).items()}

    def status(self, pki: Path, site: str, peer_sae: str) -> dict[str, object]:
        """ETSI 014 Status as the local SAE `site`-gw sees it (blocking)."""
        import json
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(pki / "tls-ca.crt"))
        ctx.load_cert_chain(pki / site / "sae-client.crt", pki / site / "sae-client.key")
        url = f"{self.url}/api/v1/keys/{peer_sae}/status"
        with urllib.request.urlopen(url, timeout=10, context=ctx) as resp:
            result: dict[str, object] = json.loads(resp.read())
        return result

    def link_status(self, pki: Path, site: str, peer_sae: str) -> dict[str, object]:
        ext = self.status(pki, site, peer_sae).get("status_extension", {})
        return dict(ext.get("qkd_link", {}))  # type: ignore[union-attr]

    def wait_exit(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        import signal

        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        import signal
        import subprocess

        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_until(pred: Callable[[], object], timeout: float, what: str,
               procs: Sequence[KmeProcess] = ()) -> None:
    """Poll `pred` (an OSError counts as not yet) until it holds; fail early, with the
    end of its log, if one of `procs` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        for p in procs:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.log.name} exited: "
                                     + p.log.read_text(errors="replace")[-2000:])
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")
