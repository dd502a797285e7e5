#!/usr/bin/env python3
"""Bulk throughput: plain loopback TCP vs stunnel (TLS 1.3) vs a qkdgw gateway pair.

One run measures, on this machine and in this run, the same load generator and sink
through three paths:

  loopback  sender -> sink directly (the physical limit of loopback TCP here)
  stunnel   sender -> stunnel client -> TLS 1.3 TLS_AES_256_GCM_SHA384 -> stunnel
            server -> sink (two stunnel processes)
  qkdgw     sender -> gateway A -> hybrid ML-KEM + QKD tunnel, AES-256-GCM records ->
            gateway B -> sink (the `gateway.tools.testbed` processes: KME-A, KME-B with the
            ideal link, gateway A dialling, gateway B listening)

each with 1 and with 4 parallel streams, and prints Gbit/s per case and the ratios
qkdgw/stunnel and qkdgw/loopback (`--json` for one JSON object).

The sender and the sink are separate processes and the same in all three cases: the
sender `sendall`s a preallocated buffer on each stream (one thread per stream), the
sink `recv_into`s a preallocated buffer and discards (one thread per connection).
Nothing is hashed in the timed part. Timing starts once every stream has reached the
sink (the sink answers a one-byte hello, so connection set-up and TLS / tunnel stream
opening are not timed) and ends when the sink has confirmed the byte count of the
last stream after its EOF, so bytes buffered inside a tunnel are not counted as
delivered. Before the timed runs, each case moves random data on 4 streams with a
SHA-256 check at both ends (untimed), which also warms it up.

All paths are started first; then each round measures every case once per stream
count (interleaved, in alternating order), so a change in background load hits all
cases alike. The headline is the median over the rounds (`--stat best` for the best).
CPU seconds of every process involved (sender, sink, stunnels, gateways, KMEs) are
read from /proc around each timed run and reported per GiB moved, so it is visible who
spends the cores. The CPU used meanwhile by other processes on the machine is measured
too (whole-machine busy time from /proc/stat minus ours): a busy machine is flagged,
and the qkdgw/stunnel ratio is also given per round and for the quiet rounds alone.
`--wait-quiet S` waits for a quiet machine before each round.

Needs stunnel for the stunnel case (Debian/Ubuntu: `apt-get install -y stunnel4`);
`--only loopback,qkdgw` runs without it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CASES = ("loopback", "stunnel", "qkdgw")
BASE_CASE = "qkdgw-base"  # the gateways of another checkout (--base-tree), same run
MODE_DISCARD = 0
MODE_HASH = 1
READY = b"R"
REPLY_LEN = 8 + 32
SEND_BUF = 4 << 20  # the sender's preallocated buffer
RECV_BUF = 1 << 20  # the sink's preallocated buffer
VERIFY_STREAMS = 4
VERIFY_BYTES = 8 << 20  # per stream, random and hashed, untimed
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
QUIET_CORES = 0.25  # background load above this (in cores) makes the run "noisy"


def say(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the sink process


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _sink_conn(conn: socket.socket) -> None:
    with conn:
        try:
            hello = _recv_exact(conn, 1)
            if not hello:
                return  # a probe or an aborted connection
            hashing = hello[0] == MODE_HASH
            conn.sendall(READY)
            buf = bytearray(RECV_BUF)
            view = memoryview(buf)
            count = 0
            digest = hashlib.sha256() if hashing else None
            recv_into = conn.recv_into
            if digest is None:
                while n := recv_into(view):
                    count += n
            else:
                while n := recv_into(view):
                    count += n
                    digest.update(view[:n])
            conn.sendall(count.to_bytes(8, "big")
                         + (digest.digest() if digest else bytes(32)))
        except OSError:
            pass


def run_sink(port_file: Path) -> None:
    """Accept forever; one thread per connection: hello, READY, discard, count, EOF."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(f"{srv.getsockname()[1]}\n")
    os.replace(tmp, port_file)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_sink_conn, args=(conn,), daemon=True).start()


