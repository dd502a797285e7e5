"""A man-in-the-middle relay between two real gateways, and the sites it sits between.

`MitmRelay` is an asyncio TCP relay on 127.0.0.1 that cuts each direction of every
tunnel connection into records (5-byte header type|flags|len24) and hands each one to
the connection's `Strategy`. A strategy sees records, not protocol state: it can
forward, hold, drop, duplicate, modify, reflect or splice them, inject raw bytes, or
end a direction with a bare TCP FIN. That works the same for the plaintext bootstrap,
for protected records and for any later handshake variant (PSK, cookies): a new
attack is a new strategy.

`Sites` runs the rest in the test's event loop: two KMEs on the ideal link (real
HTTPS with client certificates, SQLite stores), gateway B listening, gateway A
dialling B through the relay, a recording sink service behind B, and helpers for
what the tests check: what an application sees, what the sink received, the
responder's /metrics counters over HTTP, and the structured log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gateway.config import GatewayConfig
from gateway.runtime import Gateway
from gateway.tools import kme_config
from gateway.tunnel import handshake as hs_mod
from gateway.tunnel.handshake import ClientHello, Credentials, ServerHello
from gateway.tunnel.record import HEADER_LEN, PLAINTEXT_HANDSHAKE, PROTECTED, TAG_LEN
from qkd.common.confload import HostPort
from qkd.common.tcp_relay import A2B, B2A, RelayConnection, TcpRelay
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme

# A2B (from qkd.common.tcp_relay): initiator (site A) towards responder (site B).


def other(direction: str) -> str:
    return B2A if direction == A2B else A2B


# ------------------------------------------------------------------------- records


@dataclass(frozen=True)
class WireRecord:
    """One record as it crossed the relay. `seq` counts protected records per direction
    and connection: it is the implicit sequence number while no key changes."""

    direction: str
    index: int
    seq: int
    header: bytes
    body: bytes

    @property
    def rtype(self) -> int:
        return self.header[0]

    @property
    def flags(self) -> int:
        return self.header[1]

    @property
    def raw(self) -> bytes:
        return self.header + self.body

    @property
    def protected(self) -> bool:
        return self.rtype == PROTECTED

    @property
    def handshake_message(self) -> bytes | None:
        return self.body if self.rtype == PLAINTEXT_HANDSHAKE else None

    @property
    def message_type(self) -> int | None:
        msg = self.handshake_message
        return msg[0] if msg else None


def frame(rtype: int, body: bytes, flags: int = 0, length: int | None = None) -> bytes:
    """A record on the wire; `length` may lie about the body (oversize, zero-length)."""
    n = len(body) if length is None else length
    return bytes((rtype, flags, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF)) + body


def flip_bit(data: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


class _Splitter:
    """Cuts a byte stream into records without judging them: an attacker forwards
    whatever it likes, so limits are the gateways' business, not the relay's."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self.buf += data
        while len(self.buf) >= HEADER_LEN:
            n = (self.buf[2] << 16) | (self.buf[3] << 8) | self.buf[4]
            if len(self.buf) < HEADER_LEN + n:
                return
            header = bytes(self.buf[:HEADER_LEN])
            body = bytes(self.buf[HEADER_LEN : HEADER_LEN + n])
            del self.buf[: HEADER_LEN + n]
            yield header, body


# ----------------------------------------------------------------------- strategies


class Strategy:
    """Honest forwarding. Subclasses override `on_record` (and `on_eof`)."""

    def on_record(self, conn: RelayedConnection, rec: WireRecord) -> None:
        conn.forward(rec)

    def on_eof(self, conn: RelayedConnection, direction: str) -> None:
        conn.send_eof(direction)


Honest = Strategy


class OnceStrategy(Strategy):
    """Applies `attack` to the first record matching `match` in `direction`; honest
    before and after. `fired` tells the test that the attack really happened."""

    def __init__(self, direction: str = A2B,
                 match: Callable[[WireRecord], bool] = lambda r: r.protected) -> None:
        self.direction = direction
        self.match = match
        self.fired = asyncio.Event()

    def on_record(self, conn: RelayedConnection, rec: WireRecord) -> None:
        if not self.fired.is_set() and rec.direction == self.direction and self.match(rec):
            self.fired.set()
            self.attack(conn, rec)
        else:
            conn.forward(rec)

    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        raise NotImplementedError


