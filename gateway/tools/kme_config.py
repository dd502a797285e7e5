"""The one writer of KME config files (`qkdgw kme --config`), for the testbed, the
benchmarks and the tests (issue 10): a config is built as a dict and serialised by
tomli-w, so paths with quotes or backslashes and values like `inf` come out as valid
TOML without hand escaping. The file format itself is qkd.kme.config's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

Section = dict[str, Any]


def ideal_link(secret_file: Path, key_rate: float = float("inf")) -> Section:
    """[link] of the ideal (simulated) link."""
    return {"type": "ideal", "secret_file": str(secret_file), "key_rate": key_rate}


def bb84_link(secret_file: Path, role: str, *, distance_km: float, pulses: int,
              peer: int = 0, quantum: int = 0, **extra: Any) -> Section:
    """[link] of the emulated BB84 link: Bob listens on free ports, Alice dials Bob's
    classical port `peer` and quantum port `quantum` on loopback."""
    link: Section = {"type": "bb84", "secret_file": str(secret_file),
                     "distance_km": distance_km, "pulses": pulses}
    if role == "bob":
        link |= {"role": "bob", "listen": "127.0.0.1:0", "quantum_listen": "127.0.0.1:0"}
    else:
        link |= {"role": "alice", "peer": f"127.0.0.1:{peer}",
                 "quantum": f"127.0.0.1:{quantum}"}
    return link | extra


def kme_config(pki: Path, site: str, db: Path, *, local_saes: Sequence[str],
               peer_kme: str, peer_saes: Sequence[str], link: Section,
               kme: Mapping[str, Any] | None = None, log_level: str = "info",
               log_format: str | None = None,
               sections: Mapping[str, Section] | None = None) -> dict[str, Any]:
    """A KME config for `site`, with its TLS files from the test PKI layout
    (`pki/<site>/kme-server.*`, `pki/tls-ca.crt`). `kme` adds or overrides [kme]
    fields (key sizes, pool limits); `sections` adds whole tables such as [admin]."""
    cfg: dict[str, Any] = {
        "kme": {"id": f"kme-{site}", "listen": "127.0.0.1:0", "db": str(db),
                **(kme or {})},
        "tls": {"cert": str(pki / site / "kme-server.crt"),
                "key": str(pki / site / "kme-server.key"),
                "client_ca": str(pki / "tls-ca.crt")},
        "sae": [{"id": sae} for sae in local_saes],
        "peer": {"kme_id": peer_kme, "sae_ids": list(peer_saes)},
        "link": dict(link),
    }
    for name, table in (sections or {}).items():
        cfg[name] = cfg.get(name, {}) | dict(table)
    cfg["logging"] = {"level": log_level} | ({"format": log_format} if log_format else {})
    return cfg


def dumps(config: Mapping[str, Any], header: str = "") -> str:
    text = tomli_w.dumps(config)
    return f"# {header}\n{text}" if header else text


def write_kme_config(path: Path, config: Mapping[str, Any], header: str = "") -> Path:
    path.write_text(dumps(config, header))
    return path
