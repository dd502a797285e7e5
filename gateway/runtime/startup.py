"""Process start-up: `qkdgw gateway` and `qkdgw status`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.runtime.gateway import Gateway, load_credentials
from gateway.runtime.ops import budget_lines
from gateway.runtime.session import TunnelSession
from qkd.common.errors import UserError
from qkd.common.log import configure_logging


def _keep_heap() -> None:
    """Stop glibc from returning heap to the kernel after every burst of records.

    Each 64 KiB record is a fresh buffer; with glibc's default trim threshold the heap
    shrinks and regrows constantly, and the page faults cost about a quarter of the
    sending gateway's CPU (measured with perf, benchmarks/README.md)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_trim_threshold, 64 << 20)
    mallopt(m_top_pad, 16 << 20)


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config: GatewayConfig, ready_file: Path | None = None) -> None:
    gateway = Gateway(config)
    await gateway.start()
    if ready_file is not None:
        ports = {"admin": gateway.admin_port, "tunnel": gateway.tunnel_port,
                 "listeners": gateway.listener_ports, "pid": os.getpid()}
        tmp = ready_file.with_suffix(".tmp")
        import json

        tmp.write_text(json.dumps(ports))
        tmp.replace(ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.close()


def _cmd_gateway(args: argparse.Namespace) -> int:
    config = GatewayConfig.load(args.config)
    configure_logging(config.log_level, config.log_format, process=f"gateway:{config.site_id}")
    _keep_heap()
    _install_uvloop()
    asyncio.run(serve(config, Path(args.ready_file) if args.ready_file else None))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request


    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {url}: {exc} (fix: check the gateway's [admin] listen "
                        f"address and that it is running)") from None
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if "kme_id" in status:
        for line in kme_status_lines(status):
            print(line)
        return 0
    peer = status.get("peer", {})
    print(f"site {status['site_id']} ({status['role']}), up {status['uptime_s']} s")
    print(f"  peer {peer.get('site_id')}: tunnel {peer.get('tunnel')}")
    for key in ("auth_mode", "bootstrap_psk_epoch", "its_mac", "epoch", "mode", "degraded",
                "local_kme", "peer_kme", "kem", "last_handshake", "next_rekey_in_s",
                "qkd_keys_consumed", "open_streams"):
        if key in peer:
            print(f"    {key:16} {peer[key]}")
    psk = peer.get("psk")
    if psk is None:
        print("    psk              off (every tunnel bootstraps by PKI)")
    else:
        state = "OUT OF STEP with the peer" if psk.get("out_of_step") else "in step"
        print(f"    psk              epoch {psk.get('current_epoch')} ({state}; pending "
              f"{psk.get('pending_epoch')}, previous {psk.get('previous_epoch')}, "
              f"PKI bootstraps {psk.get('bootstraps')}, re-bootstrap "
              f"{'allowed' if psk.get('pki_rebootstrap_allowed') else 'refused'})")
    for key in ("handshakes", "rekeys", "key_updates", "qkd_keys_consumed",
                "degraded_handshakes"):
        print(f"  {key:20} {status.get(key)}")
    for line in budget_lines(status):
        print(line)
    return 0


def kme_status_lines(status: dict[str, Any]) -> list[str]:
    """`qkdgw status --url <KME admin>`: the KME's /status in the same words."""
    lines = [f"KME {status.get('kme_id')} (peer {status.get('peer_kme_id')}, "
             f"{status.get('link_type')} link), up {status.get('uptime_s')} s"]
    pool = status.get("pool")
    if isinstance(pool, dict):
        lines.append("  pool                 " + ", ".join(f"{k} {v}" for k, v in pool.items()))
    b = status.get("budget")
    b = b if isinstance(b, dict) else {}
    for key, label in (("pool", "key budget"), ("auth_pad", "auth pad budget")):
        fig = b.get(key)
        lines.append(f"  {label:20} "
                     + (str(fig.get("words")) if isinstance(fig, dict) else "not known yet"))
    link = status.get("link")
    if isinstance(link, dict) and status.get("link_type") != "ideal":
        qber = link.get("last_qber")
        lines.append(f"  qkd link             {'up' if link.get('connected') else 'DOWN'}, "
                     f"QBER {'-' if qber is None else f'{qber:.2%}'} (abort at "
                     f"{b.get('qber_abort_threshold')}), key rate "
                     f"{link.get('secret_key_rate_bps')} bit/s, rounds "
                     f"{link.get('rounds_committed')} committed / "
                     f"{link.get('rounds_aborted')} aborted")
        age = b.get("last_round_age_s")
        lines.append(f"  last round           {'never' if age is None else f'{age:.0f} s ago'}")
    return lines


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="run a site gateway (the tunnel endpoint)")
    p.add_argument("--config", required=True, help="gateway config file (see configs/site-a.toml)")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_gateway)
    s = sub.add_parser("status", help="show a running gateway's (or KME's) status")
    s.add_argument("--url", default="http://127.0.0.1:9101",
                   help="the [admin] address of a gateway (default http://127.0.0.1:9101) "
                        "or of a KME")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(handler=_cmd_status)


__all__ = ["Gateway", "TunnelSession", "load_credentials", "register_cli"]
