"""The KME process: an ETSI GS QKD 014 server over HTTPS with client certificates.

Request rules live in `qkd.etsi014.messages` (sans-I/O); this module only does HTTP, TLS, the
caller's identity, the key pool and the store:

- The caller's SAE ID is the CN of its TLS client certificate. TLS requires a
  certificate from the configured client CA, so a caller without one never reaches a
  handler; a handler only decides whether that SAE may ask *this*.
- enc_keys / status: caller is a local [[sae]], the path's slave a [peer] SAE.
- dec_keys: caller is a local [[sae]], the path's master a [peer] SAE, and every key ID
  must have been made by the link for exactly (master, caller).
- A delivery is committed to SQLite (`qkd.kme.keystore`) before its answer is written.

Key bytes exist only inside the JSON answer: they are never logged or put in errors.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import gc
import math
import os
import signal
import socket
import sqlite3
import ssl
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from qkd.common.errors import UserError
from qkd.common.files import write_link_ports, write_port_file
from qkd.common.log import configure_logging, get_logger
from qkd.common.storage_key import Sealer, StorageKeyError, load_or_create
from qkd.etsi014 import messages as etsi014
from qkd.etsi014.messages import (
    BAD_REQUEST,
    NO_KEY_MESSAGE,
    SERVER_ERROR,
    UNAUTHORIZED,
    EtsiError,
    QkdKey,
)
from qkd.kme import link_work, skip_api
from qkd.kme.config import KmeConfig
from qkd.kme.http import dec_keys_request, enc_keys_request
from qkd.kme.keystore import (
    AlreadyDelivered,
    AsyncKeyStore,
    PoolError,
    ReservedKey,
    SlaveDelivery,
    StoreError,
)
from qkd.kme.links import NetworkRouter, build_network_app, neighbour_config, network_status
from qkd.kme.refill import RefillGate, RefillPolicy
from qkd.kme.relay_keys import relay_sae
from qkd.kme.relay_service import RelayService
from qkd.link.bb84 import Bb84Link, Bb84Settings, LinkUnavailable
from qkd.link.core import LinkProtocolError
from qkd.link.ideal import COUNTER_LIMIT, IdealLink, InvalidKeyId, TokenBucket

log = get_logger("qkd.kme.service")

# Test hook: False brings back one RESERVE round trip per enc_keys request and no
# standing slice (the behaviour before issue 17); only the positive control sets it.
# Set through the environment so the control can run it in a real KME process.
PER_KEY_ENV = "QKDGW_TEST_PER_KEY_RESERVATIONS"
_BATCH_RESERVATIONS = os.environ.get(PER_KEY_ENV) != "1"
# Default-size keys per (master, slave) pair kept reserved at both KMEs ahead of the
# requests, so most enc_keys answers need no round trip to the peer; refilled in the
# background (one RESERVE) once half is used. The link's pool limit counts reserved
# blocks, so a master's stored_key_count falls while its slice drains.
STANDING_KEYS = 64
# Keys named in one RESERVE at most (frame size; the peer's parser allows 4096).
MAX_BATCH_KEYS = 1024


@dataclass
class _Waiter:
    """An enc_keys request waiting for the next batched RESERVE (`future` None: a
    standing-slice top-up with no request behind it)."""

    number: int
    future: asyncio.Future[list[ReservedKey]] | None

# Largest request body we read: max_key_per_request key IDs of ~60 bytes each fit
# many times over; anything bigger is not an ETSI 014 request.
_MAX_BODY = 256 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_ssl_context(config: KmeConfig) -> ssl.SSLContext:
    """TLS 1.2+ server context that requires a client cert from [tls] client_ca only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(config.tls.cert, config.tls.key)
    # Only the configured CA: never the system store, or any public-CA cert whose CN
    # happens to equal an SAE ID would be accepted.
    ctx.load_verify_locations(cafile=config.tls.client_ca)
    return ctx


