"""`qkdgw demo --topology line|ring|ring5`: a QKD network on loopback or, with
`--netns`, one network namespace per site (issue 11).

Every KME of the topology (a line of 3 sites, a ring of 4 or of 5 with k = 2) and the two
end gateways run as separate processes; the gateways sit at sites whose KMEs are not
neighbours, so every QKD key of their hybrid tunnel is relayed through trusted nodes
(ideal links: no quantum security, the demo shows the network, not the physics). This
process pushes checked traffic through the tunnel and reports the relay's figures.
`--compromise NODE` then takes a trusted node and shows which of the gateways' keys
its files and the recorded hops give (gateway/tools/network_compromise.py; docs/network.md).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.pki import init_pki
from gateway.tools.network_compromise import (
    HopRecorder,
    attack,
    read_fingerprints,
    take_node_state,
    verdict,
)
from gateway.tools.testbed import Proc, Testbed, TestbedError
from qkd.common.errors import UserError

TOPOLOGIES: dict[str, tuple[list[str], list[tuple[str, str]], int]] = {
    "line": (["site-a", "site-b", "site-c"], [("site-a", "site-b"), ("site-b", "site-c")], 1),
    "ring": (["site-a", "site-b", "site-c", "site-d"],
             [("site-a", "site-b"), ("site-b", "site-c"), ("site-c", "site-d"),
              ("site-a", "site-d")], 2),
    # Five sites: C is two hops from A one way and three the other, so the k = 2
    # shares take paths of unequal length (the slower one sets the relay latency).
    "ring5": (["site-a", "site-b", "site-c", "site-d", "site-e"],
              [("site-a", "site-b"), ("site-b", "site-c"), ("site-c", "site-d"),
               ("site-d", "site-e"), ("site-a", "site-e")], 2),
}
FAR_SITE = "site-c"  # the gateway that talks to site A's (never A's neighbour)


class Netns:
    """One network namespace per site (`qkdgw-<pid>-<site>`), each joined by a veth
    pair to a bridge in a namespace of its own, plus one veth from this process's
    namespace to that bridge (the demo reads the admin listeners and sends its traffic
    through it). Only what this object created is ever deleted."""

    def __init__(self, sites: list[str]) -> None:
        self.tag = f"qkdgw-{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.site_ns = {s: f"{self.tag}-{s}" for s in sites}
        self.host_veth = f"{self.tag}-h"  # 15 characters at most (IFNAMSIZ)
        net = _free_net()
        hosts = list(net.hosts())
        self.prefixlen = net.prefixlen
        self.addr = {s: str(hosts[i]) for i, s in enumerate(sites)}
        self.host_addr = str(hosts[-1])
        self.created_ns: list[str] = []
        self.created_host_veth = False
        self.veth_bytes: dict[str, dict[str, int]] = {}

    def up(self) -> None:
        atexit.register(self.down)
        self._ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for site, ns in self.site_ns.items():
            self._ns(ns)
            port = f"s-{site}"[:15]
            # Both ends are created inside the demo's namespaces: the host never
            # sees these interfaces.
            _ip("link", "add", port, "netns", self.bridge_ns, "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[site]}/{self.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("link", "add", self.host_veth, "type", "veth", "peer", "name", "host",
            "netns", self.bridge_ns)
        self.created_host_veth = True
        _ip("-n", self.bridge_ns, "link", "set", "host", "master", "br0", "up")
        _ip("addr", "add", f"{self.host_addr}/{self.prefixlen}", "dev", self.host_veth)
        _ip("link", "set", self.host_veth, "up")

    def _ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created_ns.append(name)

    def prefix(self, site: str) -> list[str]:
        return ["ip", "netns", "exec", self.site_ns[site]]

    def read_counters(self) -> None:
        """Bytes each site's veth carried (before the namespaces go)."""
        for site, ns in self.site_ns.items():
            with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError,
                                     KeyError, IndexError):
                out = _ip("-n", ns, "-s", "-j", "link", "show", "eth0")
                stats = json.loads(out)[0]["stats64"]
                self.veth_bytes[site] = {"tx": int(stats["tx"]["bytes"]),
                                         "rx": int(stats["rx"]["bytes"])}

    def down(self) -> None:
        """Delete what up() created (safe to call twice, and after a partial up())."""
        if self.created_host_veth:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("link", "del", self.host_veth, check=False)
            self.created_host_veth = False
        while self.created_ns:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "del", self.created_ns.pop(), check=False)


