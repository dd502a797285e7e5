"""`qkdgw demo`: the two sites on loopback, traffic on many streams, every byte checked.

KME-A, KME-B, gateway A, gateway B and a sink service at site B run as separate
processes (see `gateway.tools.testbed`). This process plays site A's applications: it opens
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools.testbed import Testbed, TestbedError, TestbedOptions
from qkd.common.errors import UserError

CHUNK = 256 * 1024
# The pool of the late-eavesdropper demo: small, so that it visibly runs dry.
EVE_POOL_KEYS = 24


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
    late_eve = bool(args.eve) and _eve_delay(args.eve_after) != 0.0
    if rekey is None:
        rekey = 1.0 if late_eve else max(1.0, args.duration / 6) if args.duration else 2.0
    pool = args.max_key_count or (EVE_POOL_KEYS if late_eve else 1000)
    options = TestbedOptions(rekey_interval=rekey, key_update_records=args.key_update_records,
                             link=args.link, distance_km=args.distance_km,
                             pulses=args.pulses, eve=args.eve, connect_wait=2.0,
                             max_key_count=pool,
                             eve_after=float("inf") if late_eve else None)
    bed = Testbed(workdir, options)
    summary: dict[str, Any] = {"ok": False, "workdir": str(workdir) if keep else None}
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr,
                                                                flush=True))
    try:
        if getattr(args, "topology", None):
            from gateway.tools.network_demo import run_network_demo  # issue 11

            run_network_demo(args, bed, summary, say, run_traffic)
        elif late_eve:
            run_late_eve_demo(args, bed, summary, say)
        elif args.eve:
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
    restart = _restart_by_psk(bed, size=min(size, 1 << 20), say=say)
    failures += restart.pop("failures")
    summary["restart"] = restart
    ok = (not failures and report.bytes_verified == report.bytes_sent > 0
          and final_a["handshakes"] >= 1 and restart["auth_mode"] == "psk")
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


def _restart_by_psk(bed: Testbed, size: int, say: Any) -> dict[str, Any]:
    """Stop gateway A and start it again on its state directory: the new tunnel must
    authenticate with the PSK the last session derived, without certificates."""
    say("restarting gateway A: the new tunnel should authenticate by PSK, not PKI")
    bed.stop("gateway-site-a")
    bed.start_gateway("site-a", "site-b", connect=bed.ports["tunnel-site-b"],
                      listeners={"sink": 0})
    peer = bed.wait_tunnel()["peer"]
    result = asyncio.run(push_stream(bed.ports["listen-site-a-sink"], 0, size))
    ok = result.error is None and result.verified == size
    return {
        "auth_mode": peer.get("auth_mode"),
        "psk_epoch": peer.get("bootstrap_psk_epoch"),
        "bytes_verified": result.verified,
        "failures": [] if ok else [f"after the restart: {result.error or 'data lost'}"],
    }


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


def _eve_delay(value: str) -> float | None:
    """--eve-after: "auto" (None) = once the tunnel is up and has re-handshaked twice;
    a number = that many seconds after the tunnel came up; 0 = from the first pulse."""
    if value == "auto":
        return None
    try:
        delay = float(value)
    except ValueError:

        raise UserError(f"--eve-after {value!r}: give 'auto' or a number of seconds "
                        "(0: attack from the first pulse)") from None
    if not delay >= 0.0:

        raise UserError("--eve-after must be >= 0 seconds (or 'auto')")
    return delay


class _Probe(threading.Thread):
    """Site A's application during the late-eve demo: a small checked stream through
    the tunnel every 0.3 s; records (seconds since t0, bytes verified, error)."""

    def __init__(self, port: int, t0: float) -> None:
        super().__init__(daemon=True, name="demo-probe")
        self.port, self.t0 = port, t0
        self.results: list[tuple[float, int, str | None]] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_evt.is_set():
            r = asyncio.run(push_stream(self.port, i, 64 * 1024, timeout=5))
            self.results.append((time.monotonic() - self.t0, r.verified, r.error))
            i += 1
            self._stop_evt.wait(0.3)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(15)


def _last_kme_error(bed: Testbed) -> str:
    """Why gateway A could not rekey: its last KME error, from its JSON log."""
    reason = ""
    with contextlib.suppress(OSError):
        for line in bed.logs.joinpath("gateway-site-a.log").read_text().splitlines():
            if '"kme.enc_keys_failed"' in line:
                with contextlib.suppress(ValueError):
                    reason = str(json.loads(line).get("error", ""))
    return reason


def run_late_eve_demo(args: argparse.Namespace, bed: Testbed, summary: dict[str, Any],
                      say: Any) -> None:
    """The link makes key, the tunnel runs and rekeys on it; then Eve starts
    intercept-resend on the quantum channel. The KMEs see her in the QBER and abort
    every round, the small pool drains with each re-handshake, and once it is dry the
    gateways cannot rekey and fail closed.

    ok = traffic crossed before the attack; after it a round aborted on QBER (the
    detection), no round committed since, the pool ran dry, and application traffic
    stopped (the last probes all failed) with the reason printed."""
    o = bed.options
    delay = _eve_delay(args.eve_after)
    summary["eve"] = args.eve
    say(f"qkdgw demo --eve {args.eve}: KMEs on {args.distance_km:g} km, pool of "
        f"{o.max_key_count} keys, re-handshake every {o.rekey_interval:g} s; the "
        "eavesdropper waits until the tunnel runs on link key")
    t0 = time.monotonic()
    bed.start_all()
    status = bed.wait_tunnel()
    up_at = time.monotonic() - t0
    say(f"t={up_at:5.1f} s  tunnel up ({status['peer']['kem']} + QKD), pool "
        f"{bed.kme_status('site-a')['stored_key_count']} keys")
    probe = _Probe(bed.ports["listen-site-a-sink"], t0)
    probe.start()
    try:
        deadline = time.monotonic() + 90
        if delay is None:
            while bed.status("site-a")["rekeys"] < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
        else:
            time.sleep(delay)
        before = bed.link_status("site-a")
        gw_before = bed.status("site-a")
        bed.arm_eve()
        armed_at = time.monotonic() - t0
        say(f"t={armed_at:5.1f} s  Eve starts {args.eve} on every pulse "
            f"({gw_before['rekeys']} re-handshakes so far, "
            f"{before['rounds_committed']} rounds committed, pool "
            f"{bed.kme_status('site-a')['stored_key_count']} keys)")
        detected_at = dry_at = closed_at = None
        last_pool = -1
        link = before
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                link = bed.link_status("site-a")
                pool = int(bed.kme_status("site-a")["stored_key_count"])
                now = time.monotonic() - t0
                if (detected_at is None and link["rounds_aborted"] > before["rounds_aborted"]
                        and "QBER" in str(link["last_abort_reason"])):
                    detected_at = now
                    say(f"t={now:5.1f} s  link: round aborted, QBER {link['last_qber']} "
                        f"({link['last_abort_reason']})")
                if pool != last_pool:
                    say(f"t={now:5.1f} s  pool {pool} keys")
                    last_pool = pool
                if pool == 0 and dry_at is None:
                    dry_at = now
                if dry_at is not None and closed_at is None:
                    recent = [r for r in probe.results if r[0] > dry_at]
                    if len(recent) >= 3 and all(v == 0 for _, v, _ in recent[-3:]):
                        closed_at = recent[-3][0]
                        say(f"t={closed_at:5.1f} s  gateways fail closed: "
                            f"{recent[-1][2] or 'no data crossed'}")
                if closed_at is not None and detected_at is not None:
                    break
            time.sleep(0.3)
    finally:
        probe.stop()
    link = bed.link_status("site-a")
    gw = bed.status("site-a")
    after_armed = [r for r in probe.results if r[0] > armed_at]
    crossed_before = sum(v for t, v, _ in probe.results if t <= armed_at)
    last = probe.results[-3:]
    reason = _last_kme_error(bed)
    committed_since = link["rounds_committed"] - before["rounds_committed"]
    ok = bool(detected_at is not None and dry_at is not None and closed_at is not None
              and crossed_before > 0 and last and all(v == 0 for _, v, _ in last)
              and committed_since <= 1)  # a round whose pulses Eve never saw may finish
    summary.update(
        ok=ok, late=True, tunnel_up_seconds=round(up_at, 2),
        eve_started_seconds=round(armed_at, 2),
        detection_seconds=None if detected_at is None else round(detected_at, 2),
        pool_dry_seconds=None if dry_at is None else round(dry_at, 2),
        fail_closed_seconds=None if closed_at is None else round(closed_at, 2),
        rekeys_before_eve=gw_before["rekeys"], rekeys=gw["rekeys"],
        rounds_committed_after_eve=committed_since,
        bytes_before_eve=crossed_before,
        bytes_after_dry=sum(v for t, v, _ in after_armed if dry_at and t > dry_at),
        tunnel=gw["peer"]["tunnel"], handshakes=gw["handshakes"],
        application_result=(last[-1][2] if last else None) or "data crossed the tunnel",
        gateway_reason=reason or None, max_key_count=bed.options.max_key_count,
        link=_link_summary(link),
    )


def _print_eve_summary(s: dict[str, Any]) -> None:
    if "error" in s:
        print(f"demo FAILED: {s['error']}\nlogs and configs kept in {s['workdir']}")
        return
    if s.get("late"):
        _print_late_eve_summary(s)
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


def _print_late_eve_summary(s: dict[str, Any]) -> None:
    link = s["link"]
    verdict = ("OK: the link detected the eavesdropper, the pool ran dry and the "
               "gateways failed closed" if s["ok"]
               else "FAILED: the attack was not handled as expected")

    def at(key: str) -> str:
        return "never" if s[key] is None else f"t = {s[key]} s"

    print(f"""