# ---------------------------------------------------------------- the sender process


def run_sender(port: int, streams: int, nbytes: int, verify: bool, timeout: float) -> None:
    """Open all streams, wait until each one reaches the sink, then push `nbytes` on
    each at once. Prints one JSON line: per-stream times and counts, own CPU time."""
    socks = []
    for _ in range(streams):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(bytes((MODE_HASH if verify else MODE_DISCARD,)))
        socks.append(s)
    for s in socks:
        if _recv_exact(s, 1) != READY:
            raise SystemExit("the sink did not answer the hello: the path is broken")
    if verify:
        payloads = [os.urandom(nbytes) for _ in range(streams)]
        expect = [hashlib.sha256(p).digest() for p in payloads]
    else:
        shared = memoryview(bytearray(os.urandom(SEND_BUF)))
    results: list[dict[str, Any]] = [{} for _ in range(streams)]
    barrier = threading.Barrier(streams + 1)

    def push(i: int) -> None:
        s = socks[i]
        r = results[i]
        barrier.wait()
        r["start"] = time.perf_counter()
        try:
            if verify:
                s.sendall(payloads[i])
            else:
                left = nbytes
                while left >= SEND_BUF:
                    s.sendall(shared)
                    left -= SEND_BUF
                if left:
                    s.sendall(shared[:left])
            s.shutdown(socket.SHUT_WR)
            reply = _recv_exact(s, REPLY_LEN)
            r["end"] = time.perf_counter()
            if len(reply) != REPLY_LEN:
                r["error"] = "connection ended before the sink's byte count"
                return
            r["received"] = int.from_bytes(reply[:8], "big")
            if r["received"] != nbytes:
                r["error"] = f"sink received {r['received']} bytes, {nbytes} were sent"
            elif verify and reply[8:] != expect[i]:
                r["error"] = "SHA-256 mismatch: the data arrived altered"
        except OSError as exc:
            r["end"] = time.perf_counter()
            r["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            s.close()

    threads = [threading.Thread(target=push, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    cpu0 = os.times()
    barrier.wait()
    for t in threads:
        t.join()
    cpu1 = os.times()
    print(json.dumps({
        "streams": results,
        "bytes_per_stream": nbytes,
        "sender_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
    }), flush=True)


# ------------------------------------------------------------------ helpers


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a whole process (all threads), from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read from /proc, no probe connection."""
    want = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":
                return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Any, proc: subprocess.Popen[bytes], what: str, log: Path,
               timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; end of {log}:\n"
                               + tail(log))
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f} s; end of {log}:\n"
                       + tail(log))


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


def stunnel_version(binary: str) -> str:
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=10)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines()
             if ln.startswith(("stunnel ", "Compiled with", "Running  with", "Running with"))]
    return "; ".join(lines) or "unknown"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            elif key.strip() == "Hypervisor vendor":
                info["hypervisor"] = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
                info["aes_ni"] = "aes" in flags
                info["vaes"] = "vaes" in flags
    with contextlib.suppress(ImportError):
        import cryptography
        from cryptography.hazmat.backends.openssl import backend

        info["cryptography"] = cryptography.__version__
        info["cryptography_openssl"] = backend.openssl_version_text()
    with contextlib.suppress(ImportError):
        import uvloop

        info["uvloop"] = uvloop.__version__
    binary = stunnel_binary()
    info["stunnel"] = stunnel_version(binary) if binary else None
    return info


# ------------------------------------------------------------------ the cases


@dataclass
class Sample:
    gbps: float
    seconds: float
    bytes: int
    cpu_s: dict[str, float]
    other_cores: float = 0.0


@dataclass
class CaseResult:
    case: str
    streams: int
    samples: list[Sample] = field(default_factory=list)
    verified: bool | None = None
    note: str | None = None


class TunnelPath:
    """One measured path: start its processes, give the port the sender dials."""

    name = ""

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.workdir = workdir
        self.sink_port = sink_port
        self.note: str | None = None

    def start(self) -> int:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        return {}

    def check(self) -> None:
        """After the verification transfer: anything to confirm about the path."""

    def stop(self) -> None:
        pass


class Loopback(TunnelPath):
    name = "loopback"

    def start(self) -> int:
        return self.sink_port


def _write_tls_material(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed P-256 certificate for stunnel (the handshake is not
    timed, so the certificate algorithm does not matter for the numbers)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = directory / "stunnel.crt"
    key_path = directory / "stunnel.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class Stunnel(TunnelPath):
    """Client-side and server-side stunnel on loopback, TLS 1.3 with only
    TLS_AES_256_GCM_SHA384 allowed; the client pins the throwaway certificate."""

    name = "stunnel"
    SUITE = "TLS_AES_256_GCM_SHA384"

    def __init__(self, workdir: Path, sink_port: int, binary: str) -> None:
        super().__init__(workdir, sink_port)
        self.binary = binary
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def _conf(self, role: str, accept: int, connect: int, cert: Path, key: Path) -> Path:
        common = (f"foreground = yes\npid =\ndebug = info\n\n[bench]\n"
                  f"accept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\n"
                  f"sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n"
                  f"ciphersuites = {self.SUITE}\n")
        if role == "server":
            text = common + f"cert = {cert}\nkey = {key}\n"
        else:
            text = common + (f"client = yes\nverifyPeer = yes\nCAfile = {cert}\n"
                             f"checkHost = localhost\n")
        path = self.workdir / f"stunnel-{role}.conf"
        path.write_text(text)
        return path

    def _spawn(self, role: str, conf: Path, port: int) -> None:
        log = self.workdir / f"stunnel-{role}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([self.binary, str(conf)], stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[role], self.logs[role] = proc, log
        wait_until(lambda: listening(port), proc, f"stunnel ({role})", log)

    def start(self) -> int:
        cert, key = _write_tls_material(self.workdir)
        for attempt in range(5):  # stunnel cannot bind port 0: pick ports, retry a race
            server_port, client_port = free_port(), free_port()
            try:
                self._spawn("server", self._conf("server", server_port, self.sink_port,
                                                 cert, key), server_port)
                self._spawn("client", self._conf("client", client_port, server_port,
                                                 cert, key), client_port)
                return client_port
            except RuntimeError:
                self.stop()
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def pids(self) -> dict[str, int]:
        return {f"stunnel-{role}": p.pid for role, p in self.procs.items()}

    def check(self) -> None:
        text = self.logs["client"].read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if "ciphersuite" in ln]
        if not lines:
            self.note = "stunnel did not log the negotiated ciphersuite"
        elif not all("TLSv1.3" in ln and self.SUITE in ln for ln in lines):
            raise RuntimeError(f"stunnel negotiated something else: {lines[-1]}")
        else:
            self.note = "negotiated " + lines[-1].split("ciphersuite:")[-1].strip()

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)
        self.procs.clear()


class Qkdgw(TunnelPath):
    """The testbed's processes, with gateway B's "sink" service pointed at our sink."""

    name = "qkdgw"

    def __init__(self, workdir: Path, sink_port: int, stream_window: int | None,
                 tree: Path | None = None) -> None:
        super().__init__(workdir, sink_port)
        self.stream_window = stream_window
        self.tree = tree
        self.bed: Any = None
        if tree is not None:
            self.name = BASE_CASE

    def start(self) -> int:
        try:
            from gateway.tools.testbed import Testbed, TestbedOptions
        except ImportError:  # run from a checkout without `pip install -e .`
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from gateway.tools.testbed import Testbed, TestbedOptions

        options = TestbedOptions()
        if self.stream_window:
            options.stream_window = self.stream_window
        bed = self.bed = Testbed(self.workdir / self.name, options)
        bed.prepare()
        # The testbed's processes inherit os.environ: with --base-tree, PYTHONPATH puts
        # the other checkout's `gateway` and `qkd` before the installed (editable) ones.
        # PYTHONSAFEPATH keeps `python -m` from putting the working directory (maybe
        # this checkout) first.
        saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
        if self.tree is not None:
            os.environ.update(PYTHONPATH=str(self.tree), PYTHONSAFEPATH="1")
            origin = subprocess.run(
                [sys.executable, "-c", "import gateway.tunnel.record as r; print(r.__file__)"],
                capture_output=True, text=True, check=True).stdout.strip()
            if not origin.startswith(str(self.tree)):
                raise RuntimeError(f"--base-tree: the gateways would import {origin}")
        try:
            bed.start_kmes()
            bed.start_gateway("site-b", "site-a", connect=None,
                              services={"sink": self.sink_port})
            bed.start_gateway("site-a", "site-b", connect=bed.ports["tunnel-site-b"],
                              listeners={"sink": 0})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        peer = bed.wait_tunnel()["peer"]
        tree = f"code from {self.tree}, " if self.tree is not None else ""
        self.note = (f"{tree}{peer['kem']} + QKD ({peer['mode']}, ideal link), stream window "
                     f"{options.stream_window} B, uvloop in the gateways if installed")
        return int(bed.ports["listen-site-a-sink"])

    def pids(self) -> dict[str, int]:
        if self.bed is None:
            return {}
        return {name: p.popen.pid for name, p in self.bed.procs.items()}

    def check(self) -> None:
        a = self.bed.status("site-a")
        if a["peer"]["tunnel"] != "up" or a.get("tunnel_connects", 1) != 1:
            raise RuntimeError(f"the tunnel went down or reconnected: {a}")

    def stop(self) -> None:
        if self.bed is not None:
            self.bed.stop()


# ------------------------------------------------------------------ running


def spawn_sink(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = workdir / "sink.port"
    log = workdir / "sink.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, "_sink", "--port-file",
                                 str(port_file)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "", proc,
               "the sink", log)
    return proc, int(port_file.read_text())


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait), /proc/stat."""
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    fields = [int(x) for x in line.split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def background_load(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes while this benchmark is idle."""
    b0, t0 = machine_busy_seconds(), time.monotonic()
    time.sleep(seconds)
    return (machine_busy_seconds() - b0) / (time.monotonic() - t0)


def run_transfer(port: int, streams: int, nbytes: int, *, verify: bool,
                 pids: dict[str, int], timeout: float) -> tuple[Sample, list[str]]:
    before = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, wall0 = machine_busy_seconds(), time.monotonic()
    out = subprocess.run([sys.executable, __file__, "_send", "--port", str(port),
                          "--streams", str(streams), "--bytes", str(nbytes),
                          "--timeout", str(timeout)] + (["--verify"] if verify else []),
                         capture_output=True, text=True, timeout=timeout + 60)
    busy1, wall1 = machine_busy_seconds(), time.monotonic()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
    if out.returncode != 0:
        raise RuntimeError(f"the sender failed (exit {out.returncode}): "
                           f"{out.stderr.strip()[-2000:]}")
    report = json.loads(out.stdout)
    results = report["streams"]
    errors = [f"stream {i}: {r['error']}" for i, r in enumerate(results) if "error" in r]
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r.get("received", 0) for r in results)
    cpu: dict[str, float] = {}
    for name in pids:
        b, a = before[name], after[name]
        if b is not None and a is not None:
            cpu[name] = round(a - b, 3)
    # Load from other processes over the whole call: machine busy time minus ours (the
    # sender counted in full, start-up included). Coarse for runs well under a second.
    sender_all = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
    other = (busy1 - busy0) - sum(cpu.values()) - sender_all
    cpu["sender"] = round(report["sender_cpu_s"], 3)
    return Sample(gbps=total * 8 / seconds / 1e9, seconds=seconds, bytes=total, cpu_s=cpu,
                  other_cores=max(0.0, other / (wall1 - wall0))), errors


def wait_quiet(deadline: float) -> None:
    """Wait (until `deadline` on the monotonic clock at most) for other processes to
    leave the machine nearly idle."""
    if time.monotonic() >= deadline:
        return
    while (load := background_load(1.0)) > QUIET_CORES:
        if time.monotonic() > deadline:
            say(f"  the machine is still busy ({load:.2f} cores used by other processes); "
                f"measuring anyway")
            return
        say(f"  waiting for a quiet machine: other processes use {load:.2f} cores")
        time.sleep(4)


def measure(paths: dict[str, TunnelPath], ports: dict[str, int], sink_pid: int,
            stream_counts: list[int], total_bytes: int, repeat: int,
            timeout: float, quiet_deadline: float) -> list[CaseResult]:
    """Interleaved rounds: every round measures every case once per stream count, so a
    change in background load hits all cases alike instead of one case's whole block."""
    results = {(name, n): CaseResult(name, n, verified=True, note=paths[name].note)
               for name in paths for n in stream_counts}
    for rnd in range(repeat):
        for n in stream_counts:
            wait_quiet(quiet_deadline)
            per_stream = total_bytes // n
            # alternate the order from round to round so that no case always runs
            # first after a pause or right after another case's load
            order = list(paths.items())
            for name, path in (order if rnd % 2 == 0 else order[::-1]):
                pids = {"sink": sink_pid, **path.pids()}
                sample, errors = run_transfer(ports[name], n, per_stream, verify=False,
                                              pids=pids, timeout=timeout)
                if errors:
                    raise RuntimeError(f"{name}, {n} streams: {errors[:4]}")
                results[(name, n)].samples.append(sample)
                ours = sum(sample.cpu_s.values()) / sample.seconds
                say(f"  round {rnd + 1}/{repeat}  {name:8} {n} stream{'s' if n > 1 else ' '}"
                    f" {sample.gbps:6.2f} Gbit/s ({sample.bytes / 2**20:.0f} MiB in "
                    f"{sample.seconds:.2f} s; ours {ours:.2f} cores, other processes "
                    f"{sample.other_cores:.2f})")
    for path in paths.values():
        path.check()
    return list(results.values())


def summarize(result: CaseResult, stat: str) -> dict[str, Any]:
    values = [s.gbps for s in result.samples]
    chosen = statistics.median(values) if stat == "median" else max(values)
    # CPU per GiB: summed over all runs of this case and stream count
    moved = sum(s.bytes for s in result.samples) / GIB
    names = sorted({k for s in result.samples for k in s.cpu_s})
    cpu_per_gib = {k: round(sum(s.cpu_s.get(k, 0.0) for s in result.samples) / moved, 3)
                   for k in names}
    path_cpu = sum(v for k, v in cpu_per_gib.items() if k not in ("sender", "sink"))
    seconds = sum(s.seconds for s in result.samples)
    ours = sum(sum(s.cpu_s.values()) for s in result.samples) / seconds
    return {
        "case": result.case,
        "streams": result.streams,
        "gbps": round(chosen, 3),
        "gbps_samples": [round(v, 3) for v in values],
        "bytes_per_run": result.samples[0].bytes,
        "seconds_samples": [round(s.seconds, 3) for s in result.samples],
        "cpu_s_per_gib": cpu_per_gib,
        "path_cpu_s_per_gib": round(path_cpu, 3),
        "cores_busy": round(ours, 2),
        "other_cores_samples": [round(s.other_cores, 2) for s in result.samples],
        "verified": result.verified,
        "note": result.note,
    }


def main_bench(args: argparse.Namespace) -> int:
    cases = [c.strip() for c in args.only.split(",")] if args.only else list(CASES)
    if args.base_tree is not None:
        if not (Path(args.base_tree) / "gateway" / "tunnel").is_dir():
            say(f"--base-tree: {args.base_tree} has no gateway/tunnel; give the root of a "
                "checkout, e.g. from `git archive main | tar -x -C DIR`")
            return 2
        cases.append(BASE_CASE)
    unknown = [c for c in cases if c not in (*CASES, BASE_CASE)]
    if unknown:
        say(f"--only: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
        return 2
    try:
        stream_counts = sorted({int(s) for s in args.streams.split(",")})
    except ValueError:
        stream_counts = []
    if not stream_counts or min(stream_counts) < 1:
        say("--streams: give stream counts of at least 1, e.g. 1,4")
        return 2
    if args.mb <= 0 or args.repeat < 1:
        say("--mb must be above 0 and --repeat at least 1")
        return 2
    binary = stunnel_binary()
    if "stunnel" in cases and binary is None:
        say("stunnel is not installed. Install it with:\n"
            "    apt-get install -y stunnel4      (Debian/Ubuntu, as root)\n"
            "or leave it out with --only loopback,qkdgw")
        return 2
    total_bytes = int(args.mb * 2**20)
    machine = machine_info()
    with contextlib.suppress(OSError):
        machine["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[0]
    say(f"machine: {machine.get('cpu', '?')}, {machine['cores']} cores"
        f"{', ' + machine['hypervisor'] + ' VM' if machine.get('hypervisor') else ''}, "
        f"Linux {machine['kernel']}, load average {machine.get('loadavg_at_start')}")
    say(f"versions: Python {machine['python']}, cryptography "
        f"{machine.get('cryptography')} ({machine.get('cryptography_openssl')}), uvloop "
        f"{machine.get('uvloop')}; stunnel: {machine['stunnel']}")
    say(f"each run moves {args.mb:g} MiB split over the streams; {args.repeat} interleaved "
        f"rounds, {args.stat} reported")
    quiet_deadline = time.monotonic() + args.wait_quiet
    wait_quiet(quiet_deadline)
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="qkdgw-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    paths: dict[str, TunnelPath] = {}
    ports: dict[str, int] = {}
    sink, sink_port = spawn_sink(workdir)
    try:
        for case in cases:
            if case == "loopback":
                path: TunnelPath = Loopback(workdir, sink_port)
            elif case == "stunnel":
                assert binary is not None
                path = Stunnel(workdir, sink_port, binary)
            elif case == BASE_CASE:
                path = Qkdgw(workdir, sink_port, args.stream_window,
                             Path(args.base_tree).resolve())
            else:
                path = Qkdgw(workdir, sink_port, args.stream_window)
            say(f"{case}: starting")
            try:
                ports[case] = path.start()
                pids = {"sink": sink.pid, **path.pids()}
                _, errors = run_transfer(ports[case], VERIFY_STREAMS, VERIFY_BYTES,
                                         verify=True, pids=pids, timeout=args.timeout)
                if errors:
                    raise RuntimeError(f"the SHA-256 check failed: {errors[:4]}")
                path.check()
                say(f"  {case}: {VERIFY_STREAMS} x {VERIFY_BYTES >> 20} MiB of random data "
                    f"arrived intact (SHA-256 checked, untimed)"
                    + (f"; {path.note}" if path.note else ""))
                paths[case] = path
            except Exception as exc:  # a broken path is reported, the others still run
                failures[case] = f"{type(exc).__name__}: {exc}"
                say(f"{case}: FAILED: {failures[case]}")
                keep = True
                path.stop()
        if paths:
            try:
                for result in measure(paths, ports, sink.pid, stream_counts, total_bytes,
                                      args.repeat, args.timeout, quiet_deadline):
                    rows.append(summarize(result, args.stat))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                failures["measurement"] = str(exc)
                say(f"FAILED: {exc}")
                keep = True
    finally:
        for path in paths.values():
            path.stop()
        stop_process(sink)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    by = {(r["case"], r["streams"]): r for r in rows}
    ratios: dict[str, dict[str, Any]] = {}

    def ratio(a: str, b: str, n: int, key: str = "gbps") -> float | None:
        ra, rb = by.get((a, n)), by.get((b, n))
        return round(ra[key] / rb[key], 3) if ra and rb and rb[key] else None

    def paired(a: str, b: str, n: int) -> tuple[list[float], list[float]]:
        """Per-round ratios a/b (same round, same stream count): all, and only the rounds
        in which other processes used at most QUIET_CORES during both runs."""
        ra, rb = by.get((a, n)), by.get((b, n))
        if not ra or not rb:
            return [], []
        pairs = list(zip(ra["gbps_samples"], rb["gbps_samples"], ra["other_cores_samples"],
                         rb["other_cores_samples"], strict=True))
        every = [round(x / y, 3) for x, y, _, _ in pairs]
        quiet = [round(x / y, 3) for x, y, oa, ob in pairs if max(oa, ob) <= QUIET_CORES]
        return every, quiet

    for n in stream_counts:
        every, quiet = paired("qkdgw", "stunnel", n)
        ratios[str(n)] = {
            # ratios of the reported (median or best) Gbit/s
            "qkdgw_over_stunnel": ratio("qkdgw", "stunnel", n),
            "qkdgw_over_loopback": ratio("qkdgw", "loopback", n),
            "stunnel_over_loopback": ratio("stunnel", "loopback", n),
            # CPU seconds per GiB of the tunnel processes alone (gateways or stunnels,
            # not the sender and sink)
            "cpu_per_gib_qkdgw_over_stunnel": ratio("qkdgw", "stunnel", n,
                                                    "path_cpu_s_per_gib"),
            "qkdgw_over_stunnel_per_round": every,
            "qkdgw_over_stunnel_quiet_rounds": quiet,
        }
        if args.base_tree is not None:
            every_b, _ = paired(BASE_CASE, "stunnel", n)
            every_n, _ = paired("qkdgw", BASE_CASE, n)
            ratios[str(n)].update({
                "qkdgw-base_over_stunnel": ratio(BASE_CASE, "stunnel", n),
                "qkdgw_over_qkdgw-base": ratio("qkdgw", BASE_CASE, n),
                "cpu_per_gib_qkdgw_over_qkdgw-base": ratio("qkdgw", BASE_CASE, n,
                                                           "path_cpu_s_per_gib"),
                "qkdgw-base_over_stunnel_per_round": every_b,
                "qkdgw_over_qkdgw-base_per_round": every_n,
            })
    warning = None
    busy = {f"{r['case']}/{r['streams']}": statistics.median(r["other_cores_samples"])
            for r in rows}
    if busy and max(busy.values()) > QUIET_CORES:
        worst = max(busy, key=lambda k: busy[k])
        warning = (f"other processes were busy during the runs (median {busy[worst]:.2f} of "
                   f"{machine['cores']} cores during {worst}): the numbers are depressed "
                   f"and noisy; prefer the quiet rounds, or rerun on a quiet machine "
                   f"(--wait-quiet helps on a shared one)")
    report = {
        "machine": machine,
        "settings": {"mib_per_run": args.mb, "streams": stream_counts, "repeat": args.repeat,
                     "statistic": args.stat, "interleaved": True, "base_tree": args.base_tree,
                     "stream_window": args.stream_window},
        "results": rows,
        "ratios": ratios,
        "warning": warning,
        "failures": failures,
        "workdir": str(workdir) if keep else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if failures else 0


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    st = report["settings"]
    print(f"\nTunnel throughput — {m.get('cpu', '?')}, {m['cores']} cores"
          f"{' (' + m['hypervisor'] + ' VM)' if m.get('hypervisor') else ''}, "
          f"AES-NI {'yes' if m.get('aes_ni') else 'no'}, Linux {m['kernel']}, "
          f"load average at start {m.get('loadavg_at_start')}")
    print(f"Python {m['python']}, cryptography {m.get('cryptography')} "
          f"({m.get('cryptography_openssl')}), uvloop {m.get('uvloop')}")
    print(f"stunnel: {m['stunnel']}")
    print(f"{st['mib_per_run']:g} MiB per run split over the streams, {st['statistic']} of "
          f"{st['repeat']} interleaved rounds\n")
    width = max([22] + [6 * len(r["gbps_samples"]) for r in report["results"]])
    print(f"{'case':10} {'streams':>7} {'Gbit/s':>7}  {'runs (Gbit/s)':{width}} {'cores':>5} "
          f"{'other':>5}  CPU s per GiB moved")
    for r in report["results"]:
        runs = " ".join(f"{v:5.2f}" for v in r["gbps_samples"])
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s_per_gib"].items()
                        if v >= 0.005)
        other = statistics.median(r["other_cores_samples"])
        print(f"{r['case']:10} {r['streams']:>7} {r['gbps']:7.2f}  {runs:{width}} "
              f"{r['cores_busy']:>5.2f} {other:>5.2f}  {cpu}")
    print("(cores: CPU used by the sender, sink and tunnel processes per second of run; "
          "other: median cores used by other processes on the machine meanwhile)\n")
    for n, ratio in report["ratios"].items():
        parts = [f"{k.replace('_over_', '/')} {v:.2f}x" for k, v in ratio.items()
                 if isinstance(v, float) and "round" not in k]
        label = f"{n} stream{'s' if n != '1' else ''}"
        if parts:
            print(f"{label}: " + ", ".join(parts))
        if ratio.get("qkdgw_over_stunnel_per_round"):
            quiet = ratio["qkdgw_over_stunnel_quiet_rounds"]
            print(f"{' ' * len(label)}  qkdgw/stunnel per round: "
                  + " ".join(f"{v:.2f}" for v in ratio["qkdgw_over_stunnel_per_round"])
                  + "; in quiet rounds: "
                  + (" ".join(f"{v:.2f}" for v in quiet) if quiet else "none"))
        for key in ("qkdgw-base_over_stunnel_per_round", "qkdgw_over_qkdgw-base_per_round"):
            if ratio.get(key):
                print(f"{' ' * len(label)}  {key[:-10].replace('_over_', '/')} per round: "
                      + " ".join(f"{v:.2f}" for v in ratio[key]))
    notes = {r["case"]: r["note"] for r in report["results"] if r.get("note")}
    for case, note in notes.items():
        print(f"{case}: {note}")
    if report.get("warning"):
        print(f"WARNING: {report['warning']}")
    for case, err in report["failures"].items():
        print(f"{case}: FAILED: {err}")
    if report.get("workdir"):
        print(f"logs and configs kept in {report['workdir']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_sink":
        p = argparse.ArgumentParser()
        p.add_argument("_role")
        p.add_argument("--port-file", type=Path, required=True)
        run_sink(p.parse_args(argv).port_file)
        return 0
    if argv and argv[0] == "_send":
        p = argparse.ArgumentParser()
        p.add_argument("_role")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--streams", type=int, required=True)
        p.add_argument("--bytes", type=int, required=True)
        p.add_argument("--timeout", type=float, default=300.0)
        p.add_argument("--verify", action="store_true")
        a = p.parse_args(argv)
        run_sender(a.port, a.streams, a.bytes, a.verify, a.timeout)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=1024,
                        help="MiB moved per timed run, split evenly over the streams "
                             "(default 1024: 1 x 1024 MiB, 4 x 256 MiB)")
    parser.add_argument("--streams", default="1,4",
                        help="parallel stream counts to measure (default 1,4)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per case and stream count (default 3)")
    parser.add_argument("--stat", choices=("median", "best"), default="median",
                        help="which run to report (default median)")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--stream-window", type=int, default=None, metavar="BYTES",
                        help="qkdgw per-stream window (default: the gateway's default)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds until other processes use less "
                             f"than {QUIET_CORES} cores (for shared machines)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up on one transfer after this many seconds")
    parser.add_argument("--workdir", help="keep configs and logs here")
    parser.add_argument("--base-tree", metavar="DIR",
                        help="also run the gateways of another checkout (case qkdgw-base, "
                             "PYTHONPATH=DIR), e.g. main's code before a change")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return main_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
