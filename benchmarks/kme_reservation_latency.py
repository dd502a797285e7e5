"""Key reservation latency between two KMEs while BB84 rounds run.

Two `qkdgw kme` processes on the BB84 link with the example configs' physics and
round size (25 km, 4e7 pulses per round, unless --pulses/--distance-km say otherwise)
and a pool limit high enough that rounds never pause for a full pool. Once both hold
key, two SAE clients ask for one key at a time (`enc_keys`, number=1) for --seconds:
site-a-gw at KME-A (whose KME reserves at KME-B, busy measuring and post-processing)
and site-b-gw at KME-B (reserving at KME-A, busy emitting pulses). Each enc_keys
answer waits for the peer's RESERVE_ACK, so its latency is what a gateway sees.

Prints p50 / p99 / max per direction, the KME-internal RESERVE -> RESERVE_ACK
quantiles from the admin endpoint, and how many rounds ran meanwhile (and what share
of the status samples found a round in progress).

    python benchmarks/kme_reservation_latency.py                  # 60 s
    python benchmarks/kme_reservation_latency.py --seconds 120 --json
    # the same load against another checkout (e.g. before a change; no admin there):
    git archive HEAD | tar -x -C /tmp/old
    python benchmarks/kme_reservation_latency.py --pythonpath /tmp/old
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
from _kme_pair import API, Kme, admin_status, link_status, prepare, ssl_ctx, start_pair, wait_levels


async def load(work: Path, kme: Kme, peer: str, seconds: float, gap: float,
               out: list[tuple[float, bool]]) -> None:
    conn = aiohttp.TCPConnector(ssl=ssl_ctx(work, kme.site))
    url = f"https://127.0.0.1:{kme.port}{API}/{peer}-gw/enc_keys"
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=conn) as s:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                async with s.post(url, json={"number": 1},
                                  timeout=aiohttp.ClientTimeout(total=30)) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            out.append((time.monotonic() - t0, ok))
            await asyncio.sleep(gap)


async def sample_rounds(work: Path, alice: Kme, seconds: float,
                        samples: list[bool]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(OSError, ValueError):
            st = await asyncio.to_thread(link_status, work, alice, "site-b")
            samples.append(st["rounds_started"] > st["rounds_committed"]
                           + st["rounds_aborted"])
        await asyncio.sleep(0.5)


def quantiles(lat: list[float]) -> dict[str, float | None]:
    if not lat:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(lat)
    return {"p50_ms": round(statistics.median(s) * 1e3, 1),
            "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3, 1),
            "max_ms": round(s[-1] * 1e3, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kme-resv-")).resolve()
    prepare(work)
    admin = args.pythonpath is None
    kmes: list[Kme] = []
    try:
        alice, bob = start_pair(work, pulses=args.pulses, distance_km=args.distance_km,
                                admin=admin, pythonpath=args.pythonpath, kmes=kmes)
        print(f"waiting for the first key ({args.pulses:.0e} pulses per round)...",
              file=sys.stderr, flush=True)
        first_key_s = wait_levels(work, alice, bob, lambda a, b: min(a, b) > 0, 600,
                                  "a first key from the link")
        before = link_status(work, alice, "site-b")
        a2b: list[tuple[float, bool]] = []
        b2a: list[tuple[float, bool]] = []
        samples: list[bool] = []
        print(f"first key after {first_key_s:.1f} s; measuring for {args.seconds:.0f} s",
              file=sys.stderr, flush=True)

        async def main() -> None:
            await asyncio.gather(
                load(work, alice, "site-b", args.seconds, args.gap, a2b),
                load(work, bob, "site-a", args.seconds, args.gap, b2a),
                sample_rounds(work, alice, args.seconds, samples))

        asyncio.run(main())
        after = link_status(work, alice, "site-b")
        internal: dict[str, Any] = {}
        for k in (alice, bob):
            st = admin_status(k)
            if st is not None:
                link = st["link"]
                internal[k.site] = {
                    "reserve_ack_p50_ms": None if link["reservation_latency_p50_s"] is None
                    else round(link["reservation_latency_p50_s"] * 1e3, 1),
                    "reserve_ack_p99_ms": None if link["reservation_latency_p99_s"] is None
                    else round(link["reservation_latency_p99_s"] * 1e3, 1)}
        result = {
            "code": args.pythonpath or "this checkout",
            "pulses": args.pulses, "distance_km": args.distance_km,
            "seconds": args.seconds, "first_key_s": round(first_key_s, 1),
            "rounds_during_run": (after["rounds_committed"] + after["rounds_aborted"])
            - (before["rounds_committed"] + before["rounds_aborted"]),
            "round_in_progress_share": round(sum(samples) / len(samples), 2)
            if samples else None,
            "master_a_reserves_at_b": {"requests": len(a2b),
                                       "failed": sum(not ok for _, ok in a2b)}
            | quantiles([t for t, ok in a2b if ok]),
            "master_b_reserves_at_a": {"requests": len(b2a),
                                       "failed": sum(not ok for _, ok in b2a)}
            | quantiles([t for t, ok in b2a if ok]),
            "kme_internal": internal,
        }
        return result
    finally:
        for k in kmes:
            k.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--gap", type=float, default=0.2,
                   help="pause between one client's requests (default 0.2 s)")
    p.add_argument("--pulses", type=int, default=40_000_000)
    p.add_argument("--distance-km", type=float, default=25.0)
    p.add_argument("--pythonpath", default=None,
                   help="run the KMEs from this source tree (e.g. an older checkout)")
    p.add_argument("--workdir", default=None, help="keep PKI, configs and logs here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"\nKME reservation latency, {r['code']}: {r['pulses']:.0e} pulses per round, "
          f"{r['distance_km']:g} km, {r['seconds']:.0f} s, {r['rounds_during_run']} rounds "
          f"ran, a round was in progress in {r['round_in_progress_share']} of the samples")
    print(f"{'direction':28} {'requests':>8} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8}")
    for key, name in (("master_a_reserves_at_b", "A master -> reserve at B"),
                      ("master_b_reserves_at_a", "B master -> reserve at A")):
        d = r[key]
        print(f"{name:28} {d['requests']:>8} {d['failed']:>6} {d['p50_ms']!s:>8} "
              f"{d['p99_ms']!s:>8} {d['max_ms']!s:>8}")
    for site, d in r["kme_internal"].items():
        print(f"  KME {site}: RESERVE -> RESERVE_ACK p50 {d['reserve_ack_p50_ms']} ms, "
              f"p99 {d['reserve_ack_p99_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