qkdgw demo --eve {s['eve']} (late): {verdict}
  tunnel up           t = {s['tunnel_up_seconds']} s; {s['bytes_before_eve']:,} bytes checked \
before the attack, {s['rekeys_before_eve']} re-handshakes
  eavesdropper starts t = {s['eve_started_seconds']} s
  detected            {at('detection_seconds')}: QBER {link['last_qber']} (abort threshold \
0.11), {link['rounds_aborted']} rounds aborted, {s['rounds_committed_after_eve']} committed \
since
  pool ran dry        {at('pool_dry_seconds')} (max {s['max_key_count']} keys)
  failed closed       {at('fail_closed_seconds')}: tunnel {s['tunnel']}, an application \
connection got: {s['application_result']}
  reason              link: {link['last_abort_reason']}
                      gateway A: {s['gateway_reason'] or '-'}""")


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
    r = s.get("restart")
    if r:
        print(f"  after a restart    tunnel authenticated by {r['auth_mode']} (PSK epoch "
              f"{r['psk_epoch']}, no signatures), {r['bytes_verified']:,} bytes verified")
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

    if args.streams < 1 or args.stream_mb <= 0:
        raise UserError("--streams must be at least 1 and --stream-mb above 0")
    if args.duration is not None and args.duration <= 0:
        raise UserError("--duration must be a positive number of seconds")
    from gateway.tools.network_demo import check_args  # issue 11

    check_args(args)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    summary = run_demo(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif args.topology:
        from gateway.tools.network_demo import print_summary

        print_summary(summary)
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
                        "the link detecting it, the pool running dry and the gateways "
                        "failing closed (exit 0 when that is what happens)")
    p.add_argument("--eve-after", default="auto", metavar="S",
                   help="when Eve starts: 'auto' (default) once the tunnel runs and has "
                        "re-handshaked twice, S seconds after the tunnel is up, or 0 from "
                        "the first pulse (the pool then never fills)")
    p.add_argument("--max-key-count", type=int, default=None, metavar="N",
                   help=f"KME pool size (default 1000; {EVE_POOL_KEYS} with --eve, so the "
                        "pool visibly runs dry)")
    p.add_argument("--topology", choices=("line", "ring", "ring5"), default=None,
                   help="a QKD network instead of two sites: a line of 3 KMEs, a ring "
                        "of 4 or a ring of 5 (k = 2 on rings), gateways at site-a and "
                        "site-c (not neighbours), keys relayed through trusted nodes "
                        "(ideal links)")
    p.add_argument("--k", type=int, default=None, choices=(1, 2), dest="paths_k",
                   help="with --topology: node-disjoint paths per relayed key (default "
                        "1 on the line, 2 on rings)")
    p.add_argument("--compromise", default=None, metavar="NODE",
                   help="with --topology: record the relay traffic on NODE's hops, take "
                        "NODE's files as its KME left them and try to rebuild the "
                        "gateways' relayed QKD keys from them (e.g. site-b)")
    p.add_argument("--netns", choices=("auto", "on", "off"), default="auto",
                   help="with --topology: one network namespace per site, joined by "
                        "veth pairs to a bridge (auto: when root with ip netns working, "
                        "else loopback; namespaces and veths are removed at the end)")
    p.add_argument("--workdir", help="keep the generated PKI, configs and logs here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_demo)
