"""The KME's durable record of what it has delivered (SQLite, stdlib sqlite3).

It holds no key material: keys are re-derivable from the link, so the store only has
to remember *who got what*, which is what makes "delivered to its master SAE once and
to its slave SAE once, never again, also across restarts" hold:

- `counters`: per ordered (master, slave) pair, the next counter the master's KME may
  hand out. Allocation bumps it in the same transaction that records the deliveries,
  so a counter is never issued twice even if the process dies right after.
- `deliveries`: one row per key ID delivered, with the role (master or slave) it was
  delivered to. The slave side's uniqueness check is the PRIMARY KEY on key_id.

Every write is a `BEGIN IMMEDIATE` transaction committed with `synchronous=FULL` under
WAL before the caller gets its answer, so an HTTP answer never describes a delivery
the disk does not yet know about. A crash between commit and answer loses those keys
(they are never re-sent), which is the safe direction.

`KeyStore` is synchronous and must be used from one thread; `AsyncKeyStore` runs it on
a single dedicated worker thread, which both keeps the event loop free and serialises
all writers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1

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
"""


class StoreError(Exception):
    """The store cannot be used (wrong owner, newer schema, exhausted counter space)."""


class AlreadyDelivered(Exception):
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
    def __init__(self, path: Path, kme_id: str) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # isolation_level=None: no implicit transactions, we BEGIN/COMMIT explicitly.
        self._db = sqlite3.connect(str(path), isolation_level=None,
                                   check_same_thread=False)
        try:
            self._init(kme_id)
        except BaseException:
            self._db.close()
            raise

    def _init(self, kme_id: str) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"SQLite refused WAL mode (got {mode!r}); put the database on "
                             "a local file system")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
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

    def close(self) -> None:
        self._db.close()


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


class AsyncKeyStore:
    """`KeyStore` on one dedicated thread: every call is serialised and off the loop."""

    def __init__(self, store: KeyStore, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor

    @classmethod
    async def open(cls, path: Path, kme_id: str) -> AsyncKeyStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kme-store")
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(executor, KeyStore, path, kme_id)
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

    async def close(self) -> None:
        try:
            await self._run(self._store.close)
        finally:
            self._executor.shutdown(wait=True)
