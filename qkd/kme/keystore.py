"""The KME's durable record of keys and deliveries (SQLite, stdlib sqlite3).

Two kinds of key source use it:

- the *ideal link* derives keys from its secret, so for it the store only remembers
  *who got what* (`counters`, `deliveries` below);
- a *real link* (the BB84 link between the KMEs) deposits key blocks into `pool`,
  sealed under the KME's storage key (`qkd.common.storage_key`: AES-256-GCM, key ID as
  associated data). A block is reserved for one (master, slave) pair, handed to this
  KME's SAE once, and then its material is overwritten (NULL, with SQLite's
  secure_delete zeroing the freed page bytes); the row stays as a tombstone so the
  key ID can never be served again. Blocks past their lifetime are erased the same way.
  The WAL is checkpointed with TRUNCATE before `take()` returns, so the answer leaves
  only once the sealed block is in neither the main file nor the WAL.

What makes "delivered to its master SAE once and to its slave SAE once, never again,
also across restarts" hold for the ideal link:

- `counters`: per ordered (master, slave) pair, the next counter the master's KME may
  hand out. Allocation bumps it in the same transaction that records the deliveries,
  so a counter is never issued twice even if the process dies right after.
- `deliveries`: one row per key ID delivered, with the role (master or slave) it was
  delivered to. The slave side's uniqueness check is the PRIMARY KEY on key_id.

The database file is created 0600 in a 0700 directory (its -wal and -shm files too),
so only the service user can read it.

Every write is a `BEGIN IMMEDIATE` transaction committed with `synchronous=FULL` under
WAL before the caller gets its answer, so an HTTP answer never describes a delivery
the disk does not yet know about. A crash between commit and answer loses those keys
(they are never re-sent), which is the safe direction.

`KeyStore` is synchronous and must be used from one thread; `AsyncKeyStore` runs it on
a single dedicated worker thread, which both keeps the event loop free and serialises
all writers. Its `take` is a group commit: the takes waiting when the thread gets to
them share one transaction and one WAL checkpoint (each request still all or none:
the group is checked in memory, then one UPDATE marks the accepted requests' keys),
so concurrent requests share the fsyncs.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qkd.common.errors import QkdError
from qkd.common.private_db import open_private_db
from qkd.common.storage_key import Sealer
from qkd.link.pool import PoolError, ReservedKey

T = TypeVar("T")

SCHEMA_VERSION = 2

# Test hook: False makes every `AsyncKeyStore.take` its own transaction again (the
# behaviour before group commits); only the positive controls set it.
_GROUP_TAKES = True

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    master TEXT NOT NULL,
    slave  TEXT NOT NULL,
    next   INTEGER NOT NULL CHECK (next >= 0),
    PRIMARY KEY (master, slave)
);
CREATE TABLE IF NOT EXISTS deliveries (
    key_id       TEXT PRIMARY KEY,
    role         TEXT NOT NULL CHECK (role IN ('master', 'slave')),
    master       TEXT NOT NULL,
    slave        TEXT NOT NULL,
    counter      INTEGER NOT NULL,
    size_bits    INTEGER NOT NULL,
    delivered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pool (
    block_id  TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL UNIQUE,
    size_bits INTEGER NOT NULL,
    material  BLOB,
    state     TEXT NOT NULL CHECK (state IN ('free', 'reserved', 'delivered', 'expired')),
    key_id    TEXT,
    part      INTEGER,
    master    TEXT,
    slave     TEXT,
    key_bits  INTEGER,
    created   REAL NOT NULL,
    expires   REAL NOT NULL,
    CHECK ((state IN ('free', 'reserved')) = (material IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS pool_free ON pool(state, seq);
CREATE INDEX IF NOT EXISTS pool_key ON pool(key_id);
CREATE INDEX IF NOT EXISTS pool_live ON pool(state, expires);
"""


class StoreError(QkdError):
    """The store cannot be used (wrong owner, newer schema, exhausted counter space)."""


