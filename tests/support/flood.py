"""In-process gateways on loopback for the denial-of-service tests and benchmark.

Both gateways run in the test's event loop with real TCP sockets and real handshakes;
only the two KMEs are replaced by one in-memory `FakeKmeLink` that counts the
responder's `dec_keys` calls, the first piece of expensive work a ClientHello causes.
The attacker side is plain sockets speaking the record format by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.runtime import Gateway
from gateway.tunnel.constants import PROTOCOL_VERSION
from gateway.tunnel.handshake import ClientHello
from gateway.tunnel.record import PLAINTEXT_HANDSHAKE, RecordLayer
from pqc.factory import get_kem
from qkd.etsi014.client import KmeRejected
from qkd.etsi014.messages import QkdKey


@dataclass
class FakeKmeLink:
    """Both KMEs of one link: enc_keys at A makes a key, dec_keys at B hands it out once."""

    keys: dict[str, bytes] = field(default_factory=dict)
    dec_calls: int = 0
    enc_calls: int = 0
    dec_delay: float = 0.0  # a real KME answers over HTTPS from SQLite: not free

    def client(self) -> FakeEtsiClient:
        return FakeEtsiClient(self)


class FakeEtsiClient:
    """The part of `qkd.etsi014.client.EtsiClient` a gateway uses."""

    def __init__(self, link: FakeKmeLink) -> None:
        self.link = link

    async def get_enc_keys(self, slave_sae_id: str, number: int = 1,
                           size: int = 256) -> list[QkdKey]:
        self.link.enc_calls += 1
        out = []
        for _ in range(number):
            kid = str(uuid.uuid4())
            self.link.keys[kid] = os.urandom(size // 8)
            out.append(QkdKey(kid, self.link.keys[kid]))
        return out

    async def get_dec_keys(self, master_sae_id: str, key_ids: list[str], *,
                           size: int | None = None) -> list[QkdKey]:
        self.link.dec_calls += 1
        if self.link.dec_delay:
            await asyncio.sleep(self.link.dec_delay)
        if any(k not in self.link.keys for k in key_ids):
            raise KmeRejected("fake KME: unknown key ID", 400, "unknown key ID")
        return [QkdKey(k, self.link.keys.pop(k)) for k in key_ids]

    async def close(self) -> None:
        return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return json.dumps([str(v) for v in value])
    return json.dumps(str(value))


def write_config(workdir: Path, pki: Path, site: str, peer: str, *,
                 listen: bool = False, connect_port: int | None = None,
                 admission: dict[str, Any] | None = None,
                 handshake_timeout: float = 15.0, psk: bool = True) -> GatewayConfig:
    workdir.mkdir(parents=True, exist_ok=True)
    tunnel = ('listen = "127.0.0.1:0"' if listen
              else f'connect = "127.0.0.1:{connect_port}"')
    adm = "".join(f"{k} = {_toml(v)}\n" for k, v in (admission or {}).items())
    text = f"""
[gateway]
site_id = "{site}"
sae_id = "{site}-gw"
state_dir = {_toml(workdir / "state" / site)}

[tunnel]
{tunnel}
handshake_timeout_s = {handshake_timeout}
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[tunnel.admission]
{adm}
[peer]
site_id = "{peer}"
sae_id = "{peer}-gw"

[pki]
ca = {_toml(pki / "ca.crt")}
cert = {_toml(pki / site / "gateway.crt")}
key = {_toml(pki / site / "gateway.key")}

[kme]
url = "https://127.0.0.1:1"
ca = {_toml(pki / "tls-ca.crt")}
cert = {_toml(pki / site / "sae-client.crt")}
key = {_toml(pki / site / "sae-client.key")}