def _ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise TestbedError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


# 10.88.0.0/16 is podman's default bridge network and 10.244/16 Kubernetes' pod range;
# the demo starts its search well away from both.
NETNS_FIRST_OCTET2 = 201


def _free_net() -> ipaddress.IPv4Network:
    """10.201.0.0/24, or the first 10.X.N.0/24 (X from 201 up) that no address or route
    here overlaps."""
    used: list[ipaddress.IPv4Network] = []
    for args in (("-4", "-j", "addr"), ("-4", "-j", "route", "show", "table", "all")):
        with contextlib.suppress(ValueError, TypeError):
            for entry in json.loads(_ip(*args)):
                for a in entry.get("addr_info", []):
                    used.append(ipaddress.ip_network(
                        f"{a['local']}/{a['prefixlen']}", strict=False))
                dst = entry.get("dst")
                if dst and dst != "default":
                    used.append(ipaddress.ip_network(dst, strict=False))
    for x in range(NETNS_FIRST_OCTET2, 255):
        for n in range(256):
            net = ipaddress.IPv4Network(f"10.{x}.{n}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
    raise TestbedError(f"no free 10.X.N.0/24 range (X >= {NETNS_FIRST_OCTET2}) for the "
                       "demo's namespaces (fix: free one, or run with --netns off)")


def netns_choice(mode: str, compromise: str | None) -> tuple[bool, str]:
    """(use namespaces?, why) for --netns auto|on|off."""
    if mode == "off":
        return False, "--netns off"
    why = None
    if compromise is not None:
        why = "--compromise records the hops on loopback"
    elif os.geteuid() != 0:
        why = "not running as root"
    elif shutil.which("ip") is None:
        why = "the ip command (iproute2) is missing"
    else:
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               timeout=20)
        if probe.returncode != 0:
            why = f"ip netns does not work here ({probe.stderr.strip()[:80]})"
    if why is None:
        return True, "root and ip netns work"
    if mode == "on":
        raise UserError(f"--netns on: {why}; run as root with iproute2, or use "
                        "--netns off (loopback)")
    return False, why


def _in_ns(text: str, connect_host: str | None) -> str:
    """A generated config, rewritten for a site namespace: listeners on every address
    of the namespace (loopback and its veth), the tunnel dialled at the peer's site."""
    text = text.replace('listen = "127.0.0.1:', 'listen = "0.0.0.0:')
    if connect_host is not None:
        text = text.replace('connect = "127.0.0.1:', f'connect = "{connect_host}:')
    return text


async def _forwarded(target: tuple[str, int], run: Callable[[int], Any]) -> Any:
    """Run `run(port)` with 127.0.0.1:port forwarded to `target` (site A's listener in
    its namespace): the traffic generator only dials loopback."""
    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if w.can_write_eof():
                    w.write_eof()

    conns: set[asyncio.Task[Any]] = set()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            conns.add(task)
        try:
            tr, tw = await asyncio.open_connection(*target)
        except OSError:
            w.close()
            return
        try:
            await asyncio.gather(pipe(r, tw), pipe(tr, w))
        except asyncio.CancelledError:
            # Only the shutdown below cancels a connection. Python 3.11's stream server
            # calls exception() on a cancelled handler, which raises and prints a
            # traceback, so the handler ends normally here.
            pass
        finally:
            for x in (w, tw):
                x.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        return await run(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        # Connections still open (an interrupted run): end them here, so none is left
        # pending for the loop's shutdown to report.
        for t in conns:
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)


