"""SQLite databases that hold secrets: the KME's key store and the gateway's PSK store.

Owner-only files (a 0700 directory; the db, -wal and -shm files 0600, since SQLite
creates them with the process umask), WAL with `synchronous=FULL` so a commit is on disk
before the answer that depends on it leaves, freed pages zeroed so erased keys do not
linger, and no implicit transactions (`isolation_level=None`: callers BEGIN/COMMIT).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

from qkd.common.storage_key import private_dir


def open_private_db(path: Path, setup: Callable[[sqlite3.Connection], None]
                    ) -> sqlite3.Connection:
    """Open (or create) the database and run `setup` (schema, version checks) while the
    owner-only umask is in force. The connection is closed if anything fails."""
    private_dir(path.parent)
    old = os.umask(0o077)
    try:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(
                    f"SQLite refused WAL mode (got {mode!r}); put the database on a local "
                    "file system")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            db.execute("PRAGMA busy_timeout=5000")
            setup(db)
        except BaseException:
            db.close()
            raise
    finally:
        os.umask(old)
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(path) + suffix)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(f.stat().st_mode) & 0o077:
                f.chmod(0o600)
    return db
