"""Configs for KMEs with several links and a [network] (issue 11), on the test PKI's
sites (site-a .. site-d: KME kme-<site>, SAE <site>-gw)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkd.etsi014.client import EtsiClient
from tests.support.kme_processes import KmeProcess, wait_until


@dataclass
class Nb:
    """One [[neighbour]]: the site at its other end and its ideal link's key rate."""

    site: str
    key_rate: str = "inf"
    relay_port: int | None = None  # dial the neighbour's relay listener here


def net_kme_toml(pki: Path, site: str, db: Path, neighbours: list[Nb], *,
                 network: str = "", max_key_count: int = 1000, admin: bool = False,
                 relay_listen: bool | int = False) -> str:
    """A KME for `site` with one [[neighbour]] per entry (ideal links) and, if
    `network` is given, a [network] section with those extra lines."""
    parts = [f"""
[kme]
id = "kme-{site}"
listen = "127.0.0.1:0"
db = "{db}"
key_size = 256
min_key_size = 64
max_key_size = 1024
max_key_count = {max_key_count}
max_key_per_request = 16

[tls]
cert = "{pki}/{site}/kme-server.crt"
key = "{pki}/{site}/kme-server.key"
client_ca = "{pki}/tls-ca.crt"

[[sae]]
id = "{site}-gw"
"""]
    for nb in neighbours:
        relay = f'relay = "127.0.0.1:{nb.relay_port}"\n' if nb.relay_port else ""
        parts.append(f"""
[[neighbour]]
kme_id = "kme-{nb.site}"
sae_ids = ["{nb.site}-gw"]
{relay}
[neighbour.link]
type = "ideal"
secret_file = "{pki}/link-secret.key"
key_rate = {nb.key_rate}
""")
    if network or relay_listen:
        port = relay_listen if type(relay_listen) is int else 0
        listen = f'relay_listen = "127.0.0.1:{port}"\n' if relay_listen else ""
        parts.append(f"\n[network]\n{listen}{network}\n")
    if admin:
        parts.append('\n[admin]\nlisten = "127.0.0.1:0"\n')
    parts.append('\n[logging]\nlevel = "debug"\n')
    return "".join(parts)


def topology_toml(sites: list[str], links: list[tuple[str, str]]) -> str:
    """[network] nodes and [[network.link]] lines for the sites and links given."""
    nodes = ", ".join(f'"kme-{s}"' for s in sites)
    out = [f"nodes = [{nodes}]\n"]
    for a, b in links:
        out.append(f'[[network.link]]\na = "kme-{a}"\nb = "kme-{b}"\n')
    return "".join(out)


def remote_sae_toml(sites: list[str]) -> str:
    return "".join(f'[[network.sae]]\nid = "{s}-gw"\nkme_id = "kme-{s}"\n' for s in sites)


class Network:
    """KME processes for `sites` joined by `links`; the smaller site of a link dials the
    larger, so they start largest first and each learns its neighbours' relay ports."""

    def __init__(self, pki: Path, work: Path, sites: list[str],
                 links: list[tuple[str, str]], network_extra: str = "",
                 dial_port: Callable[[str, str, int], int] | None = None,
                 env: dict[str, dict[str, str]] | None = None) -> None:
        self.pki, self.work = pki, work
        self.procs: dict[str, KmeProcess] = {}
        self.relay_ports: dict[str, int] = {}
        self.sites, self.links = sites, links
        self._topo = topology_toml(sites, links)
        self._extra = network_extra
        self._dial_port = dial_port
        self.env = dict(env or {})  # per site, for the next start of that site
        for site in sorted(sites, reverse=True):
            self.start(site)
        for site in self.procs:
            self.wait_channels(site)

    def _neighbours(self, site: str) -> list[str]:
        return [b if site == a else a for a, b in self.links if site in (a, b)]

    def start(self, site: str) -> KmeProcess:
        """Write `site`'s config (its relay port kept once known) and start it."""
        nbs = []
        for other in self._neighbours(site):
            port = self.relay_ports.get(other) if other > site else None
            if port is not None and self._dial_port is not None:
                port = self._dial_port(site, other, port)  # e.g. through a tap
            nbs.append(Nb(other, relay_port=port))
        remote = [s for s in self.sites if s != site and s not in self._neighbours(site)]
        cfg = self.work / f"{site}.toml"
        cfg.write_text(net_kme_toml(
            self.pki, site, self.work / f"{site}.sqlite3", nbs,
            network=self._extra + self._topo + remote_sae_toml(remote),
            relay_listen=self.relay_ports.get(site, True), admin=True))
        proc = KmeProcess(cfg, self.work, site, env=self.env.get(site))
        self.procs[site] = proc
        port_file = proc.port_file.with_name(proc.port_file.name + ".relay")
        self.relay_ports[site] = json.loads(port_file.read_text())["relay"]
        return proc

    def wait_channels(self, site: str) -> None:
        expected = {f"kme-{o}" for o in self._neighbours(site)}
        proc = self.procs[site]
        wait_until(lambda: {nb for nb, v in self.status(proc)["network"]["neighbours"].items()
                            if v.get("connected")} == expected, 30,
                   f"{site}'s relay channels", list(self.procs.values()))

    def status(self, proc: KmeProcess | str) -> dict[str, Any]:
        p = self.procs[proc] if isinstance(proc, str) else proc
        admin = json.loads(p.port_file.with_name(p.port_file.name + ".admin").read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{admin['admin']}/status",
                                    timeout=10) as resp:
            out: dict[str, Any] = json.loads(resp.read())
        return out

    def metrics(self, site: str) -> str:
        p = self.procs[site]
        admin = json.loads(p.port_file.with_name(p.port_file.name + ".admin").read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{admin['admin']}/metrics",
                                    timeout=10) as resp:
            return resp.read().decode()

    def sae(self, site: str) -> EtsiClient:
        return EtsiClient(self.procs[site].url, ca_file=self.pki / "tls-ca.crt",
                          cert_file=self.pki / site / "sae-client.crt",
                          key_file=self.pki / site / "sae-client.key", timeout=20)

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()