def _kme_toml(bed: Testbed, site: str, sites: list[str], links: list[tuple[str, str]],
              k: int, relay_ports: dict[str, int], key_rate: float) -> str:
    pki = bed.pki
    # In a namespace: listen on all of it (loopback for the local gateway, whose
    # KME URL and certificate say 127.0.0.1; the veth for neighbours and the demo).
    any_ip = "0.0.0.0" if bed.hosts else "127.0.0.1"
    nbs = [b if site == a else a for a, b in links if site in (a, b)]
    out = [f"""# generated by qkdgw demo --topology
[kme]
id = "kme-{site}"
listen = "{any_ip}:0"
db = "{bed.workdir / 'state' / f'kme-{site}.sqlite3'}"

[tls]
cert = "{pki / site / 'kme-server.crt'}"
key = "{pki / site / 'kme-server.key'}"
client_ca = "{pki / 'tls-ca.crt'}"

[[sae]]
id = "{site}-gw"
"""]
    for nb in nbs:
        # The smaller site dials the larger: KMEs start largest first.
        host = bed.hosts.get(nb, "127.0.0.1")
        dial = f'relay = "{host}:{relay_ports[nb]}"\n' if nb > site else ""
        out.append(f"""
[[neighbour]]
kme_id = "kme-{nb}"
sae_ids = ["{nb}-gw"]
{dial}
[neighbour.link]
type = "ideal"
secret_file = "{pki / 'link-secret.key'}"
key_rate = {key_rate}
""")
    nodes = ", ".join(f'"kme-{s}"' for s in sites)
    out.append(f'\n[network]\nrelay_listen = "{any_ip}:0"\nk = {k}\nnodes = [{nodes}]\n')
    out += [f'[[network.link]]\na = "kme-{a}"\nb = "kme-{b}"\n' for a, b in links]
    out += [f'[[network.sae]]\nid = "{s}-gw"\nkme_id = "kme-{s}"\n' for s in sites
            if s != site and s not in nbs]
    out.append(f'\n[admin]\nlisten = "{any_ip}:0"\n\n[logging]\nformat = "json"\n')
    return "".join(out)


def _admin(bed: Testbed, site: str) -> dict[str, Any]:
    port = bed.ports[f"kme-admin-{site}"]
    host = bed.hosts.get(site, "127.0.0.1")
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=5) as resp:
        out: dict[str, Any] = json.loads(resp.read())
    return out


def _wait(pred: Any, timeout: float, what: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError):
            pass
        for p in procs:
            if p.popen.poll() is not None:
                raise TestbedError(f"{p.name} exited; end of {p.log}:\n{p.tail()}")
        time.sleep(0.2)
    raise TestbedError(f"timed out waiting for {what}")


