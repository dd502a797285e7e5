"""What the relay must not forget over a restart (SQLite, `<[kme] db>.relay`):

- per neighbour, the outgoing link-key offset (leased ahead, so a crash skips bytes and
  never sends two frames under one pad) and the incoming watermark (a frame replayed
  after a restart is refused), plus the link-key bits used each way;
- BB84 links (qkd.kme.relay_keys): per neighbour and direction the pool keys moved into
  the relay stream, at their stream offsets, sealed until their bytes are used; and the
  link's Wegman-Carter hash key, sealed;
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
    delivered REAL);
CREATE TABLE IF NOT EXISTS stream_keys (
    neighbour TEXT NOT NULL, direction TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    offset INTEGER NOT NULL, nbytes INTEGER NOT NULL, key_id TEXT NOT NULL, sealed BLOB,
    PRIMARY KEY (neighbour, direction, offset), UNIQUE (neighbour, direction, key_id));
CREATE TABLE IF NOT EXISTS link_hash_keys (
    neighbour TEXT PRIMARY KEY, sealed BLOB NOT NULL)
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

    # ------------------------------------------- BB84 relay streams (relay_keys)

    def _seal_id(self, nb: str, direction: str, key_id: str) -> str:
        return f"relay-stream/{nb}/{direction}/{key_id}"

    def add_stream_keys(self, nb: str, direction: str,
                        keys: Sequence[tuple[int, str, bytes]]) -> None:
        """Pool keys (offset, key_id, material) joining a stream; a key already there
        (a repeated announcement) is left as it is."""
        with self._txn():
            self._db.executemany(
                "INSERT INTO stream_keys(neighbour, direction, offset, nbytes, key_id, "
                "sealed) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(nb, direction, off, len(mat), kid,
                  self._sealer.seal(self._seal_id(nb, direction, kid), mat))
                 for off, kid, mat in keys])

    def stream_bytes(self, nb: str, direction: str, offset: int, n: int) -> bytes | None:
        """Bytes offset .. offset+n of a stream, or None unless every one is held."""
        rows = self._db.execute(
            "SELECT offset, nbytes, key_id, sealed FROM stream_keys WHERE neighbour = ? "
            "AND direction = ? AND offset < ? AND offset + nbytes > ? ORDER BY offset",
            (nb, direction, offset + n, offset)).fetchall()
        out = b""
        at = offset
        for off, nbytes, kid, sealed in rows:
            if off > at or sealed is None:
                return None
            mat = self._sealer.open(self._seal_id(nb, direction, kid), sealed)
            out += mat[at - off:offset + n - off]
            at = off + nbytes
        return out if len(out) == n else None

    def stream_end(self, nb: str, direction: str) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(offset + nbytes), 0) FROM stream_keys "
                               "WHERE neighbour = ? AND direction = ?",
                               (nb, direction)).fetchone()
        return int(row[0])

    def stream_keys(self, nb: str, direction: str, *, held: bool = True
                    ) -> list[tuple[int, str]]:
        """(offset, key_id) of a stream's keys (with `held`: those not yet erased)."""
        cond = " AND sealed IS NOT NULL" if held else ""
        return [(int(o), str(k)) for o, k in self._db.execute(
            "SELECT offset, key_id FROM stream_keys WHERE neighbour = ? AND direction = ?"
            f"{cond} ORDER BY offset", (nb, direction))]

    def erase_stream_below(self, nb: str, direction: str, mark: int) -> None:
        """Erase the material of every key wholly below `mark` (its bytes are used)."""
        with self._txn():
            self._db.execute("UPDATE stream_keys SET sealed = NULL WHERE neighbour = ? AND "
                             "direction = ? AND offset + nbytes <= ? AND sealed IS NOT NULL",
                             (nb, direction, mark))

    def hash_key(self, nb: str) -> bytes | None:
        row = self._db.execute("SELECT sealed FROM link_hash_keys WHERE neighbour = ?",
                               (nb,)).fetchone()
        return None if row is None else self._sealer.open(f"relay-hash/{nb}", row[0])

    def set_hash_key(self, nb: str, key: bytes) -> None:
        with self._txn():
            self._db.execute("INSERT INTO link_hash_keys(neighbour, sealed) VALUES (?, ?) "
                             "ON CONFLICT DO NOTHING",
                             (nb, self._sealer.seal(f"relay-hash/{nb}", key)))

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
