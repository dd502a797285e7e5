"""What the relay must not forget over a restart (SQLite, `<[kme] db>.relay`):

- per neighbour, the outgoing link-key offset (leased ahead, so a crash skips bytes and
  never sends two frames under one pad) and the incoming watermark (a frame replayed
  after a restart is refused), plus the link-key bits used each way;
- relayed keys: at the destination the key (sealed with the storage key) until the slave
  SAE fetches it once; at the source only that the master got it (no material).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from qkd.common.errors import QkdError
from qkd.common.private_db import open_private_db
from qkd.common.storage_key import Sealer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS link_counters (
    neighbour TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (neighbour, name));
CREATE TABLE IF NOT EXISTS relayed_keys (
    key_id TEXT PRIMARY KEY, master TEXT NOT NULL, slave TEXT NOT NULL,
    peer_kme TEXT NOT NULL, role TEXT NOT NULL, sealed BLOB, created REAL NOT NULL,
    delivered REAL)
"""


class RelayKeyError(QkdError):
    """A dec_keys request the relayed-key table refuses; `status` 400 or 401."""

    def __init__(self, status: int, reason: str, key_ids: Sequence[str]) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.key_ids = list(key_ids)


class RelayStore:
    """Synchronous and small: each call is one short transaction on the event loop's
    thread, so a counter is on disk before the frame that depends on it leaves."""

    def __init__(self, path: Path, sealer: Sealer) -> None:
        self.path = path
        self._sealer = sealer

        def setup(db: sqlite3.Connection) -> None:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

        self._db = open_private_db(path, setup)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        # The connection is in autocommit mode (open_private_db): one explicit
        # transaction per call, so dec_keys is all or nothing.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------- counters

    def counters(self) -> dict[tuple[str, str], int]:
        rows = self._db.execute("SELECT neighbour, name, value FROM link_counters")
        return {(n, k): v for n, k, v in rows}

    def set_counters(self, values: dict[tuple[str, str], int]) -> None:
        with self._txn():
            self._db.executemany(
                "INSERT INTO link_counters(neighbour, name, value) VALUES (?, ?, ?) "
                "ON CONFLICT(neighbour, name) DO UPDATE SET value = excluded.value",
                [(n, k, v) for (n, k), v in values.items()])

    # ---------------------------------------------------------- relayed keys

    def store_key(self, key_id: str, master: str, slave: str, source: str, key: bytes,
                  now: float) -> None:
        """Destination: keep the assembled key for the slave SAE (before the ACK)."""
        with self._txn():
            self._db.execute(
                "INSERT INTO relayed_keys(key_id, master, slave, peer_kme, role, sealed, "
                "created) VALUES (?, ?, ?, ?, 'slave', ?, ?)",
                (key_id, master, slave, source, self._sealer.seal(key_id, key), now))

    def discard_key(self, key_id: str) -> bool:
        """Destination: the relay was aborted after the key was stored; erase it unless
        the slave already has it (then the abort came too late to matter)."""
        with self._txn():
            cur = self._db.execute("DELETE FROM relayed_keys WHERE key_id = ? AND role = "
                                   "'slave' AND delivered IS NULL", (key_id,))
        return cur.rowcount > 0

    def record_master(self, keys: Sequence[tuple[str, str, str, str]], now: float) -> None:
        """Source: (key_id, master, slave, destination) handed to the master SAE."""
        with self._txn():
            self._db.executemany(
                "INSERT INTO relayed_keys(key_id, master, slave, peer_kme, role, created, "
                "delivered) VALUES (?, ?, ?, ?, 'master', ?, ?)",
                [(*k, now, now) for k in keys])

    def take(self, key_ids: Sequence[str], master: str, slave: str,
             now: float) -> list[tuple[str, bytes]]:
        """Destination, dec_keys: every key or none, each once; its material is erased
        in the same transaction that marks it delivered."""
        out: list[tuple[str, bytes]] = []
        with self._txn():
            rows = {r[0]: r for r in self._db.execute(
                "SELECT key_id, master, slave, role, sealed, delivered FROM relayed_keys "
                f"WHERE key_id IN ({','.join('?' * len(key_ids))})", list(key_ids))}
            missing = [k for k in key_ids if k not in rows or rows[k][3] != "slave"]
            if missing:
                raise RelayKeyError(400, "unknown", missing)
            foreign = [k for k in key_ids if rows[k][1:3] != (master, slave)]
            if foreign:
                raise RelayKeyError(401, "not relayed for this SAE pair", foreign)
            used = [k for k in key_ids if rows[k][5] is not None]
            if used:
                raise RelayKeyError(400, "already delivered", used)
            for k in key_ids:
                out.append((k, self._sealer.open(k, rows[k][4])))
            self._db.executemany("UPDATE relayed_keys SET sealed = NULL, delivered = ? "
                                 "WHERE key_id = ?", [(now, k) for k in key_ids])
        return out

    def purge(self, before: float) -> int:
        """Erase undelivered keys older than `before` (their master never got them or
        never passed the ID on); delivered rows stay as the once-only record."""
        with self._txn():
            cur = self._db.execute("DELETE FROM relayed_keys WHERE delivered IS NULL AND "
                                   "created < ?", (before,))
        return cur.rowcount

    def counts(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT role, delivered IS NOT NULL, COUNT(*) FROM relayed_keys GROUP BY 1, 2")
        out = {"stored_for_slave": 0, "delivered_to_slave": 0, "delivered_to_master": 0}
        for role, done, n in rows:
            if role == "master":
                out["delivered_to_master"] += n
            else:
                out["delivered_to_slave" if done else "stored_for_slave"] += n
        return out
