"""`qkdgw demo`: the two sites on loopback, traffic on many streams, every byte checked.

KME-A, KME-B, gateway A, gateway B and a sink service at site B run as separate
processes (see `gateway.testbed`). This process plays site A's applications: it opens
`--streams` connections to gateway A's local listener at once, pushes `--stream-mb` of
data on each, and checks the byte count and SHA-256 the sink answers with. With
`--duration` it keeps doing rounds of that until the time is up, with the re-handshake
timer shortened so rekeys happen while data flows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.testbed import Testbed, TestbedError, TestbedOptions

CHUNK = 256 * 1024


@dataclass
class StreamResult:
    index: int
    sent: int = 0
    verified: int = 0
    error: str | None = None


@dataclass
class TrafficReport:
    results: list[StreamResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_sent(self) -> int:
        return sum(r.sent for r in self.results)

    @property
    def bytes_verified(self) -> int:
        return sum(r.verified for r in self.results)

    @property
    def failures(self) -> list[str]:
        return [f"stream {r.index}: {r.error}" for r in self.results if r.error]


async def push_stream(port: int, index: int, size: int, timeout: float = 120.0) -> StreamResult:
    """Send `size` bytes on one connection and check the sink's count and digest.

    Each chunk starts with its own sequence number, so a lost, repeated or reordered
    chunk changes the digest even though the rest of the chunk is the same pattern."""
    result = StreamResult(index)
    block = bytearray(os.urandom(CHUNK))
    digest = hashlib.sha256()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as exc:
        result.error = f"cannot connect to gateway A: {exc}"
        return result
    try:
        seq = 0
        while result.sent < size:
            n = min(CHUNK, size - result.sent)
            struct.pack_into(">QI", block, 0, seq, index)
            chunk = bytes(block[:n])
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
            result.sent += n
            seq += 1
        writer.write_eof()
        reply = await asyncio.wait_for(reader.readexactly(40), timeout)
        count = int.from_bytes(reply[:8], "big")
        if count != result.sent:
            result.error = f"sink received {count} bytes, {result.sent} were sent"
        elif reply[8:] != digest.digest():
            result.error = "SHA-256 mismatch: the data arrived altered"
        else:
            result.verified = result.sent
    except asyncio.IncompleteReadError:
        result.error = "connection ended before the sink's answer (tunnel reset?)"
    except (OSError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return result


async def run_traffic(port: int, streams: int, size: int, duration: float | None,
                      progress: bool) -> TrafficReport:
    report = TrafficReport()
    start = time.monotonic()
    rounds = 0
    while True:
        base = rounds * streams
        results = await asyncio.gather(*(push_stream(port, base + i, size)
                                         for i in range(streams)))
        report.results.extend(results)
        rounds += 1
        elapsed = time.monotonic() - start
        if progress and duration:
            print(f"  round {rounds}: {report.bytes_verified / 1e6:.0f} MB verified, "
                  f"{elapsed:.1f}/{duration:.0f} s", file=sys.stderr, flush=True)
        if duration is None or elapsed >= duration or report.failures:
            break
    report.seconds = time.monotonic() - start
    return report


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="qkdgw-demo-"))
    rekey = args.rekey_interval
    if rekey is None:
        rekey = max(1.0, args.duration / 6) if args.duration else 2.0
    options = TestbedOptions(rekey_interval=rekey, key_update_records=args.key_update_records,
                             link=args.link, distance_km=args.distance_km,
                             pulses=args.pulses, eve=args.eve, connect_wait=2.0)
    bed = Testbed(workdir, options)
    summary: dict[str, Any] = {"ok": False, "workdir": str(workdir) if keep else None}
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr,
                                                                flush=True))
    try:
        if args.eve:
            run_eve_demo(args, bed, summary, say)
        else:
            run_traffic_demo(args, bed, summary, say)
    except TestbedError as exc:
        summary["error"] = str(exc)
        keep = True
        summary["workdir"] = str(workdir)
    finally:
        bed.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return summary


def run_traffic_demo(args: argparse.Namespace, bed: Testbed, summary: dict[str, Any],
                     say: Any) -> None:
    """The normal demo: checked traffic on many streams through the tunnel."""
    workdir = bed.workdir
    say(f"qkdgw demo: starting KME-A, KME-B, gateway B, gateway A and the sink in {workdir}")
    bed.start_all()
    status = bed.wait_tunnel()
    peer = status["peer"]
    say(f"tunnel up: {peer['kem']} + QKD ({peer['mode']}), epoch {peer['epoch']}, "
        f"PKI-authenticated; pushing {args.streams} streams x {args.stream_mb} MB"
        + (f" for {args.duration:.0f} s" if args.duration else ""))
    port = bed.ports["listen-site-a-sink"]
    size = int(args.stream_mb * 1024 * 1024)
    report = asyncio.run(run_traffic(port, args.streams, size, args.duration,
                                     not args.json))
    final_a, final_b = bed.status("site-a"), bed.status("site-b")
    if args.link == "bb84":
        summary["link"] = _link_summary(bed.link_status("site-a"))
    failures = report.failures
    ok = (not failures and report.bytes_verified == report.bytes_sent > 0
          and final_a["handshakes"] >= 1)
    summary.update(
        ok=ok,
        streams=len(report.results),
        bytes_sent=report.bytes_sent,
        bytes_verified=report.bytes_verified,
        seconds=round(report.seconds, 3),
        throughput_mbps=round(report.bytes_verified * 8 / report.seconds / 1e6, 1)
        if report.seconds else 0.0,
        handshakes=final_a["handshakes"],
        rekeys=final_a["rekeys"],
        key_updates=final_a["key_updates"] + final_b["key_updates"],
        qkd_keys_consumed=final_a["qkd_keys_consumed"],
        epoch=final_a["peer"].get("epoch"),
        kem=peer["kem"],
        mode=peer["mode"],
        failures=failures[:20],
    )


def _link_summary(st: dict[str, Any]) -> dict[str, Any]:
    keys = ("distance_km", "rounds_committed", "rounds_aborted", "auth_failures",
            "last_qber", "last_abort_reason", "pool_free_blocks", "secret_key_rate_bps",
            "key_rate_at_source_bps", "auth_mode")
    return {k: st.get(k) for k in keys}


def run_eve_demo(args: argparse.Namespace, bed: Testbed, summary: dict[str, Any],
                 say: Any) -> None:
    """Eve on the quantum channel from the start: the KMEs must see her in the QBER,
    abort every round (so the pool never fills), and the gateways must fail closed.

    ok = the attack was detected (a round aborted on QBER), no key was produced and no
    application byte crossed; that is the expected outcome, so it exits 0."""
    summary["eve"] = args.eve
    say(f"qkdgw demo --eve {args.eve}: KMEs on {args.distance_km:g} km of fibre, "
        "eavesdropper on the quantum channel")
    t0 = time.monotonic()
    bed.start_all()
    detected_at = None
    link: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            link = bed.link_status("site-a")
            if link.get("rounds_aborted", 0) >= 1 or link.get("rounds_committed", 0):
                detected_at = time.monotonic() - t0
                break
        time.sleep(0.2)
    say(f"link: round aborted after {detected_at or 0:.1f} s: "
        f"{link.get('last_abort_reason') or 'no abort'}")
    # The gateways: the KME has no key, so the handshake cannot complete and an
    # application connection is reset rather than carried.
    port = bed.ports["listen-site-a-sink"]
    result = asyncio.run(push_stream(port, 0, 64 * 1024, timeout=10))
    closed_at = time.monotonic() - t0
    gw = bed.status("site-a")
    link = bed.link_status("site-a")
    detected = (detected_at is not None and link.get("rounds_committed", 0) == 0
                and "QBER" in str(link.get("last_abort_reason")))
    summary.update(
        ok=bool(detected and result.verified == 0 and gw["handshakes"] == 0),
        detection_seconds=round(detected_at or 0.0, 2),
        fail_closed_seconds=round(closed_at, 2),
        tunnel=gw["peer"]["tunnel"],
        handshakes=gw["handshakes"],
        application_result=result.error or "data crossed the tunnel",
        link=_link_summary(link),
    )


def _print_eve_summary(s: dict[str, Any]) -> None:
    if "error" in s:
        print(f"demo FAILED: {s['error']}\nlogs and configs kept in {s['workdir']}")
        return
    link = s["link"]
    verdict = ("OK: the link detected the eavesdropper and the gateways failed closed"
               if s["ok"] else "FAILED: the attack was not handled as expected")
    print(f"""
