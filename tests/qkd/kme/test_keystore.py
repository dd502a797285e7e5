"""SQLite key store: counters never repeat, slave deliveries are once-only, durable."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from qkd.kme.keystore import AlreadyDelivered, AsyncKeyStore, KeyStore, SlaveDelivery, StoreError


def mk(i: int) -> str:
    return f"id-{i}"


def test_allocate_is_monotonic_across_reopen(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "kme.sqlite3"
    store = KeyStore(db, "kme-a")
    assert [i for i, _ in store.allocate("a", "b", 3, 256, mk, 1 << 40)] == [0, 1, 2]
    assert [i for i, _ in store.allocate("a", "c", 1, 256, lambda i: f"c{i}", 1 << 40)] == [0]
    store.close()
    store = KeyStore(db, "kme-a")
    assert [i for i, _ in store.allocate("a", "b", 2, 256, lambda i: f"x{i}", 1 << 40)] == [3, 4]
    assert store.delivery("id-1") == ("master", "a", "b")
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


def test_allocate_refuses_exhausted_space(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db", "kme-a")
    store.allocate("a", "b", 2, 256, mk, 3)
    with pytest.raises(StoreError, match="exhausted"):
        store.allocate("a", "b", 2, 256, lambda i: f"y{i}", 3)
    assert store.next_counter("a", "b") == 2


def test_slave_delivery_once_and_all_or_nothing(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    store = KeyStore(db, "kme-b")
    one = SlaveDelivery("k1", "a", "b", 1, 256)
    two = SlaveDelivery("k2", "a", "b", 2, 256)
    store.deliver_to_slave([one])
    with pytest.raises(AlreadyDelivered) as ei:
        store.deliver_to_slave([two, one])
    assert ei.value.key_ids == ["k1"]
    assert store.delivery("k2") is None          # rolled back with the failing request
    store.close()
    store = KeyStore(db, "kme-b")
    with pytest.raises(AlreadyDelivered):
        store.deliver_to_slave([one])
    store.deliver_to_slave([two])
    store.close()


def test_store_belongs_to_one_kme(tmp_path: Path) -> None:
    KeyStore(tmp_path / "k.db", "kme-a").close()
    with pytest.raises(StoreError, match="kme-a"):
        KeyStore(tmp_path / "k.db", "kme-b")


async def test_async_store_serialises_concurrent_writers(tmp_path: Path) -> None:
    store = await AsyncKeyStore.open(tmp_path / "k.db", "kme-a")
    try:
        results = await asyncio.gather(*(store.allocate("a", "b", 2, 256,
                                                        lambda i: f"id{i}", 1 << 40)
                                         for _ in range(20)))
        counters = [i for r in results for i, _ in r]
        assert sorted(counters) == list(range(40))
        item = SlaveDelivery("z", "b", "a", 0, 256)
        outcomes = await asyncio.gather(*(store.deliver_to_slave([item]) for _ in range(10)),
                                        return_exceptions=True)
        assert sum(o is None for o in outcomes) == 1
        assert all(isinstance(o, AlreadyDelivered) for o in outcomes if o is not None)
    finally:
        await store.close()
