"""Configs for KMEs with several links and a [network] (issue 11), on the test PKI's
sites (site-a .. site-d: KME kme-<site>, SAE <site>-gw)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