qkdgw demo --eve {s['eve']}: {verdict}
  QBER (test basis)   {link['last_qber']}  (abort threshold 0.11)
  rounds              {link['rounds_committed']} committed, {link['rounds_aborted']} aborted
  abort reason        {link['last_abort_reason']}
  key pool            {link['pool_free_blocks']} keys
  detected after      {s['detection_seconds']} s
  gateways            tunnel {s['tunnel']}, {s['handshakes']} handshakes; an application
                      connection got: {s['application_result']}
  failed closed after {s['fail_closed_seconds']} s""")


def _print_summary(s: dict[str, Any]) -> None:
    if "eve" in s:
        _print_eve_summary(s)
        return
    if "error" in s:
        print(f"demo FAILED: {s['error']}\nlogs and configs kept in {s['workdir']}")
        return
    verdict = "OK: every byte arrived intact" if s["ok"] else "FAILED"
    print(f"""
qkdgw demo: {verdict}
  streams            {s['streams']} (SHA-256 checked each)
  bytes sent         {s['bytes_sent']:,}
  bytes verified     {s['bytes_verified']:,}
  throughput         {s['throughput_mbps']} Mbit/s over {s['seconds']} s
  session keys       {s['kem']} + QKD ({s['mode']}), final epoch {s['epoch']}
  handshakes         {s['handshakes']} (of which {s['rekeys']} re-handshakes inside the tunnel)
  key updates        {s['key_updates']}
  QKD keys consumed  {s['qkd_keys_consumed']}""")
    link = s.get("link")
    if link:
        print(f"  QKD link           {link['distance_km']:g} km BB84, QBER {link['last_qber']}, "
              f"{link['rounds_committed']} rounds committed, {link['rounds_aborted']} "
              f"aborted, {link['secret_key_rate_bps']:.0f} bit/s emulated "
              f"({link['key_rate_at_source_bps'] / 1e6:.2f} Mbit/s at the source rate)")
    for failure in s["failures"]:
        print(f"  failure: {failure}")
    if s.get("workdir"):
        print(f"  work directory     {s['workdir']} (PKI, configs, logs)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.cli import UserError

    if args.streams < 1 or args.stream_mb <= 0:
        raise UserError("--streams must be at least 1 and --stream-mb above 0")
    if args.duration is not None and args.duration <= 0:
        raise UserError("--duration must be a positive number of seconds")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    summary = run_demo(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0 if summary["ok"] else 1


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run both sites on loopback and push checked traffic",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (default 32)")
    p.add_argument("--stream-mb", type=float, default=4.0,
                   help="megabytes per stream per round (default 4)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="keep traffic flowing for S seconds, with frequent rekeys")
    p.add_argument("--rekey-interval", type=float, default=None, metavar="S",
                   help="seconds between hybrid re-handshakes (default: 2, or duration/6)")
    p.add_argument("--key-update-records", type=int, default=1024,
                   help="records per AES key before a key update (default 1024)")
    p.add_argument("--link", choices=("bb84", "ideal"), default="bb84",
                   help="key source between the KMEs: the emulated BB84 link (default) "
                        "or the ideal link (no quantum security, fast)")
    p.add_argument("--distance-km", type=float, default=25.0,
                   help="fibre length of the BB84 link (default 25)")
    p.add_argument("--pulses", type=int, default=20_000_000,
                   help="pulses per BB84 round (default 2e7: 20 ms at 1 GHz, first key "
                        "in a few seconds)")
    p.add_argument("--eve", choices=("intercept-resend", "pns", "noise"), default=None,
                   help="put an eavesdropper on the quantum channel; the demo then shows "
                        "the link detecting it and the gateways failing closed (exit 0 "
                        "when that is what happens)")
    p.add_argument("--workdir", help="keep the generated PKI, configs and logs here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_demo)
