"""A two-site testbed on loopback, every component a separate process.

Used by `qkdgw demo`, `qkdgw rndl`, the end-to-end tests and the benchmarks:
creates a PKI and configs in a work directory, then starts KME-A, KME-B, gateway B
(listening), gateway A (dialling, optionally through a relay) and a sink service at
site B. Every process listens on port 0 and reports its port through a file, so
nothing races for fixed ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.pki import init_pki
from gateway.tools import kme_config


class TestbedError(GatewayError):
    """A testbed process failed to start; the message carries the end of its log."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass
class TestbedOptions:
    __test__ = False
    rekey_interval: float = 600.0
    key_update_records: int = 1 << 20
    key_rate: float = 1000.0  # keys per second the ideal link produces
    max_key_count: int = 1000
    allow_degraded: bool = False
    keylog: bool = False
    kem: str = "ML-KEM-768"
    algorithm: str = "ml-dsa-65"
    log_level: str = "info"
    stream_window: int = 1 << 20
    connect_wait: float = 10.0
    # "ideal" (fast, for tests) or "bb84" (the emulated QKD link between the KMEs).
    link: str = "ideal"
    distance_km: float = 25.0
    pulses: int = 40_000_000
    # An eavesdropper on the quantum channel: intercept-resend, pns or noise.
    eve: str | None = None
    eve_fraction: float = 1.0
    # None: Eve attacks from the first pulse. A number: she forwards untouched for that
    # many seconds (inf: until `arm_eve()`), so the link first makes key.
    eve_after: float | None = None