def start_network(bed: Testbed, topology: str, key_rate: float = 1000.0, *,
                  k: int | None = None,
                  dial: Callable[[str, str, int], int] | None = None,
                  netns: Netns | None = None) -> None:
    """Every KME of `topology`, relay channels up. `k` overrides the topology's default;
    `dial(site, neighbour, port)` gives the port `site` dials for its relay channel to
    `neighbour` (e.g. a recorder's, in front of `port`); with `netns` (up already)
    each site's processes run in its namespace."""
    sites, links, default_k = TOPOLOGIES[topology]
    if netns is not None:
        bed.hosts.update(netns.addr)
        for site in sites:
            for name in (f"kme-{site}", f"gateway-{site}"):
                bed.spawn_prefix[name] = netns.prefix(site)
        bed.spawn_prefix["sink-site-b"] = netns.prefix(FAR_SITE)  # start_sink's name
    k = default_k if k is None else k
    init_pki(bed.pki, sites, algorithm=bed.options.algorithm)
    for d in (bed.logs, bed.run, bed.workdir / "configs", bed.workdir / "state"):
        d.mkdir(parents=True, exist_ok=True)
    relay_ports: dict[str, int] = {}
    for site in sorted(sites, reverse=True):
        name = f"kme-{site}"
        cfg = bed.workdir / "configs" / f"{name}.toml"
        dialled = {nb: dial(site, nb, port) if dial else port
                   for nb, port in relay_ports.items()
                   if (site, nb) in links or (nb, site) in links}
        cfg.write_text(_kme_toml(bed, site, sites, links, k, dialled, key_rate))
        port_file = bed.run / f"{name}.port"
        port_file.unlink(missing_ok=True)
        proc = bed._spawn(name, ["-m", "gateway.cli", "kme", "--config", str(cfg),
                                 "--port-file", str(port_file)])
        bed.ports[name] = int(bed._wait_file(proc, port_file))
        relay_ports[site] = json.loads(port_file.with_name(port_file.name + ".relay")
                                       .read_text())["relay"]
        bed.ports[f"kme-admin-{site}"] = json.loads(
            port_file.with_name(port_file.name + ".admin").read_text())["admin"]
    procs = list(bed.procs.values())
    for site in sites:
        _wait(lambda s=site: all(v.get("connected") for v in
                                 _admin(bed, s)["network"]["neighbours"].values()),
              30, f"kme-{site}'s relay channels", procs)


def check_args(args: argparse.Namespace) -> None:
    """Refuse option combinations the network demo cannot run, before starting anything."""
    topology = getattr(args, "topology", None)
    k, node = getattr(args, "paths_k", None), getattr(args, "compromise", None)
    netns = getattr(args, "netns", "auto")
    if topology is None:
        if k is not None or node is not None or netns == "on":
            raise UserError("--k, --compromise and --netns on need --topology "
                            "line|ring|ring5")
        return
    if netns == "on":
        netns_choice(netns, node)  # refuses (not root, no ip, --compromise) before any start
    sites, _links, _k = TOPOLOGIES[topology]
    if k == 2 and topology == "line":
        raise UserError("--topology line has one path between site-a and site-c: "
                        "--k 2 needs a ring (--topology ring or ring5)")
    trusted = [s for s in sites if s not in ("site-a", FAR_SITE)]
    if node is not None and node not in trusted:
        raise UserError(f"--compromise {node}: give a trusted node of --topology "
                        f"{topology} ({', '.join(trusted)}); site-a and {FAR_SITE} are the ends")


def _start_gateway(bed: Testbed, site: str, peer: str, witness: Path | None, *,
                   connect: int | None, listeners: dict[str, int] | None = None,
                   services: dict[str, int] | None = None) -> None:
    """bed.start_gateway, or with `witness` the same gateway run under the key
    fingerprint recorder (gateway.tools.network_compromise's main)."""
    if witness is None and not bed.hosts:
        bed.start_gateway(site, peer, connect=connect, listeners=listeners,
                          services=services)
        return
    name = f"gateway-{site}"
    text = bed.gateway_config(site, peer, connect=connect, listeners=listeners,
                              services=services)
    if bed.hosts:
        text = _in_ns(text, bed.hosts[peer] if connect is not None else None)
    cfg = bed._write(f"{site}.toml", text)
    ready = bed.run / f"{name}.ready"
    ready.unlink(missing_ok=True)
    run = (["-m", "gateway.cli"] if witness is None
           else ["-m", "gateway.tools.network_compromise", str(witness)])
    proc = bed._spawn(name, [*run, "gateway", "--config", str(cfg),
                             "--ready-file", str(ready)])
    info = json.loads(bed._wait_file(proc, ready))
    bed.ports[f"admin-{site}"] = int(info["admin"])
    if info.get("tunnel"):
        bed.ports[f"tunnel-{site}"] = int(info["tunnel"])
    for service, port in info.get("listeners", {}).items():
        bed.ports[f"listen-{site}-{service}"] = int(port)


