#!/usr/bin/env python3
"""Real gateway handshakes on loopback, p50/p99 with a per-step breakdown (issue 13).

KME-A and KME-B run as `qkdgw kme` processes (the testbed's ideal link: real HTTPS with
client certificates, real SQLite). A child process runs gateway B (`Gateway.start()`,
listening, admission out of the way) and site A's `Gateway` dialling the way
`Gateway._dial_loop` does: prestart (enc_keys at KME-A), TCP connect, handshake, until
the tunnel is ready. Both gateways share the child's one core, as the steps of a
handshake are sequential anyway. Timed from prestart to TunnelReady:

  pki   every handshake a PKI bootstrap (both PSK stores reset before it, so it also
        writes the first PSK on both sides)
  psk   every handshake after the first authenticates with the PSK of the one before

The breakdown comes from the real code path: `gateway.tunnel.steptimes`, switched on in
the child, times ML-KEM, ML-DSA sign / verify / certificate chain, each ETSI 014 round
trip (as the gateway awaits it), each PSK SQLite commit, summed over both gateways;
"TCP + other" is the rest (TCP, records, key schedule, the event loop, logging).

`--base DIR` runs the same children against another source tree too (e.g. a checkout
of main: `git worktree add --detach /tmp/base main`), interleaved round by round with
the same KMEs, for a before/after in one run; a tree without `steptimes` reports totals
only.

    python benchmarks/handshake_latency.py                       # --n 200 per mode
    python benchmarks/handshake_latency.py --base /tmp/base --rounds 4
    python benchmarks/handshake_latency.py --profile /tmp/prof   # cProfile the child
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
STEPS = ("ml_kem", "ml_dsa_sign", "ml_dsa_verify", "ml_dsa_cert_chain", "etsi_enc_keys",
         "etsi_dec_keys", "etsi_status", "sqlite_commit", "sqlite_commit (background)")
ADMISSION_OFF = ('\n[tunnel.admission]\ncookie = "off"\nrate_per_s = 10000.0\n'
                 "burst = 100000\nmax_pending = 100000\nmax_pending_per_source = 100000\n"
                 "load_threshold = 100000\n")


# --------------------------------------------------------------------------- child


def _config(tb: Any, site: str, peer: str, state: Path, connect: int | None) -> str:
    text = tb.gateway_config(site, peer, connect=connect)
    # No admin endpoint: its KME status poller would add requests to the timed window.
    text = text.replace('\n[admin]\nlisten = "127.0.0.1:0"\n', "\n")
    text = text.replace(f'state_dir = "{tb.workdir / "state" / site}"',
                        f'state_dir = "{state / site}"')
    assert str(state / site) in text, "state_dir not replaced"
    return text + ("" if connect is not None else ADMISSION_OFF)


async def _child(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.config import GatewayConfig
    from gateway.runtime import Gateway, TunnelSession
    from gateway.tools.testbed import Testbed, TestbedOptions
    from qkd.common.log import configure_logging

    try:
        from gateway.tunnel import steptimes
    except ImportError:  # an older tree: totals only
        steptimes = None  # type: ignore[assignment]
    # "info" is what a gateway logs by default (JSON lines, here into a pipe).
    configure_logging(args.log_level, "json" if args.log_level == "info" else "console")
    work = Path(args.workdir)
    tb = Testbed(work, TestbedOptions(log_level="warning"))
    tb.ports.update(json.loads((work / "ports.json").read_text()))
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))
    cfg_dir = state / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "b.toml").write_text(_config(tb, "site-b", "site-a", state, None))
    gw_b = Gateway(GatewayConfig.load(cfg_dir / "b.toml"))
    await gw_b.start()
    assert gw_b.tunnel_port is not None
    (cfg_dir / "a.toml").write_text(_config(tb, "site-a", "site-b", state, gw_b.tunnel_port))
    cfg_a = GatewayConfig.load(cfg_dir / "a.toml")
    gw_a = Gateway(cfg_a)
    assert gw_a.psk is not None and gw_b.psk is not None
    loop = asyncio.get_running_loop()
    host, port = "127.0.0.1", gw_b.tunnel_port

    async def one() -> tuple[float, float, dict[str, tuple[float, int]], str]:
        if steptimes is not None:
            steptimes.take()
        c0 = time.process_time()
        t0 = time.perf_counter()
        s = TunnelSession(gw_a, initiator=True)
        s.prestart()
        await s.hello_ready.wait()
        if s.conn.closed:
            raise RuntimeError("the handshake ended before the TCP connection")
        await loop.create_connection(lambda: s, host, port)
        ready = asyncio.ensure_future(s.ready.wait())
        closed = asyncio.ensure_future(s.closed.wait())
        await asyncio.wait({ready, closed}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for f in (ready, closed):
            f.cancel()
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        steps = steptimes.take() if steptimes is not None else {}
        if not s.ready.is_set():
            raise RuntimeError("handshake failed (see the gateway log lines above)")
        auth = s.conn.session.auth if s.conn.session is not None else "?"
        s.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(s.closed.wait(), 5)
        return dt, cpu, steps, auth

    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
    out: dict[str, Any] = {"tree": str(Path(sys.modules["gateway"].__file__ or "").parent),
                           "modes": {}}
    try:
        for mode in args.modes.split(","):
            for warm in range(3):  # first connections, TLS sessions to the KMEs
                del warm
                if mode == "pki":
                    gw_a.psk.reset()
                    gw_b.psk.reset()
                await one()
            if steptimes is not None:
                steptimes.enable()
            if prof is not None:
                prof.enable()
            samples = []
            for _ in range(args.n):
                if mode == "pki":
                    if prof is not None:
                        prof.disable()
                    gw_a.psk.reset()
                    gw_b.psk.reset()
                    if prof is not None:
                        prof.enable()
                dt, cpu, steps, auth = await one()
                if auth != mode:
                    raise RuntimeError(f"mode {mode}: the handshake used {auth}")
                samples.append({"total": dt, "cpu": cpu, "steps": steps})
                await asyncio.sleep(args.gap)
            if prof is not None:
                prof.disable()
            if steptimes is not None:
                steptimes.disable()
            out["modes"][mode] = samples
    finally:
        await gw_a.close()
        await gw_b.close()
        if prof is not None:
            prof.dump_stats(args.profile)
    return out


# -------------------------------------------------------------------------- parent


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _table(label: str, samples: list[dict[str, Any]]) -> list[str]:
    totals = [s["total"] for s in samples]
    rows = [f"| {label} | total | {statistics.median(totals) * 1e3:.2f} | "
            f"{_pct(totals, 0.99) * 1e3:.2f} | {len(samples)} |"]
    cpu = [s["cpu"] for s in samples]
    rows.append(f"| | (CPU of the gateways' process) | {statistics.median(cpu) * 1e3:.2f} | "
                f"{_pct(cpu, 0.99) * 1e3:.2f} | |")
    if not any(s["steps"] for s in samples):
        return rows
    names = [n for n in STEPS if any(n in s["steps"] for s in samples)]
    names += sorted({n for s in samples for n in s["steps"]} - set(names))
    for name in names:
        vals = [s["steps"].get(name, (0.0, 0))[0] for s in samples]
        count = statistics.median(s["steps"].get(name, (0.0, 0))[1] for s in samples)
        rows.append(f"| | {name} (x{count:g}) | {statistics.median(vals) * 1e3:.2f} | "
                    f"{_pct(vals, 0.99) * 1e3:.2f} | |")
    # "x (background)" / "x (during ETSI 014)" ran beside other steps: not summed.
    other = [s["total"] - sum(v[0] for n, v in s["steps"].items() if "(" not in n)
             for s in samples]
    rows.append(f"| | TCP + other | {statistics.median(other) * 1e3:.2f} | "
                f"{_pct(other, 0.99) * 1e3:.2f} | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="handshakes per mode (all rounds)")
    p.add_argument("--rounds", type=int, default=2,
                   help="children per tree, interleaved with --base (default 2)")
    p.add_argument("--modes", default="pki,psk")
    p.add_argument("--base", help="another source tree to measure in the same run")
    p.add_argument("--profile", help="cProfile the (first) child into this file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--gap", type=float, default=0.01,
                   help="seconds between handshakes (default 0.01; 0: back to back, so "
                        "one handshake's background write meets the next one's KME "
                        "requests on the same disk)")
    p.add_argument("--log-level", default="warning", choices=("warning", "info"),
                   help="the gateways' log level (info: the default of qkdgw, JSON)")
    p.add_argument("--asyncio", action="store_true",
                   help="the stock asyncio loop instead of uvloop (which qkdgw uses)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if not args.asyncio:
            # As `qkdgw gateway` runs (gateway/runtime/startup.py).
            with contextlib.suppress(ImportError):
                import uvloop

                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        print(json.dumps(asyncio.run(_child(args))), flush=True)
        return 0

    sys.path.insert(0, str(HERE))
    from gateway.tools.testbed import Testbed, TestbedOptions

    trees = {"this tree": HERE}
    if args.base:
        trees = {"base": Path(args.base).resolve(), **trees}
    results: dict[str, dict[str, list[Any]]] = {t: {} for t in trees}
    per_child = max(1, args.n // args.rounds)
    with tempfile.TemporaryDirectory(prefix="qkdgw-hs-") as tmp:
        work = Path(tmp)
        tb = Testbed(work, TestbedOptions(key_rate=5000.0, max_key_count=20000,
                                          log_level="warning"))
        with tb:
            tb.prepare()
            tb.start_kmes()
            (work / "ports.json").write_text(json.dumps(tb.ports))
            first = True
            for _ in range(args.rounds):
                for label, tree in trees.items():
                    cmd = [sys.executable, __file__, "--child", "--workdir", str(work),
                           "--n", str(per_child), "--modes", args.modes,
                           "--log-level", args.log_level, "--gap", str(args.gap),
                           *(["--asyncio"] if args.asyncio else [])]
                    if args.profile and first and label == "this tree":
                        cmd += ["--profile", args.profile]
                        first = False
                    env = dict(os.environ, PYTHONPATH=str(tree))
                    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True,
                                          text=True, timeout=1800)
                    if proc.returncode != 0:
                        print(proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"child for {label} failed")
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    if Path(res["tree"]).resolve() != (tree / "gateway").resolve():
                        raise SystemExit(f"child for {label} imported {res['tree']}")
                    for mode, samples in res["modes"].items():
                        results[label].setdefault(mode, []).extend(samples)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print("| tree / mode | step | p50 ms | p99 ms | n |\n|---|---|---|---|---|")
    for label, modes in results.items():
        for mode, samples in modes.items():
            print("\n".join(_table(f"{label} / {mode}", samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