class KmeService:
    """The request handlers and the state they share (pool, link, store)."""

    def __init__(self, config: KmeConfig, store: AsyncKeyStore, link: IdealLink,
                 clock: Callable[[], float] = time.monotonic,
                 bb84: Bb84Link | None = None) -> None:
        self.config = config
        self.store = store
        self.link = link
        # With the BB84 link, keys come from the pool the link deposits into; `link`
        # (the ideal one) is then unused.
        self.bb84 = bb84
        # The link's refill rule (qkd.kme.refill), for the admin status; None: no BB84.
        self.refill: RefillPolicy | None = None
        self._reserve_lock = asyncio.Lock()
        # Batched reservations: requests waiting for the next RESERVE, per
        # (master, slave, size), and the task that sends them.
        self._pending: dict[tuple[str, str, int], list[_Waiter]] = {}
        self._flusher: asyncio.Future[None] | None = None
        # Standing slices: default-size keys reserved at both KMEs for a pair and not
        # yet handed to its master SAE. In memory only: after a crash they stay
        # reserved (never handed out) until their lifetime ends, the safe direction.
        self._standing: dict[tuple[str, str], collections.deque[ReservedKey]] = {}
        self._standing_inflight: dict[tuple[str, str], int] = {}  # top-ups in a RESERVE
        self.reservation_batches = 0  # RESERVE messages this KME sent for enc_keys
        self.reservation_batch_keys = 0  # keys they carried (standing top-ups too)
        self.delivered_master = 0
        self._clock = clock
        self.bucket = TokenBucket(config.link.key_rate, config.limits.max_key_count, clock())
        self._local = frozenset(config.local_sae_ids)
        self._peers = frozenset(config.peer.sae_ids)
        # TLS connection -> its client certificate's CNs (dropped with the connection).
        self._peer_cns: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = \
            weakref.WeakKeyDictionary()

    def ideal_level(self) -> int:
        """Keys the ideal link could hand out now (its token bucket)."""
        return self.bucket.level(self._clock())

    # ------------------------------------------------------------ identity / checks

    def caller(self, request: web.Request) -> str:
        """The SAE ID (client certificate CN) of the caller, registered here; else 401."""
        transport = request.transport
        ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_obj is None:
            raise EtsiError(UNAUTHORIZED, "a TLS client certificate is required")
        # The certificate is fixed for the connection's life: its CNs are read once per
        # keep-alive connection, not once per request (getpeercert builds a dict of the
        # whole certificate each call). The registration check below stays per request.
        cns = self._peer_cns.get(ssl_obj)
        if cns is None:
            cert = ssl_obj.getpeercert()
            if not cert:
                # Unreachable with CERT_REQUIRED, kept so a misconfigured context fails
                # closed.
                raise EtsiError(UNAUTHORIZED, "a TLS client certificate is required")
            cns = tuple(value for rdn in cert.get("subject", ()) for (name, value) in rdn
                        if name == "commonName")
            self._peer_cns[ssl_obj] = cns
        if len(cns) != 1:
            raise EtsiError(UNAUTHORIZED, "client certificate must have exactly one CN "
                            "(the SAE ID)")
        sae_id: str = cns[0]
        if sae_id not in self._local:
            raise EtsiError(UNAUTHORIZED, f"SAE {sae_id!r} is not registered at KME "
                            f"{self.config.kme_id!r}")
        return sae_id

    def _peer_sae(self, request: web.Request, role: str) -> str:
        sae_id = request.match_info["sae_id"]
        if sae_id not in self._peers:
            raise EtsiError(BAD_REQUEST, f"unknown {role} SAE {sae_id!r}: not an SAE of "
                            f"peer KME {self.config.peer.kme_id!r}",
                            [{"parameter": f"{role}_SAE_ID", "reason": "unknown SAE"}])
        return sae_id

    # ------------------------------------------------------------------- handlers

    async def status(self, request: web.Request) -> web.Response:
        caller = self.caller(request)
        slave = self._peer_sae(request, "slave")
        if self.bb84 is not None:
            # Keys already reserved for this pair (its standing slice) are this
            # master's to ask for, so they count as stored for it. Read from the store
            # in one query: adding the in-memory slice to a separate free count could
            # catch a block in neither, and the level would dip and come back.
            now = time.time()
            free = await self.store.free_blocks(now)
            stored = min(self.config.limits.max_key_count,
                         await self.store.available_for(caller, slave, now))
        else:
            stored = self.bucket.level(self._clock())
        body = etsi014.build_status(
            source_kme_id=self.config.kme_id, target_kme_id=self.config.peer.kme_id,
            master_sae_id=caller, slave_sae_id=slave, limits=self.config.limits,
            stored_key_count=stored,
        )
        if self.bb84 is not None:
            # ETSI 014's own extension slot: the standard fields stay as they are.
            body["status_extension"] = {"qkd_link": self.bb84.status()
                                        | {"pool_free_blocks": free}}
        return web.json_response(body)

    async def enc_keys(self, request: web.Request) -> web.Response:
        caller = self.caller(request)
        slave = self._peer_sae(request, "slave")
        limits = self.config.limits
        req = await enc_keys_request(request, limits)

        # The pool counts keys of the default size; a bigger key uses several.
        cost = req.number * math.ceil(req.size / limits.key_size)
        if cost > limits.max_key_count:
            raise EtsiError(BAD_REQUEST, f"request needs {cost} stored keys of "
                            f"{limits.key_size} bits, the pool holds at most "
                            f"{limits.max_key_count}",
                            [{"parameter": "number", "reason": "ask for fewer or smaller keys"}])
        keys = await self.deliver_master(caller, slave, req.number, req.size)
        return web.json_response(etsi014.build_key_container(keys))

    async def deliver_master(self, caller: str, slave: str, number: int,
                             size: int) -> list[QkdKey]:
        """New keys for master SAE `caller` shared with `slave`, committed as delivered
        before they are returned (ETSI 014 enc_keys and SKIP's new key share this)."""
        if self.bb84 is not None:
            return await self._enc_keys_pool(caller, slave, number, size)
        cost = number * math.ceil(size / self.config.limits.key_size)
        # take() runs without an await before it, so concurrent requests cannot both
        # spend the same keys.
        if not self.bucket.take(cost, self._clock()):
            raise EtsiError(SERVER_ERROR, NO_KEY_MESSAGE,
                            [{"reason": f"{cost} stored keys needed, "
                                        f"{self.bucket.level(self._clock())} available"}])

        link = self.link
        try:
            allocated = await self.store.allocate(
                caller, slave, number, size,
                lambda i: link.key_id(caller, slave, i, size), COUNTER_LIMIT)
        except StoreError as exc:
            log.error("kme_store_refused", reason=str(exc))
            raise EtsiError(SERVER_ERROR, str(exc)) from None
        keys = [QkdKey(kid, link.key(caller, slave, i, size)) for i, kid in allocated]
        log.info("keys_delivered", role="master", master=caller, slave=slave,
                 count=len(keys), size=size, key_ids=[k.key_id for k in keys])
        return keys

    async def dec_keys(self, request: web.Request) -> web.Response:
        caller = self.caller(request)
        master = self._peer_sae(request, "master")
        key_ids = await dec_keys_request(request, self.config.limits)

        keys = await self.deliver_slave(master, caller, key_ids)
        return web.json_response(etsi014.build_key_container(keys))

    async def deliver_slave(self, master: str, caller: str,
                            key_ids: list[str]) -> list[QkdKey]:
        """The keys `master` obtained under `key_ids`, for slave SAE `caller`, each
        committed as delivered first (ETSI 014 dec_keys and SKIP's key by ID)."""
        if self.bb84 is not None:
            return await self._dec_keys_pool(master, caller, key_ids)
        items: list[SlaveDelivery] = []
        not_yours: list[str] = []
        unknown: list[str] = []
        for key_id in key_ids:
            try:
                counter, size = self.link.open_key_id(key_id, master, caller)
            except InvalidKeyId:
                owner = self._owner(key_id, exclude=(master, caller))
                if owner is not None and owner[1] != caller:
                    not_yours.append(key_id)
                else:
                    unknown.append(key_id)
                continue
            items.append(SlaveDelivery(key_id, master, caller, counter, size))
        if not_yours:
            raise EtsiError(UNAUTHORIZED, f"key ID(s) were not issued for SAE {caller!r}",
                            [{"key_ID": k} for k in not_yours])
        if unknown:
            raise EtsiError(BAD_REQUEST, f"key ID(s) unknown for master SAE {master!r} and "
                            f"slave SAE {caller!r}", [{"key_ID": k} for k in unknown])
        try:
            await self.store.deliver_to_slave(items)
        except AlreadyDelivered as exc:
            raise EtsiError(BAD_REQUEST, "key ID(s) already delivered; a key is delivered "
                            "once", [{"key_ID": k} for k in exc.key_ids]) from None
        keys = [QkdKey(it.key_id, self.link.key(master, caller, it.counter, it.size_bits))
                for it in items]
        log.info("keys_delivered", role="slave", master=master, slave=caller,
                 count=len(keys), key_ids=[k.key_id for k in keys])
        return keys

    async def _enc_keys_pool(self, master: str, slave: str, number: int,
                             size: int) -> list[QkdKey]:
        """Hand out keys reserved for (master, slave) at both KMEs: from the pair's
        standing slice when it holds enough (no round trip to the peer), else from a
        batched reservation. Either way the peer KME recorded the same reservation
        before this answer, so the slave SAE can fetch exactly these keys there and no
        other SAE can."""
        assert self.bb84 is not None
        pair = (master, slave)
        taken: list[tuple[str, bytes]] | None = None
        if size == self.config.limits.key_size:
            standing = self._standing.get(pair)
            # Popped without an await in between: two requests never get the same key.
            if standing is not None and len(standing) >= number:
                keys = [standing.popleft() for _ in range(number)]
                try:
                    taken = await self.store.take([k.key_id for k in keys], master, slave,
                                                  time.time())
                except PoolError as exc:
                    # Expired under us (lifetime): the rest of the slice is as old, so
                    # drop it (its blocks expire at both KMEs) and reserve afresh.
                    log.info("standing_reservation_dropped", master=master, slave=slave,
                             reason=exc.reason, keys=len(standing))
                    standing.clear()
            self._maybe_refill(pair)
        if taken is None:
            keys = await self._reserve(master, slave, number, size)
            try:
                taken = await self.store.take([k.key_id for k in keys], master, slave,
                                              time.time())
            except PoolError as exc:
                # The queued path may have served these from the standing slice
                # (`_reserve_group`), whose keys can have expired meanwhile: drop the
                # slice as above and reserve afresh, once (a second failure is real).
                standing = self._standing.get(pair)
                log.info("standing_reservation_dropped", master=master, slave=slave,
                         reason=exc.reason, keys=len(standing or ()))
                if standing:
                    standing.clear()
                keys = await self._reserve(master, slave, number, size)
                taken = await self.store.take([k.key_id for k in keys], master, slave,
                                              time.time())
        self.delivered_master += len(taken)
        log.info("keys_delivered", role="master", master=master, slave=slave,
                 count=len(taken), size=size, key_ids=[k for k, _ in taken])
        return [QkdKey(kid, key) for kid, key in taken]

    # ------------------------------------------------ batched reservations

    def standing_keys(self, master: str | None = None, slave: str | None = None) -> int:
        """Keys held in standing slices (reserved at both KMEs, not yet handed out),
        and top-ups on their way into one (reserved here, the peer asked)."""
        pairs = set(self._standing) | set(self._standing_inflight)
        return sum(len(self._standing.get(p, ())) + self._standing_inflight.get(p, 0)
                   for p in pairs if master in (None, p[0]) and slave in (None, p[1]))

    def _maybe_refill(self, pair: tuple[str, str]) -> None:
        """Below half its target, a pair's standing slice is topped up in the background
        (one RESERVE for the whole top-up, riding along with any waiting requests)."""
        if not _BATCH_RESERVATIONS or STANDING_KEYS <= 0:
            return
        if len(self._standing.get(pair, ())) > STANDING_KEYS // 2:
            return
        group = (*pair, self.config.limits.key_size)
        waiters = self._pending.setdefault(group, [])
        if not any(w.future is None for w in waiters):
            waiters.append(_Waiter(0, None))
        self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_reservations())

    async def _reserve(self, master: str, slave: str, number: int,
                       size: int) -> list[ReservedKey]:
        """Keys reserved here and confirmed by the peer KME for this request. Requests
        that arrive while a RESERVE is in flight wait and go out together in the next
        one: one message (one pad per direction) for all of them."""
        fut: asyncio.Future[list[ReservedKey]] = asyncio.get_running_loop().create_future()
        if not _BATCH_RESERVATIONS:
            async with self._reserve_lock:
                await self._reserve_group(master, slave, size, [_Waiter(number, fut)],
                                          standing=False)
            return fut.result()
        self._pending.setdefault((master, slave, size), []).append(_Waiter(number, fut))
        self._kick()
        return await fut

    async def _flush_reservations(self) -> None:
        """The only task that sends reservations while batching is on: one batch per
        (master, slave, size) group at a time, so everything that queued up meanwhile
        goes out in the next message."""
        while self._pending:
            group = next(iter(self._pending))
            waiters = self._pending.pop(group)
            batch: list[_Waiter] = []
            keys_in_batch = 0
            for w in waiters:
                # A RESERVE names at most MAX_BATCH_KEYS keys (the frame stays small,
                # the peer's parser caps it); the rest goes in the next message.
                if batch and keys_in_batch + w.number > MAX_BATCH_KEYS:
                    self._pending.setdefault(group, []).append(w)
                    continue
                batch.append(w)
                keys_in_batch += w.number
            master, slave, size = group
            async with self._reserve_lock:
                try:
                    await self._reserve_group(master, slave, size, batch, standing=True)
                except Exception as exc:  # the store's errors: every waiter hears it
                    for w in batch:
                        if w.future is not None and not w.future.done():
                            w.future.set_exception(exc)

    async def _reserve_group(self, master: str, slave: str, size: int,
                             waiters: list[_Waiter], *, standing: bool) -> None:
        """Reserve for every waiter (plus a standing top-up) in one local transaction
        and one RESERVE; resolve each waiter's future with its keys or a 503."""
        assert self.bb84 is not None
        limits = self.config.limits
        now = time.time()
        blocks_per_key = math.ceil(size / limits.key_size)
        pair = (master, slave)
        # Waiters for default-size keys that the pair's standing slice covers now take
        # them from it: a top-up may have landed while they queued behind it, and with
        # the free pool empty they would get a 503 with keys reserved for their pair.
        if size == limits.key_size:
            slice_keys = self._standing.get(pair)
            for w in waiters:
                if (slice_keys and w.future is not None and not w.future.done()
                        and len(slice_keys) >= w.number):
                    w.future.set_result([slice_keys.popleft() for _ in range(w.number)])
        free = await self.store.free_blocks(now)
        # Serve the waiters in arrival order while the pool has room; the others get a
        # 503 now (the pool really is short), not after a round trip.
        served: list[_Waiter] = []
        need = 0
        for w in waiters:
            if w.future is None or w.future.done():
                continue
            if (need + w.number) * blocks_per_key <= free:
                served.append(w)
                need += w.number
            else:
                w.future.set_exception(EtsiError(SERVER_ERROR, NO_KEY_MESSAGE, [{
                    "reason": f"no key available: {free} blocks of {limits.key_size} "
                              "bits in the pool"}]))
        extra = 0
        if standing and size == limits.key_size and STANDING_KEYS > 0:
            have = len(self._standing.get(pair, ()))
            # A slice never takes more than a quarter of what is left after this
            # batch, so one pair's slice cannot starve another pair's requests.
            extra = max(0, min(STANDING_KEYS - have, (free - need) // 4,
                               MAX_BATCH_KEYS - need))
        if need + extra == 0:
            return
        role = self.config.link.role
        try:
            keys = await self.store.reserve(master, slave, need + extra, size, now,
                                            newest_first=role == "bob")
        except PoolError as exc:
            for w in served:
                w.future.set_exception(EtsiError(  # type: ignore[union-attr]
                    SERVER_ERROR, NO_KEY_MESSAGE, [{"reason": exc.reason}]))
            return
        self.reservation_batches += 1
        self.reservation_batch_keys += len(keys)
        # The top-up's keys are out of the free pool now and join the slice only once
        # the peer confirms: count them meanwhile, or the pair's stored_key_count dips
        # for a round trip and comes back, which a forecaster reads as production.
        topup = len(keys) - need
        self._standing_inflight[pair] = self._standing_inflight.get(pair, 0) + topup
        try:
            await self.bb84.reserve_at_peer(master, slave, keys)
        except LinkUnavailable as exc:
            await self.store.release(keys)
            log.warning("keys_not_reserved_at_peer", master=master, slave=slave,
                        keys=len(keys), requests=len(served), reason=str(exc))
            for w in served:
                w.future.set_exception(EtsiError(  # type: ignore[union-attr]
                    SERVER_ERROR, NO_KEY_MESSAGE, [{"reason": str(exc)}]))
            return
        finally:
            self._standing_inflight[pair] -= topup
        i = 0
        for w in served:
            assert w.future is not None
            mine, i = keys[i:i + w.number], i + w.number
            if w.future.done():
                # Its caller went away (disconnected): the keys stay reserved at both
                # KMEs for this pair; keep default-size ones for the next request.
                if standing and size == limits.key_size:
                    self._standing.setdefault(pair, collections.deque()).extend(mine)
                continue
            w.future.set_result(mine)
        if keys[i:]:
            self._standing.setdefault(pair, collections.deque()).extend(keys[i:])

    async def _dec_keys_pool(self, master: str, slave: str,
                             key_ids: list[str]) -> list[QkdKey]:
        try:
            taken = await self.store.take(key_ids, master, slave, time.time())
        except PoolError as exc:
            status = UNAUTHORIZED if exc.reason == "not reserved for this SAE pair" \
                else BAD_REQUEST
            msg = (f"key ID(s) were not issued for SAE {slave!r}" if status == UNAUTHORIZED
                   else f"key ID(s) {exc.reason} for master SAE {master!r} and slave SAE "
                        f"{slave!r}; a key is delivered once")
            raise EtsiError(status, msg, [{"key_ID": k} for k in exc.key_ids]) from None
        log.info("keys_delivered", role="slave", master=master, slave=slave,
                 count=len(taken), key_ids=[k for k, _ in taken])
        return [QkdKey(kid, key) for kid, key in taken]

    def _owner(self, key_id: str, exclude: tuple[str, str]) -> tuple[str, str] | None:
        """Which other (master, slave) pair of this KME a key ID belongs to, if any.

        Only used to answer 401 rather than 400 when an SAE presents a real key ID
        that was made for someone else; key IDs are not secret, so this tells the
        caller nothing it could not learn from the wire."""
        pairs = [(m, s) for m in self._peers for s in self._local]
        pairs += [(m, s) for m in self._local for s in self._peers]
        for pair in sorted(pairs):
            if pair == exclude:
                continue
            try:
                self.link.open_key_id(key_id, *pair)
            except InvalidKeyId:
                continue
            return pair
        return None


