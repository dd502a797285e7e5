"""`qkdgw network status`: one KME's view of the QKD network, from its admin /status:
the topology, each link's state, pool level, key rate and relay usage, the relay
counters and the paths in use. Levels and counts only, never key material."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qkd.common.errors import UserError


def _admin_url(args: argparse.Namespace) -> str:
    if args.admin:
        return str(args.admin).rstrip("/")
    from qkd.kme.config import KmeConfig

    cfg = KmeConfig.load(args.config)
    if cfg.admin_listen is None or cfg.admin_listen.port == 0:
        raise UserError(f"{args.config}: [admin] listen: not set or port 0 (fix: give a "
                        "fixed admin port in the config, or pass --admin URL)")
    host = cfg.admin_listen.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{cfg.admin_listen.port}"


def fetch(url: str, timeout: float = 10.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/status", timeout=timeout) as resp:
            out: dict[str, Any] = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise UserError(f"cannot read {url}/status ({exc}) (fix: check that the KME runs "
                        "and that --admin / [admin] listen is its admin address)") from None
    return out


def render(status: dict[str, Any]) -> str:
    net = status.get("network")
    if not net:
        return (f"KME {status.get('kme_id')}: one link to {status.get('peer_kme_id')}, "
                "no [network] section\n")
    lines = [f"KME {status.get('kme_id')}"]
    topo = net.get("topology")
    if topo:
        lines.append(f"topology: {len(topo['nodes'])} nodes, {len(topo['links'])} links")
        lines += [f"  {x['a']} -- {x['b']}" for x in topo["links"]]
    lines.append("links:")
    for nb, v in sorted(net["neighbours"].items()):
        state = ("connected" if v.get("connected") else "down") if "connected" in v else "-"
        rate = v.get("key_rate")
        lines.append(f"  {nb:<20} {v.get('link_type', '?'):<5} relay channel {state:<9} "
                     f"pool {v.get('pool_keys')} keys, key rate "
                     f"{'-' if rate is None else rate}/s, relay bits out "
                     f"{v.get('bits_out', 0)} in {v.get('bits_in', 0)}")
    if "relay" in net:
        r = net["relay"]
        lines.append("relay: " + ", ".join(f"{k} {v}" for k, v in sorted(r.items())))
        if net.get("failures"):
            lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(net["failures"].items())))
        lines.append("relayed keys: " + ", ".join(
            f"{k} {v}" for k, v in sorted(net["relayed_keys"].items())))
        if net.get("latency_p50_s") is not None:
            lines.append(f"latency: p50 {1000 * net['latency_p50_s']:.1f} ms, "
                         f"p99 {1000 * net['latency_p99_s']:.1f} ms")
        lines.append("paths in use:" if net.get("paths_in_use") else "paths in use: none")
        for pair, paths in sorted(net.get("paths_in_use", {}).items()):
            lines += [f"  {pair}: {' > '.join(p)}" for p in paths]
    return "\n".join(lines) + "\n"


def _handle(args: argparse.Namespace) -> int:
    status = fetch(_admin_url(args))
    print(json.dumps(status.get("network", {}), indent=2) if args.json else render(status),
          end="\n" if args.json else "")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("network", help="show a KME's view of the QKD network",
                              description="Show one KME's view of the QKD network.")
    sub = p.add_subparsers(dest="network_command", metavar="SUBCOMMAND")
    sub.required = True
    st = sub.add_parser("status", help="topology, links, pools, relay counters, paths",
                        description="Topology, each link's pool level and key rate, "
                                    "relay counters and the paths in use (from the KME's "
                                    "admin /status).")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--admin", metavar="URL", help="the KME's admin address, e.g. "
                       "http://127.0.0.1:9202")
    where.add_argument("--config", type=Path, metavar="FILE",
                       help="the KME config; its [admin] listen is used")
    st.add_argument("--json", action="store_true", help="the raw `network` section")
    st.set_defaults(handler=_handle)


__all__ = ["fetch", "register_cli", "render"]