class AlreadyDelivered(QkdError):
    """Some key IDs were delivered before; nothing of the request was recorded."""

    def __init__(self, key_ids: Sequence[str]) -> None:
        super().__init__(f"{len(key_ids)} key ID(s) already delivered")
        self.key_ids = list(key_ids)


@dataclass(frozen=True)
class SlaveDelivery:
    key_id: str
    master: str
    slave: str
    counter: int
    size_bits: int


class KeyStore:
    def __init__(self, path: Path, kme_id: str, sealer: Sealer | None = None) -> None:
        self.path = path
        self._sealer = sealer
        self._erase_wal = True

        def setup(db: sqlite3.Connection) -> None:
            self._db = db
            self._init(kme_id)

        # Owner-only files, WAL + synchronous=FULL, freed pages zeroed: the store holds
        # (sealed) key material and the delivery history.
        self._db = open_private_db(path, setup)

    def _init(self, kme_id: str) -> None:
        db = self._db
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"database schema version {version} is newer than this "
                             f"program's {SCHEMA_VERSION}; upgrade qkdgw")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            row = db.execute("SELECT value FROM meta WHERE name='kme_id'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta(name, value) VALUES ('kme_id', ?)", (kme_id,))
            elif row[0] != kme_id:
                # Two KMEs sharing one file, or a config edit: either way the delivery
                # history would be mixed up; refuse instead of guessing.
                raise StoreError(f"database belongs to KME {row[0]!r}, not {kme_id!r}; "
                                 "give each KME its own db file")

    def _transaction(self) -> _Txn:
        return _Txn(self._db)

    def allocate(self, master: str, slave: str, count: int, size_bits: int,
                 make_id: Callable[[int], str], limit: int) -> list[tuple[int, str]]:
        """Reserve `count` fresh counters for master -> slave and record them as
        delivered to the master. Returns [(counter, key_id)], committed to disk."""
        if count < 1:
            raise ValueError("count must be at least 1")
        db = self._db
        with self._transaction():
            row = db.execute("SELECT next FROM counters WHERE master=? AND slave=?",
                             (master, slave)).fetchone()
            start = row[0] if row else 0
            if start + count > limit:
                raise StoreError(f"key ID space for {master} -> {slave} is exhausted; "
                                 "rotate the link secret and start a new database")
            out = [(i, make_id(i)) for i in range(start, start + count)]
            now = time.time()
            db.executemany(
                "INSERT INTO deliveries(key_id, role, master, slave, counter, size_bits,"
                " delivered_at) VALUES (?, 'master', ?, ?, ?, ?, ?)",
                [(kid, master, slave, i, size_bits, now) for i, kid in out],
            )
            db.execute(
                "INSERT INTO counters(master, slave, next) VALUES (?, ?, ?) "
                "ON CONFLICT(master, slave) DO UPDATE SET next=excluded.next",
                (master, slave, start + count),
            )
        return out

    def deliver_to_slave(self, items: Sequence[SlaveDelivery]) -> None:
        """Record all `items` as delivered to their slave, or none of them.

        Raises AlreadyDelivered naming every ID that was delivered before (to anyone)."""
        db = self._db
        with self._transaction():
            used = [it.key_id for it in items
                    if db.execute("SELECT 1 FROM deliveries WHERE key_id=?",
                                  (it.key_id,)).fetchone()]
            if used:
                raise AlreadyDelivered(used)
            now = time.time()
            db.executemany(
                "INSERT INTO deliveries(key_id, role, master, slave, counter, size_bits,"
                " delivered_at) VALUES (?, 'slave', ?, ?, ?, ?, ?)",
                [(it.key_id, it.master, it.slave, it.counter, it.size_bits, now)
                 for it in items],
            )

    def delivery(self, key_id: str) -> tuple[str, str, str] | None:
        """(role, master, slave) of a delivered key ID, or None; for audits and tests."""
        row = self._db.execute("SELECT role, master, slave FROM deliveries WHERE key_id=?",
                               (key_id,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def next_counter(self, master: str, slave: str) -> int:
        row = self._db.execute("SELECT next FROM counters WHERE master=? AND slave=?",
                               (master, slave)).fetchone()
        return row[0] if row else 0

    # ------------------------------------------------------------------ key pool

    def _need_sealer(self) -> Sealer:
        if self._sealer is None:
            raise StoreError("this store was opened without a storage key; key blocks "
                             "cannot be stored")
        return self._sealer

    def deposit(self, blocks: Sequence[tuple[str, bytes]], now: float,
                lifetime: float, limit: int | None = None,
                count_reserved: bool = False) -> int:
        """Add key blocks (block_id, material) from the link, sealed, in one transaction.

        Idempotent: a block ID the pool already has (stored before a crash, maybe
        delivered since) is left as it is, so replaying a deposit is harmless. With
        `limit`, the pool never holds more than `limit` free blocks (with
        `count_reserved`, free and reserved ones: `pool_level`): the blocks that do not
        fit are dropped (never stored). Returns how many were dropped."""
        sealer = self._need_sealer()
        db = self._db
        with self._transaction():
            known = {r[0] for r in db.execute(
                "SELECT block_id FROM pool WHERE block_id IN (SELECT value FROM "
                "json_each(?))", (_json_list([b for b, _ in blocks]),))}
            new = [(bid, mat) for bid, mat in blocks if bid not in known]
            dropped = 0
            if limit is not None:
                level = self.pool_level(now) if count_reserved else self.free_blocks(now)
                room = max(0, limit - level)
                dropped = max(0, len(new) - room)
                new = new[:room]
            row = db.execute("SELECT COALESCE(MAX(seq), -1) FROM pool").fetchone()
            seq = row[0] + 1
            db.executemany(
                "INSERT INTO pool(block_id, seq, size_bits, material, state, created,"
                " expires) VALUES (?, ?, ?, ?, 'free', ?, ?)",
                [(bid, seq + i, len(mat) * 8, sealer.seal(bid, mat), now, now + lifetime)
                 for i, (bid, mat) in enumerate(new)])
        return dropped

    def pool_counts(self, now: float) -> dict[str, int]:
        """Blocks per state ('free' counts only unexpired ones); for status/metrics."""
        out = {"free": 0, "reserved": 0, "delivered": 0, "expired": 0}
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM pool GROUP BY state"):
            out[state] = int(n)
        out["free"] = self.free_blocks(now)
        return out

    def free_blocks(self, now: float) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM pool WHERE state='free' AND "
                               "expires > ?", (now,)).fetchone()
        return int(row[0])

    def pool_level(self, now: float) -> int:
        """Unexpired blocks not yet handed out here: free plus reserved (standing
        slices, reservations in flight, keys a peer SAE took whose slave has not yet
        fetched them). What the link's pool limit counts, so that the level an SAE
        sees falls while its slice drains and the link refills it."""
        row = self._db.execute("SELECT COUNT(*) FROM pool WHERE state IN ('free', "
                               "'reserved') AND expires > ?", (now,)).fetchone()
        return int(row[0])

    def available_for(self, master: str, slave: str, now: float) -> int:
        """Unexpired blocks a master SAE can still be served from: the free pool plus
        what is reserved for this pair and not yet taken (standing slice, reservations
        in flight). One query, so a status read never sees a block between the two."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM pool WHERE expires > ? AND (state='free' OR "
            "(state='reserved' AND master=? AND slave=?))", (now, master, slave)).fetchone()
        return int(row[0])

    def reserve(self, master: str, slave: str, number: int, size_bits: int,
                now: float, newest_first: bool = False) -> list[ReservedKey]:
        """Reserve `number` keys of `size_bits` from the oldest (or newest) free blocks
        (the allocating KME's side). Raises PoolError if the pool cannot serve all.

        The two KMEs of a link allocate from opposite ends of the same pool, so they
        rarely pick the same block; when they do, the peer refuses and nothing is
        handed out."""
        db = self._db
        order = "DESC" if newest_first else "ASC"
        with self._transaction():
            # Read lazily, only as far as the keys need: fetching the whole free pool
            # (thousands of rows) for one key cost ~5 ms on the store thread, which
            # every take queued behind it waited for.
            rows = db.execute("SELECT block_id, size_bits FROM pool WHERE state='free' "
                              f"AND expires > ? ORDER BY seq {order}", (now,))
            keys: list[ReservedKey] = []
            for _ in range(number):
                ids: list[str] = []
                bits = 0
                while bits < size_bits:
                    row = rows.fetchone()
                    if row is None:
                        raise PoolError("no key available")
                    ids.append(row[0])
                    bits += row[1]
                keys.append(ReservedKey(ids[0], tuple(ids), size_bits))
            rows.close()
            self._mark_reserved(keys, master, slave)
        return keys

    def apply_reservation(self, master: str, slave: str, keys: Sequence[ReservedKey],
                          now: float) -> None:
        """Record the peer KME's reservation (the slave's side), all or none."""
        db = self._db
        with self._transaction():
            for key in keys:
                for bid in key.block_ids:
                    row = db.execute("SELECT state, expires FROM pool WHERE block_id=?",
                                     (bid,)).fetchone()
                    if row is None or row[0] != "free" or row[1] <= now:
                        raise PoolError("peer reserved a block this KME cannot give",
                                        [key.key_id])
            self._mark_reserved(keys, master, slave)

    def release(self, keys: Sequence[ReservedKey]) -> None:
        """Undo a local reservation the peer KME refused (its blocks become free)."""
        with self._transaction():
            self._db.executemany(
                "UPDATE pool SET state='free', key_id=NULL, part=NULL, master=NULL,"
                " slave=NULL, key_bits=NULL WHERE block_id=? AND state='reserved'",
                [(bid,) for k in keys for bid in k.block_ids])

    def _mark_reserved(self, keys: Sequence[ReservedKey], master: str, slave: str) -> None:
        self._db.executemany(
            "UPDATE pool SET state='reserved', key_id=?, part=?, master=?, slave=?,"
            " key_bits=? WHERE block_id=? AND state='free'",
            [(k.key_id, part, master, slave, k.size_bits, bid)
             for k in keys for part, bid in enumerate(k.block_ids)])

    def take(self, key_ids: Sequence[str], master: str, slave: str,
             now: float) -> list[tuple[str, bytes]]:
        """Hand out reserved keys for master -> slave once: returns [(key_id, key)] and
        erases their material in the same transaction (all or none)."""
        result = self.take_many([(key_ids, master, slave)], now)[0]
        if isinstance(result, PoolError):
            raise result
        return result

    def take_many(self, requests: Sequence[tuple[Sequence[str], str, str]], now: float
                  ) -> list[list[tuple[str, bytes]] | PoolError]:
        """`take` for several requests (key_ids, master, slave) in ONE transaction and
        one WAL checkpoint (group commit: the fsyncs are what a take costs). Each
        request is all-or-none on its own: a refused one gets its PoolError in its
        slot and changes nothing, the others are delivered.

        Two statements for the whole group (one SELECT, one UPDATE), whatever its
        size: every request is checked in Python against the rows read, and only the
        accepted ones' keys are marked. Per-request statements and savepoints cost a
        GIL hand-off each, which under load (the event loop and the link's threads
        busy) made a group of 26 takes 10x slower than on an idle process."""
        sealer = self._need_sealer()
        db = self._db
        results: list[list[tuple[str, bytes]] | PoolError] = []
        with self._transaction():
            wanted = {kid for key_ids, _, _ in requests for kid in key_ids}
            by_key: dict[str, list[Any]] = {}
            for r in db.execute("SELECT key_id, block_id, material, state, master,"
                                " slave, key_bits, expires FROM pool WHERE key_id IN"
                                " (SELECT value FROM json_each(?)) ORDER BY part",
                                (_json_list(sorted(wanted)),)):
                by_key.setdefault(r[0], []).append(r[1:])
            claimed: set[str] = set()  # handed out by an earlier request of the group
            for key_ids, master, slave in requests:
                try:
                    results.append(self._check_take(sealer, key_ids, master, slave, now,
                                                    by_key, claimed))
                except PoolError as exc:
                    results.append(exc)
                else:
                    claimed.update(key_ids)
            if claimed:
                db.execute("UPDATE pool SET state='delivered', material=NULL WHERE"
                           " key_id IN (SELECT value FROM json_each(?))",
                           (_json_list(sorted(claimed)),))
        # The answers carrying the keys leave only after the sealed material is gone
        # from the WAL too: secure_delete zeroed it in the new page images, the
        # checkpoint writes those into the main file and TRUNCATE drops the WAL frames
        # that still held the old pages.
        if claimed and not self._erase_from_wal():
            # Another connection holds the WAL open: the old pages may still be in it.
            # Fail closed: the keys are recorded as delivered (never served again), but
            # no answer is sent while their sealed material may linger.
            raise StoreError("could not checkpoint the key store's WAL to erase "
                             "delivered key material; no other process may open the "
                             "database while the KME runs")
        return results

    @staticmethod
    def _check_take(sealer: Sealer, key_ids: Sequence[str], master: str, slave: str,
                    now: float, by_key: dict[str, list[Any]], claimed: set[str]
                    ) -> list[tuple[str, bytes]]:
        """One request of a group take: its keys (opened), or PoolError naming the
        first key ID that cannot be handed out. Changes nothing."""
        if len(set(key_ids)) != len(key_ids):
            # Each ID is checked before any is marked: a repeated one would pass twice.
            raise PoolError("key ID named twice", [k for k in key_ids
                                                    if list(key_ids).count(k) > 1])
        out: list[tuple[str, bytes]] = []
        for kid in key_ids:
            rows = by_key.get(kid)
            if not rows:
                raise PoolError("unknown key ID", [kid])
            if kid in claimed:
                raise PoolError("already delivered", [kid])
            states = {r[2] for r in rows}
            if states != {"reserved"}:
                reason = ("already delivered" if "delivered" in states
                          else "expired" if "expired" in states else "not reserved")
                raise PoolError(reason, [kid])
            if (rows[0][3], rows[0][4]) != (master, slave):
                raise PoolError("not reserved for this SAE pair", [kid])
            if rows[0][6] <= now:
                raise PoolError("expired", [kid])
            material = b"".join(sealer.open(r[0], r[1]) for r in rows)
            out.append((kid, material[: rows[0][5] // 8]))
        return out

    def _erase_from_wal(self) -> bool:
        """Checkpoint the WAL into the main file and truncate it; False if another
        connection kept it from completing."""
        if not self._erase_wal:  # test-only hook: the control that finds the blob
            return True
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    def purge_expired(self, now: float) -> int:
        """Erase every block past its lifetime (free or reserved); returns the count."""
        db = self._db
        with self._transaction():
            cur = db.execute("UPDATE pool SET state='expired', material=NULL "
                             "WHERE state IN ('free', 'reserved') AND expires <= ?", (now,))
            count = cur.rowcount
        if count:
            # Push the erased pages out of the WAL into the (zeroed) main file; if a
            # reader blocks it, the next take() or purge completes it.
            self._erase_from_wal()
        return count

    def close(self) -> None:
        self._db.close()


def _json_list(items: Sequence[str]) -> str:
    return json.dumps(list(items))


class _Txn:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so read-then-write inside the
        # transaction cannot interleave with another writer on the same file.
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, _exc: Any, _tb: Any) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


# (key_ids, master, slave), the caller's time, the caller's future
_QueuedTake = tuple[tuple[list[str], str, str], float,
                    asyncio.Future[list[tuple[str, bytes]]]]


class AsyncKeyStore:
    """`KeyStore` on one dedicated thread: every call is serialised and off the loop."""

    def __init__(self, store: KeyStore, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor
        self._takes: list[_QueuedTake] = []
        self._take_drain: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: Path, kme_id: str,
                   sealer: Sealer | None = None) -> AsyncKeyStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kme-store")
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(executor, KeyStore, path, kme_id, sealer)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(store, executor)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def allocate(self, master: str, slave: str, count: int, size_bits: int,
                       make_id: Callable[[int], str], limit: int) -> list[tuple[int, str]]:
        return await self._run(self._store.allocate, master, slave, count, size_bits,
                               make_id, limit)

    async def deliver_to_slave(self, items: Sequence[SlaveDelivery]) -> None:
        await self._run(self._store.deliver_to_slave, items)

    async def delivery(self, key_id: str) -> tuple[str, str, str] | None:
        return await self._run(self._store.delivery, key_id)

    async def next_counter(self, master: str, slave: str) -> int:
        return await self._run(self._store.next_counter, master, slave)

    async def deposit(self, blocks: Sequence[tuple[str, bytes]], now: float,
                      lifetime: float, limit: int | None = None,
                      count_reserved: bool = False) -> int:
        return await self._run(self._store.deposit, blocks, now, lifetime, limit,
                               count_reserved)

    async def pool_counts(self, now: float) -> dict[str, int]:
        return await self._run(self._store.pool_counts, now)

    async def free_blocks(self, now: float) -> int:
        return await self._run(self._store.free_blocks, now)

    async def pool_level(self, now: float) -> int:
        return await self._run(self._store.pool_level, now)

    async def available_for(self, master: str, slave: str, now: float) -> int:
        return await self._run(self._store.available_for, master, slave, now)

    async def reserve(self, master: str, slave: str, number: int, size_bits: int,
                      now: float, newest_first: bool = False) -> list[ReservedKey]:
        return await self._run(self._store.reserve, master, slave, number, size_bits, now,
                               newest_first)

    async def release(self, keys: Sequence[ReservedKey]) -> None:
        await self._run(self._store.release, keys)

    async def apply_reservation(self, master: str, slave: str,
                                keys: Sequence[ReservedKey], now: float) -> None:
        await self._run(self._store.apply_reservation, master, slave, keys, now)

    async def take(self, key_ids: Sequence[str], master: str, slave: str,
                   now: float) -> list[tuple[str, bytes]]:
        """Queued, and every take waiting when the worker gets to them is committed in
        one transaction (`KeyStore.take_many`): concurrent requests share the fsyncs
        instead of queueing for one each. Each request is still all-or-none."""
        if not _GROUP_TAKES:
            return await self._run(self._store.take, key_ids, master, slave, now)
        fut: asyncio.Future[list[tuple[str, bytes]]] = \
            asyncio.get_running_loop().create_future()
        self._takes.append(((list(key_ids), master, slave), now, fut))
        if self._take_drain is None or self._take_drain.done():
            self._take_drain = asyncio.ensure_future(self._drain_takes())
        return await fut

    async def _drain_takes(self) -> None:
        while self._takes:
            batch, self._takes = self._takes, []
            now = max(n for _, n, _ in batch)
            try:
                results = await self._run(self._store.take_many,
                                          [req for req, _, _ in batch], now)
            except BaseException as exc:  # StoreError, sqlite3.Error: every waiter
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, _, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue  # its caller went away; the keys are delivered (lost)
                if isinstance(res, PoolError):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def purge_expired(self, now: float) -> int:
        return await self._run(self._store.purge_expired, now)

    async def close(self) -> None:
        try:
            await self._run(self._store.close)
        finally:
            self._executor.shutdown(wait=True)
