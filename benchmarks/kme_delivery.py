"""Key delivery throughput of one KME pair with a full pool (issue 17).

Two `qkdgw kme` processes on the BB84 link (`_kme_pair.py`: the example configs'
physics, 25 km and 4e7 pulses per round unless --pulses/--distance-km say otherwise,
a throwaway PKI) with `max_key_count` = --pool (default 1000), filled before the
measurement starts. Then, for each concurrency C in --concurrency (default 1, 8, 64):

- enc_keys phase: site-a-gw asks KME-A for one key per request (number=1), C requests
  in flight at a time, --requests-per-level requests (C=1 does a third; by default the
  levels together ask for less than the pool holds);
- dec_keys phase: site-b-gw fetches each answered key ID at KME-B (one per request),
  C at a time, and the key must equal the one site-a-gw got.

Prints keys/s (wall), p50/p99 latency, the count of 503s (and other failures), the
pool level after the phase, mismatches, and the CPU seconds the two KME processes and
this client used in the phase (the machine is shared: CPU time is the steadier
comparison; refilling rounds run in the same KME processes and are included), and of
that the two KMEs' event-loop threads alone (`kme_loop_cpu_s`, A and B: the request
path's TLS, HTTP, JSON and logging; the rest is the store and link threads).

Then (--sustain-rounds, default 4) the sustained phase: the pools are refilled (that
refill measures the link's generation rate), and site-a-gw asks for one key at that
rate for that many rounds' time, open loop, each key fetched at once at KME-B.

    python benchmarks/kme_delivery.py
    # the same load against another checkout (e.g. main before a change):
    git worktree add --detach /tmp/kme-old main
    python benchmarks/kme_delivery.py --pythonpath /tmp/kme-old
    # where the event loop spends its time (cProfile, one file per KME):
    python benchmarks/kme_delivery.py --profile /tmp/kme-prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kme_pair import (
    API,
    Kme,
    cpu_s,
    link_status,
    loop_cpu_s,
    prepare,
    ssl_ctx,
    start_pair,
    wait_pool,
)


def quantiles(lat: list[float]) -> dict[str, float | None]:
    if not lat:
        return {"p50_ms": None, "p99_ms": None}
    s = sorted(lat)
    return {"p50_ms": round(statistics.median(s) * 1e3, 2),
            "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3, 2)}


async def phase(url: str, ctx: Any, bodies: list[dict[str, Any]], conc: int
                ) -> tuple[list[tuple[float, int, dict[str, Any] | None]], float]:
    """POST every body, `conc` at a time; returns [(latency, status, answer)], wall s."""
    out: list[tuple[float, int, dict[str, Any] | None]] = []
    queue = list(reversed(bodies))
    conn = aiohttp.TCPConnector(ssl=ctx, limit=conc)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker() -> None:
            while queue:
                body = queue.pop()
                t0 = time.monotonic()
                try:
                    async with s.post(url, json=body,
                                      timeout=aiohttp.ClientTimeout(total=60)) as r:
                        data = await r.json(content_type=None)
                        status = r.status
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    data, status = None, 0
                out.append((time.monotonic() - t0, status, data))

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return out, time.monotonic() - t0


async def sustained(enc_url: str, dec_url: str, ctx_a: Any, ctx_b: Any, rate: float,
                    seconds: float) -> dict[str, Any]:
    """Open loop: one enc_keys (number=1) at KME-A every 1/rate s for `seconds`, each
    answer's key fetched at once at KME-B and compared. Requests are not held back
    when earlier ones are slow, so a KME that falls behind shows as latency."""
    enc_lat: list[float] = []
    statuses: list[int] = []
    # After each 503, the pair's stored_key_count read at once: a 503 while the pool
    # held keys for the pair breaks an aim. (A round deposited between the two reads
    # would show here too: this count errs high, never low.)
    level_after_503: list[int] = []
    status_url = enc_url.rsplit("/", 1)[0] + "/status"
    mismatches = 0
    conn_a = aiohttp.TCPConnector(ssl=ctx_a, limit=64)
    conn_b = aiohttp.TCPConnector(ssl=ctx_b, limit=64)
    async with aiohttp.ClientSession(connector=conn_a) as sa, \
            aiohttp.ClientSession(connector=conn_b) as sb:
        async def one() -> None:
            nonlocal mismatches
            t0 = time.monotonic()
            try:
                async with sa.post(enc_url, json={"number": 1},
                                   timeout=aiohttp.ClientTimeout(total=60)) as r:
                    data, status = await r.json(content_type=None), r.status
            except (aiohttp.ClientError, TimeoutError, ValueError):
                data, status = None, 0
            statuses.append(status)
            if status == 503:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError,
                                         KeyError):
                    async with sa.get(status_url,
                                      timeout=aiohttp.ClientTimeout(total=60)) as r:
                        level_after_503.append(int((await r.json())["stored_key_count"]))
            if status != 200 or not data:
                return
            enc_lat.append(time.monotonic() - t0)
            key = data["keys"][0]
            try:
                async with sb.post(dec_url, json={"key_IDs": [{"key_ID": key["key_ID"]}]},
                                   timeout=aiohttp.ClientTimeout(total=60)) as r:
                    got = await r.json(content_type=None)
                    same = r.status == 200 and got["keys"][0]["key"] == key["key"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                same = False
            mismatches += not same

        t0 = time.monotonic()
        tasks = []
        n = int(rate * seconds)
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
    return {"requests": n, "keys": len(enc_lat), "keys_per_s": round(len(enc_lat) / wall, 1),
            "status_503": statuses.count(503),
            "status_503_with_keys": sum(1 for n in level_after_503 if n > 0),
            "other_failures": sum(1 for st in statuses if st not in (200, 503)),
            "mismatches": mismatches, "wall_s": round(wall, 1)} | quantiles(enc_lat)


def run(args: argparse.Namespace) -> dict[str, Any]:
    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kme-deliv-")).resolve()
    prepare(work)
    kmes: list[Kme] = []
    try:
        link = {"refill_below": args.refill_below} if args.refill_below is not None else {}
        env = dict(e.split("=", 1) for e in args.kme_env)
        alice, bob = start_pair(work, pulses=args.pulses, distance_km=args.distance_km,
                                admin=True, pythonpath=args.pythonpath,
                                max_key_count=args.pool, profile=args.profile, kmes=kmes,
                                link=link, env=env)
        print(f"filling the pools to {args.pool} keys...", file=sys.stderr, flush=True)
        # Full, not nearly: at 98 % the round that fills the rest was still running
        # (seconds of both cores) in the first phases.
        fill_s = wait_pool(alice, bob, args.pool, 900, f"filling the pools to {args.pool}")
        print(f"pools full after {fill_s:.0f} s", file=sys.stderr, flush=True)
        enc_url = f"https://127.0.0.1:{alice.port}{API}/site-b-gw/enc_keys"
        dec_url = f"https://127.0.0.1:{bob.port}{API}/site-a-gw/dec_keys"
        ctx_a, ctx_b = ssl_ctx(work, "site-a"), ssl_ctx(work, "site-b")
        rows: list[dict[str, Any]] = []
        got: dict[str, str] = {}
        for conc in args.concurrency:
            n = args.requests_per_level // 3 if conc == 1 else args.requests_per_level
            for op in ("enc_keys", "dec_keys"):
                if op == "enc_keys":
                    bodies: list[dict[str, Any]] = [{"number": 1}] * n
                    url, ctx = enc_url, ctx_a
                else:
                    bodies = [{"key_IDs": [{"key_ID": k}]} for k in got]
                    url, ctx = dec_url, ctx_b
                cpu0 = [cpu_s(k.popen.pid) for k in kmes]
                loop0 = [loop_cpu_s(k.popen.pid) for k in kmes]
                rounds0 = link_status(work, alice, "site-b")["rounds_committed"]
                me0 = time.process_time()
                res, wall = asyncio.run(phase(url, ctx, bodies, conc))
                cpu = sum(cpu_s(k.popen.pid) for k in kmes) - sum(cpu0)
                loops = {k.site: loop_cpu_s(k.popen.pid) - c
                         for k, c in zip(kmes, loop0, strict=True)}
                me = time.process_time() - me0
                ok = [(t, d) for t, st, d in res if st == 200 and d]
                answered = {k["key_ID"]: k["key"] for _, d in ok for k in d["keys"]}
                mismatches = 0
                if op == "enc_keys":
                    got = answered
                else:
                    mismatches = sum(1 for k, v in answered.items() if got.get(k) != v)
                    mismatches += len(set(got) - set(answered))
                free = link_status(work, alice if op == "enc_keys" else bob,
                                   "site-b" if op == "enc_keys" else "site-a"
                                   )["stored_key_count"]
                # Rounds committed during the phase (one more may have been running).
                rounds = link_status(work, alice, "site-b")["rounds_committed"] - rounds0
                rows.append({
                    "op": op, "concurrency": conc, "requests": len(res),
                    "keys": len(answered), "keys_per_s": round(len(answered) / wall, 1),
                    "status_503": sum(1 for _, st, _ in res if st == 503),
                    "other_failures": sum(1 for _, st, _ in res if st not in (200, 503)),
                    "pool_free_after": free, "mismatches": mismatches,
                    "rounds": rounds, "wall_s": round(wall, 2), "kme_cpu_s": round(cpu, 2),
                    "client_cpu_s": round(me, 2),
                    # event-loop threads of KME-A and KME-B (the rest: worker threads)
                    "kme_loop_cpu_s": [round(loops[s], 2) for s in ("site-a", "site-b")],
                } | quantiles([t for t, _ in ok]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                # key bytes stay in memory only (checked against the peer, then dropped)
                del res, ok
        sus: dict[str, Any] | None = None
        if args.sustain_rounds > 0:
            # The link's generation rate: how fast it refills the pools drained by the
            # phases above, rounds back to back and no requests. The sustained phase
            # then starts from full pools and asks for keys at that rate.
            st = link_status(work, alice, "site-b")
            level0, rounds0 = st["stored_key_count"], st["rounds_committed"]
            print("refilling the pools...", file=sys.stderr, flush=True)
            refill_s = wait_pool(alice, bob, args.pool, 900, "refilling the pools")
            st = link_status(work, alice, "site-b")
            made = st["stored_key_count"] - level0
            rate = made / refill_s * args.sustain_factor
            round_s = refill_s / max(1, st["rounds_committed"] - rounds0)
            seconds = args.sustain_rounds * round_s
            print(f"sustained: the link made {made} keys in {refill_s:.1f} s; "
                  f"{rate:.1f} keys/s for {seconds:.0f} s ({args.sustain_rounds} rounds of "
                  f"~{round_s:.1f} s)", file=sys.stderr, flush=True)
            level0, rounds0 = st["stored_key_count"], st["rounds_committed"]
            cpu0 = sum(cpu_s(k.popen.pid) for k in kmes)
            sus = asyncio.run(sustained(enc_url, dec_url, ctx_a, ctx_b, rate, seconds))
            st = link_status(work, alice, "site-b")
            sus |= {"rate_asked": round(rate, 1), "pool_before": level0,
                    "pool_after": st["stored_key_count"],
                    "rounds": st["rounds_committed"] - rounds0,
                    "kme_cpu_s": round(sum(cpu_s(k.popen.pid) for k in kmes) - cpu0, 2)}
            print(json.dumps(sus), file=sys.stderr, flush=True)
        return {"code": args.label or args.pythonpath or "this checkout", "pool": args.pool,
                "pulses": args.pulses, "distance_km": args.distance_km,
                "fill_s": round(fill_s, 1), "rows": rows, "sustained": sus}
    finally:
        for k in kmes:
            k.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=1000, help="max_key_count (default 1000)")
    p.add_argument("--requests-per-level", type=int, default=400,
                   help="enc_keys per concurrency level (C=1: a third); by default all "
                        "levels together ask for less than the pool holds")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8, 64])
    p.add_argument("--pulses", type=int, default=40_000_000)
    p.add_argument("--distance-km", type=float, default=25.0)
    p.add_argument("--pythonpath", default=None,
                   help="run the KMEs from this source tree (e.g. an older checkout)")
    p.add_argument("--workdir", default=None, help="keep PKI, configs and logs here")
    p.add_argument("--sustain-rounds", type=float, default=4.0,
                   help="after the phases, ask for keys at the link's generation rate "
                        "for this many rounds' time (0: skip)")
    p.add_argument("--sustain-factor", type=float, default=1.0,
                   help="multiply the sustained request rate by this")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="run the KMEs under cProfile, kme-site-{a,b}.prof into DIR")
    p.add_argument("--refill-below", type=float, default=None, metavar="FRACTION",
                   help="[link] refill_below of both KMEs (default: the KME's default; "
                        "an older checkout may not know the setting)")
    p.add_argument("--kme-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of both KME processes, e.g. QKDGW_KME_LINK_NICE=0")
    p.add_argument("--label", default=None, help="name of this run in the output")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"\nKME delivery, {r['code']}: pool {r['pool']} keys (full after "
          f"{r['fill_s']} s), one key per request")
    print(f"{'op':9} {'conc':>4} {'req':>5} {'keys/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'503s':>5} {'other':>5} {'free after':>10} {'mism':>4} {'rnds':>4} {'wall s':>7} "
          f"{'KME cpu s':>9} {'client cpu s':>12} {'loop A/B s':>10}")
    for w in r["rows"]:
        print(f"{w['op']:9} {w['concurrency']:>4} {w['requests']:>5} {w['keys_per_s']:>8} "
              f"{w['p50_ms']!s:>8} {w['p99_ms']!s:>8} {w['status_503']:>5} "
              f"{w['other_failures']:>5} {w['pool_free_after']:>10} {w['mismatches']:>4} "
              f"{w['rounds']:>4} "
              f"{w['wall_s']:>7} {w['kme_cpu_s']:>9} {w['client_cpu_s']:>12} "
              f"{'/'.join(str(c) for c in w['kme_loop_cpu_s']):>10}")
    if r["sustained"]:
        w = r["sustained"]
        print(f"\nsustained at {w['rate_asked']} keys/s (the link's rate) for {w['wall_s']} s:"
              f" {w['keys']}/{w['requests']} served, {w['keys_per_s']} keys/s, p50 "
              f"{w['p50_ms']} ms, p99 {w['p99_ms']} ms, {w['status_503']} x 503 "
              f"({w['status_503_with_keys']} with keys in the pool right after), "
              f"{w['other_failures']} other, {w['mismatches']} mismatches, pool "
              f"{w['pool_before']} -> {w['pool_after']}, {w['rounds']} rounds, KME cpu "
              f"{w['kme_cpu_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
