"""Shared setup of the KME benchmarks: two `qkdgw kme` processes on the BB84 link.

`kme_reservation_latency.py` and `kme_delivery.py` both run KME-A (Alice) and KME-B
(Bob) as separate processes on loopback with a throwaway PKI; this module holds the
config, process handling and client TLS they share. `--pythonpath` runs the KMEs from
another source tree (an older checkout), `--profile DIR` under cProfile (the event
loop thread only: the store and link worker threads are not in it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from gateway.pki import init_pki
from gateway.tools import kme_config

API = "/api/v1/keys"


def kme_toml(work: Path, site: str, peer: str, link: dict[str, Any], admin: bool,
             max_key_count: int = 1_000_000) -> str:
    pki = work / "pki"
    return kme_config.dumps(kme_config.kme_config(
        pki, site, work / "state" / f"kme-{site}.sqlite3", local_saes=[f"{site}-gw"],
        peer_kme=f"kme-{peer}", peer_saes=[f"{peer}-gw"],
        link={"type": "bb84", "secret_file": str(pki / "link-secret.key"), **link},
        kme={"max_key_count": max_key_count, "max_key_per_request": 128},
        sections={"admin": {"listen": "127.0.0.1:0"}} if admin else None,
        log_level="info", log_format="json"))


class Kme:
    """One `qkdgw kme` process; the constructor returns once it listens."""

    def __init__(self, work: Path, site: str, config: str, pythonpath: str | None,
                 profile: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.site = site
        path = work / f"kme-{site}.toml"
        path.write_text(config)
        self.port_file = work / f"kme-{site}.port"
        self.log = work / f"kme-{site}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1") | (env or {})
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        prof: list[str] = []
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            # Written when the KME exits cleanly (stop() sends SIGTERM).
            prof = ["-m", "cProfile", "-o", str(profile / f"kme-{site}.prof")]
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, *prof, "-m", "gateway.cli", "kme", "--config", str(path),
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
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def ssl_ctx(work: Path, site: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(work / "pki" / "tls-ca.crt"))
    ctx.load_cert_chain(work / "pki" / site / "sae-client.crt",
                        work / "pki" / site / "sae-client.key")
    return ctx


def link_status(work: Path, kme: Kme, peer: str) -> dict[str, Any]:
    """The ETSI status `<site>-gw` sees for slave `<peer>-gw`, with the link extension
    merged in."""
    url = f"https://127.0.0.1:{kme.port}{API}/{peer}-gw/status"
    with urllib.request.urlopen(url, timeout=10, context=ssl_ctx(work, kme.site)) as r:
        st: dict[str, Any] = json.loads(r.read())
    return st | dict(st.get("status_extension", {}).get("qkd_link", {}))


def admin_status(kme: Kme) -> dict[str, Any] | None:
    """The admin `/status` JSON, or None when the KME serves no admin endpoint."""
    port = kme.side_file(".admin").get("admin")
    if not port:
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def cpu_s(pid: int) -> float:
    """utime + stime of a process (and its reaped children) in seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def loop_cpu_s(pid: int) -> float:
    """utime + stime of a process's main thread (a KME's event loop: TLS, HTTP, JSON,
    logging) in seconds; the rest of `cpu_s` is its worker threads (key store, link
    rounds)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prepare(work: Path) -> None:
    """Work directory with a state dir and a PKI for site-a and site-b (kept if there)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "state").mkdir(exist_ok=True)
    if not (work / "pki" / "ca.crt").exists():
        init_pki(work / "pki", ["site-a", "site-b"], algorithm="ecdsa-p256")


def start_pair(work: Path, *, pulses: int, distance_km: float, admin: bool,
               pythonpath: str | None, max_key_count: int = 1_000_000,
               profile: Path | None = None, kmes: list[Kme],
               link: dict[str, Any] | None = None,
               env: dict[str, str] | None = None) -> tuple[Kme, Kme]:
    """Bob (site-b) then Alice (site-a), dialling Bob's link ports. Each started KME is
    appended to `kmes` at once, so the caller's cleanup stops it even if the other
    one fails to start. `link`: more [link] settings for both; `env`: more
    environment for both processes."""
    common: dict[str, Any] = {"distance_km": distance_km, "pulses": pulses} | (link or {})
    bob = Kme(work, "site-b", kme_toml(work, "site-b", "site-a", common | {
        "role": "bob", "listen": "127.0.0.1:0", "quantum_listen": "127.0.0.1:0"},
        admin, max_key_count), pythonpath, profile, env)
    kmes.append(bob)
    ports = bob.side_file(".link")
    alice = Kme(work, "site-a", kme_toml(work, "site-a", "site-b", common | {
        "role": "alice", "peer": f"127.0.0.1:{ports['classical']}",
        "quantum": f"127.0.0.1:{ports['quantum']}"}, admin, max_key_count),
        pythonpath, profile, env)
    kmes.append(alice)
    return alice, bob


def wait_levels(work: Path, alice: Kme, bob: Kme, ok: Any, timeout: float,
                what: str) -> float:
    """Poll both masters' stored_key_count until `ok(level_a, level_b)`; returns the
    seconds it took. Exits with Alice's log tail if a KME dies or time runs out."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(OSError, ValueError):
            levels = [link_status(work, k, p)["stored_key_count"]
                      for k, p in ((alice, "site-b"), (bob, "site-a"))]
            if ok(*levels):
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout or any(k.popen.poll() is not None
                                                  for k in (alice, bob)):
            raise SystemExit(f"{what} did not happen:\n"
                             + alice.log.read_text(errors="replace")[-2000:])
        time.sleep(0.5)


def wait_pool(alice: Kme, bob: Kme, target: int, timeout: float, what: str) -> float:
    """Poll Alice's admin /status until her pool (free + reserved blocks, what the
    link's pool limit counts) holds `target`; returns the seconds it took. A master's
    stored_key_count is not the test: another pair's standing slice is not its to
    ask for, so with slices it stays below the cap even with the pool full."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            st = admin_status(alice)
            if st is not None and st["pool"]["free"] + st["pool"]["reserved"] >= target:
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout or any(k.popen.poll() is not None
                                                  for k in (alice, bob)):
            raise SystemExit(f"{what} did not happen:\n"
                             + alice.log.read_text(errors="replace")[-2000:])
        time.sleep(0.5)
