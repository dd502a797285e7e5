"""Delivered and expired key material is gone from the SQLite file and its WAL before
the store hands the keys out (issue 9.5, erasure).

The store seals each block (AES-GCM) and, on delivery or expiry, overwrites it with
NULL under `secure_delete` and checkpoints the WAL with TRUNCATE before `take()`
returns, so the answer to the SAE leaves only after the material is unrecoverable from
disk. The test greps both files for every sealed blob (and the plain blocks). The
controls: without the checkpoint the sealed blobs are still in the WAL; with
`secure_delete` off they survive in the main file's freed space."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qkd.common.storage_key import Sealer
from qkd.kme.keystore import KeyStore

M, S = "site-a-gw", "site-b-gw"
NOW = 1_000_000.0


def _on_disk(path: Path) -> bytes:
    out = path.read_bytes()
    wal = Path(str(path) + "-wal")
    if wal.exists():
        out += wal.read_bytes()
    return out


def _store(tmp_path: Path, n: int = 64) -> tuple[KeyStore, list[tuple[str, bytes]]]:
    store = KeyStore(tmp_path / "kme.sqlite3", "kme-site-a", Sealer(os.urandom(32)))
    blocks = [(f"blk-{i:04d}", os.urandom(32)) for i in range(n)]
    store.deposit(blocks, NOW, lifetime=3600.0)
    return store, blocks


def _sealed(store: KeyStore, block_ids: list[str]) -> list[bytes]:
    rows = store._db.execute(
        "SELECT material FROM pool WHERE block_id IN (SELECT value FROM json_each(?))",
        (json.dumps(block_ids),)).fetchall()
    assert len(rows) == len(block_ids) and all(r[0] for r in rows)
    return [bytes(r[0]) for r in rows]


def _deliver(store: KeyStore, number: int) -> tuple[list[str], list[bytes]]:
    keys = store.reserve(M, S, number, 256, NOW)
    ids = [bid for k in keys for bid in k.block_ids]
    sealed = _sealed(store, ids)
    got = store.take([k.key_id for k in keys], M, S, NOW)
    assert len(got) == number
    return ids, sealed


def test_delivered_material_is_gone_from_db_and_wal(tmp_path: Path) -> None:
    store, blocks = _store(tmp_path)
    plain = dict(blocks)
    ids, sealed = _deliver(store, 8)
    disk = _on_disk(store.path)
    assert not [b for b in sealed if b in disk], "a delivered sealed block is still on disk"
    assert not [plain[i] for i in ids if plain[i] in disk]
    wal = Path(str(store.path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the WAL was not truncated"
    # The blocks not delivered are still there (the grep can find what is on disk).
    kept = _sealed(store, [b for b, _ in blocks if b not in ids][:4])
    assert all(b in _on_disk(store.path) for b in kept)
    store.close()


def test_expired_material_is_gone_from_db_and_wal(tmp_path: Path) -> None:
    store, blocks = _store(tmp_path)
    sealed = _sealed(store, [b for b, _ in blocks])
    assert store.purge_expired(NOW + 7200.0) == len(blocks)
    disk = _on_disk(store.path)
    assert not [b for b in sealed if b in disk], "an expired sealed block is still on disk"
    store.close()


def test_control_without_the_checkpoint_the_wal_keeps_the_blobs(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    store._erase_wal = False  # test-only hook: skip the checkpoint
    _, sealed = _deliver(store, 8)
    wal = Path(str(store.path) + "-wal").read_bytes()
    assert [b for b in sealed if b in wal], "control: the WAL should still hold the blobs"
    store.close()


def test_control_without_secure_delete_the_main_file_keeps_the_blobs(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    store._db.execute("PRAGMA secure_delete=OFF")
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # blobs in the main file first
    _, sealed = _deliver(store, 8)
    main = store.path.read_bytes()
    assert [b for b in sealed if b in main], "control: freed bytes should keep the blobs"
    store.close()