def _toml_str(s: str | Path) -> str:
    return json.dumps(str(s))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class Testbed:
    __test__ = False
    workdir: Path
    options: TestbedOptions = field(default_factory=TestbedOptions)
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # Network namespaces (qkdgw demo --topology --netns): a process name's command
    # prefix (`ip netns exec NS`) and the address a site's admin listener is reached at.
    spawn_prefix: dict[str, list[str]] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def run(self) -> Path:
        return self.workdir / "run"

    def keylog_path(self, site: str) -> Path:
        return self.workdir / "state" / site / "keylog.txt"

    # -- files ---------------------------------------------------------------------

    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in (self.logs, self.run, self.workdir / "configs", self.workdir / "state"):
            d.mkdir(exist_ok=True)
        if not (self.pki / "ca.crt").exists():
            init_pki(self.pki, ["site-a", "site-b"], algorithm=self.options.algorithm)
        if self.options.link == "ideal":
            for site, peer in (("site-a", "site-b"), ("site-b", "site-a")):
                self._write(f"kme-{site}.toml", self._kme_config(site, peer))

    def _write(self, name: str, text: str) -> Path:
        path = self.workdir / "configs" / name
        path.write_text(text)
        return path

    def _link_config(self, site: str) -> dict[str, Any]:
        o = self.options
        secret = self.pki / "link-secret.key"
        if o.link == "ideal":
            return kme_config.ideal_link(secret, o.key_rate)
        common = {"distance_km": o.distance_km, "pulses": o.pulses}
        if site == "site-b":
            return kme_config.bb84_link(secret, "bob", **common)
        quantum = self.ports.get("eve", self.ports["link-quantum"])
        return kme_config.bb84_link(secret, "alice", **common,
                                    peer=self.ports["link-classical"], quantum=quantum)

    def _kme_config(self, site: str, peer: str) -> str:
        o = self.options
        return kme_config.dumps(kme_config.kme_config(
            self.pki, site, self.workdir / "state" / f"kme-{site}.sqlite3",
            local_saes=[f"{site}-gw"], peer_kme=f"kme-{peer}", peer_saes=[f"{peer}-gw"],
            link=self._link_config(site),
            kme={"key_size": 256, "max_key_count": o.max_key_count,
                 "max_key_per_request": min(128, o.max_key_count)},
            log_level=o.log_level, log_format="json"), "generated by the qkdgw testbed")

    def gateway_config(self, site: str, peer: str, *, connect: int | None,
                       listeners: dict[str, int] | None = None,
                       services: dict[str, int] | None = None, listen_port: int = 0) -> str:
        o = self.options
        tunnel = (f'connect = "127.0.0.1:{connect}"' if connect is not None
                  else f'listen = "127.0.0.1:{listen_port}"')
        text = f"""# generated by the qkdgw testbed
[gateway]
site_id = "{site}"
sae_id = "{site}-gw"
state_dir = {_toml_str(self.workdir / "state" / site)}

[tunnel]
{tunnel}
rekey_interval_s = {o.rekey_interval}
key_update_records = {o.key_update_records}
stream_window = {o.stream_window}
connect_wait_s = {o.connect_wait}
reconnect_min_s = 0.2
reconnect_max_s = 2

[peer]
site_id = "{peer}"
sae_id = "{peer}-gw"

[pki]
ca = {_toml_str(self.pki / "ca.crt")}
cert = {_toml_str(self.pki / site / "gateway.crt")}
key = {_toml_str(self.pki / site / "gateway.key")}

[kme]
url = "https://127.0.0.1:{self.ports[f"kme-{site}"]}"
ca = {_toml_str(self.pki / "tls-ca.crt")}
cert = {_toml_str(self.pki / site / "sae-client.crt")}
key = {_toml_str(self.pki / site / "sae-client.key")}

[policy]
kem = "{o.kem}"
allow_degraded = {"true" if o.allow_degraded else "false"}

[logging]
level = "{o.log_level}"
format = "json"
"""
        if o.keylog:
            text += f"keylog_file = {_toml_str(self.keylog_path(site))}\n"
        text += '\n[admin]\nlisten = "127.0.0.1:0"\n'
        for service, port in (listeners or {}).items():
            text += f'\n[[listen]]\nlisten = "127.0.0.1:{port}"\nservice = "{service}"\n'
        for service, port in (services or {}).items():
            text += f'\n[[service]]\nname = "{service}"\ntarget = "127.0.0.1:{port}"\n'
        return text

    # -- processes -------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.logs / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "ab") as out:
            popen = subprocess.Popen([*self.spawn_prefix.get(name, []), sys.executable,
                                      *args], stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def _wait_file(self, proc: Proc, path: Path, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                text = path.read_text()
                if text.strip():
                    return text
            if proc.popen.poll() is not None:
                raise TestbedError(f"{proc.name} exited with code {proc.popen.returncode} "
                                   f"while starting; end of {proc.log}:\n{proc.tail()}")
            time.sleep(0.05)
        raise TestbedError(f"{proc.name} did not become ready within {timeout:.0f} s; "
                           f"end of {proc.log}:\n{proc.tail()}")

    def start_kmes(self) -> None:
        # With the BB84 link, Bob (site B) binds its link ports first; Alice's config
        # names them (through eve if there is one).
        order = ("site-a", "site-b") if self.options.link == "ideal" else ("site-b", "site-a")
        for site in order:
            name = f"kme-{site}"
            if self.options.link != "ideal":
                peer = "site-a" if site == "site-b" else "site-b"
                self._write(f"{name}.toml", self._kme_config(site, peer))
            port_file = self.run / f"{name}.port"
            port_file.unlink(missing_ok=True)
            proc = self._spawn(name, ["-m", "gateway.cli", "kme", "--config",
                                      str(self.workdir / "configs" / f"{name}.toml"),
                                      "--port-file", str(port_file)])
            self.ports[name] = int(self._wait_file(proc, port_file))
            if self.options.link != "ideal" and site == "site-b":
                link = json.loads(port_file.with_name(port_file.name + ".link").read_text())
                self.ports["link-classical"] = int(link["classical"])
                self.ports["link-quantum"] = int(link["quantum"])
                if self.options.eve:
                    self.start_eve()

    def start_eve(self) -> int:
        o = self.options
        port_file = self.run / "eve.port"
        port_file.unlink(missing_ok=True)
        proc = self._spawn("eve", ["-m", "gateway.cli", "eve", "--listen", "127.0.0.1:0",
                                   "--forward", f"127.0.0.1:{self.ports['link-quantum']}",
                                   "--attack", str(o.eve), "--fraction", str(o.eve_fraction),
                                   "--link-secret", str(self.pki / "link-secret.key"),
                                   "--start-after", str(o.eve_after or 0.0),
                                   "--port-file", str(port_file), "--log-format", "json"])
        self.ports["eve"] = int(self._wait_file(proc, port_file))
        return self.ports["eve"]

    def arm_eve(self) -> None:
        """Make a waiting eavesdropper start her attack now."""
        proc = self.procs.get("eve")
        if proc is None or proc.popen.poll() is not None:
            raise TestbedError("no eavesdropper is running")
        proc.popen.send_signal(signal.SIGUSR1)

    def wait_kme_key(self, timeout: float = 60.0) -> float:
        """Wait until both KMEs hold key from the link; returns the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(OSError, ValueError):
                if all(self.kme_status(s)["stored_key_count"] > 0
                       for s in ("site-a", "site-b")):
                    return time.monotonic() - start
            for proc in self.procs.values():
                if proc.popen.poll() is not None:
                    raise TestbedError(f"{proc.name} exited with code "
                                       f"{proc.popen.returncode}; end of {proc.log}:\n"
                                       f"{proc.tail()}")
            time.sleep(0.2)
        kme = self.procs.get("kme-site-a")
        raise TestbedError(f"the QKD link produced no key within {timeout:.0f} s; end of "
                           "KME A's log:\n" + (kme.tail() if kme else ""))

    def kme_status(self, site: str) -> dict[str, Any]:
        """The KME's ETSI 014 Status as the local gateway (its SAE certificate) sees it."""
        import ssl

        peer = "site-b" if site == "site-a" else "site-a"
        ctx = ssl.create_default_context(cafile=str(self.pki / "tls-ca.crt"))
        ctx.load_cert_chain(self.pki / site / "sae-client.crt",
                            self.pki / site / "sae-client.key")
        url = (f"https://127.0.0.1:{self.ports[f'kme-{site}']}/api/v1/keys/{peer}-gw"
               "/status")
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def link_status(self, site: str) -> dict[str, Any]:
        ext: dict[str, Any] = self.kme_status(site).get("status_extension", {})
        return dict(ext.get("qkd_link", {}))

    def start_sink(self) -> int:
        port_file = self.run / "sink.port"
        port_file.unlink(missing_ok=True)
        proc = self._spawn("sink-site-b", ["-m", "gateway.tools.demo_sink", "--port-file",
                                           str(port_file)])
        self.ports["sink"] = int(self._wait_file(proc, port_file))
        return self.ports["sink"]

    def start_gateway(self, site: str, peer: str, *, connect: int | None,
                      listeners: dict[str, int] | None = None,
                      services: dict[str, int] | None = None,
                      listen_port: int = 0) -> dict[str, Any]:
        """Start (or restart, on the same state directory) one gateway. `listen_port`
        fixes the listening side's tunnel port, so a restarted one is found again."""
        name = f"gateway-{site}"
        cfg = self._write(f"{site}.toml", self.gateway_config(
            site, peer, connect=connect, listeners=listeners, services=services,
            listen_port=listen_port))
        ready = self.run / f"{name}.ready"
        ready.unlink(missing_ok=True)
        proc = self._spawn(name, ["-m", "gateway.cli", "gateway", "--config", str(cfg),
                                  "--ready-file", str(ready)])
        info: dict[str, Any] = json.loads(self._wait_file(proc, ready))
        self.ports[f"admin-{site}"] = int(info["admin"])
        if info.get("tunnel"):
            self.ports[f"tunnel-{site}"] = int(info["tunnel"])
        for service, port in info.get("listeners", {}).items():
            self.ports[f"listen-{site}-{service}"] = int(port)
        return info

    def start_all(self, *, relay_port: int | None = None,
                  extra_listeners: tuple[str, ...] = ()) -> None:
        """KMEs, sink, gateway B, then gateway A (through `relay_port` if given)."""
        self.prepare()
        self.start_kmes()
        if self.options.link != "ideal" and (not self.options.eve
                                             or self.options.eve_after is not None):
            # A gateway that meets an empty pool fails closed and redials with backoff;
            # starting the gateways once the link has key makes the first attempt work.
            self.wait_kme_key()
        sink = self.start_sink()
        self.start_gateway("site-b", "site-a", connect=None, services={"sink": sink})
        listeners = {"sink": 0} | {name: 0 for name in extra_listeners}
        self.start_gateway("site-a", "site-b",
                           connect=relay_port or self.ports["tunnel-site-b"],
                           listeners=listeners)

    def metrics(self, site: str) -> str:
        host = self.hosts.get(site, "127.0.0.1")
        url = f"http://{host}:{self.ports[f'admin-{site}']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def status(self, site: str) -> dict[str, Any]:
        host = self.hosts.get(site, "127.0.0.1")
        url = f"http://{host}:{self.ports[f'admin-{site}']}/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def wait_tunnel(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                last = self.status("site-a")
                if last["peer"]["tunnel"] == "up" and self.status("site-b")["peer"][
                        "tunnel"] == "up":
                    return last
            for proc in self.procs.values():
                if proc.popen.poll() is not None:
                    raise TestbedError(f"{proc.name} exited with code "
                                       f"{proc.popen.returncode}; end of {proc.log}:\n"
                                       f"{proc.tail()}")
            time.sleep(0.1)
        a = self.procs.get("gateway-site-a")
        raise TestbedError("the tunnel did not come up; end of gateway A's log:\n"
                           + (a.tail() if a else ""))

    def stop(self, name: str | None = None) -> None:
        names = [name] if name else list(reversed(self.procs))
        for n in names:
            proc = self.procs.get(n)
            if proc is not None and proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        for n in names:
            proc = self.procs.get(n)
            if proc is None:
                continue
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            self.procs.pop(n, None)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