class FlipBit(OnceStrategy):
    """Flip one bit of the record at byte `pos` of header‖body (negative: from the end)."""

    def __init__(self, pos: int, bit: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.pos, self.bit = pos, bit

    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        conn.send(rec.direction, flip_bit(rec.raw, self.pos, self.bit))


class Replay(OnceStrategy):
    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        conn.forward(rec)
        conn.send(rec.direction, rec.raw)


class Drop(OnceStrategy):
    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        pass


class Reorder(OnceStrategy):
    """Hold the matching record and send it after the next one in the same direction."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.held: WireRecord | None = None

    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        self.held = rec

    def on_record(self, conn: RelayedConnection, rec: WireRecord) -> None:
        if self.held is not None and rec.direction == self.direction:
            conn.forward(rec)
            conn.forward(self.held)
            self.held = None
            return
        super().on_record(conn, rec)


class Reflect(OnceStrategy):
    """Forward the record and also send a copy back to the side that sent it."""

    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        conn.forward(rec)
        conn.send(other(rec.direction), rec.raw)


class Substitute(OnceStrategy):
    """Replace the matching record by other bytes (e.g. a record of another session)."""

    def __init__(self, replacement: bytes, **kw: Any) -> None:
        super().__init__(**kw)
        self.replacement = replacement

    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        conn.send(rec.direction, self.replacement)


class Inject(OnceStrategy):
    """Send raw bytes of the attacker's choice in place of the matching record."""

    def __init__(self, data: bytes, *, keep: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.data, self.keep = data, keep

    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        conn.send(rec.direction, self.data)
        if self.keep:
            conn.forward(rec)


class Truncate(OnceStrategy):
    """Forward `keep` bytes of the matching record, then a bare TCP FIN, and nothing
    more in that direction: a cut with no authenticated close."""

    def __init__(self, keep: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.keep = keep

    def attack(self, conn: RelayedConnection, rec: WireRecord) -> None:
        if self.keep is None:
            conn.forward(rec)
        else:
            conn.send(rec.direction, rec.raw[: self.keep])
        conn.send_eof(rec.direction)
        conn.blackhole.add(rec.direction)


class ReplayOnSideConnection(Strategy):
    """The first-flight replay of issue 9.3: hold the first ClientHello, send a copy to
    the responder on a connection of the attacker's own (which makes the responder
    fetch, and so spend, the hello's QKD key IDs), wait for its answer, then forward
    the original. Honest on every later connection (the strategy object is shared)."""

    def __init__(self) -> None:
        self.fired = asyncio.Event()
        self.side_answer: list[int] = []  # handshake message types on the side connection
        self._tasks: set[asyncio.Task[None]] = set()

    def on_record(self, conn: RelayedConnection, rec: WireRecord) -> None:
        if (self.fired.is_set() or rec.direction != A2B
                or rec.message_type != hs_mod.MSG_CLIENT_HELLO):
            conn.forward(rec)
            return
        self.fired.set()
        task = asyncio.ensure_future(self._replay_then_forward(conn, rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replay_then_forward(self, conn: RelayedConnection, rec: WireRecord) -> None:
        from gateway.tunnel.record import RecordReader

        reader, writer = await asyncio.open_connection("127.0.0.1", conn.relay.target_port)
        writer.write(rec.raw)
        rr = RecordReader()
        try:
            async with asyncio.timeout(10):
                while not self.side_answer and (data := await reader.read(1 << 16)):
                    rr.feed(data)
                    while (got := rr.next_record()) is not None:
                        self.side_answer.append(bytes(got[3])[0])
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
        conn.forward(rec)


class TamperHandshake(Strategy):
    """Rewrite plaintext handshake messages. `rewrite(direction, msg)` returns the
    message to send (or the same bytes). Every change is remembered in `originals`
    (sent -> original) so a test can switch the transcript binding off for exactly
    the modified messages (the positive control)."""

    def __init__(self, rewrite: Callable[[str, bytes], bytes],
                 originals: dict[bytes, bytes] | None = None) -> None:
        self.rewrite = rewrite
        self.originals = originals if originals is not None else {}
        self.changed = 0

    def on_record(self, conn: RelayedConnection, rec: WireRecord) -> None:
        msg = rec.handshake_message
        if msg is None:
            conn.forward(rec)
            return
        new = self.rewrite(rec.direction, msg)
        if new != msg:
            self.changed += 1
            self.originals[new] = msg
        conn.send(rec.direction, frame(PLAINTEXT_HANDSHAKE, new))


def rewrite_hello(msg: bytes, **changes: Any) -> bytes:
    """Re-encode a ClientHello or ServerHello with some fields replaced."""
    if msg[0] == hs_mod.MSG_CLIENT_HELLO:
        return dataclasses.replace(ClientHello.decode(msg), **changes).encode()
    if msg[0] == hs_mod.MSG_SERVER_HELLO:
        return dataclasses.replace(ServerHello.decode(msg), **changes).encode()
    return msg


# --------------------------------------------------------------------------- relay


class RelayedConnection(RelayConnection):
    """One tunnel TCP connection through the relay: both sockets and the records seen."""

    relay: MitmRelay

    def __init__(self, relay: TcpRelay, number: int,
                 client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        super().__init__(relay, number, client, upstream)
        assert isinstance(relay, MitmRelay)
        self.strategy: Strategy = relay.strategy_factory()
        self.records: dict[str, list[WireRecord]] = {A2B: [], B2A: []}
        self.blackhole: set[str] = set()
        self._seq = {A2B: 0, B2A: 0}
        self._splitters = {A2B: _Splitter(), B2A: _Splitter()}

    def __repr__(self) -> str:
        return f"RelayedConnection(#{self.number}, {type(self.strategy).__name__})"

    def protected(self, direction: str) -> list[WireRecord]:
        return [r for r in self.records[direction] if r.protected]

    def handshake_messages(self, direction: str) -> list[bytes]:
        return [r.body for r in self.records[direction] if r.rtype == PLAINTEXT_HANDSHAKE]

    # what strategies do
    def forward(self, rec: WireRecord) -> None:
        self.send(rec.direction, rec.raw)

    def send(self, direction: str, data: bytes) -> None:
        if direction not in self.blackhole:
            super().send(direction, data)

    # the pumps (qkd.common.tcp_relay) hand over chunks; strategies see records
    def _record(self, direction: str, header: bytes, body: bytes) -> WireRecord:
        seq = self._seq[direction]
        if header[0] == PROTECTED:
            self._seq[direction] += 1
        rec = WireRecord(direction, len(self.records[direction]), seq, header, body)
        self.records[direction].append(rec)
        return rec

    async def on_chunk(self, direction: str, chunk: bytes) -> None:
        if direction in self.blackhole:
            return
        for header, body in self._splitters[direction].feed(chunk):
            self.strategy.on_record(self, self._record(direction, header, body))

    def on_eof(self, direction: str) -> None:
        buf = self._splitters[direction].buf
        if buf and direction not in self.blackhole:
            self.send(direction, bytes(buf))  # a partial record, as it came
        if direction not in self.blackhole:
            self.strategy.on_eof(self, direction)


class MitmRelay(TcpRelay):
    """TCP relay 127.0.0.1:port -> 127.0.0.1:target_port with a strategy per connection.

    New connections get `strategy_factory()`; a live one can be re-armed through
    `live.strategy`. `target_port` may be changed to send the next connection to
    another gateway (a third site, an impostor)."""

    connections: list[RelayedConnection]  # type: ignore[assignment]

    def __init__(self, target_port: int) -> None:
        super().__init__(lambda: ("127.0.0.1", self.target_port),
                         connection_class=RelayedConnection, on_connect=self._connected)
        self.target_port = target_port
        self.strategy_factory: Callable[[], Strategy] = Honest
        self.new_connection = asyncio.Event()

    @property
    def live(self) -> RelayedConnection | None:
        open_ = [c for c in self.connections if not c.closed.is_set()]
        return open_[-1] if open_ else None

    def honest(self) -> None:
        self.strategy_factory = Honest

    def _connected(self, conn: RelayConnection) -> None:
        self.new_connection.set()
        self.new_connection = asyncio.Event()


# ---------------------------------------------------- switchable protections (tests)


class UncheckedAesGcm:
    """AES-GCM with the tag check switched off: decrypts with the GCM keystream and
    ignores the tag. Only for positive controls (what the tag check is worth)."""

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)  # the record layer wipes its buffer once AESGCM has it
        self._aead = AESGCM(self._key)

    def encrypt_into(self, nonce: bytes, data: bytes, aad: bytes, buf: Any) -> int:
        return int(self._aead.encrypt_into(nonce, data, aad, buf))

    def decrypt_into(self, nonce: bytes, data: Any, aad: bytes, buf: Any) -> int:
        ct = bytes(data[:-TAG_LEN])
        # GCM with a 96-bit nonce encrypts with CTR starting at counter block 2.
        dec = Cipher(algorithms.AES(self._key), modes.CTR(nonce + b"\x00\x00\x00\x02")
                     ).decryptor()
        buf[:] = dec.update(ct) + dec.finalize()
        return len(ct)


def unbind_transcript(monkeypatch: Any, originals: dict[bytes, bytes]) -> None:
    """Positive control: every modified handshake message enters the receiver's
    transcript as the original, i.e. as if the modified fields were not in TH."""
    absorb = hs_mod.Handshake._absorb

    def _absorb(self: Any, msg: bytes) -> None:
        absorb(self, originals.get(bytes(msg), msg))

    monkeypatch.setattr(hs_mod.Handshake, "_absorb", _absorb)


def legacy_qkd_degrade(monkeypatch: Any) -> None:
    """Positive control (issue 9.3): the QKD degrade rules as they were before the fix.

    - a key ID the KME or the key-ID memory refuses is treated as "no key available";
    - a responder whose KME cannot deliver the named keys falls back to ML-KEM-only;
    - a responder agrees to ML-KEM-only without asking its own KME;
    - an initiator that obtained QKD keys still accepts ML-KEM-only."""
    from gateway.tunnel.connection import TunnelConnection

    def rejected_as_unavailable(self: Any, handshake_id: int, reason: str,
                                now: float) -> None:
        self.qkd_keys_unavailable(handshake_id, reason, now)

    def degrade_after_dec_failure(self: Any, reason: str, status: str) -> None:
        pol = self.params.policy
        assert self._ch is not None
        if not (pol.degraded_allowed and hs_mod.MODE_MLKEM_ONLY in self._ch.allowed_modes):
            raise self._fail(hs_mod.ErrorCode.QKD_UNAVAILABLE, f"no QKD key: {reason}")
        self._qkd_keys = []
        self._send_server_flight(hs_mod.MODE_MLKEM_ONLY, status)

    def degrade_without_asking(self: Any, status: str) -> None:
        self._send_server_flight(hs_mod.MODE_MLKEM_ONLY,
                                 status if status in hs_mod.QKD_DEGRADED else hs_mod.QKD_NO_KEY)

    monkeypatch.setattr(TunnelConnection, "qkd_keys_rejected", rejected_as_unavailable)
    monkeypatch.setattr(hs_mod.Handshake, "_dec_keys_failed", degrade_after_dec_failure)
    monkeypatch.setattr(hs_mod.Handshake, "local_qkd_status", degrade_without_asking)
    monkeypatch.setattr(hs_mod.Handshake, "_refuse_mlkem_only_with_own_keys",
                        lambda self, ch: None)


# -------------------------------------------------------------------- applications


@dataclass
class SinkConnection:
    data: bytearray = field(default_factory=bytearray)
    end: str = ""  # "eof" (clean end seen), "reset" or "closed"
    done: asyncio.Event = field(default_factory=asyncio.Event)


class RecordingSink:
    """Site B's service: keeps every byte per connection and how the connection ended;
    on a clean EOF answers with 8-byte length ‖ SHA-256, like `gateway.tools.demo_sink`."""

    def __init__(self) -> None:
        self.connections: list[SinkConnection] = []
        self.port = 0
        self.new_connection = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = SinkConnection()
        self.connections.append(conn)
        self.new_connection.set()
        self.new_connection = asyncio.Event()
        try:
            while chunk := await reader.read(1 << 16):
                conn.data += chunk
            conn.end = "eof"
            writer.write(len(conn.data).to_bytes(8, "big") + hashlib.sha256(conn.data).digest())
            await writer.drain()
        except (ConnectionError, OSError):
            conn.end = "reset"
        finally:
            conn.end = conn.end or "closed"
            writer.close()
            conn.done.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


def expected_reply(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest()


@dataclass
class AppResult:
    reply: bytes
    error: str  # "" | "reset" | "timeout"

    def outcome(self, payload: bytes) -> str:
        if self.error:
            return self.error
        if self.reply == expected_reply(payload):
            return "ok"
        return "refused" if not self.reply else "wrong"


class AppClient:
    """An application at site A talking to the sink through the tunnel, step by step."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def send(self, data: bytes, *, eof: bool = False) -> None:
        assert self.writer is not None
        with contextlib.suppress(ConnectionError, OSError):
            self.writer.write(data)
            if eof:
                self.writer.write_eof()
            await self.writer.drain()

    async def result(self, timeout: float = 10.0) -> AppResult:
        assert self.reader is not None and self.writer is not None
        try:
            reply = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, OSError):
            return AppResult(b"", "reset")
        except TimeoutError:
            return AppResult(b"", "timeout")
        finally:
            self.writer.transport.abort()
        return AppResult(reply, "")


# --------------------------------------------------------------------------- sites


def kme_toml(pki: Path, site: str, db: Path, local: list[str], peer_kme: str,
             peers: list[str]) -> str:
    return kme_config.dumps(kme_config.kme_config(
        pki, site, db, local_saes=local, peer_kme=peer_kme, peer_saes=peers,
        link=kme_config.ideal_link(pki / "link-secret.key"),
        kme={"key_size": 256, "max_key_count": 1000, "max_key_per_request": 16},
        log_level="warning"))


def gateway_config(pki: Path, workdir: Path, site: str, peer: str, *, kme_url: str,
                   kme_site: str | None = None, connect: int | None = None,
                   listeners: tuple[str, ...] = (), services: dict[str, int] | None = None,
                   **overrides: Any) -> GatewayConfig:
    """A GatewayConfig built directly (no TOML): PKI mode on every connection (the PSK
    chain is off: PSK attacks are not this suite's subject), no admission limits in
    the way of the many reconnects, fast redials."""
    from gateway.config import ListenerConfig, ServiceConfig

    kme_site = kme_site or site
    values: dict[str, Any] = dict(
        source=workdir / f"{site}.toml", site_id=site, sae_id=f"{kme_site}-gw",
        state_dir=workdir / "state" / site,
        tunnel_listen=None if connect is not None else HostPort("127.0.0.1", 0),
        tunnel_connect=HostPort("127.0.0.1", connect) if connect is not None else None,
        handshake_timeout=5.0, rekey_interval=600.0, key_update_records=1 << 20,
        key_update_bytes=1 << 34, stream_window=1 << 20, max_streams=64, connect_wait=1.0,
        reconnect_min=0.05, reconnect_max=0.3, peer_site_id=peer,
        peer_sae_id=f"{peer}-gw", ca_file=pki / "ca.crt", cert_file=pki / site / "gateway.crt",
        key_file=pki / site / "gateway.key", kme_url=kme_url, kme_ca=pki / "tls-ca.crt",
        kme_cert=pki / kme_site / "sae-client.crt", kme_key=pki / kme_site / "sae-client.key",
        kme_timeout=5.0, kme_id=f"kme-{kme_site}", kem="ML-KEM-768", allow_degraded=False,
        qkd_key_bits=256,
        pqc_backend="auto",
        listeners=tuple(ListenerConfig(HostPort("127.0.0.1", 0), s) for s in listeners),
        services=tuple(ServiceConfig(n, HostPort("127.0.0.1", p))
                       for n, p in (services or {}).items()),
        log_level="info", log_format="json", admin_listen=HostPort("127.0.0.1", 0),
        psk_enabled=False,
    )
    with contextlib.suppress(ImportError):
        from gateway.tunnel.admission import COOKIE_OFF, AdmissionSettings

        values["admission"] = dataclasses.replace(
            AdmissionSettings(), cookie=COOKIE_OFF, rate=10_000.0, burst=100_000)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(GatewayConfig)}
    (workdir / "state" / site).mkdir(parents=True, exist_ok=True)
    return GatewayConfig(**{k: v for k, v in values.items() if k in known})


class Sites:
    """KME-A, KME-B, gateway B (+ sink), relay, gateway A, all in this event loop."""

    def __init__(self, pki: Path, workdir: Path) -> None:
        self.pki = pki
        self.workdir = workdir
        self.kmes: dict[str, RunningKme] = {}
        self.gateways: dict[str, Gateway] = {}
        self.sink = RecordingSink()
        self.relay: MitmRelay | None = None
        self.logs: list[dict[str, Any]] = []
        self._logs_cm: Any = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def a(self) -> Gateway:
        return self.gateways["site-a"]

    @property
    def b(self) -> Gateway:
        return self.gateways["site-b"]

    async def start_kmes(self) -> None:
        self._logs_cm = capture_logs()
        self.logs = self._logs_cm.__enter__()
        layout = {"site-a": (["site-a-gw", "site-c-gw"], "kme-site-b", ["site-b-gw"]),
                  "site-b": (["site-b-gw"], "kme-site-a", ["site-a-gw", "site-c-gw"])}
        for site, (local, peer_kme, peers) in layout.items():
            path = self.workdir / f"kme-{site}.toml"
            path.write_text(kme_toml(self.pki, site, self.workdir / f"kme-{site}.sqlite3",
                                     local, peer_kme, peers))
            self.kmes[site] = await start_kme(KmeConfig.load(path))

    def kme_url(self, site: str) -> str:
        return self.kmes[site].url

    async def start_gateway(self, name: str, config: GatewayConfig, *,
                            credentials: Credentials | None = None,
                            setup: Callable[[Gateway], None] | None = None) -> Gateway:
        gw = Gateway(config, credentials=credentials)
        if setup is not None:
            setup(gw)
        await gw.start()
        self.gateways[name] = gw
        return gw

    async def start(self, *, a: dict[str, Any] | None = None, b: dict[str, Any] | None = None,
                    setup_a: Callable[[Gateway], None] | None = None,
                    setup_b: Callable[[Gateway], None] | None = None,
                    strategy: Callable[[], Strategy] = Honest) -> None:
        """Everything up; gateway A dials through the relay, whose first connection
        already gets `strategy`."""
        await self.start_kmes()
        await self.sink.start()
        gb = await self.start_gateway("site-b", gateway_config(
            self.pki, self.workdir, "site-b", "site-a", kme_url=self.kme_url("site-b"),
            services={"sink": self.sink.port}, **(b or {})), setup=setup_b)
        assert gb.tunnel_port is not None
        self.relay = MitmRelay(gb.tunnel_port)
        self.relay.strategy_factory = strategy
        await self.relay.start()
        await self.start_gateway("site-a", gateway_config(
            self.pki, self.workdir, "site-a", "site-b", kme_url=self.kme_url("site-a"),
            connect=self.relay.port, listeners=("sink",), **(a or {})), setup=setup_a)

    async def close(self) -> None:
        for gw in self.gateways.values():
            with contextlib.suppress(Exception):
                await gw.close()
        if self.relay is not None:
            await self.relay.close()
        await self.sink.close()
        for kme in self.kmes.values():
            with contextlib.suppress(Exception):
                await kme.close()
        if self._http is not None:
            await self._http.close()
        if self._logs_cm is not None:
            self._logs_cm.__exit__(None, None, None)

    # -- waiting ------------------------------------------------------------------

    def tunnel_of(self, site: str = "site-a") -> Any:
        t = self.gateways[site].tunnel
        return t if t is not None and t.conn.ready else None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0,
                       what: str = "condition") -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async def wait_tunnel(self, *, not_: Any = None, timeout: float = 15.0) -> Any:
        """Both sides ready on a tunnel other than `not_` (A's previous session)."""
        def up() -> bool:
            ta, tb = self.tunnel_of("site-a"), self.tunnel_of("site-b")
            return ta is not None and tb is not None and ta is not not_
        await self.wait_for(up, timeout, "the tunnel to come up")
        return self.tunnel_of("site-a")

    # -- applications ---------------------------------------------------------------

    @property
    def app_port(self) -> int:
        return self.a.listener_ports["sink"]

    async def open_app(self) -> tuple[AppClient, SinkConnection]:
        """An application connection whose stream is open end to end (the sink has it)."""
        app = AppClient(self.app_port)
        seen = len(self.sink.connections)
        await app.connect()
        await self.wait_for(lambda: len(self.sink.connections) > seen, 10.0,
                            "the stream to reach the sink")
        return app, self.sink.connections[-1]

    async def exchange(self, payload: bytes, timeout: float = 10.0) -> AppResult:
        app = AppClient(self.app_port)
        try:
            await app.connect()
        except OSError:
            return AppResult(b"", "reset")
        await app.send(payload, eof=True)
        return await app.result(timeout)

    async def recover(self, old: Any = None, payload: bytes = b"after the attack " * 64
                      ) -> None:
        """The relay forwards honestly again; a fresh tunnel carries fresh data intact."""
        assert self.relay is not None
        self.relay.honest()
        await self.wait_tunnel(not_=old)
        result = await self.exchange(payload)
        assert result.outcome(payload) == "ok", f"no recovery: {result}"

    # -- what was counted and logged -------------------------------------------------

    async def metrics(self, site: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The gateway's /metrics over HTTP, as {(sample name, sorted labels): value}."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        url = f"http://127.0.0.1:{self.gateways[site].admin_port}/metrics"
        async with self._http.get(url) as resp:
            text = await resp.text()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    async def counter(self, site: str, name: str, **labels: str) -> float:
        m = await self.metrics(site)
        key = (name, tuple(sorted(labels.items())))
        return m.get(key, 0.0)

    def log_events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]