def run_network_demo(args: argparse.Namespace, bed: Testbed, summary: dict[str, Any],
                     say: Any, run_traffic: Any) -> None:
    """`run_traffic` is gateway.tools.demo's (passed in: demo imports this module)."""
    topology = args.topology
    k = TOPOLOGIES[topology][2]
    k = getattr(args, "paths_k", None) or k
    node = getattr(args, "compromise", None)
    recorder = HopRecorder() if node else None
    use_ns, why = netns_choice(getattr(args, "netns", "off") or "off", node)
    if getattr(args, "netns", "off") == "auto" and not use_ns:
        print(f"qkdgw demo: --netns auto: loopback, no namespaces ({why})",
              file=sys.stderr, flush=True)
    netns = Netns(TOPOLOGIES[topology][0]) if use_ns else None
    old_term = None
    main = threading.current_thread() is threading.main_thread()
    if netns is not None and main:
        # SIGTERM ends the run through the finally below (and atexit), like Ctrl-C.
        old_term = signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        if netns is not None:
            netns.up()
            summary["netns"] = {"namespaces": sorted(netns.created_ns),
                                "addresses": dict(netns.addr),
                                "demo_side": netns.host_addr}
            say(f"namespaces up: {', '.join(sorted(netns.site_ns.values()))}; "
                f"sites at {', '.join(f'{s} {a}' for s, a in netns.addr.items())}")
        _run(args, bed, summary, say, run_traffic, k, node, recorder, netns)
    finally:
        if recorder is not None:
            recorder.close()
        if netns is not None:
            netns.read_counters()
            summary.setdefault("netns", {})["veth_bytes"] = netns.veth_bytes
            bed.stop()  # no process may outlive its namespace
            netns.down()
            if main:
                signal.signal(signal.SIGTERM, old_term)
            bed.hosts.clear()
            bed.spawn_prefix.clear()


def _exit_on_term(_sig: int, _frame: Any) -> None:
    sys.exit(128 + signal.SIGTERM)


