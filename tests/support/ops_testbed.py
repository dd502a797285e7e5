"""Helpers for the deploy/ checks: a testbed whose KMEs have admin endpoints and whose
gateways check a CRL (so every metric family the code can export is present), and the
metric-name extraction used by the Prometheus and Grafana tests."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.tools.testbed import Testbed, _toml_str

FAST = dict(link="bb84", distance_km=10.0, pulses=12_000_000, connect_wait=2.0)


class OpsTestbed(Testbed):
    """The testbed with each KME's admin endpoint on and the gateways checking a CRL."""

    def _kme_config(self, site: str, peer: str) -> str:
        return super()._kme_config(site, peer) + '\n[admin]\nlisten = "127.0.0.1:0"\n'

    def gateway_config(self, site: str, peer: str, **kw: object) -> str:
        text = super().gateway_config(site, peer, **kw)  # type: ignore[arg-type]
        return text.replace("[pki]\n", f"[pki]\ncrl = {_toml_str(self.pki / 'crl.pem')}\n", 1)

    def kme_admin_port(self, site: str) -> int:
        path = self.run / f"kme-{site}.port.admin"
        return int(json.loads(path.read_text())["admin"])

    def kme_metrics(self, site: str) -> str:
        import urllib.request

        url = f"http://127.0.0.1:{self.kme_admin_port(site)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{|\s)")


def exported_names(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition: every family's name (from # HELP /
    # TYPE, so labelled families without a sample yet count) and every sample name."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            if m:
                names.add(m.group(1))
    return names


@dataclass
class LiveSites:
    bed: OpsTestbed
    gateway_metrics: dict[str, str] = field(default_factory=dict)
    kme_metrics: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        out: set[str] = set()
        for text in (*self.gateway_metrics.values(), *self.kme_metrics.values()):
            out |= exported_names(text)
        return out


def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def metric_names_in(expr: str) -> set[str]:
    """The qkdgw_* metric names a PromQL expression reads."""
    return set(re.findall(r"\b(qkdgw_[a-z0-9_]+)\b", expr))


ROOT = Path(__file__).resolve().parents[2]
