#!/usr/bin/env python3
"""The two ETSI 014 requests of a handshake: wall time and the gateway's client CPU.

KME-A and KME-B as `qkdgw kme` processes (the testbed's ideal link); one process runs
`EtsiClient`s, keep-alive, one enc_keys at KME-A then one dec_keys at KME-B per pair,
timing each request's wall time and this process's CPU time (the client's share; the
rest of the wall time is the KME's and the network's). `--base DIR` loads another
tree's `qkd/etsi014/client.py` under another module name (its imports resolve to this
tree, which is fine while only the client differs) and alternates the two clients in
blocks, so both meet the same KMEs and the same background load. Runs under uvloop
when installed, as `qkdgw gateway` does.

    python benchmarks/handshake_etsi_client.py --n 400 --base /tmp/h13hs-base
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_client(tree: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "base_etsi014_client", tree / "qkd" / "etsi014" / "client.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def run(tb: Any, clients: dict[str, ModuleType], n: int, block: int
              ) -> dict[str, dict[str, list[float]]]:
    pki = tb.pki
    out: dict[str, dict[str, list[float]]] = {
        name: {"enc_wall": [], "enc_cpu": [], "dec_wall": [], "dec_cpu": []}
        for name in clients}
    pairs = {}
    for name, mod in clients.items():
        a = mod.EtsiClient(f"https://127.0.0.1:{tb.ports['kme-site-a']}",
                           ca_file=pki / "tls-ca.crt",
                           cert_file=pki / "site-a" / "sae-client.crt",
                           key_file=pki / "site-a" / "sae-client.key")
        b = mod.EtsiClient(f"https://127.0.0.1:{tb.ports['kme-site-b']}",
                           ca_file=pki / "tls-ca.crt",
                           cert_file=pki / "site-b" / "sae-client.crt",
                           key_file=pki / "site-b" / "sae-client.key")
        pairs[name] = (a, b)
        for _ in range(5):  # connections up, TLS done
            (k,) = await a.get_enc_keys("site-b-gw")
            await b.get_dec_keys("site-a-gw", [k.key_id])
    try:
        done = 0
        while done < n:
            for name, (a, b) in pairs.items():
                rec = out[name]
                for _ in range(block):
                    c, t = time.process_time(), time.perf_counter()
                    (k,) = await a.get_enc_keys("site-b-gw")
                    rec["enc_wall"].append(time.perf_counter() - t)
                    rec["enc_cpu"].append(time.process_time() - c)
                    c, t = time.process_time(), time.perf_counter()
                    await b.get_dec_keys("site-a-gw", [k.key_id])
                    rec["dec_wall"].append(time.perf_counter() - t)
                    rec["dec_cpu"].append(time.process_time() - c)
            done += block
    finally:
        for a, b in pairs.values():
            await a.close()
            await b.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="request pairs per client")
    ap.add_argument("--block", type=int, default=20, help="pairs per turn")
    ap.add_argument("--base", help="another source tree whose client to compare")
    args = ap.parse_args()
    from gateway.tools.testbed import Testbed, TestbedOptions
    from qkd.common.log import configure_logging
    from qkd.etsi014 import client as this_client

    configure_logging("warning")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    clients = {"this tree": this_client}
    if args.base:
        clients = {"base": load_client(Path(args.base)), **clients}
    with tempfile.TemporaryDirectory(prefix="qkdgw-etsi-") as tmp:
        tb = Testbed(Path(tmp), TestbedOptions(key_rate=5000.0, max_key_count=20000,
                                               log_level="warning"))
        with tb:
            tb.prepare()
            tb.start_kmes()
            res = asyncio.run(run(tb, clients, args.n, args.block))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| client | enc_keys wall | enc_keys client CPU | dec_keys wall | "
          "dec_keys client CPU |\n|---|---|---|---|---|")
    for name, rec in res.items():
        cells = [f"{statistics.median(rec[k]) * 1e3:.3f}"
                 for k in ("enc_wall", "enc_cpu", "dec_wall", "dec_cpu")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("(ms, p50 over", args.n, "pairs each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