[auth]
psk = {_toml(psk)}
"""
    path = workdir / f"{site}.toml"
    path.write_text(text)
    return GatewayConfig.load(path)


async def start_gateway(config: GatewayConfig, link: FakeKmeLink) -> Gateway:
    gw = Gateway(config)
    real = gw.kme
    gw.kme = link.client()  # type: ignore[assignment]
    await real.close()
    await gw.start()
    return gw


async def wait_for(predicate: Any, timeout: float, step: float = 0.02) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


def tunnel_up(gw: Gateway) -> bool:
    t = gw.tunnel
    return t is not None and t.conn.ready


# --------------------------------------------------------------------------- attacker


_EK_CACHE: dict[str, bytes] = {}


def valid_looking_hello(*, initiator: str = "site-a", responder: str = "site-b",
                        cookie: bytes = b"", kem: str = "ML-KEM-768",
                        key_ids: tuple[str, ...] | None = None,
                        ek: bytes | None = None, nonce: bytes | None = None,
                        flags: int = 0, auth: str = "pki", psk_epoch: int = 0) -> ClientHello:
    """A ClientHello that passes every cheap check (identities are public), with key IDs
    the KME never issued: only the KME request can tell it apart from a real one."""
    if ek is None:
        if kem not in _EK_CACHE:
            _EK_CACHE[kem] = get_kem(kem, "auto").from_seed(os.urandom(64)).encapsulation_key
        ek = _EK_CACHE[kem]
    return ClientHello(
        version=PROTOCOL_VERSION, epoch=0, auth=auth, psk_epoch=psk_epoch,
        kems_offered=(kem,),
        kem=kem, allowed_modes=("hybrid",), initiator_id=initiator, responder_id=responder,
        initiator_sae_id=f"{initiator}-gw", nonce=nonce or os.urandom(32),
        encapsulation_key=ek, qkd_key_size_bits=256,
        qkd_key_ids=key_ids if key_ids is not None else (str(uuid.uuid4()),),
        stream_window=1 << 20, flags=flags, cookie=cookie)


def hello_fields_for(responder: Gateway) -> dict[str, Any]:
    """What an attacker watching the wire puts in a ClientHello so that it passes every
    cheap check of this responder: the policy flags, and once the sites share a PSK,
    auth "psk" with the current PSK epoch (both are sent in the clear)."""
    from gateway.tunnel.handshake import FLAG_ITS_MAC, FLAG_PSK

    book = responder.params.psk_book
    flags = (FLAG_PSK if book is not None else 0) | (
        FLAG_ITS_MAC if responder.params.policy.its_mac else 0)
    if book is not None and not book.pki_allowed():
        psk = book.offer()
        if psk is not None:
            return {"flags": flags, "auth": "psk", "psk_epoch": psk.epoch}
    return {"flags": flags}


def plaintext_record(msg: bytes) -> bytes:
    return bytes(RecordLayer().seal_plaintext_handshake(msg))


def read_records(buf: bytearray) -> list[tuple[int, bytes]]:
    """Cut complete (type, body) records off the front of `buf`."""
    out = []
    while len(buf) >= 5:
        length = int.from_bytes(buf[2:5], "big")
        if len(buf) < 5 + length:
            break
        out.append((buf[0], bytes(buf[5 : 5 + length])))
        del buf[: 5 + length]
    return out


async def open_from(source: str, port: int) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    """A TCP connection to the tunnel port from a chosen loopback address (all of
    127/8 reaches lo on Linux)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2.0)


async def refused_quickly(reader: asyncio.StreamReader, within: float = 1.0) -> bool:
    """True if the server ended the connection (RST or FIN) within `within` seconds
    without sending anything; False if it stayed open (an admitted connection)."""
    try:
        data = await asyncio.wait_for(reader.read(1), within)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return data == b""


async def hello_flood(port: int, sources: list[str], count: int, *,
                      echo_cookie: bool = False, linger: float = 0.3,
                      concurrency: int = 50,
                      hello_fields: Callable[[], dict[str, Any]] = dict) -> dict[str, int]:
    """`count` connections spread over `sources`, each sending one valid-looking
    ClientHello (and, if `echo_cookie`, resending it with the cookie it is given)."""
    from gateway.tunnel.handshake import MSG_HELLO_RETRY, decode_hello_retry

    tally = {"refused": 0, "retry": 0, "closed": 0, "open": 0, "error": 0}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            src = sources[i % len(sources)]
            try:
                reader, writer = await open_from(src, port)
            except OSError:
                tally["error"] += 1
                return
            try:
                hello = valid_looking_hello(**hello_fields())
                writer.write(plaintext_record(hello.encode()))
                await writer.drain()
                buf = bytearray()
                loop = asyncio.get_running_loop()
                end = loop.time() + linger
                outcome = "open"
                while (left := end - loop.time()) > 0:
                    try:
                        chunk = await asyncio.wait_for(reader.read(65536), left)
                    except TimeoutError:
                        break
                    if not chunk:
                        outcome = "closed"
                        break
                    buf += chunk
                    for rtype, body in read_records(buf):
                        if rtype == PLAINTEXT_HANDSHAKE and body[:1] == bytes((MSG_HELLO_RETRY,)):
                            tally["retry"] += 1
                            if echo_cookie:
                                again = ClientHello(**{**hello.__dict__,
                                                       "cookie": decode_hello_retry(body)})
                                writer.write(plaintext_record(again.encode()))
                tally[outcome] += 1
            except (ConnectionResetError, BrokenPipeError):
                tally["refused"] += 1
            finally:
                writer.transport.abort()

    await asyncio.gather(*(one(i) for i in range(count)))
    return tally


def free_sources(n: int, first: int = 2) -> list[str]:
    return [f"127.0.0.{first + i}" for i in range(n)]


def can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


async def hold_slots(port: int, sources: list[str], per_source: int,
                     stop: asyncio.Event) -> dict[str, int]:
    """Keep `per_source` silent connections open from each source: a client that sends
    nothing holds a pending slot until the first-record deadline cuts it, and then
    comes straight back. Returns how often connections were opened and refused."""
    tally = {"opened": 0, "refused": 0}

    async def holder(src: str) -> None:
        while not stop.is_set():
            try:
                reader, writer = await open_from(src, port)
            except OSError:
                tally["refused"] += 1
                await asyncio.sleep(0.05)
                continue
            tally["opened"] += 1
            try:
                stop_wait = asyncio.ensure_future(stop.wait())
                read = asyncio.ensure_future(reader.read(1))
                await asyncio.wait({stop_wait, read}, return_when=asyncio.FIRST_COMPLETED)
                for f in (stop_wait, read):
                    f.cancel()
                if read.done() and not read.cancelled() and read.exception() is not None:
                    tally["refused"] += 1
            finally:
                writer.transport.abort()
            await asyncio.sleep(0.01)

    await asyncio.gather(*(holder(src) for src in sources for _ in range(per_source)),
                         return_exceptions=True)
    return tally
