"""Relayed keys between real KME processes (issue 11): ETSI 014 enc_keys at the
source for the SAE behind a non-adjacent KME, then dec_keys at the destination, over
ideal links and loopback TCP. Measures enc_keys latency (the whole relay: every hop,
the destination's store, every ACK back) p50/p99, relayed keys per second with
concurrent requests, and link-key bits per delivered key.

Topologies (source site-a, destination named): lines of 3 and 4 (k = 1, 2 and 3
hops), a ring of 4 (k = 2, two 2-hop paths), a ring of 5 to site-c with k = 1 (2 hops)
and k = 2 (paths of 2 and 3 hops).

    python benchmarks/relay_kmes.py                 # 200 sequential + 200 concurrent keys
    python benchmarks/relay_kmes.py --keys 500 --json --only line-3 ring-5-k2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.pki import init_pki
from qkd.common.log import configure_logging
from tests.support.network_kmes import Network

_RING5 = (["site-a", "site-b", "site-c", "site-d", "site-e"],
          [("site-a", "site-b"), ("site-b", "site-c"), ("site-c", "site-d"),
           ("site-d", "site-e"), ("site-a", "site-e")])
TOPOLOGIES = {
    "line-3": (["site-a", "site-b", "site-c"],
               [("site-a", "site-b"), ("site-b", "site-c")], "k = 1\n", "site-c"),
    "line-4": (["site-a", "site-b", "site-c", "site-d"],
               [("site-a", "site-b"), ("site-b", "site-c"), ("site-c", "site-d")],
               "k = 1\n", "site-d"),
    "ring-4-k2": (["site-a", "site-b", "site-c", "site-d"],
                  [("site-a", "site-b"), ("site-b", "site-c"), ("site-c", "site-d"),
                   ("site-a", "site-d")], "k = 2\n", "site-c"),
    "ring-5": (*_RING5, "k = 1\n", "site-c"),
    "ring-5-k2": (*_RING5, "k = 2\n", "site-c"),
}


def _q(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _measure(net: Network, dest: str, keys: int, concurrency: int) -> dict[str, object]:
    lat: list[float] = []
    async with net.sae("site-a") as a_gw, net.sae(dest) as d_gw:
        for _ in range(keys):
            t0 = time.perf_counter()
            enc = await a_gw.get_enc_keys(f"{dest}-gw", number=1)
            lat.append(time.perf_counter() - t0)
            assert await d_gw.get_dec_keys("site-a-gw", [enc[0].key_id]) == enc
        per_request = 8
        t0 = time.perf_counter()
        rounds = max(1, keys // per_request // concurrency)
        for _ in range(rounds):
            await asyncio.gather(*(a_gw.get_enc_keys(f"{dest}-gw", number=per_request)
                                   for _ in range(concurrency)))
        rate = rounds * concurrency * per_request / (time.perf_counter() - t0)
    a = net.status("site-a")["network"]
    delivered = a["relay"]["relays_delivered"]
    bits = sum(v["bits_out"] + v["bits_in"] for v in a["neighbours"].values())
    mids = [s for s in net.procs if s not in ("site-a", dest)]
    mid_bits = {s: sum(v["bits_out"] + v["bits_in"]
                       for v in net.status(s)["network"]["neighbours"].values())
                for s in mids}
    total = bits + sum(mid_bits.values()) + sum(
        v["bits_out"] + v["bits_in"]
        for v in net.status(dest)["network"]["neighbours"].values())
    paths = a["paths_in_use"].get(f"site-a-gw->{dest}-gw", [])
    return {"k": len(paths), "hops_per_path": sorted(len(p) - 1 for p in paths),
            "enc_keys_latency_p50_ms": round(1000 * _q(lat, 0.5), 2),
            "enc_keys_latency_p99_ms": round(1000 * _q(lat, 0.99), 2),
            "enc_keys_latency_mean_ms": round(1000 * statistics.fmean(lat), 2),
            "relayed_keys_per_s": round(rate, 1),
            "delivered": delivered,
            # Every hop's bits are counted at both of its ends: halve the sum.
            "link_key_bits_per_key": round(total / 2 / delivered, 1),
            "relay_failures": a["relay"]["relays_failed"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", nargs="+", choices=sorted(TOPOLOGIES), default=None,
                    help="run only these topologies")
    args = ap.parse_args()
    configure_logging("warning", "console")
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        init_pki(pki, _RING5[0], algorithm="ecdsa-p256")
        for name, (sites, links, extra, dest) in TOPOLOGIES.items():
            if args.only and name not in args.only:
                continue
            work = Path(tmp) / name
            work.mkdir()
            net = Network(pki, work, sites, links, network_extra=extra)
            try:
                out[name] = asyncio.run(_measure(net, dest, args.keys, args.concurrency))
            finally:
                net.stop()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, row in out.items():
            print(name, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