@web.middleware
async def _etsi_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an ETSI Error JSON body with 400/401/503 (or the HTTP
    status aiohttp chose, e.g. 404/405/413, still with a JSON body)."""
    try:
        return await handler(request)
    except EtsiError as exc:
        level = log.warning if exc.status == UNAUTHORIZED else log.info
        level("kme_request_refused", status=exc.status, reason=exc.message,
              method=request.method, path=request.path)
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(etsi014.build_error(exc.reason), status=exc.status)
    except (sqlite3.Error, OSError):
        log.exception("kme_store_error", method=request.method, path=request.path)
        return web.json_response(etsi014.build_error("key store error"), status=SERVER_ERROR)


def build_app(service: KmeService) -> web.Application:
    app = web.Application(middlewares=[_etsi_errors], client_max_size=_MAX_BODY)
    base = etsi014.API_PREFIX + "/{sae_id}"
    app.router.add_get(base + "/status", service.status, allow_head=False)
    app.router.add_get(base + "/enc_keys", service.enc_keys, allow_head=False)
    app.router.add_post(base + "/enc_keys", service.enc_keys)
    app.router.add_get(base + "/dec_keys", service.dec_keys, allow_head=False)
    app.router.add_post(base + "/dec_keys", service.dec_keys)
    skip_api.add_routes(app, service)
    return app


@dataclass
class RunningKme:
    """A KME serving in this event loop. `close()` stops it and closes the store."""

    config: KmeConfig
    host: str
    port: int
    service: KmeService
    _runner: web.AppRunner
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    link: Bb84Link | None = None
    admin_runner: web.AppRunner | None = None
    admin_port: int | None = None
    relay_port: int | None = None  # [network] relay_listen, bound
    # Several links (issue 11): every link's service (`service` is the first) and the
    # relay to non-adjacent KMEs; closed with the rest.
    services: list[KmeService] = field(default_factory=list)
    relay: RelayService | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.relay is not None:
            await self.relay.close()
        if self.link is not None:
            await self.link.close()
        for svc in self.services[1:]:
            if svc.bb84 is not None:
                await svc.bb84.close()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        try:
            await self._runner.cleanup()
        finally:
            await self.service.store.close()
            await _close_stores(self.services[1:])


async def _purge_loop(store: AsyncKeyStore, lifetime: float) -> None:
    """Erase pool blocks past their lifetime; the interval keeps an expired block's
    material on disk for at most a quarter of its lifetime (and never over a minute)."""
    interval = min(60.0, max(0.5, lifetime / 4))
    while True:
        try:
            erased = await store.purge_expired(time.time())
        except (sqlite3.Error, OSError):
            log.exception("kme_purge_failed")
        else:
            if erased:
                log.info("key_blocks_expired", erased=erased)
        await asyncio.sleep(interval)


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _warn_ideal(config: KmeConfig) -> None:
    log.warning(        "ideal_link_no_quantum_security",
        message="IDEAL LINK: keys are derived from a pre-shared file, NOT from QKD. They "
                "give NO quantum security; anyone with the link secret file can compute "
                "every key. Use only for tests and demos.",
        link_file=str(config.link.secret_file),
    )
    with contextlib.suppress(OSError):
        if config.link.secret_file.stat().st_mode & 0o077:
            # Anyone who can read this file can compute every key this KME delivers.
            log.warning("link_secret_file_not_private", link_file=str(config.link.secret_file),
                        fix="chmod 600 the file (qkdgw pki init writes it that way)")


async def open_service(config: KmeConfig, clock: Callable[[], float] = time.monotonic,
                       *, relay_of: str | None = None) -> KmeService:
    """The store, the link (not started) and the service of one link's KME config.
    `relay_of` (this KME's ID, when it relays): the BB84 link also accepts RESERVEs
    for the relay's pseudo SAEs (qkd.kme.relay_keys), for its relay link keys."""
    link = IdealLink(config.link.secret)
    try:
        sealer = Sealer(load_or_create(config.storage_key))
    except StorageKeyError as exc:
        raise config.error("[kme] storage_key", str(exc), "see the message") from None
    except OSError as exc:
        raise config.error("[kme] storage_key", f"cannot create or read "
                           f"{str(config.storage_key)!r} ({exc.strerror})",
                           "point it at a writable location on a local disk") from None
    try:
        store = await AsyncKeyStore.open(config.db, config.kme_id, sealer)
    except StoreError as exc:
        raise config.error("[kme] db", str(exc), "see the message") from None
    except (sqlite3.Error, OSError) as exc:
        raise config.error("[kme] db", f"cannot open {str(config.db)!r} ({exc})",
                           "point it at a writable file on a local disk") from None

    bb84: Bb84Link | None = None
    gate: RefillGate | None = None
    if config.link.type == "bb84":
        lcfg = config.link
        settings = Bb84Settings(role=lcfg.role, params=lcfg.params,
                                bootstrap_key=lcfg.secret, peer=lcfg.peer,
                                quantum=lcfg.quantum, listen=lcfg.listen,
                                quantum_listen=lcfg.quantum_listen,
                                round_timeout_s=lcfg.round_timeout_s)
        assert lcfg.state_file is not None
        # Any block ever stored (free, reserved, delivered, expired) is key history:
        # a missing link state file over it is refused, not re-bootstrapped.
        history = sum((await store.pool_counts(0.0)).values())  # expired ones too
        relay_local = (relay_sae(relay_of),) if relay_of is not None else ()
        relay_peer = (relay_sae(config.peer.kme_id),) if relay_of is not None else ()
        try:
            # The link reads the pool through the low-water mark (qkd.kme.refill).
            gate = RefillGate(store, RefillPolicy(config.limits.max_key_count,
                                                  lcfg.refill_below), time.monotonic)
            bb84 = Bb84Link(settings, gate, sealer, lcfg.state_file, key_history=history,
                            key_size_bits=config.limits.key_size,
                            lifetime_s=config.key_lifetime_s,
                            max_key_count=config.limits.max_key_count,
                            local_saes=(*config.local_sae_ids, *relay_local),
                            peer_saes=(*config.peer.sae_ids, *relay_peer))
        except LinkProtocolError as exc:
            await store.close()
            raise config.error("[link] state_file", str(exc), "see the message") from None
    service = KmeService(config, store, link, clock, bb84)
    service.refill = gate.policy if gate is not None else None
    return service


def _tls_context(config: KmeConfig) -> ssl.SSLContext:
    try:
        return server_ssl_context(config)
    except (ssl.SSLError, OSError) as exc:
        raise config.error("[tls] cert", f"cannot load TLS files ({exc})",
                           "check [tls] cert, key and client_ca") from None


async def _serve_https(runner: web.AppRunner, config: KmeConfig,
                       ssl_ctx: ssl.SSLContext) -> int:
    """Set the app up and serve it on `[kme] listen`; returns the bound port."""
    await runner.setup()
    try:
        sock = _bind(config.listen.host, config.listen.port)
    except OSError as exc:
        raise UserError(f"{config.source}: [kme] listen: cannot listen on "
                        f"{config.listen} ({exc.strerror or exc}) (fix: choose a free "
                        "port or stop the other process)") from None
    await web.SockSite(runner, sock, ssl_context=ssl_ctx).start()
    return int(sock.getsockname()[1])


async def start_kme(config: KmeConfig, *,
                    clock: Callable[[], float] = time.monotonic) -> RunningKme:
    """Open the store, bind `[kme] listen` (port 0 = any free port) and serve."""
    if len(config.neighbours) > 1 or config.network is not None:
        return await _start_network_kme(config, clock)
    if config.link.type == "ideal":
        _warn_ideal(config)
    ssl_ctx = _tls_context(config)
    service = await open_service(config, clock)
    store, bb84 = service.store, service.bb84
    runner = web.AppRunner(build_app(service), access_log=None, shutdown_timeout=5.0)
    try:
        if bb84 is not None:
            try:
                await bb84.start()
            except OSError as exc:
                raise UserError(f"{config.source}: [link] listen: cannot listen "
                                f"({exc.strerror or exc}) (fix: choose free ports for "
                                "listen and quantum_listen)") from None
        port = await _serve_https(runner, config, ssl_ctx)
    except BaseException:
        if bb84 is not None:
            await bb84.close()
        await runner.cleanup()
        await store.close()
        raise
    running = RunningKme(config, config.listen.host, port, service, runner, link=bb84)
    running.tasks.append(asyncio.create_task(_purge_loop(store, config.key_lifetime_s)))
    if config.admin_listen is not None:
        try:
            await _start_admin(running)
        except BaseException:
            await running.close()
            raise
    log.info("kme_started", kme_id=config.kme_id, listen=f"{config.listen.host}:{port}",
             url=running.url, link_type=config.link.type, key_rate=config.link.key_rate,
             local_saes=list(config.local_sae_ids), peer_kme=config.peer.kme_id,
             peer_saes=list(config.peer.sae_ids), db=str(config.db))
    return running


async def _close_stores(services: list[KmeService]) -> None:
    for svc in services:
        with contextlib.suppress(sqlite3.Error, OSError):
            await svc.store.close()


async def _start_network_kme(config: KmeConfig, clock: Callable[[], float]) -> RunningKme:
    """Several links or a relay (issue 11): one service per link (qkd.kme.links routes
    requests between them), the relay, one HTTPS port."""
    ssl_ctx = _tls_context(config)
    services: list[KmeService] = []
    relay: RelayService | None = None
    runner: web.AppRunner | None = None
    try:
        for nb in config.neighbours:
            sub = neighbour_config(config, nb)
            if nb.link.type == "ideal":
                _warn_ideal(sub)
            services.append(await open_service(
                sub, clock, relay_of=config.kme_id if config.network is not None else None))
        if config.network is not None:
            relay = RelayService(config, {s.config.peer.kme_id: s for s in services})
            await relay.start()
        for i, svc in enumerate(services):
            if svc.bb84 is not None:
                try:
                    await svc.bb84.start()
                except OSError as exc:
                    raise UserError(f"{config.source}: [neighbour][{i}] link listen: cannot "
                                    f"listen ({exc.strerror or exc}) (fix: choose free "
                                    "ports for listen and quantum_listen)") from None
        router = NetworkRouter(config, services, relay)
        runner = web.AppRunner(build_network_app(router, _etsi_errors), access_log=None,
                               shutdown_timeout=5.0)
        port = await _serve_https(runner, config, ssl_ctx)
    except BaseException:
        if relay is not None:
            await relay.close()
        for svc in services:
            if svc.bb84 is not None:
                await svc.bb84.close()
        if runner is not None:
            await runner.cleanup()
        await _close_stores(services)
        raise
    running = RunningKme(config, config.listen.host, port, services[0], runner,
                         link=services[0].bb84, services=services, relay=relay,
                         relay_port=relay.port if relay is not None else None)
    for svc in services:
        running.tasks.append(asyncio.create_task(
            _purge_loop(svc.store, config.key_lifetime_s)))
    if config.admin_listen is not None:
        try:
            await _start_admin(running)
        except BaseException:
            await running.close()
            raise
    log.info("kme_started", kme_id=config.kme_id, listen=f"{config.listen.host}:{port}",
             url=running.url, local_saes=list(config.local_sae_ids),
             neighbours={nb.peer.kme_id: {"link_type": nb.link.type,
                                          "saes": list(nb.peer.sae_ids)}
                         for nb in config.neighbours},
             relay_port=running.relay_port,
             remote_saes=dict(config.network.remote_saes) if config.network else {})
    return running


async def _start_admin(running: RunningKme) -> None:
    from qkd.kme.admin import build_admin_app

    addr = running.config.admin_listen
    assert addr is not None
    network: Callable[[], dict[str, Any]] | None = None
    if running.services:
        network = functools.partial(network_status, running.services, running.relay)
    runner = web.AppRunner(build_admin_app(running.service, network=network),
                           access_log=None)
    await runner.setup()
    running.admin_runner = runner
    try:
        sock = _bind(addr.host, addr.port)
    except OSError as exc:
        raise UserError(f"{running.config.source}: [admin] listen: cannot listen on {addr} "
                        f"({exc.strerror or exc}) (fix: choose a free port or remove "
                        "[admin])") from None
    running.admin_port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    log.info("kme_admin_listening", address=f"{addr.host}:{running.admin_port}")


GC_FREEZE_ENV = "QKDGW_KME_GC_FREEZE"  # 0 turns it off (the benchmarks' comparison)


def freeze_startup_heap() -> bool:
    """Move everything alive after startup (modules, numpy/scipy, the app, the store)
    out of the cyclic GC's reach, unless QKDGW_KME_GC_FREEZE=0.

    Measured with perf on a KME's event-loop thread at C=8 (issue 17): about a quarter
    of its CPU was the collector walking that long-lived heap, again and again, for
    requests that leave no cycles. Frozen objects are still freed by reference
    counting; only cycles among them (long-lived by construction) are never found."""
    if os.environ.get(GC_FREEZE_ENV, "1") == "0":
        return False
    gc.collect()
    gc.freeze()
    return True


async def serve(config: KmeConfig, port_file: Path | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly."""
    loop = asyncio.get_running_loop()
    link_work.install(loop)  # before the link starts: its round work at lower priority
    running = await start_kme(config)
    freeze_startup_heap()
    stop = asyncio.Event()
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        if port_file is not None:
            try:
                if running.link is not None and running.link.ports:
                    # Written first: a launcher that sees the port file may rely on it.
                    write_link_ports(port_file, running.link.ports)
                if running.admin_port is not None:
                    write_link_ports(port_file, {"admin": running.admin_port}, ".admin")
                if running.relay_port is not None:
                    write_link_ports(port_file, {"relay": running.relay_port}, ".relay")
                write_port_file(port_file, running.port)
            except OSError as exc:
                raise UserError(f"--port-file {port_file}: cannot write ({exc.strerror})"
                                ) from None
        await stop.wait()
        log.info("kme_stopping", kme_id=config.kme_id)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await running.close()
        if port_file is not None:
            # A stale port file would point the next launcher at a dead (or foreign) port.
            for stale in (port_file, port_file.with_name(port_file.name + ".admin"),
                          port_file.with_name(port_file.name + ".relay")):
                with contextlib.suppress(OSError):
                    stale.unlink()
        log.info("kme_stopped", kme_id=config.kme_id)


# GIL switch interval of a KME process, s (CPython's default is 5 ms). The link's
# work items (Cascade, privacy amplification) run Python on a worker thread for
# seconds; every hand-off on the request path (event loop -> store thread -> event
# loop) waited up to a full interval for them, which added milliseconds per key.
SWITCH_INTERVAL_S = 0.0005


def _handle(args: argparse.Namespace) -> int:
    config = KmeConfig.load(args.config)
    configure_logging(config.log_level, config.log_format, process="kme", cache=True)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.port_file))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "kme", help="run a key management entity (ETSI GS QKD 014 server)",
        description="Run a KME: serves ETSI GS QKD 014 over HTTPS with client "
                    "certificates until SIGINT/SIGTERM.")
    p.add_argument("--config", required=True, type=Path, metavar="FILE",
                   help="KME config (TOML), see configs/kme-a.toml")
    p.add_argument("--port-file", type=Path, metavar="PATH", default=None,
                   help="write the bound TCP port to PATH once listening "
                        "(useful with listen = '127.0.0.1:0')")
    p.set_defaults(handler=_handle)


__all__ = ["KmeService", "RunningKme", "build_app", "register_cli", "serve", "start_kme"]

