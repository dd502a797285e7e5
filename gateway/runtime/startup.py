"""Process start-up: `qkdgw gateway` and `qkdgw status`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

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


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="run a site gateway (the tunnel endpoint)")
    p.add_argument("--config", required=True, help="gateway config file (see configs/site-a.toml)")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_gateway)
    s = sub.add_parser("status", help="show a running gateway's tunnel status")
    s.add_argument("--url", default="http://127.0.0.1:9101",
                   help="the gateway's [admin] address (default http://127.0.0.1:9101)")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(handler=_cmd_status)


__all__ = ["Gateway", "TunnelSession", "load_credentials", "register_cli"]
