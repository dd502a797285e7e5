#!/usr/bin/env python3
"""Legitimate handshake latency while the tunnel listener is flooded with ClientHellos.

Processes: KME-A and KME-B (the `gateway.tools.testbed` KMEs on the ideal link, real HTTPS
and SQLite), gateway B (a real `qkdgw gateway` process, the responder), a flood worker
(this script with `--flood-worker`), and the legitimate initiator, which runs in this
process: site A's `Gateway` objects with a real ETSI 014 client to KME-A, dialling one
fresh PKI handshake at a time and timing TCP connect -> tunnel ready.

The flood comes from `--sources` loopback addresses 127.0.0.2, 127.0.0.3, ... (all of
127/8 reaches lo on Linux; the default 100 is more than the 64-slot global pending
cap), `--concurrency` connections at a time, in one of two styles:

  hello   each connection sends one valid-looking ClientHello (the right identities
          and policy flags, an ML-KEM encapsulation key, a key ID the KME never issued)
          and hangs up after an answer or `--linger` seconds; cookies are not echoed.
          Every hello that gets past admission costs gateway B a `dec_keys` request
          that KME-B answers from SQLite with an error (`kme_errors` in B's metrics).
  hold    each connection sends nothing and stays until B cuts it at the first-record
          deadline, then comes straight back: it holds a pending slot as long as it can,
          the way to lock the peer out of a listener with a global cap.

Three configurations of gateway B, each measured without and with the flood:

  off        [tunnel.admission] cookie = "off", rates and caps out of the way
  defaults   [tunnel.admission] left at its defaults (cookie = "under-load", 2/s per
             source with a burst of 10, 64 pending handshakes, 8 per source)
  reserved   the defaults plus peer_sources = ["127.0.0.1"]: the legitimate initiator
             (which dials from 127.0.0.1) has reserved slots outside the global cap

PSK authentication is off on both sides, so every legitimate handshake is a full PKI
one (ML-DSA signatures both ways) and every flood hello is a bootstrap attempt the
responder must take seriously. Legitimate handshakes are paced `--gap` seconds apart
(a real peer reconnects rarely; the default 0.6 s stays under the 2/s per-source rate).

    python benchmarks/handshake_flood.py                 # about 5 minutes
    python benchmarks/handshake_flood.py --styles hold --modes defaults,reserved
    python benchmarks/handshake_flood.py --handshakes 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ADMISSION = {
    "off": ('cookie = "off"\nrate_per_s = 10000.0\nburst = 100000\nmax_pending = 100000\n'
            "max_pending_per_source = 100000\nload_threshold = 100000\n"),
    "defaults": "",
    "reserved": 'peer_sources = ["127.0.0.1"]\n',
}


def flood_sources(n: int) -> list[str]:
    if not 1 <= n <= 250:
        raise SystemExit("--sources must be 1..250 (127.0.0.2-127.0.0.251)")
    return [f"127.0.0.{2 + i}" for i in range(n)]


# ------------------------------------------------------------------------ flood worker


async def _flood(port: int, duration: float, concurrency: int, linger: float,
                 sources: list[str], style: str) -> dict[str, int]:
    import signal

    from gateway.tunnel.constants import PROTOCOL_VERSION
    from gateway.tunnel.handshake import ClientHello
    from gateway.tunnel.record import RecordLayer
    from pqc.factory import get_kem

    ek = get_kem("ML-KEM-768", "auto").from_seed(os.urandom(64)).encapsulation_key
    tally = {"sent": 0, "refused": 0, "answered": 0, "silent": 0, "reset_at_connect": 0,
             "connect_failed": 0}
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # the bench is done: report

    async def holder(i: int) -> None:
        src = sources[i % len(sources)]
        while loop.time() < stop_at and not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(src, 0))
            except ConnectionResetError:
                tally["reset_at_connect"] += 1
                continue
            except OSError:
                tally["connect_failed"] += 1
                await asyncio.sleep(0.05)
                continue
            tally["sent"] += 1
            try:
                left = max(0.0, stop_at - loop.time())
                data = await asyncio.wait_for(reader.read(4096), left)
                tally["answered" if data else "refused"] += 1
            except (ConnectionResetError, BrokenPipeError):
                tally["refused"] += 1
            except TimeoutError:
                tally["silent"] += 1
            finally:
                writer.transport.abort()

    async def worker(i: int) -> None:
        src = sources[i % len(sources)]
        while loop.time() < stop_at and not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(src, 0))
            except ConnectionResetError:
                # Refused by admission before asyncio finished setting the socket up.
                tally["reset_at_connect"] += 1
                continue
            except OSError:
                tally["connect_failed"] += 1
                await asyncio.sleep(0.05)
                continue
            hello = ClientHello(
                version=PROTOCOL_VERSION, epoch=0, auth="pki", psk_epoch=0,
                kems_offered=("ML-KEM-768",), kem="ML-KEM-768", allowed_modes=("hybrid",),
                initiator_id="site-a", responder_id="site-b", initiator_sae_id="site-a-gw",
                nonce=os.urandom(32), encapsulation_key=ek, qkd_key_size_bits=256,
                qkd_key_ids=(str(uuid.uuid4()),), stream_window=1 << 20)
            try:
                writer.write(bytes(RecordLayer().seal_plaintext_handshake(hello.encode())))
                tally["sent"] += 1
                data = await asyncio.wait_for(reader.read(4096), linger)
                tally["answered" if data else "refused"] += 1
            except (ConnectionResetError, BrokenPipeError):
                tally["refused"] += 1
            except TimeoutError:
                tally["silent"] += 1
            finally:
                writer.transport.abort()

    run = holder if style == "hold" else worker
    tasks = [asyncio.ensure_future(run(i)) for i in range(concurrency)]
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if stopper.done():
        for t in tasks:
            t.cancel()
    else:
        await asyncio.wait(tasks)
        stopper.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def flood_worker(args: argparse.Namespace) -> int:
    tally = asyncio.run(_flood(args.port, args.duration, args.concurrency, args.linger,
                               flood_sources(args.sources), args.style))
    print(json.dumps(tally), flush=True)
    return 0


# -------------------------------------------------------------------------- the bench


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def _legit_handshakes(config_path: Path, count: int, gap: float,
                            timeout: float) -> list[float | None]:
    from gateway.config import GatewayConfig
    from gateway.runtime import Gateway, TunnelSession

    cfg = GatewayConfig.load(config_path)
    assert cfg.tunnel_connect is not None
    loop = asyncio.get_running_loop()
    gw = Gateway(cfg)
    out: list[float | None] = []
    try:
        for _ in range(count):
            start = loop.time()
            session: TunnelSession | None = None
            try:
                _, session = await loop.create_connection(
                    lambda: TunnelSession(gw, initiator=True),
                    cfg.tunnel_connect.host, cfg.tunnel_connect.port)
                ready = asyncio.ensure_future(session.ready.wait())
                closed = asyncio.ensure_future(session.closed.wait())
                await asyncio.wait({ready, closed}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                for f in (ready, closed):
                    f.cancel()
                out.append(loop.time() - start if session.ready.is_set() else None)
            except OSError:
                out.append(None)
            if session is not None:
                session.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session.closed.wait(), 5)
            await asyncio.sleep(gap)
    finally:
        await gw.close()
    return out


def _summary(latencies: list[float | None]) -> dict[str, Any]:
    ok = sorted(x for x in latencies if x is not None)
    res: dict[str, Any] = {"n": len(latencies), "failed": len(latencies) - len(ok)}
    if ok:
        res["median_ms"] = round(statistics.median(ok) * 1000, 1)
        res["p90_ms"] = round(ok[min(len(ok) - 1, int(0.9 * len(ok)))] * 1000, 1)
        res["max_ms"] = round(ok[-1] * 1000, 1)
    return res


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.tools.testbed import Testbed, TestbedOptions
    from qkd.common.log import configure_logging

    configure_logging("warning")  # the in-process initiator's lines would drown the table

    class FloodTestbed(Testbed):
        admission = ""

        def gateway_config(self, site: str, peer: str, **kw: Any) -> str:
            text = super().gateway_config(site, peer, **kw)
            text += "\n[auth]\npsk = false\n"
            if site == "site-b":
                text += "\n[tunnel.admission]\n" + self.admission
            return text

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qkdgw-flood-"))
    options = TestbedOptions(key_rate=2000.0, max_key_count=5000, log_level="warning")
    results: dict[str, Any] = {"handshakes": args.handshakes, "flood": {
        "sources": args.sources, "concurrency": args.concurrency,
        "linger_s": args.linger}, "cases": {}}
    tb = FloodTestbed(workdir, options)
    with tb:
        tb.prepare()
        tb.start_kmes()
        for mode in args.modes.split(","):
            tb.admission = ADMISSION[mode]
            tb.stop("gateway-site-b")
            tb.start_gateway("site-b", "site-a", connect=None)
            port = tb.ports["tunnel-site-b"]
            a_cfg = tb._write("site-a.toml", tb.gateway_config("site-a", "site-b",
                                                                 connect=port))
            for flood in [None, *args.styles.split(",")]:
                before = tb.metrics("site-b")
                proc = None
                if flood:
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "--flood-worker", "--port", str(port),
                         "--duration", str(args.handshakes * (args.gap + 1.0) + 30),
                         "--concurrency", str(args.concurrency), "--linger",
                         str(args.linger), "--sources", str(args.sources), "--style", flood],
                        stdout=subprocess.PIPE, text=True)
                    time.sleep(args.warmup)
                t0 = time.monotonic()
                lat = asyncio.run(_legit_handshakes(a_cfg, args.handshakes, args.gap,
                                                    args.timeout))
                elapsed = time.monotonic() - t0
                tally: dict[str, int] = {}
                if proc is not None:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        out, _ = proc.communicate(timeout=10)
                        tally = json.loads(out or "{}")
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                after = tb.metrics("site-b")
                row = _summary(lat)
                row["kme_requests_failed"] = int(
                    _metric_sum(after, "qkdgw_kme_errors_total")
                    - _metric_sum(before, "qkdgw_kme_errors_total"))
                row["refused"] = int(_metric_sum(after, "qkdgw_tunnel_refused_total")
                                     - _metric_sum(before, "qkdgw_tunnel_refused_total"))
                row["cookies"] = int(_metric_sum(after, "qkdgw_cookie_retries_total")
                                     - _metric_sum(before, "qkdgw_cookie_retries_total"))
                row["refused_by_reason"] = {
                    r: n for r in ("rate_limited", "pending_cap", "source_pending_cap",
                                   "peer_reserved_full", "first_record_timeout",
                                   "cookie_retry_timeout", "handshake_bytes")
                    if (n := int(_metric_sum(after, "qkdgw_tunnel_refused_total", reason=r)
                                 - _metric_sum(before, "qkdgw_tunnel_refused_total",
                                               reason=r)))}
                row["window_s"] = round(elapsed, 1)
                if tally:
                    row["flood"] = tally
                load = f"flood-{flood}" if flood else "quiet"
                results["cases"][f"{mode}/{load}"] = row
                print(f"{mode:9} {load:12} {json.dumps(row)}", file=sys.stderr, flush=True)
    return results


def _print_table(res: dict[str, Any]) -> None:
    print(f"{'admission':10} {'load':12} {'ok/n':>6} {'median ms':>10} {'p90 ms':>8} "
          f"{'max ms':>8} {'flood conn/s':>15} {'KME req (flood)':>16} {'refused':>8} "
          f"{'cookies':>8}")
    for name, row in res["cases"].items():
        mode, load = name.split("/")
        f = row.get("flood")
        rate = (f"{(f['sent'] + f['reset_at_connect']) / row['window_s']:.0f}" if f else "-")
        print(f"{mode:10} {load:12} {row['n'] - row['failed']:>3}/{row['n']:<2} "
              f"{row.get('median_ms', '-'):>10} {row.get('p90_ms', '-'):>8} "
              f"{row.get('max_ms', '-'):>8} {rate:>15} {row['kme_requests_failed']:>16} "
              f"{row['refused']:>8} {row['cookies']:>8}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flood-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--handshakes", type=int, default=15,
                   help="legitimate handshakes per case (default 15)")
    p.add_argument("--gap", type=float, default=0.6,
                   help="seconds between legitimate handshakes (default 0.6)")
    p.add_argument("--timeout", type=float, default=15.0,
                   help="a legitimate handshake slower than this counts as failed")
    p.add_argument("--concurrency", type=int, default=128,
                   help="flood connections in flight (default 128)")
    p.add_argument("--linger", type=float, default=1.0,
                   help="seconds a flood connection waits for an answer (default 1)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of flood before the first timed handshake (default 2)")
    p.add_argument("--modes", default="off,defaults,reserved",
                   help="admission configs to run (off, defaults, reserved)")
    p.add_argument("--styles", default="hello,hold",
                   help="flood styles to run (hello, hold); each after a quiet run")
    p.add_argument("--sources", type=int, default=100,
                   help="flood source addresses 127.0.0.2... (default 100, above the "
                        "64-slot global cap)")
    p.add_argument("--style", default="hello", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help="keep configs and logs here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.flood_worker:
        return flood_worker(args)
    res = run_bench(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
