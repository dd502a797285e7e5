"""Trusted-node relay cores (qkd.network.relay) in memory: core processing latency per
hop and end to end, relayed keys/s, and link-key bits per delivered key.

No sockets: frames go straight from one RelayNode core to the next in one process, so
the figures are the cores' own cost (decode, tag check, OTP, re-encrypt, encode), the
floor under any networked deployment. Topologies: a 3-node line (k = 1, 2 hops) and a
5-node ring (k = 2, paths of 2 and 3 hops).

    python benchmarks/relay.py                  # 2000 keys per topology
    python benchmarks/relay.py --keys 5000 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qkd.network.constants import AMD_BYTES, PAD_BYTES
from qkd.network.relay import (
    InMemoryLinkKeys,
    KeyAssembled,
    KeyDeliverable,
    RelayNode,
    relay_cost_bits,
)

KEY_BYTES = 32


def build(pairs: list[tuple[str, str]], keys: int) -> tuple[dict[str, RelayNode],
                                                            dict[str, InMemoryLinkKeys]]:
    # Enough link key for every relay: at most 5 hops of (share of E(K) + 2 pads) per
    # key, the share being key + x + t of the AMD code.
    supply = InMemoryLinkKeys.links(
        pairs, keys * 5 * (KEY_BYTES + AMD_BYTES + 2 * PAD_BYTES) + 4096)
    return {n: RelayNode(n, k) for n, k in supply.items()}, supply


def relay_once(nodes: dict[str, RelayNode], src: str, paths: list[tuple[str, ...]],
               per_hop: list[float], now: float) -> float:
    """One key end to end; returns the summed core time (s) and appends each frame's
    receive_data time to per_hop."""
    t0 = time.perf_counter()
    nodes[src].start_relay("sae-m", "sae-s", paths, KEY_BYTES, now)
    core = time.perf_counter() - t0
    queue: deque[tuple[str, str, bytes]] = deque()
    delivered = False
    while True:
        for name, node in nodes.items():
            while (ev := node.next_event()) is not None:
                if isinstance(ev, KeyAssembled):
                    t = time.perf_counter()
                    node.key_stored(ev.key_id, now)
                    core += time.perf_counter() - t
                elif isinstance(ev, KeyDeliverable):
                    delivered = True
            for to, frame in node.data_to_send():
                queue.append((name, to, frame))
        if not queue:
            break
        a, b, frame = queue.popleft()
        t = time.perf_counter()
        nodes[b].receive_data(a, frame, now)
        dt = time.perf_counter() - t
        per_hop.append(dt)
        core += dt
    assert delivered, "relay did not deliver"
    return core


def quantiles(xs: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(xs, n=100)
    return {"p50_us": qs[49] * 1e6, "p99_us": qs[98] * 1e6}


def run(name: str, pairs: list[tuple[str, str]], src: str, paths: list[tuple[str, ...]],
        keys: int) -> dict[str, object]:
    nodes, supply = build(pairs, keys)
    per_hop: list[float] = []
    e2e: list[float] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(keys):
        # 0.1 s of simulated time per key, and timers every 100 keys, so finished
        # relays are forgotten (SEEN_TTL_S) as in service instead of piling up.
        now = i * 0.1
        if i % 100 == 0:
            for node in nodes.values():
                node.handle_timer(now)
        e2e.append(relay_once(nodes, src, paths, per_hop, now))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    bits = sum(sum(s.bits_taken.values()) for s in supply.values())
    return {"topology": name, "k": len(paths), "hops": [len(p) - 1 for p in paths],
            "keys": keys, "per_frame": quantiles(per_hop), "end_to_end": quantiles(e2e),
            "keys_per_s_wall": keys / wall, "keys_per_s_cpu": keys / cpu,
            "link_key_bits_per_key": bits / keys,
            "formula_bits_per_key": relay_cost_bits(paths, KEY_BYTES)}


def bits_table(keys: int) -> list[dict[str, int]]:
    """Measured link-key bits per delivered key for k = 1..3 and path lengths 1..4."""
    rows = []
    for k in (1, 2, 3):
        for hops in (1, 2, 3, 4):
            # k parallel chains of `hops` hops between S and D ("S-x1-..-D").
            paths = [tuple(["S", *[f"n{j}_{i}" for i in range(hops - 1)], "D"])
                     for j in range(k)] if hops > 1 else [("S", "D")]
            if hops == 1 and k > 1:
                continue  # only one direct link: no k disjoint 1-hop paths
            pairs = sorted({pair for p in paths for pair in pairwise(p)})
            nodes, supply = build(pairs, keys)
            for i in range(keys):
                relay_once(nodes, "S", paths, [], float(i))
            bits = sum(sum(s.bits_taken.values()) for s in supply.values())
            rows.append({"k": k, "hops": hops, "bits_per_key": bits // keys,
                         "key_bits": 8 * KEY_BYTES})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [
        run("3-line", list(pairwise("ABC")), "A", [("A", "B", "C")], args.keys),
        run("5-ring", [*pairwise("ABCDE"), ("E", "A")], "A",
            [("A", "B", "C"), ("A", "E", "D", "C")], args.keys),
    ]
    table = bits_table(20)
    if args.json:
        print(json.dumps({"results": results, "bits": table}, indent=2))
        return
    print(f"{KEY_BYTES * 8}-bit keys, {args.keys} keys per topology, in-memory cores")
    print("topology  k  hops    frame p50/p99 us   e2e p50/p99 us   keys/s wall (cpu)"
          "   link bits/key (formula)")
    for r in results:
        f, e = r["per_frame"], r["end_to_end"]  # type: ignore[index]
        print(f"{r['topology']:8}  {r['k']}  {r['hops']!s:7} {f['p50_us']:7.1f} / "
              f"{f['p99_us']:7.1f}  {e['p50_us']:7.1f} / {e['p99_us']:7.1f}  "
              f"{r['keys_per_s_wall']:8.0f} ({r['keys_per_s_cpu']:.0f})   "
              f"{r['link_key_bits_per_key']:.0f} ({r['formula_bits_per_key']})")
    print("\nlink-key bits per delivered key (measured), by k and hops per path")
    for row in table:
        print(f"  k={row['k']} hops={row['hops']}: {row['bits_per_key']} bits "
              f"({row['bits_per_key'] / row['key_bits']:.1f}x the key)")


if __name__ == "__main__":
    main()