def _run(args: argparse.Namespace, bed: Testbed, summary: dict[str, Any], say: Any,
         run_traffic: Any, k: int, node: str | None, recorder: HopRecorder | None,
         netns: Netns | None = None) -> None:
    topology = args.topology
    sites, _links, _k = TOPOLOGIES[topology]
    dial = None
    if recorder is not None:
        # Every hop is recorded (the attacker's wiretap); the node's own view is only
        # what reached it. The collusion control below uses the other trusted nodes'.
        def dial(site: str, nb: str, port: int) -> int:
            return recorder.tap(f"kme-{site}", f"kme-{nb}", port)
    say(f"starting {len(sites)} KMEs ({topology}, k = {k}) ...")
    start_network(bed, topology, k=k, dial=dial, netns=netns)
    witness = {s: bed.run / f"qkd-keys-{s}.jsonl" if node else None
               for s in ("site-a", FAR_SITE)}
    say("starting the gateways at site-a and site-c (not neighbours) ...")
    sink = bed.start_sink()
    _start_gateway(bed, FAR_SITE, "site-a", witness[FAR_SITE], connect=None,
                   services={"sink": sink})
    _start_gateway(bed, "site-a", FAR_SITE, witness["site-a"],
                   connect=bed.ports[f"tunnel-{FAR_SITE}"], listeners={"sink": 0})
    procs = list(bed.procs.values())
    _wait(lambda: bed.status("site-a")["peer"]["tunnel"] == "up"
          and bed.status(FAR_SITE)["peer"]["tunnel"] == "up", 60, "the tunnel", procs)
    peer = bed.status("site-a")["peer"]
    say(f"tunnel up ({peer['mode']}); pushing traffic ...")
    def traffic(port: int) -> Any:
        return run_traffic(port, args.streams, int(args.stream_mb * 1024 * 1024),
                           args.duration, not args.json)

    listener = bed.ports["listen-site-a-sink"]
    report = asyncio.run(traffic(listener) if netns is None
                         else _forwarded((netns.addr["site-a"], listener), traffic))
    a_net = _admin(bed, "site-a")["network"]
    c_net = _admin(bed, FAR_SITE)["network"]
    mids = {s: _admin(bed, s)["network"]["neighbours"] for s in sites
            if s not in ("site-a", FAR_SITE)}
    summary.update(
        topology=topology, k=k, sites=sites, tunnel_mode=peer["mode"],
        degraded=peer["degraded"], streams=args.streams, bytes_sent=report.bytes_sent,
        bytes_verified=report.bytes_verified, failures=report.failures[:5],
        handshakes=bed.status("site-a")["handshakes"],
        paths=a_net["paths_in_use"], relays_delivered=a_net["relay"]["relays_delivered"],
        relays_failed=a_net["relay"]["relays_failed"],
        relay_latency_p50_ms=None if a_net["latency_p50_s"] is None
        else round(1000 * a_net["latency_p50_s"], 1),
        keys_delivered_at_far_kme=c_net["relayed_keys"]["delivered_to_slave"],
        trusted_node_link_key_bits={s: {nb: v["bits_out"] + v["bits_in"]
                                        for nb, v in n.items()} for s, n in mids.items()},
    )
    summary["ok"] = (not report.failures and report.bytes_verified == report.bytes_sent
                     and peer["mode"] == "hybrid" and a_net["relay"]["relays_delivered"] > 0
                     and a_net["relay"]["relays_failed"] == 0)
    if node is not None and recorder is not None:
        _compromise(bed, summary, say, k, node, recorder, witness)


def _compromise(bed: Testbed, summary: dict[str, Any], say: Any, k: int, node: str,
                recorder: HopRecorder, witness: dict[str, Path | None]) -> None:
    sites = summary["sites"]
    # The gateways stop first, so no key is used after the node is taken.
    for site in ("site-a", FAR_SITE):
        bed.stop(f"gateway-{site}")
    used = {s: read_fingerprints(p) for s, p in witness.items() if p is not None}
    a_used, c_used = used["site-a"], used[FAR_SITE]
    ends_agree = all(c_used.get(kid, fp) == fp for kid, fp in a_used.items())
    say(f"taking {node}: SIGKILL its KME, copying its files, opening the recorded "
        f"relay frames ...")
    taken: dict[str, Path] = {}
    for s in sites:
        if s in ("site-a", FAR_SITE):
            continue
        proc = bed.procs[f"kme-{s}"]
        proc.popen.kill()
        proc.popen.wait()
        taken[s] = take_node_state(bed.workdir / "configs" / f"kme-{s}.toml",
                                   bed.workdir / "compromised" / s)
    frames = list(recorder.frames)
    result = verdict(attack(taken[node], frames), a_used)
    # Control: every trusted node's files together (collusion of all of them).
    together: dict[str, list[Any]] = {}
    for manifest in taken.values():
        for kid, shares in attack(manifest, frames).items():
            together.setdefault(kid, []).extend(shares)
    control = verdict(together, a_used)
    if k == 1:
        # Every key relayed through the node is rebuilt, and matches the gateways'.
        expected = not result["partial"] and all(r["match"] for r in result["rebuilt"])
    else:
        expected = result["none_rebuilt"] and control["all_rebuilt"]
    summary["compromise"] = dict(
        node=node, k=k, files=sorted(p.name for p in taken[node].parent.iterdir()),
        frames_recorded=len(frames), keys_used_by_gateways=len(a_used),
        gateways_agree=ends_agree, rebuilt=result["rebuilt"], partial=result["partial"],
        not_through_node=result["not_through_node"],
        control_all_trusted_nodes_rebuilt=len(control["rebuilt"]),
        control_match=control["all_rebuilt"], as_expected=expected)
    summary["ok"] = bool(summary["ok"] and ends_agree and a_used and expected)


