"""Issue 17: an enc_keys that queued behind a standing-slice top-up is served from the
slice once the top-up lands, instead of a 503 because the free pool ran dry meanwhile
(the 503 with keys reserved for the caller's pair that the sustained benchmark
showed). One event loop, two real key stores holding the same blocks, the link's
RESERVE replaced by applying the reservation at the peer's store."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qkd.common.storage_key import Sealer
from qkd.etsi014.messages import EtsiError
from qkd.kme import service as service_mod
from qkd.kme.keystore import AsyncKeyStore
from qkd.kme.service import KmeService
from qkd.link.pool import ReservedKey

KEY_BITS = 256
BLOCKS = 20


class _GatedLink:
    """reserve_at_peer that waits for `gate` (a RESERVE in flight) before the peer's
    store records the reservation."""

    def __init__(self, peer: AsyncKeyStore) -> None:
        self.peer = peer
        self.gate = asyncio.Event()
        self.sent = 0

    async def reserve_at_peer(self, master: str, slave: str,
                              keys: list[ReservedKey]) -> None:
        self.sent += 1
        await self.gate.wait()
        await self.peer.apply_reservation(master, slave, keys, time.time())


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[KmeService, AsyncKeyStore]]:
    blocks = [(f"blk-{i:05d}", secrets.token_bytes(KEY_BITS // 8)) for i in range(BLOCKS)]
    stores = []
    for name in ("a", "b"):
        store = await AsyncKeyStore.open(tmp_path / f"{name}.db", f"kme-{name}",
                                         Sealer(secrets.token_bytes(32)))
        await store.deposit(blocks, time.time(), 3600.0)
        stores.append(store)
    config: Any = SimpleNamespace(
        limits=SimpleNamespace(key_size=KEY_BITS, max_key_count=1000),
        link=SimpleNamespace(key_rate=0.0, role="alice"), local_sae_ids=("m",),
        peer=SimpleNamespace(sae_ids=("s",), kme_id="kme-b"), kme_id="kme-a")
    svc = KmeService(config, stores[0], None, bb84=_GatedLink(stores[1]))  # type: ignore[arg-type]
    try:
        yield svc, stores[1]
    finally:
        for s in stores:
            await s.close()


async def _race(svc: KmeService) -> list[Any]:
    link: Any = svc.bb84
    first = asyncio.ensure_future(svc.deliver_master("m", "s", 1, KEY_BITS))
    while link.sent == 0:  # the first batch (1 key + a top-up) is in flight
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(svc.deliver_master("m", "s", 1, KEY_BITS))
    await asyncio.sleep(0.01)  # queued behind the in-flight RESERVE
    # Other pairs draw the rest of the free pool meanwhile.
    free = await svc.store.free_blocks(time.time())
    await svc.store.reserve("x", "y", free, KEY_BITS, time.time())
    link.gate.set()
    return list(await asyncio.gather(first, second, return_exceptions=True))


async def test_a_request_behind_a_top_up_gets_the_slice_keys(pair: Any) -> None:
    svc, peer = pair
    first, second = await _race(svc)
    assert not isinstance(first, BaseException), first
    assert not isinstance(second, BaseException), second
    ids = [first[0].key_id, second[0].key_id]
    assert len(set(ids)) == 2 and first[0].key != second[0].key
    # Both keys were reserved for (m, s) at the peer too: the slave can fetch them.
    got = await peer.take(ids, "m", "s", time.time())
    assert [k for _, k in got] == [first[0].key, second[0].key]
    assert svc.standing_keys("m", "s") == len(svc._standing[("m", "s")])


async def test_control_without_the_slice_check_it_was_a_503(pair: Any,
                                                            monkeypatch: Any) -> None:
    """Positive control: with the slice emptied before the second request's group is
    served (what the old code amounted to: it never looked at the slice there), the
    same race ends in a 503."""
    svc, _peer = pair
    original = service_mod.KmeService._reserve_group

    async def without_slice(self: KmeService, master: str, slave: str, size: int,
                            waiters: list[Any], *, standing: bool) -> None:
        saved = self._standing.pop((master, slave), None)
        try:
            await original(self, master, slave, size, waiters, standing=standing)
        finally:
            if saved is not None:  # back in front of any new top-up
                saved.extend(self._standing.pop((master, slave), ()))
                self._standing[(master, slave)] = saved

    monkeypatch.setattr(service_mod.KmeService, "_reserve_group", without_slice)
    first, second = await _race(svc)
    assert not isinstance(first, BaseException), first
    assert isinstance(second, EtsiError) and second.status == 503



@pytest.mark.parametrize("fresh_fails_too", [False, True])
async def test_expired_slice_keys_on_the_queued_path_are_dropped_and_reserved_afresh(
        pair: Any, monkeypatch: Any, fresh_fails_too: bool) -> None:
    """A request queued behind a top-up is served from the slice (above); when those
    keys expired meanwhile, the slice is dropped and the request gets a fresh
    reservation instead of the store's error. Control: when the fresh take fails too,
    that error still reaches the caller (nothing is hidden)."""
    svc, _peer = pair
    link: Any = svc.bb84
    slice_ids: set[str] = set()
    real_reserve_at_peer = link.reserve_at_peer

    async def reserve_at_peer(master: str, slave: str, keys: list[ReservedKey]) -> None:
        if not slice_ids:  # the first RESERVE: one key for the first request + top-up
            slice_ids.update(k.key_id for k in keys[1:])
        await real_reserve_at_peer(master, slave, keys)

    link.reserve_at_peer = reserve_at_peer
    real_take = svc.store.take
    calls: list[str] = []

    async def take(ids: list[str], *args: Any) -> Any:
        if set(ids) <= slice_ids:
            calls.append("slice")
            raise service_mod.PoolError("key expired (test)", ids)
        if fresh_fails_too and calls:
            calls.append("fresh")
            raise service_mod.PoolError("key expired (test)", ids)
        return await real_take(ids, *args)

    monkeypatch.setattr(svc.store, "take", take)
    first = asyncio.ensure_future(svc.deliver_master("m", "s", 1, KEY_BITS))
    while link.sent == 0:
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(svc.deliver_master("m", "s", 1, KEY_BITS))
    await asyncio.sleep(0.01)  # queued behind the in-flight RESERVE
    link.gate.set()
    got = await asyncio.gather(first, second, return_exceptions=True)
    assert not isinstance(got[0], BaseException), got[0]
    assert calls[0] == "slice"
    if fresh_fails_too:
        assert isinstance(got[1], service_mod.PoolError)
        return
    assert not isinstance(got[1], BaseException), got[1]
    assert got[1][0].key_id not in slice_ids and got[1][0].key_id != got[0][0].key_id
    assert not ({k.key_id for k in svc._standing.get(("m", "s"), ())} & slice_ids)
