"""Where a tunnel handshake's time goes: each step alone, then whole handshakes.

Steps, each timed alone (p50 / p99 over `--n` runs, one core):
  ML-KEM-768 keygen, encapsulate, decapsulate; ML-DSA-65 sign, verify; the peer
  certificate check (chain + identity); TCP connect on loopback; the ETSI 014 round
  trips of one handshake (enc_keys at KME-A, dec_keys at KME-B, each over real TLS 1.3
  with client certificates, each committed to SQLite before it answers).
Whole handshakes, the sans-I/O core of both sides back to back in memory (no network,
QKD keys from an in-memory KME pair):
  PKI bootstrap (ML-KEM + ML-DSA both ways) and PSK handshake (ML-KEM, PSK binder,
  PSK state committed to SQLite on both sides).
The sum "core + ETSI round trips + TCP" estimates a loopback handshake between two
gateways; `handshake_latency.py` measures the real thing (two gateways, two KME
processes) with a per-step breakdown taken inside the real code path, and
`handshake_flood.py` measures it under a flood.

    python benchmarks/handshake_steps.py            # --n 200 by default
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.pki import init_pki, load_certificate, load_private_key, verify_peer_certificate
from pqc import sign, verify
from pqc.factory import get_kem
from qkd.common.log import configure_logging
from qkd.etsi014.client import EtsiClient
from qkd.kme.config import KmeConfig
from qkd.kme.service import start_kme
from tests.support.kme_processes import kme_toml
from tests.support.psk_sites import Site, connect
from tests.support.tunnel_harness import FakeKmePair, make_pair


def stats(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s) * 1e3, s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def row(name: str, samples: list[float]) -> None:
    p50, p99 = stats(samples)
    print(f"| {name} | {p50:.3f} | {p99:.3f} |")


async def etsi_round_trips(pki: Path, work: Path, n: int) -> tuple[list[float], list[float]]:
    kmes = []
    for side in ("a", "b"):
        path = work / f"kme-{side}.toml"
        path.write_text(kme_toml(pki, side, work / f"kme-{side}.sqlite3",
                                 max_key_count=100000, key_rate="inf"))
        kmes.append(await start_kme(KmeConfig.load(path)))
    a, b = kmes
    enc_t: list[float] = []
    dec_t: list[float] = []
    try:
        async with EtsiClient(a.url, ca_file=pki / "tls-ca.crt",
                              cert_file=pki / "site-a" / "sae-client.crt",
                              key_file=pki / "site-a" / "sae-client.key") as ca, \
                EtsiClient(b.url, ca_file=pki / "tls-ca.crt",
                           cert_file=pki / "site-b" / "sae-client.crt",
                           key_file=pki / "site-b" / "sae-client.key") as cb:
            await cb.get_dec_keys("site-a-gw", [(await ca.get_enc_keys("site-b-gw"))[0].key_id])
            for _ in range(n):  # keep-alive connections, as a gateway's client has
                t = time.perf_counter()
                (k,) = await ca.get_enc_keys("site-b-gw")
                enc_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                await cb.get_dec_keys("site-a-gw", [k.key_id])
                dec_t.append(time.perf_counter() - t)
    finally:
        for k in kmes:
            await k.close()
    return enc_t, dec_t


def tcp_connect(n: int) -> list[float]:
    srv = socket.create_server(("127.0.0.1", 0), backlog=n + 8)
    port = srv.getsockname()[1]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c = socket.create_connection(("127.0.0.1", port))
        out.append(time.perf_counter() - t)
        s, _ = srv.accept()
        c.close()
        s.close()
    srv.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    n = args.n
    configure_logging("warning")  # the PSK store logs every epoch at info
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = work / "pki"
        init_pki(pki, ["site-a", "site-b", "site-c", "site-d"])  # ML-DSA-65 gateway CA
        key = load_private_key(pki / "site-a" / "gateway.key")
        cert = load_certificate(pki / "site-a" / "gateway.crt")
        ca = load_certificate(pki / "ca.crt")
        kem = get_kem("ML-KEM-768")
        dk = kem.generate()
        ct, _ = kem.encapsulate(dk.encapsulation_key)
        sig = sign(key, b"m" * 200)
        print("| step | p50 ms | p99 ms |\n|---|---|---|")
        row("ML-KEM-768 keygen", timed(kem.generate, n))
        row("ML-KEM-768 encapsulate", timed(lambda: kem.encapsulate(dk.encapsulation_key), n))
        row("ML-KEM-768 decapsulate", timed(lambda: dk.decapsulate(ct), n))
        row("ML-DSA-65 sign", timed(lambda: sign(key, b"m" * 200), n))
        row("ML-DSA-65 verify", timed(lambda: verify(cert.public_key(), sig, b"m" * 200), n))
        row("peer certificate check", timed(
            lambda: verify_peer_certificate(cert, ca, "site-a", datetime.now(UTC)), n))
        row("TCP connect (loopback)", tcp_connect(n))
        enc_t, dec_t = asyncio.run(etsi_round_trips(pki, work, n))
        row("ETSI 014 enc_keys (TLS, SQLite commit)", enc_t)
        row("ETSI 014 dec_keys (TLS, SQLite commit)", dec_t)

        def pki_handshake() -> None:
            pair = make_pair(pki)
            assert pair.a.ready and pair.b.ready

        pki_t = timed(pki_handshake, max(20, n // 4))
        row("whole PKI handshake, both cores in memory", pki_t)
        sa, sb = Site(work / "psk-a.sqlite", "site-b"), Site(work / "psk-b.sqlite", "site-a")
        kme = FakeKmePair()
        assert connect(pki, sa, sb, kme).ready  # PKI bootstrap
        psk_t = []
        for _ in range(max(20, n // 4)):
            t = time.perf_counter()
            att = connect(pki, sa, sb, kme)
            psk_t.append(time.perf_counter() - t)
            assert att.ready and att.a.session is not None and att.a.session.auth == "psk"
        row("whole PSK handshake, both cores in memory (+ PSK commits)", psk_t)
        tcp = stats(tcp_connect(n))[0]
        etsi = stats(enc_t)[0] + stats(dec_t)[0]
        print(f"\nestimated loopback handshake p50 (core + ETSI enc + dec + TCP): PKI "
              f"{stats(pki_t)[0] + etsi + tcp:.2f} ms, PSK {stats(psk_t)[0] + etsi + tcp:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
