"""Gateway memory with many concurrent streams, and over a soak of streams opening and
closing: resident set size (RSS) of both gateway processes, every byte checked.

Two sites on loopback as `qkdgw demo` runs them (separate processes for the KMEs, the
gateways and the sink; ideal link). Phase 1 holds `--streams` application connections
open at once through the tunnel, each with `--bytes` sent, and reads RSS; then ends them
and checks every reply (byte count + SHA-256 from the sink). Phase 2 runs for `--soak`
seconds: batches of `--batch` concurrent connections of random sizes, one after the
other, RSS printed every `--every` seconds.

    python benchmarks/gateway_memory.py                       # 1000 streams, 10 min soak
    python benchmarks/gateway_memory.py --soak 60             # shorter soak
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.tools.testbed import Testbed, TestbedOptions


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


class Checked:
    """One application connection through the tunnel: payload out, sink's digest back."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(self.payload)
        await self.writer.drain()

    async def finish(self) -> bool:
        assert self.reader is not None and self.writer is not None
        self.writer.write_eof()
        try:
            answer = await asyncio.wait_for(self.reader.read(), 60)
        finally:
            self.writer.close()
        expected = len(self.payload).to_bytes(8, "big") + hashlib.sha256(self.payload).digest()
        return answer == expected


async def hold_many(port: int, n: int, size: int, pids: dict[str, int],
                    open_streams: Callable[[], object]) -> dict[str, object]:
    conns = [Checked(os.urandom(size)) for _ in range(n)]
    sem = asyncio.Semaphore(200)  # open them fast, but not all SYNs in one burst

    async def opened(c: Checked) -> None:
        async with sem:
            await c.open(port)

    t0 = time.monotonic()
    await asyncio.gather(*(opened(c) for c in conns))
    await asyncio.sleep(2.0)  # let every stream reach the sink and the windows settle
    held = {site: rss_mib(pid)[0] for site, pid in pids.items()}
    streams = await asyncio.to_thread(open_streams)  # the gateway's own count, not ours
    ok = await asyncio.gather(*(c.finish() for c in conns))
    return {"open_s": time.monotonic() - t0, "rss_held": held, "ok": sum(ok),
            "gateway_streams": streams,
            "bad": n - sum(ok)}


async def soak(port: int, seconds: float, batch: int, every: float,
               pids: dict[str, int]) -> dict[str, object]:
    rng = random.Random(1)
    end = time.monotonic() + seconds
    next_print = time.monotonic()
    samples: list[tuple[float, dict[str, float]]] = []
    done = bad = 0
    t0 = time.monotonic()
    while time.monotonic() < end:
        conns = [Checked(os.urandom(rng.randint(1, 64 * 1024))) for _ in range(batch)]
        await asyncio.gather(*(c.open(port) for c in conns))
        ok = await asyncio.gather(*(c.finish() for c in conns))
        done += len(ok)
        bad += len(ok) - sum(ok)
        if time.monotonic() >= next_print:
            rss = {site: rss_mib(pid)[0] for site, pid in pids.items()}
            samples.append((time.monotonic() - t0, rss))
            print(f"  t={samples[-1][0]:6.0f} s  streams {done:7d}  corrupted {bad}  "
                  + "  ".join(f"{s} RSS {v:6.1f} MiB" for s, v in rss.items()), flush=True)
            next_print += every
    return {"streams": done, "bad": bad, "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--bytes", type=int, default=16 * 1024, help="bytes sent per held stream")
    ap.add_argument("--soak", type=float, default=600.0, help="soak seconds (0: none)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--every", type=float, default=30.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            Testbed(Path(tmp), TestbedOptions(log_level="warning")) as bed:
        bed.start_all()
        bed.wait_tunnel()
        port = bed.ports["listen-site-a-sink"]
        pids = {site: bed.procs[f"gateway-{site}"].popen.pid for site in ("site-a", "site-b")}
        idle = {site: rss_mib(pid)[0] for site, pid in pids.items()}
        print("gateway RSS with the tunnel up, no stream: "
              + ", ".join(f"{s} {v:.1f} MiB" for s, v in idle.items()))
        held = asyncio.run(hold_many(
            port, args.streams, args.bytes, pids,
            lambda: bed.status("site-a").get("peer", {}).get("open_streams")))
        print(f"{args.streams} concurrent streams ({args.bytes} B each) opened in "
              f"{held['open_s']:.1f} s: RSS "
              + ", ".join(f"{s} {v:.1f} MiB" for s, v in held["rss_held"].items())  # type: ignore[attr-defined]
              + f" (gateway A counted {held['gateway_streams']} open streams); replies ok "
              f"{held['ok']}, corrupted or lost {held['bad']}")
        if args.soak > 0:
            print(f"soak: {args.soak:.0f} s of batches of {args.batch} streams, 1 B-64 KiB")
            res = asyncio.run(soak(port, args.soak, args.batch, args.every, pids))
            samples = res["samples"]
            for site in pids:
                vals = [rss[site] for _, rss in samples]  # type: ignore[union-attr]
                half = vals[len(vals) // 2:]
                print(f"  {site}: RSS min {min(vals):.1f}, max {max(vals):.1f}, first "
                      f"{vals[0]:.1f}, last {vals[-1]:.1f} MiB; second half spread "
                      f"{max(half) - min(half):.1f} MiB; peak (VmHWM) "
                      f"{rss_mib(pids[site])[1]:.1f} MiB")
            print(f"  {res['streams']} streams, corrupted or lost {res['bad']}")
        st = bed.status("site-a")
        print(f"tunnel handshakes {st.get('handshakes')}, open streams now "
              f"{st.get('peer', {}).get('open_streams')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
