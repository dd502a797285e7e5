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
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from gateway.pki import init_pki
from gateway.tools import kme_config

API = "/api/v1/keys"


def kme_toml(work: Path, site: str, peer: str, link: dict[str, Any], admin: bool) -> str:
    pki = work / "pki"
    return kme_config.dumps(kme_config.kme_config(
        pki, site, work / "state" / f"kme-{site}.sqlite3", local_saes=[f"{site}-gw"],
        peer_kme=f"kme-{peer}", peer_saes=[f"{peer}-gw"], link=link,
        kme={"max_key_count": 1000000, "max_key_per_request": 128},
        sections={"admin": {"listen": "127.0.0.1:0"}} if admin else None,
        log_level="info", log_format="json"))


class Kme:
    def __init__(self, work: Path, site: str, config: str, pythonpath: str | None) -> None:
        self.site = site
        path = work / f"kme-{site}.toml"
        path.write_text(config)
        self.port_file = work / f"kme-{site}.port"
        self.log = work / f"kme-{site}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "kme", "--config", str(path),
                 "--port-file", str(self.port_file)], stdout=out, stderr=out,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                cwd=pythonpath or None)
        deadline = time.monotonic() + 60
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"KME {site} did not start:\n"
                                 + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        self.port = int(self.port_file.read_text())

    def side_file(self, suffix: str) -> dict[str, int]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.port_file.with_name(self.port_file.name + suffix)
                                   .read_text()))
        return {}

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def ssl_ctx(work: Path, site: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(work / "pki" / "tls-ca.crt"))
    ctx.load_cert_chain(work / "pki" / site / "sae-client.crt",
                        work / "pki" / site / "sae-client.key")
    return ctx


def link_status(work: Path, kme: Kme, peer: str) -> dict[str, Any]:
    url = f"https://127.0.0.1:{kme.port}{API}/{peer}-gw/status"
    with urllib.request.urlopen(url, timeout=10, context=ssl_ctx(work, kme.site)) as r:
        st: dict[str, Any] = json.loads(r.read())
    return st | dict(st.get("status_extension", {}).get("qkd_link", {}))


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
    work.mkdir(parents=True, exist_ok=True)
    (work / "state").mkdir(exist_ok=True)
    if not (work / "pki" / "ca.crt").exists():
        init_pki(work / "pki", ["site-a", "site-b"], algorithm="ecdsa-p256")
    admin = args.pythonpath is None
    secret = work / "pki" / "link-secret.key"
    common = {"distance_km": args.distance_km, "pulses": args.pulses}
    kmes: list[Kme] = []
    try:
        bob = Kme(work, "site-b", kme_toml(work, "site-b", "site-a", kme_config.bb84_link(
            secret, "bob", **common), admin), args.pythonpath)
        kmes.append(bob)
        ports = bob.side_file(".link")
        alice = Kme(work, "site-a", kme_toml(work, "site-a", "site-b", kme_config.bb84_link(
            secret, "alice", **common, peer=ports["classical"], quantum=ports["quantum"]),
            admin), args.pythonpath)
        kmes.append(alice)
        t0 = time.monotonic()
        print(f"waiting for the first key ({args.pulses:.0e} pulses per round)...",
              file=sys.stderr, flush=True)
        while True:
            with contextlib.suppress(OSError, ValueError):
                if all(link_status(work, k, p)["stored_key_count"] > 0
                       for k, p in ((alice, "site-b"), (bob, "site-a"))):
                    break
            if time.monotonic() - t0 > 600 or any(k.popen.poll() is not None for k in kmes):
                raise SystemExit("no key from the link:\n"
                                 + alice.log.read_text(errors="replace")[-2000:])
            time.sleep(0.5)
        first_key_s = time.monotonic() - t0
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
            port = k.side_file(".admin").get("admin")
            if port:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status",
                                            timeout=10) as r:
                    link = json.loads(r.read())["link"]
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
