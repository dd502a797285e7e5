"""Trusted-node key relay wired into a KME (issue 11): the asyncio side of
`qkd.network.relay.RelayNode`.

- One TCP connection per neighbour carries the relay frames (u32 length + frame). Its
  HELLO is a mutual HMAC-SHA256 challenge under the link's secret file, so nobody else
  takes a neighbour's place; the frames themselves carry per-hop Wegman-Carter tags.
- `LinkKeys` is the LinkKeySupplier: the hop's one-time pads and tag pads come from
  the neighbour's link. Ideal link (`StoreLinkKeys`): bytes derived from the link
  secret, each direction its own stream, charged to the link's token bucket. BB84 link
  (qkd.kme.relay_keys): real pool keys reserved at both KMEs, named in KEYS frames on
  the channel. Offsets and watermarks are persisted (qkd.kme.relay_store) before a
  frame leaves.
- Link-state adverts go over the same channels (own links every second and on a
  channel change, flooded on; HMAC per channel), into a LinkStateDb for routing.
- enc_keys for an SAE behind a non-adjacent KME starts one relay per key over
  `disjoint_paths` (policy from [network]) and answers once every key is
  KeyDeliverable; the destination stores the key before it lets the ACKs go.

Key bytes never reach a log, an error or a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import math
import os
import secrets
import signal
import sqlite3
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from qkd.common.log import get_logger
from qkd.common.storage_key import Sealer, load_or_create
from qkd.etsi014 import messages as etsi014
from qkd.etsi014.messages import (
    BAD_REQUEST,
    NO_KEY_MESSAGE,
    SERVER_ERROR,
    UNAUTHORIZED,
    EtsiError,
    QkdKey,
)
from qkd.kme.http import dec_keys_request, enc_keys_request
from qkd.kme.relay_keys import MAX_KEYS_PER_FRAME, PoolLinkKeys, decode_keys, encode_keys
from qkd.kme.relay_store import RelayKeyError, RelayStore
from qkd.link.wegman_carter import HASH_KEY_BYTES, HashKey
from qkd.network.constants import (
    MAX_FRAME_BYTES,
    MAX_KEY_BYTES,
    MAX_LSA_LINKS,
    MAX_POOL_BITS,
    MIN_KEY_BYTES,
    PAD_BYTES,
)
from qkd.network.errors import NetErrorCode, NetworkError
from qkd.network.relay import (
    Event,
    FrameRejected,
    KeyAssembled,
    KeyDeliverable,
    KeyDiscarded,
    RelayFailed,
    RelayNode,
    Share,
    decode_frame,
    relay_cost_bits,
)
from qkd.network.topology import (
    LinkReport,
    LinkStateAd,
    LinkStateDb,
    disjoint_paths,
)
from qkd.network.topology import Path as NetPath

if TYPE_CHECKING:
    from qkd.kme.config import KmeConfig
    from qkd.kme.service import KmeService

log = get_logger("qkd.kme.relay")

_HELLO = b"qkdgw relay hello v1\x00"
_NONCE = 16
_MAC = 32
# Outgoing offsets are leased this far ahead: one write per lease, not per frame; a
# crash loses at most this much link key, never reuses it.
_LEASE_BYTES = 1 << 16
_TICK_S = 0.2
_LSA_INTERVAL_S = 1.0  # also sent at once when a relay channel goes up or down
_LSA_MARK = b"L"  # first byte of an LSA frame on the channel; relay frames start with 1
_KEYS_MARK = b"K"  # a KEYS frame: the BB84 pool keys the sender added to its stream
# Largest channel frame: a relay frame, or an LSA frame (mark, counter, advert, tag).
_MAX_CHANNEL_FRAME = max(MAX_FRAME_BYTES, 1 + 8 + 12 + 64 + MAX_LSA_LINKS * 74 + _MAC)
_DIAL_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)
# Test hook: SIGKILL this KME at one step of a relay, so the crash tests can hit every
# step in a real process. Unset (always, outside those tests): no effect.
CRASH_ENV = "QKDGW_TEST_RELAY_CRASH"
CRASH_POINTS = ("transit_on_share", "transit_after_forward", "dest_before_store",
                "dest_after_store", "source_after_acks")
_CRASH = os.environ.get(CRASH_ENV, "")


def _crash_at(point: str) -> None:
    if point == _CRASH:
        log.warning("test_crash", point=point)
        os.kill(os.getpid(), signal.SIGKILL)


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _prf(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(_lp(p) for p in parts), hashlib.sha256).digest()


def _expand(secret: bytes, what: bytes, *names: str, n: int, first: int = 0) -> bytes:
    out = b"".join(_prf(secret, b"qkdgw relay link key v1 " + what,
                        *(x.encode() for x in names), struct.pack(">Q", i))
                   for i in range(first, first + math.ceil(n / 32)))
    return out[:n]


def link_stream(secret: bytes, sender: str, receiver: str, offset: int, n: int) -> bytes:
    """Bytes offset .. offset+n of the (sender -> receiver) relay link-key stream of an
    ideal link with `secret`: what both ends of the hop (and anyone holding the link
    secret, e.g. a compromised node) can compute."""
    first, skip = divmod(offset, 32)
    return _expand(secret, b"otp", sender, receiver, n=n + skip, first=first)[skip:]


@dataclass
class _LinkPool:
    """One neighbour's link as the relay sees it: the secret the ideal link derives
    from (a BB84 link's: its bootstrap secret, for the channel HELLO only), and its
    pool (an ideal link's token bucket, a BB84 link's store)."""

    secret: bytes = field(repr=False)
    service: KmeService = field(repr=False)
    bb84_keys: PoolLinkKeys | None = None

    def level_keys(self) -> int:
        if self.bb84_keys is not None:
            return self.bb84_keys.free_blocks.get(self.service.config.peer.kme_id, 0)
        return self.service.ideal_level()

    def level_bits(self) -> int:
        if self.bb84_keys is not None:
            nb = self.service.config.peer.kme_id
            return (self.level_keys() * self.service.config.limits.key_size
                    + 8 * self.bb84_keys.held_out(nb))
        return self.service.ideal_level() * self.service.config.limits.key_size

    def take_keys(self, n: int) -> bool:
        # The bucket runs on the service's clock (tests freeze it).
        return self.service.bucket.take(n, self.service._clock())


class StoreLinkKeys:
    """LinkKeySupplier over each neighbour's link and the relay store (see module doc).

    Both ends derive the same bytes: stream (sender -> receiver) byte i is in block
    i // 32 = HMAC-SHA256(secret, label | sender | receiver | block). Each byte is
    used once: outgoing offsets only grow (leased ahead on disk), incoming ones must
    be above a persisted watermark."""

    def __init__(self, me: str, store: RelayStore, links: dict[str, _LinkPool]) -> None:
        self.me = me
        self._store = store
        self._links = links
        saved = store.counters()
        self._c: dict[tuple[str, str], int] = {}
        for nb in links:
            for name in ("out_lease", "in_mark", "bits_out", "bits_in", "keys_charged"):
                self._c[(nb, name)] = saved.get((nb, name), 0)
            # After a restart the next offset is the end of the last lease.
            self._c[(nb, "out_next")] = self._c[(nb, "out_lease")]
        self._hash = {nb: HashKey(_expand(p.secret, b"hash", *sorted((me, nb)),
                                          n=HASH_KEY_BYTES))
                      for nb, p in links.items()}

    def __repr__(self) -> str:
        return f"StoreLinkKeys({self.me!r}, neighbours={sorted(self._links)}, <keys redacted>)"

    def _stream(self, sender: str, receiver: str, offset: int, n: int) -> bytes:
        return link_stream(self._pool(sender if sender != self.me else receiver).secret,
                           sender, receiver, offset, n)

    def _pool(self, nb: str) -> _LinkPool:
        try:
            return self._links[nb]
        except KeyError:
            raise NetworkError(NetErrorCode.UNKNOWN_NODE,
                               f"no link key for neighbour {nb!r}") from None

    def _charge(self, nb: str, nbytes: int, *, strict: bool) -> None:
        """Take whole pool keys to cover the link-key bits used so far on this link
        (both ends of a hop charge the same bits: the pool is one pool)."""
        pool = self._pool(nb)
        key_size = pool.service.config.limits.key_size
        used = self._c[(nb, "bits_out")] + self._c[(nb, "bits_in")] + 8 * nbytes
        need = math.ceil(used / key_size) - self._c[(nb, "keys_charged")]
        if need > 0:
            if not pool.take_keys(need):
                if strict:
                    raise NetworkError(NetErrorCode.LINK_KEY, f"link key to {nb!r} exhausted "
                                       "(its pool is empty)")
                # The sender already spent these bytes: drain what is left.
                need = max(0, min(need, pool.service.ideal_level()))
                pool.take_keys(need)
            self._c[(nb, "keys_charged")] += need

    def hash_key(self, neighbour: str) -> HashKey:
        self._pool(neighbour)
        return self._hash[neighbour]

    def take(self, neighbour: str, nbytes: int) -> tuple[int, bytes]:
        self._charge(neighbour, nbytes, strict=True)
        off = self._c[(neighbour, "out_next")]
        self._c[(neighbour, "out_next")] = off + nbytes
        self._c[(neighbour, "bits_out")] += 8 * nbytes
        if off + nbytes > self._c[(neighbour, "out_lease")]:
            self._c[(neighbour, "out_lease")] = off + nbytes + _LEASE_BYTES
        self._save(neighbour)  # on disk before the frame under these bytes leaves
        return off, self._stream(self.me, neighbour, off, nbytes)

    def peek(self, neighbour: str, offset: int, nbytes: int) -> bytes:
        self._pool(neighbour)
        if offset < self._c[(neighbour, "in_mark")] or offset > 1 << 62:
            raise NetworkError(NetErrorCode.LINK_KEY, f"link key from {neighbour!r} at "
                               f"offset {offset} already used or not held")
        return self._stream(neighbour, self.me, offset, nbytes)

    def consume(self, neighbour: str, offset: int, nbytes: int) -> None:
        self._c[(neighbour, "in_mark")] = max(self._c[(neighbour, "in_mark")],
                                              offset + nbytes)
        self._charge(neighbour, nbytes, strict=False)
        self._c[(neighbour, "bits_in")] += 8 * nbytes
        self._save(neighbour)

    def _save(self, nb: str) -> None:
        self._store.set_counters({k: v for k, v in self._c.items()
                                  if k[0] == nb and k[1] != "out_next"})

    def usage(self) -> dict[str, dict[str, int]]:
        return {nb: {"bits_out": self._c[(nb, "bits_out")],
                     "bits_in": self._c[(nb, "bits_in")],
                     "pool_keys_charged": self._c[(nb, "keys_charged")]}
                for nb in sorted(self._links)}


class LinkKeys:
    """The node's LinkKeySupplier: each neighbour's calls go to its link's kind."""

    def __init__(self, ideal: StoreLinkKeys, bb84: PoolLinkKeys) -> None:
        self.ideal = ideal
        self.bb84 = bb84
        self._bb84 = frozenset(bb84.neighbours())

    def __repr__(self) -> str:
        return f"LinkKeys({self.ideal!r}, {self.bb84!r})"

    def _of(self, nb: str) -> StoreLinkKeys | PoolLinkKeys:
        return self.bb84 if nb in self._bb84 else self.ideal

    def hash_key(self, neighbour: str) -> HashKey:
        return self._of(neighbour).hash_key(neighbour)

    def take(self, neighbour: str, nbytes: int) -> tuple[int, bytes]:
        return self._of(neighbour).take(neighbour, nbytes)

    def peek(self, neighbour: str, offset: int, nbytes: int) -> bytes:
        return self._of(neighbour).peek(neighbour, offset, nbytes)

    def consume(self, neighbour: str, offset: int, nbytes: int) -> None:
        self._of(neighbour).consume(neighbour, offset, nbytes)

    def usage(self) -> dict[str, dict[str, int]]:
        return {**self.ideal.usage(), **self.bb84.usage()}


class _Channel:
    """One neighbour's relay connection (either side may have dialled). `lsa_key`
    authenticates the link-state adverts on it (relay frames carry their own tags)."""

    def __init__(self, neighbour: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, lsa_key: bytes) -> None:
        self.neighbour = neighbour
        self.reader = reader
        self.writer = writer
        self.lsa_key = lsa_key
        self.sent = 0  # LSA frames sent / the last counter received: no replay, no reorder
        self.received = 0

    def __repr__(self) -> str:
        return f"_Channel({self.neighbour!r}, <key redacted>)"

    def send(self, frame: bytes) -> None:
        self.writer.write(struct.pack(">I", len(frame)) + frame)

    async def recv(self) -> bytes:
        (n,) = struct.unpack(">I", await self.reader.readexactly(4))
        if n > _MAX_CHANNEL_FRAME:
            raise ValueError(f"relay frame of {n} bytes from {self.neighbour!r}")
        return await self.reader.readexactly(n)

    def close(self) -> None:
        self.writer.close()


class RelayService:
    """The relay at one KME: enc_keys/dec_keys for remote SAEs, the neighbour channels,
    the timer; everything the core says is done in `_pump`."""

    def __init__(self, config: KmeConfig, services: dict[str, KmeService]) -> None:
        assert config.network is not None
        self.config = config
        self.net = config.network
        self.me = config.kme_id
        self.services = services
        self.store = RelayStore(Path(f"{config.db}.relay"),
                                Sealer(load_or_create(config.storage_key)))
        self.pool_keys = PoolLinkKeys(self.me, self.store, {
            nb: svc for nb, svc in services.items() if svc.bb84 is not None})
        self._pools = {nb: _LinkPool(svc.config.link.secret, svc,
                                     self.pool_keys if svc.bb84 is not None else None)
                       for nb, svc in services.items()}
        self.keys = LinkKeys(StoreLinkKeys(self.me, self.store, {
            nb: p for nb, p in self._pools.items() if p.bb84_keys is None}), self.pool_keys)
        self.node = RelayNode(self.me, self.keys)
        self.channels: dict[str, _Channel] = {}
        self._waiting: dict[str, asyncio.Future[KeyDeliverable]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        self.port: int | None = None
        self.counters: dict[str, int] = {"relays_started": 0, "relays_delivered": 0,
                                         "relays_failed": 0, "keys_stored": 0,
                                         "keys_discarded": 0, "frames_rejected": 0,
                                         "frames_unsent": 0, "hello_refused": 0,
                                         "lsa_stale": 0, "lsa_rejected": 0,
                                         "keys_frames_rejected": 0}
        self.failures: dict[str, int] = {}
        self.rejections: dict[str, int] = {}  # frames dropped unattributed, by code
        self.latencies: list[float] = []  # end-to-end seconds per delivered relay
        self._started_at: dict[str, float] = {}
        self.paths_in_use: dict[str, list[list[str]]] = {}
        self.lsdb = LinkStateDb(self.net.topology())
        self._lsas: dict[str, LinkStateAd] = {}  # the latest advert of every origin
        self._lsa_seq = 0

    def __repr__(self) -> str:
        return f"RelayService({self.me!r}, channels={sorted(self.channels)})"

    def serves(self, sae_id: str) -> bool:
        return sae_id in self.net.remote_saes

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.net.relay_listen is not None:
            hp = self.net.relay_listen
            try:
                self._server = await asyncio.start_server(self._accept, hp.host, hp.port)
            except OSError as exc:
                self.store.close()
                raise self.config.error("[network] relay_listen", f"cannot listen on {hp} "
                                        f"({exc.strerror or exc})",
                                        "choose a free port") from None
            self.port = self._server.sockets[0].getsockname()[1]
        for nb in self.config.neighbours:
            if nb.relay is not None:
                self._tasks.append(asyncio.create_task(self._dial(nb.peer.kme_id,
                                                                  nb.relay.host,
                                                                  nb.relay.port)))
        self._tasks.append(asyncio.create_task(self._ticker()))
        for nb in self.pool_keys.neighbours():
            self._tasks.append(asyncio.create_task(self._top_up_loop(nb)))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for ch in list(self.channels.values()):
            ch.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(NetworkError(NetErrorCode.STATE, "KME stopping"))
        self.store.close()

    # ------------------------------------------------------------- channels

    def _secret(self, nb: str) -> bytes | None:
        pool = self._pools.get(nb)
        return pool.secret if pool is not None else None

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        nb = None
        try:
            nonce = secrets.token_bytes(_NONCE)
            writer.write(nonce)
            n = (await asyncio.wait_for(reader.readexactly(1), 10))[0]
            nb = (await asyncio.wait_for(reader.readexactly(n), 10)).decode("ascii", "replace")
            rest = await asyncio.wait_for(reader.readexactly(_NONCE + _MAC), 10)
            their, mac = rest[:_NONCE], rest[_NONCE:]
            secret = self._secret(nb)
            if secret is None or not hmac.compare_digest(
                    mac, _prf(secret, _HELLO + b"D", nonce, their, nb.encode(),
                              self.me.encode())):
                self.counters["hello_refused"] += 1
                log.warning("relay_hello_refused", claimed=nb[:64])
                writer.close()
                return
            writer.write(_prf(secret, _HELLO + b"L", nonce, their, nb.encode(),
                              self.me.encode()))
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            writer.close()
            return
        await self._run_channel(_Channel(nb, reader, writer, _prf(
            secret, _HELLO + b"K", nonce, their, nb.encode(), self.me.encode())))

    async def _dial(self, nb: str, host: str, port: int) -> None:
        secret = self._secret(nb)
        assert secret is not None
        attempt = 0
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                nonce = await asyncio.wait_for(reader.readexactly(_NONCE), 10)
                mine = secrets.token_bytes(_NONCE)
                writer.write(bytes([len(self.me)]) + self.me.encode() + mine
                             + _prf(secret, _HELLO + b"D", nonce, mine, self.me.encode(),
                                    nb.encode()))
                mac = await asyncio.wait_for(reader.readexactly(_MAC), 10)
                if not hmac.compare_digest(mac, _prf(secret, _HELLO + b"L", nonce, mine,
                                                     self.me.encode(), nb.encode())):
                    self.counters["hello_refused"] += 1
                    log.warning("relay_hello_refused", neighbour=nb, side="dialer")
                    writer.close()
                else:
                    attempt = 0
                    await self._run_channel(_Channel(nb, reader, writer, _prf(
                        secret, _HELLO + b"K", nonce, mine, self.me.encode(), nb.encode())))
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                pass
            await asyncio.sleep(_DIAL_BACKOFF_S[min(attempt, len(_DIAL_BACKOFF_S) - 1)])
            attempt += 1

    async def _run_channel(self, ch: _Channel) -> None:
        old = self.channels.get(ch.neighbour)
        if old is not None:
            old.close()
        self.channels[ch.neighbour] = ch
        log.info("relay_channel_up", neighbour=ch.neighbour)
        self._advertise()
        for lsa in self._lsas.values():  # what this node knows, so the new one catches up
            self._send_lsa(ch, lsa)
        if ch.neighbour in self.pool_keys.neighbours():
            # Keys reserved while the channel was down (or before a restart) may be
            # unknown over there: name them again; it skips what it holds.
            self._send_keys(ch, self.pool_keys.announce_list(ch.neighbour))
        try:
            while True:
                frame = await ch.recv()
                if frame[:1] == _LSA_MARK:
                    self._on_lsa(ch, frame)
                    continue
                if frame[:1] == _KEYS_MARK:
                    # Awaited here, before the next frame: Shares under these keys
                    # follow on the same connection.
                    await self._on_keys(ch, frame)
                    continue
                transit_share = bool(_CRASH) and self._is_transit_share(frame)
                if transit_share:
                    _crash_at("transit_on_share")
                self.node.receive_data(ch.neighbour, frame, time.monotonic())
                self._pump()
                if transit_share:
                    await ch.writer.drain()
                    _crash_at("transit_after_forward")
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if self.channels.get(ch.neighbour) is ch:
                del self.channels[ch.neighbour]
                self._advertise()
            ch.close()
            log.info("relay_channel_down", neighbour=ch.neighbour)

    def _is_transit_share(self, frame: bytes) -> bool:
        try:
            msg, *_ = decode_frame(frame)
        except NetworkError:
            return False
        return isinstance(msg, Share) and msg.path[-1] != self.me

    # ------------------------------------------------------ link-state adverts

    def _advertise(self) -> None:
        """This node's links as it sees them now (channel up, pool level), to the
        link-state db and every neighbour."""
        seq = max(self._lsa_seq + 1, time.time_ns() // 1000)  # grows across restarts
        self._lsa_seq = seq
        lsa = LinkStateAd(self.me, seq, tuple(
            LinkReport(nb, nb in self.channels, min(pool.level_bits(), MAX_POOL_BITS))
            for nb, pool in sorted(self._pools.items())))
        self._learn(lsa, None)

    def _learn(self, lsa: LinkStateAd, came_from: str | None) -> None:
        known = self._lsas.get(lsa.origin)
        if known is not None and known.seq >= lsa.seq:
            self.counters["lsa_stale"] += 1
            return
        try:
            self.lsdb.apply(lsa)
        except NetworkError as exc:
            self.counters["lsa_rejected"] += 1
            log.warning("lsa_rejected", origin=lsa.origin, reason=exc.reason)
            return
        self._lsas[lsa.origin] = lsa
        for nb, ch in self.channels.items():
            if nb != came_from:
                self._send_lsa(ch, lsa)  # flooding: each node passes on what is new

    def _send_lsa(self, ch: _Channel, lsa: LinkStateAd) -> None:
        ch.sent += 1
        body = struct.pack(">Q", ch.sent) + lsa.encode()
        ch.send(_LSA_MARK + body + _prf(ch.lsa_key, b"lsa", self.me.encode(), body))

    def _on_lsa(self, ch: _Channel, frame: bytes) -> None:
        body, mac = frame[1:-_MAC], frame[-_MAC:]
        if len(body) < 8 or not hmac.compare_digest(
                mac, _prf(ch.lsa_key, b"lsa", ch.neighbour.encode(), body)):
            self.counters["lsa_rejected"] += 1
            log.warning("lsa_rejected", neighbour=ch.neighbour, reason="bad tag")
            return
        (counter,) = struct.unpack(">Q", body[:8])
        if counter <= ch.received:
            self.counters["lsa_rejected"] += 1
            log.warning("lsa_rejected", neighbour=ch.neighbour, reason="replayed")
            return
        ch.received = counter
        try:
            lsa = LinkStateAd.decode(body[8:])
        except NetworkError as exc:
            self.counters["lsa_rejected"] += 1
            log.warning("lsa_rejected", neighbour=ch.neighbour, reason=exc.reason)
            return
        if lsa.origin != self.me:
            self._learn(lsa, ch.neighbour)

    # ------------------------------------------------- BB84 relay link keys

    def _send_keys(self, ch: _Channel, entries: list[tuple[int, str]]) -> None:
        for i in range(0, len(entries), MAX_KEYS_PER_FRAME):
            body = encode_keys(entries[i:i + MAX_KEYS_PER_FRAME])
            ch.send(_KEYS_MARK + body + _prf(ch.lsa_key, b"keys", self.me.encode(), body))

    async def _on_keys(self, ch: _Channel, frame: bytes) -> None:
        body, mac = frame[1:-_MAC], frame[-_MAC:]
        if ch.neighbour not in self.pool_keys.neighbours() or not hmac.compare_digest(
                mac, _prf(ch.lsa_key, b"keys", ch.neighbour.encode(), body)):
            self.counters["keys_frames_rejected"] += 1
            log.warning("relay_keys_rejected", neighbour=ch.neighbour, reason="bad tag")
            return
        try:
            entries = decode_keys(body)
        except (ValueError, struct.error, UnicodeDecodeError):
            self.counters["keys_frames_rejected"] += 1
            log.warning("relay_keys_rejected", neighbour=ch.neighbour, reason="malformed")
            return
        # A replayed frame is harmless: keys already held, or gone from the pool, are
        # skipped.
        await self.pool_keys.accept(ch.neighbour, entries)

    async def _top_up_loop(self, nb: str) -> None:
        """Keep the outgoing stream to `nb` ahead of need (relay_keys LOW/HIGH)."""
        while True:
            await asyncio.sleep(_TICK_S)
            try:
                await self.pool_keys.refresh_level(nb)
                ch = self.channels.get(nb)
                if ch is None:
                    continue
                entries = await self.pool_keys.top_up(nb)
                ch = self.channels.get(nb)
                if entries and ch is not None:
                    self._send_keys(ch, entries)
                    # Derive the link's hash key as soon as its bytes are here.
                    with contextlib.suppress(NetworkError):
                        self.pool_keys.hash_key(nb)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store or link failed: try again next tick
                log.exception("relay_top_up_failed", neighbour=nb)

    # ---------------------------------------------------------- the core

    async def _ticker(self) -> None:
        purge_at = advertise_at = 0.0
        while True:
            await asyncio.sleep(_TICK_S)
            self.node.handle_timer(time.monotonic())
            self._pump()
            if time.monotonic() >= advertise_at:
                advertise_at = time.monotonic() + _LSA_INTERVAL_S
                self._advertise()
            now = time.time()
            if now >= purge_at:
                purge_at = now + 30.0
                erased = self.store.purge(now - self.config.key_lifetime_s)
                if erased:
                    log.info("relayed_keys_expired", erased=erased)

    def _pump(self) -> None:
        """Send what the core queued, act on its events (which may queue more)."""
        while True:
            out = self.node.data_to_send()
            for to, frame in out:
                ch = self.channels.get(to)
                if ch is None:
                    # No channel: the relay fails by timeout, closed at both ends.
                    self.counters["frames_unsent"] += 1
                    continue
                ch.send(frame)
            progressed = bool(out)
            while (ev := self.node.next_event()) is not None:
                progressed = True
                try:
                    self._on_event(ev)
                except (sqlite3.Error, OSError):
                    # The store failed: this relay ends by timeout (no ACK was sent
                    # for a key not on disk); the channel and the other relays go on.
                    log.exception("relay_event_failed", event=type(ev).__name__,
                                  key_id=getattr(ev, "key_id", None))
            if not progressed:
                return

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, KeyAssembled):
            _crash_at("dest_before_store")
            try:
                self.store.store_key(ev.key_id, ev.master_sae, ev.slave_sae, ev.source,
                                     ev.key, time.time())
            except Exception:  # no ACK without the key on disk: the relay times out
                log.exception("relayed_key_not_stored", key_id=ev.key_id)
                return
            self.counters["keys_stored"] += 1
            _crash_at("dest_after_store")  # stored, the ACK not sent yet
            if not self.node.key_stored(ev.key_id, time.monotonic()):
                self.store.discard_key(ev.key_id)
        elif isinstance(ev, KeyDiscarded):
            if self.store.discard_key(ev.key_id):
                self.counters["keys_discarded"] += 1
        elif isinstance(ev, KeyDeliverable):
            _crash_at("source_after_acks")  # every ACK in, the master not answered yet
            self.counters["relays_delivered"] += 1
            t0 = self._started_at.pop(ev.key_id, None)
            if t0 is not None:
                self.latencies = [*self.latencies[-999:], time.monotonic() - t0]
            fut = self._waiting.pop(ev.key_id, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
        elif isinstance(ev, RelayFailed):
            self.counters["relays_failed"] += 1
            self.failures[ev.code.name] = self.failures.get(ev.code.name, 0) + 1
            log.warning("relay_failed", key_id=ev.key_id, role=ev.role, code=ev.code.name,
                        reason=ev.reason)
            self._started_at.pop(ev.key_id, None)
            fut = self._waiting.pop(ev.key_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(NetworkError(ev.code, ev.reason))
        elif isinstance(ev, FrameRejected):
            self.counters["frames_rejected"] += 1
            self.rejections[ev.code.name] = self.rejections.get(ev.code.name, 0) + 1
            log.warning("relay_frame_rejected", neighbour=ev.neighbour, code=ev.code.name,
                        reason=ev.reason)

    # ------------------------------------------------------------- routing

    def paths(self, master: str, slave: str) -> list[NetPath]:
        """Node-disjoint paths for a key to `slave`'s KME under the pair's policy, over
        links that are up (channel connected, pool not dry) here and in the adverts."""
        dest = self.net.remote_saes[slave]
        pol = self.net.policy(master, slave)
        # Far links as the latest adverts say (both ends must call a link up), this
        # node's own links as they are right now.
        topo = copy.deepcopy(self.lsdb.topology)
        for nb, pool in self._pools.items():
            topo.set_link(self.me, nb, up=nb in self.channels, pool_bits=pool.level_bits())
        return disjoint_paths(topo, self.me, dest, pol.k, max_hops=pol.max_hops,
                              avoid=pol.avoid)

    # ------------------------------------------------------------- ETSI 014

    def _check_size(self, size: int) -> None:
        if not MIN_KEY_BYTES * 8 <= size <= MAX_KEY_BYTES * 8:
            raise EtsiError(BAD_REQUEST, f"relayed keys are {MIN_KEY_BYTES * 8} to "
                            f"{MAX_KEY_BYTES * 8} bits",
                            [{"parameter": "size", "reason": "out of range for a relay"}])

    async def status(self, request: web.Request, caller: str) -> web.Response:
        slave = request.match_info["sae_id"]
        limits = self.config.limits
        try:
            paths = self.paths(caller, slave)
        except NetworkError:
            stored, paths = 0, []
        else:
            per_key = relay_cost_bits(paths, limits.key_size // 8)
            first = [self._pools[p[1]].level_bits() for p in paths]
            # What the first hops could carry now (this KME sees only its own pools).
            stored = min(limits.max_key_count, min(first) * len(paths) // max(per_key, 1))
        body = etsi014.build_status(
            source_kme_id=self.me, target_kme_id=self.net.remote_saes[slave],
            master_sae_id=caller, slave_sae_id=slave, limits=limits,
            stored_key_count=stored)
        body["status_extension"] = {"relay": {"paths": [list(p) for p in paths],
                                              "k": self.net.policy(caller, slave).k}}
        return web.json_response(body)

    async def enc_keys(self, request: web.Request, caller: str) -> web.Response:
        slave = request.match_info["sae_id"]
        limits = self.config.limits
        req = await enc_keys_request(request, limits)
        keys = await self.deliver_master(caller, slave, req.number, req.size)
        return web.json_response(etsi014.build_key_container(keys))

    async def deliver_master(self, master: str, slave: str, number: int,
                             size: int) -> list[QkdKey]:
        """Relay `number` fresh keys to `slave`'s KME; return them once every one is
        stored there (all ACKs in). Any failure: 503 and no key for the master."""
        self._check_size(size)
        try:
            paths = self.paths(master, slave)
        except NetworkError as exc:
            # The policy cannot be met: fail closed, and say why in the message itself
            # (clients show the message, not the details).
            raise EtsiError(SERVER_ERROR, f"{NO_KEY_MESSAGE}: no relay route: {exc.reason}",
                            [{"reason": f"no relay route: {exc.reason}"}]) from None
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[KeyDeliverable]] = []
        now = time.monotonic()
        try:
            for _ in range(number):
                key_id = self.node.start_relay(master, slave, paths, size // 8, now)
                self.counters["relays_started"] += 1
                fut: asyncio.Future[KeyDeliverable] = loop.create_future()
                self._waiting[key_id] = fut
                self._started_at[key_id] = now
                futs.append(fut)
        except NetworkError as exc:
            self._pump()
            for f in futs:
                f.cancel()
            raise EtsiError(SERVER_ERROR, NO_KEY_MESSAGE,
                            [{"reason": f"relay not started: {exc.reason}"}]) from None
        self.paths_in_use[f"{master}->{slave}"] = [list(p) for p in paths]
        self._pump()
        done = await asyncio.gather(*futs, return_exceptions=True)
        failed = [d for d in done if isinstance(d, BaseException)]
        if failed:
            codes = sorted({d.code.name if isinstance(d, NetworkError) else type(d).__name__
                            for d in failed})
            why = f"{len(failed)} of {number} relays failed ({', '.join(codes)})"
            raise EtsiError(SERVER_ERROR, f"{NO_KEY_MESSAGE}: {why}", [{"reason": why}])
        ok = [d for d in done if isinstance(d, KeyDeliverable)]
        self.store.record_master([(d.key_id, master, slave, d.destination) for d in ok],
                                 time.time())
        log.info("keys_delivered", role="master", master=master, slave=slave,
                 count=len(ok), size=size, relayed=True, key_ids=[d.key_id for d in ok])
        return [QkdKey(d.key_id, d.key) for d in ok]

    async def dec_keys(self, request: web.Request, caller: str) -> web.Response:
        master = request.match_info["sae_id"]
        key_ids = await dec_keys_request(request, self.config.limits)
        keys = await self.deliver_slave(master, caller, key_ids)
        return web.json_response(etsi014.build_key_container(keys))

    async def deliver_slave(self, master: str, slave: str,
                            key_ids: list[str]) -> list[QkdKey]:
        try:
            taken = self.store.take(key_ids, master, slave, time.time())
        except RelayKeyError as exc:
            if exc.status == 401:
                raise EtsiError(UNAUTHORIZED, f"key ID(s) were not issued for SAE {slave!r}",
                                [{"key_ID": k} for k in exc.key_ids]) from None
            raise EtsiError(BAD_REQUEST, f"key ID(s) {exc.reason} for master SAE {master!r} "
                            f"and slave SAE {slave!r}; a key is delivered once",
                            [{"key_ID": k} for k in exc.key_ids]) from None
        log.info("keys_delivered", role="slave", master=master, slave=slave,
                 count=len(taken), relayed=True, key_ids=[k for k, _ in taken])
        return [QkdKey(k, key) for k, key in taken]

    # --------------------------------------------------------------- status

    def snapshot(self) -> dict[str, Any]:
        """Counts and levels only (the admin /status `network` section)."""
        lat = sorted(self.latencies)

        def q(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

        return {
            "node": self.me,
            "topology": {"nodes": list(self.net.nodes),
                         "links": [{"a": x.a, "b": x.b, "up": x.up, "pool_bits": x.pool_bits,
                                    "advertised": x.a in self._lsas or x.b in self._lsas}
                                   for x in self.lsdb.topology.links.values()]},
            "neighbours": {nb: {"connected": nb in self.channels,
                                "link_type": pool.service.config.link.type,
                                "pool_keys": pool.level_keys(),
                                "pool_bits": pool.level_bits(),
                                **self.keys.usage()[nb]}
                           for nb, pool in sorted(self._pools.items())},
            "relay": dict(self.counters), "failures": dict(self.failures),
            "rejected": dict(self.rejections),
            "relayed_keys": self.store.counts(),
            "latency_p50_s": q(0.5), "latency_p99_s": q(0.99),
            "paths_in_use": dict(self.paths_in_use),
            "pad_bytes_per_hop": PAD_BYTES,
        }

