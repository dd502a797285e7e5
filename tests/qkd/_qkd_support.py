"""Shared helpers for the qkd tests (imported by conftest and test modules).

Topology used by the KME tests (4 sites so that "another local SAE" and "another
peer SAE" exist on both sides):

    KME-A (kme-site-a): local site-a-gw, site-c-gw   peer site-b-gw, site-d-gw
    KME-B (kme-site-b): local site-b-gw, site-d-gw   peer site-a-gw, site-c-gw
"""

from __future__ import annotations

from pathlib import Path

SITES = ["site-a", "site-b", "site-c", "site-d"]
SIDES = {
    "a": {"site": "site-a", "local": ["site-a-gw", "site-c-gw"],
          "peer_kme": "kme-site-b", "peer": ["site-b-gw", "site-d-gw"]},
    "b": {"site": "site-b", "local": ["site-b-gw", "site-d-gw"],
          "peer_kme": "kme-site-a", "peer": ["site-a-gw", "site-c-gw"]},
}


def kme_toml(pki: Path, side: str, db: Path, *, key_rate: str = "inf",
             max_key_count: int = 1000, max_key_per_request: int = 16,
             extra_kme: str = "") -> str:
    s = SIDES[side]
    site = s["site"]
    saes = "".join(f'[[sae]]\nid = "{sae}"\n\n' for sae in s["local"])
    peers = ", ".join(f'"{p}"' for p in s["peer"])
    return f"""
[kme]
id = "kme-{site}"
listen = "127.0.0.1:0"
db = "{db}"
key_size = 256
min_key_size = 64
max_key_size = 1024
max_key_count = {max_key_count}
max_key_per_request = {max_key_per_request}
{extra_kme}
[tls]
cert = "{pki}/{site}/kme-server.crt"
key = "{pki}/{site}/kme-server.key"
client_ca = "{pki}/tls-ca.crt"

{saes}
[peer]
kme_id = "{s['peer_kme']}"
sae_ids = [{peers}]

[link]
type = "ideal"
secret_file = "{pki}/link-secret.key"
key_rate = {key_rate}

[logging]
level = "debug"
"""
