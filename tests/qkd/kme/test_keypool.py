"""Key pool at rest: sealed under the storage key, bound to its key ID, erased after
delivery or expiry, private file modes."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from qkd.common.storage_key import Sealer, SealError, StorageKeyError, load_or_create
from qkd.kme.keystore import KeyStore, PoolError, ReservedKey

T0 = 1_000_000.0


def blocks(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    # Recognisable 32-byte blocks so a plaintext leak into the file is easy to find.
    return [(f"00000000-0000-4000-8000-{i:012d}", bytes([0xA5, i % 256]) * 16)
            for i in range(start, start + n)]


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    key = load_or_create(tmp_path / "state" / "kme.storage-key")
    return KeyStore(tmp_path / "state" / "kme.sqlite3", "kme-a", Sealer(key))


def test_storage_key_created_once_private(tmp_path: Path) -> None:
    path = tmp_path / "d" / "sk"
    key = load_or_create(path)
    assert load_or_create(path) == key and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o640)
    with pytest.raises(StorageKeyError, match="chmod 600"):
        load_or_create(path)
    path.chmod(0o600)
    path.write_text("zz")
    with pytest.raises(StorageKeyError, match="hex"):
        load_or_create(path)


def test_material_sealed_at_rest_and_files_private(store: KeyStore, tmp_path: Path) -> None:
    store.deposit(blocks(8), T0, 3600)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir()
                   if p.name.startswith("kme.sqlite3"))
    assert not any(mat in raw for _, mat in blocks(8))
    # Positive control: the same search finds a block stored without sealing.
    plain = sqlite3.connect(tmp_path / "plain.db")
    plain.execute("CREATE TABLE t (b BLOB)")
    plain.execute("INSERT INTO t VALUES (?)", (blocks(8)[3][1],))
    plain.commit()
    plain.close()
    assert blocks(8)[3][1] in (tmp_path / "plain.db").read_bytes()
    for p in (tmp_path / "state").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_reserve_take_once_then_erased(store: KeyStore, tmp_path: Path) -> None:
    store.deposit(blocks(5), T0, 3600)
    keys = store.reserve("a-gw", "b-gw", 2, 512, T0)
    assert [k.block_ids for k in keys] == [tuple(b for b, _ in blocks(2)),
                                          tuple(b for b, _ in blocks(2, 2))]
    assert store.free_blocks(T0) == 1
    got = store.take([keys[1].key_id], "a-gw", "b-gw", T0)
    assert got == [(keys[1].key_id, blocks(2, 2)[0][1] + blocks(2, 2)[1][1])]
    with pytest.raises(PoolError, match="already delivered"):
        store.take([keys[1].key_id], "a-gw", "b-gw", T0)
    with pytest.raises(PoolError, match="not reserved for this SAE pair"):
        store.take([keys[0].key_id], "a-gw", "c-gw", T0)
    # All or nothing: a batch with one bad ID delivers nothing.
    with pytest.raises(PoolError):
        store.take([keys[0].key_id, keys[1].key_id], "a-gw", "b-gw", T0)
    assert store.take([keys[0].key_id], "a-gw", "b-gw", T0)[0][0] == keys[0].key_id
    db = sqlite3.connect(store.path)
    rows = db.execute("SELECT state, material IS NULL FROM pool ORDER BY seq").fetchall()
    assert rows == [("delivered", 1)] * 4 + [("free", 0)]
    with pytest.raises(PoolError, match="no key available"):
        store.reserve("a-gw", "b-gw", 1, 512, T0)


def test_peer_reservation_must_name_free_blocks(store: KeyStore) -> None:
    store.deposit(blocks(3), T0, 3600)
    key = ReservedKey(blocks(1)[0][0], (blocks(1)[0][0],), 256)
    store.apply_reservation("b-gw", "a-gw", [key], T0)
    with pytest.raises(PoolError, match="cannot give"):
        store.apply_reservation("b-gw", "a-gw", [key], T0)
    assert store.take([key.key_id], "b-gw", "a-gw", T0)[0][1] == blocks(1)[0][1]


def test_expiry_erases_free_and_reserved(store: KeyStore) -> None:
    store.deposit(blocks(2), T0, 10)
    store.deposit(blocks(1, 2), T0 + 5, 10)
    key = store.reserve("a-gw", "b-gw", 1, 256, T0)[0]
    assert store.purge_expired(T0 + 10) == 2
    with pytest.raises(PoolError, match="expired"):
        store.take([key.key_id], "a-gw", "b-gw", T0 + 10)
    assert store.free_blocks(T0 + 10) == 1
    assert store.free_blocks(T0 + 15) == 0


def test_moved_or_edited_rows_do_not_open(store: KeyStore, tmp_path: Path) -> None:
    store.deposit(blocks(2), T0, 3600)
    a, b = (bid for bid, _ in blocks(2))
    db = sqlite3.connect(store.path, isolation_level=None)
    mat_a = db.execute("SELECT material FROM pool WHERE block_id=?", (a,)).fetchone()[0]
    # Copy block A's sealed bytes onto block B: the key ID is bound, so it must fail.
    db.execute("UPDATE pool SET material=? WHERE block_id=?", (mat_a, b))
    key_b = store.reserve("a-gw", "b-gw", 2, 256, T0)[1]
    with pytest.raises(SealError, match=key_b.key_id):
        store.take([key_b.key_id], "a-gw", "b-gw", T0)
    # A different storage key opens nothing.
    other = KeyStore(store.path, "kme-a", Sealer(os.urandom(32)))
    with pytest.raises(SealError):
        other.take([a], "a-gw", "b-gw", T0)
    other.close()
    assert store.take([a], "a-gw", "b-gw", T0) == [(a, blocks(1)[0][1])]


def test_sealer_repr_hides_key() -> None:
    key = bytes(range(32))
    assert key.hex() not in repr(Sealer(key)) and "redacted" in repr(Sealer(key))


def test_deposit_is_idempotent_and_never_exceeds_the_limit(store: KeyStore) -> None:
    assert store.deposit(blocks(4), T0, 3600) == 0
    keys = store.reserve("m", "s", 1, 256, T0)
    store.take([keys[0].key_id], "m", "s", T0)
    # Replaying the same deposit (after a crash) neither duplicates nor revives a block.
    assert store.deposit(blocks(4), T0, 3600, limit=100) == 0
    assert store.free_blocks(T0) == 3
    with pytest.raises(PoolError, match="already delivered"):
        store.take([keys[0].key_id], "m", "s", T0)
    # The limit: only the room left is stored, the rest is dropped and counted.
    assert store.deposit(blocks(5, 10), T0, 3600, limit=6) == 2
    assert store.free_blocks(T0) == 6
    assert store.deposit(blocks(2, 20), T0, 3600, limit=6) == 2
    assert store.pool_counts(T0) == {"free": 6, "reserved": 0, "delivered": 1, "expired": 0}
    # Positive control: without a limit the same deposit goes above it.
    assert store.deposit(blocks(2, 30), T0, 3600) == 0
    assert store.free_blocks(T0) == 8


def test_pool_level_counts_reserved_blocks_and_caps_deposits(store: KeyStore) -> None:
    """A standing slice is pool its SAEs have not drawn yet: the limit Alice deposits
    under counts it, so drawing from the slice makes room and the level falls."""
    store.deposit(blocks(10), T0, 3600)
    keys = store.reserve("m", "s", 4, 256, T0)  # a slice of 4, reserved at both KMEs
    assert (store.free_blocks(T0), store.pool_level(T0)) == (6, 10)
    assert store.available_for("m", "s", T0) == 10
    # Full at 10 with the slice counted: nothing more is stored.
    assert store.deposit(blocks(3, 100), T0, 3600, limit=10, count_reserved=True) == 3
    store.take([keys[0].key_id, keys[1].key_id], "m", "s", T0)
    assert store.pool_level(T0) == 8 and store.available_for("m", "s", T0) == 8
    # Two drawn, two stored: the pool is back at its limit, never above.
    assert store.deposit(blocks(3, 200), T0, 3600, limit=10, count_reserved=True) == 1
    assert store.pool_level(T0) == 10
    # Expired reserved blocks no longer count.
    assert store.pool_level(T0 + 7200) == 0
    # Control: counting free blocks only (Bob's cap) stores above the level.
    assert store.deposit(blocks(2, 300), T0, 3600, limit=10) == 0
    assert store.pool_level(T0) == 12 and store.free_blocks(T0) == 10


def test_take_many_is_all_or_none_per_request(store: KeyStore) -> None:
    """Grouped takes (one transaction for every waiting request): a refused request
    changes nothing and gets its own error; the others in the group are delivered."""
    store.deposit(blocks(6), T0, 3600)
    keys = store.reserve("a", "b", 6, 256, T0 + 1)
    ids = [k.key_id for k in keys]
    results = store.take_many([
        (ids[0:2], "a", "b"),
        ([ids[2], "00000000-0000-4000-8000-999999999999"], "a", "b"),  # unknown ID
        (ids[3:4], "a", "x"),  # another pair's
        (ids[4:6], "a", "b"),
    ], T0 + 2)
    assert [kid for kid, _ in results[0]] == ids[0:2]  # type: ignore[union-attr]
    assert isinstance(results[1], PoolError) and results[1].reason == "unknown key ID"
    assert isinstance(results[2], PoolError)
    assert results[2].reason == "not reserved for this SAE pair"
    assert [kid for kid, _ in results[3]] == ids[4:6]  # type: ignore[union-attr]
    # The refused requests' keys are untouched: still there, once, for their pair.
    assert [kid for kid, _ in store.take([ids[2]], "a", "b", T0 + 3)] == [ids[2]]
    assert [kid for kid, _ in store.take([ids[3]], "a", "b", T0 + 3)] == [ids[3]]
    # The delivered ones are gone for good.
    with pytest.raises(PoolError, match="already delivered"):
        store.take([ids[0]], "a", "b", T0 + 3)
    assert store.pool_counts(T0 + 3)["delivered"] == 6


def test_one_key_in_two_requests_of_a_group_goes_to_the_first_only(store: KeyStore
                                                                     ) -> None:
    """The group is checked in memory before one UPDATE marks it: a key ID named by
    two requests of the same group (a replayed dec_keys) is handed out once, and a
    request naming an ID twice gets nothing."""
    store.deposit(blocks(4), T0, 3600)
    ids = [k.key_id for k in store.reserve("a", "b", 4, 256, T0)]
    results = store.take_many([
        (ids[0:2], "a", "b"),
        (ids[1:3], "a", "b"),  # ids[1] went to the request before
        ([ids[3], ids[3]], "a", "b"),
    ], T0 + 1)
    assert [kid for kid, _ in results[0]] == ids[0:2]  # type: ignore[union-attr]
    assert isinstance(results[1], PoolError) and results[1].reason == "already delivered"
    assert results[1].key_ids == [ids[1]]
    assert isinstance(results[2], PoolError) and results[2].reason == "key ID named twice"
    # Refused requests changed nothing: ids[2] and ids[3] are still there, once.
    assert [kid for kid, _ in store.take(ids[2:4], "a", "b", T0 + 2)] == ids[2:4]
    assert store.pool_counts(T0 + 2)["delivered"] == 4


async def test_concurrent_async_takes_share_a_transaction(tmp_path: Path) -> None:
    """AsyncKeyStore.take queues: takes waiting together go into one take_many, and
    each caller still gets exactly its own keys (or its own error)."""
    import asyncio

    from qkd.kme import keystore as ks

    key = load_or_create(tmp_path / "sk")
    store = await ks.AsyncKeyStore.open(tmp_path / "db.sqlite3", "kme-a", Sealer(key))
    calls: list[int] = []
    inner = store._store.take_many

    def counting(reqs: list[tuple[list[str], str, str]], now: float) -> list[object]:
        calls.append(len(reqs))
        return inner(reqs, now)  # type: ignore[return-value]

    store._store.take_many = counting  # type: ignore[method-assign]
    try:
        await store.deposit(blocks(20), T0, 1e9)
        keys = await store.reserve("a", "b", 20, 256, T0 + 1)
        ids = [k.key_id for k in keys]
        outs = await asyncio.gather(
            *(store.take([i], "a", "b", T0 + 2) for i in ids),
            store.take([ids[0]], "a", "b", T0 + 2), return_exceptions=True)
        assert [o[0][0] for o in outs[:20]] == ids  # type: ignore[index]
        assert isinstance(outs[20], PoolError)  # ids[0] twice: only one gets it
        assert sum(calls) == 21 and len(calls) < 21  # grouped
    finally:
        await store.close()