def print_summary(s: dict[str, Any]) -> None:
    if "error" in s:
        print(f"qkdgw demo --topology: FAILED: {s['error']}")
        return
    print(f"QKD network demo ({s['topology']}, k = {s['k']}): "
          f"{'OK' if s['ok'] else 'FAILED'}")
    print(f"  sites              {' '.join(s['sites'])}; gateways at site-a and {FAR_SITE}")
    ns = s.get("netns")
    if ns:
        print("  namespaces         one per site, veths to a bridge: " + ", ".join(
            f"{site} {addr} ({ns['veth_bytes'].get(site, {}).get('tx', '?')} B out)"
            for site, addr in ns["addresses"].items()) + "; removed")
    else:
        print("  namespaces         none (loopback)")
    print(f"  tunnel             {s['tunnel_mode']}, {s['handshakes']} handshakes")
    print(f"  traffic            {s['bytes_verified'] / 1e6:.1f} of "
          f"{s['bytes_sent'] / 1e6:.1f} MB verified on {s['streams']} streams")
    print(f"  relayed keys       {s['relays_delivered']} delivered, {s['relays_failed']} "
          f"failed, p50 {s['relay_latency_p50_ms']} ms")
    for pair, paths in s["paths"].items():
        print(f"  paths {pair}: " + "  |  ".join(" > ".join(p) for p in paths))
    for node, bits in s["trusted_node_link_key_bits"].items():
        print(f"  trusted node {node}: link-key bits used " + ", ".join(
            f"{nb} {b}" for nb, b in sorted(bits.items())))
    if "compromise" in s:
        _print_compromise(s["compromise"])


def _print_compromise(c: dict[str, Any]) -> None:
    node, n = c["node"], c["keys_used_by_gateways"]
    secrets = [f for f in c["files"] if f.startswith("link-")]
    print(f"  compromised node   {node} (k = {c['k']}): {len(c['files'])} files taken "
          f"(config, {len(secrets)} link secrets, key store, relay store), "
          f"{c['frames_recorded']} relay frames recorded on the hops")
    print(f"  the gateways       used {n} relayed QKD keys (both ends: "
          f"{'same fingerprints' if c['gateways_agree'] else 'FINGERPRINTS DIFFER'})")
    if c["rebuilt"]:
        print(f"  REBUILT            {len(c['rebuilt'])} of {n} keys from {node}'s "
              f"files and traffic alone (single path through it):")
        for r in c["rebuilt"][:8]:
            print(f"    key {r['key_id']}  gateways sha256 {r['used']}  rebuilt "
                  f"{r['rebuilt']}  {'match' if r['match'] else 'MISMATCH'}")
    if c["partial"]:
        p = c["partial"][0]
        print(f"  not rebuilt        {len(c['partial'])} of {n} keys: {node} holds "
              f"{p['shares_held']} of {p['shares']} shares only (the other path avoids "
              f"it); a share alone is independent of the key:")
        for r in c["partial"][:8]:
            print(f"    key {r['key_id']}  gateways sha256 {r['used']}  {node}'s share "
                  f"{r['share_fingerprint']}")
    if c["not_through_node"]:
        print(f"  not through {node}   {len(c['not_through_node'])} of {n} keys")
    print(f"  control            all trusted nodes' files together rebuild "
          f"{c['control_all_trusted_nodes_rebuilt']} of {n} "
          f"({'match' if c['control_match'] else 'not all'})")
    print(f"  outcome            {'as expected' if c['as_expected'] else 'UNEXPECTED'}")


__all__ = ["TOPOLOGIES", "check_args", "print_summary", "run_network_demo", "start_network"]
