"""Relay link keys from a BB84 link's pool (qkd.kme.relay_keys), in one event loop:
two real key stores holding the same blocks (as after BB84 rounds), the link's
RESERVE replaced by applying the reservation to the peer's store. The pads are the
pool's material, each byte used once (across restarts too), both pools pay."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qkd.common.storage_key import Sealer
from qkd.kme.keystore import AsyncKeyStore
from qkd.kme.relay_keys import HIGH_BYTES, LOW_BYTES, PoolLinkKeys, decode_keys, encode_keys
from qkd.kme.relay_service import link_stream
from qkd.kme.relay_store import RelayStore
from qkd.link.bb84 import LinkUnavailable
from qkd.link.pool import ReservedKey
from qkd.link.wegman_carter import HASH_KEY_BYTES
from qkd.network import amd
from qkd.network.constants import AMD_BYTES, PAD_BYTES
from qkd.network.errors import NetErrorCode, NetworkError
from qkd.network.relay import KeyAssembled, RelayNode, Share, decode_frame

KEY_BITS = 256
BLOCKS = 600
SECRET = b"s" * 32  # the ideal derivation's input, for the negative control


class _FakeBb84:
    """The link's reserve_at_peer: the peer's store records the same reservation."""

    def __init__(self) -> None:
        self.peer: AsyncKeyStore | None = None
        self.up = True

    async def reserve_at_peer(self, master: str, slave: str,
                              keys: list[ReservedKey]) -> None:
        if not self.up:
            raise LinkUnavailable("the peer KME is not connected")
        assert self.peer is not None
        await self.peer.apply_reservation(master, slave, keys, time.time())


@dataclass
class _End:
    name: str
    store: AsyncKeyStore
    relay: RelayStore
    svc: Any
    keys: PoolLinkKeys

    def reopen(self, other: str) -> PoolLinkKeys:
        """A restart: the same stores, a fresh supplier."""
        return PoolLinkKeys(self.name, self.relay, {other: self.svc})


@pytest.fixture
async def hop(tmp_path: Path) -> AsyncIterator[tuple[_End, _End, dict[str, bytes]]]:
    blocks = [(f"blk-{i:05d}", secrets.token_bytes(KEY_BITS // 8)) for i in range(BLOCKS)]
    ends: dict[str, _End] = {}
    for name, role, other in (("A", "alice", "B"), ("B", "bob", "A")):
        sealer = Sealer(secrets.token_bytes(32))
        store = await AsyncKeyStore.open(tmp_path / f"{name}.db", f"kme-{name}", sealer)
        await store.deposit(blocks, time.time(), 3600.0)
        svc = SimpleNamespace(store=store, bb84=_FakeBb84(), config=SimpleNamespace(
            limits=SimpleNamespace(key_size=KEY_BITS), link=SimpleNamespace(role=role),
            peer=SimpleNamespace(kme_id=other)))
        relay = RelayStore(tmp_path / f"{name}.relay", sealer)
        ends[name] = _End(name, store, relay, svc,
                          PoolLinkKeys(name, relay, {other: svc}))  # type: ignore[dict-item]
    ends["A"].svc.bb84.peer = ends["B"].store
    ends["B"].svc.bb84.peer = ends["A"].store
    try:
        yield ends["A"], ends["B"], dict(blocks)
    finally:
        for e in ends.values():
            e.relay.close()
            await e.store.close()


async def _fill(a: _End, b: _End) -> None:
    """Both directions topped up and announced (what the relay service's loop does)."""
    for x, y in ((a, b), (b, a)):
        while True:
            entries = await x.keys.top_up(y.name)
            if not entries:
                break
            got = await y.keys.accept(x.name, decode_keys(encode_keys(entries)))
            assert got == len(entries)


def _stream_material(entries: list[tuple[int, str]], material: dict[str, bytes],
                     offset: int, n: int) -> bytes:
    whole = b"".join(material[k] for _, k in sorted(entries))
    return whole[offset:offset + n]


async def test_pads_are_the_pool_material_each_used_once(hop: Any) -> None:
    a, b, material = hop
    a_out: list[tuple[int, str]] = []
    while entries := await a.keys.top_up("B"):
        a_out += entries
        await b.keys.accept("A", entries)
    # The hash key opens the A -> B stream (A < B): the pool's first reserved keys.
    assert a.keys.hash_key("B").material == b.keys.hash_key("A").material \
        == _stream_material(a_out, material, 0, HASH_KEY_BYTES)
    off, pad = a.keys.take("B", 48)
    assert off == HASH_KEY_BYTES  # data starts after the hash key's bytes
    assert pad == _stream_material(a_out, material, off, 48)  # the pool's bytes
    assert pad != link_stream(SECRET, "A", "B", off, 48)  # not the ideal derivation
    assert b.keys.peek("A", off, 48) == pad
    b.keys.consume("A", off, 48)
    with pytest.raises(NetworkError) as err:
        b.keys.peek("A", off, 48)  # a replayed frame
    assert err.value.code is NetErrorCode.LINK_KEY
    # Both pools gave the same keys (reserved here, then taken out of the pool).
    for e in (a, b):
        counts = await e.store.pool_counts(time.time())
        assert counts["delivered"] == len(a_out) and counts["free"] == BLOCKS - len(a_out)
    # Restart both ends: no outgoing byte handed out twice, no old frame accepted.
    a2, b2 = a.reopen("B"), b.reopen("A")
    off2, pad2 = a2.take("B", 48)
    assert off2 == off + 48 and pad2 != pad
    with pytest.raises(NetworkError):
        b2.peek("A", off, 48)
    assert b2.peek("A", off2, 48) == pad2
    assert b2.hash_key("A").material == a.keys.hash_key("B").material
    # Used keys are erased at both ends: the hash key's and the first pad's.
    assert a.relay.stream_bytes("B", "out", 0, HASH_KEY_BYTES + 96) is None
    assert b.relay.stream_bytes("A", "in", 0, HASH_KEY_BYTES + 96) is None


async def test_fail_closed_without_reserved_key(hop: Any) -> None:
    a, b, _ = hop
    with pytest.raises(NetworkError) as err:
        a.keys.hash_key("B")
    assert err.value.code is NetErrorCode.LINK_KEY
    with pytest.raises(NetworkError) as err:
        a.keys.take("B", 48)
    assert err.value.code is NetErrorCode.LINK_KEY and "no hash key" in err.value.reason
    # The peer link down: nothing reserved at either end, the keys go back to the pool.
    a.svc.bb84.up = False
    assert await a.keys.top_up("B") == []
    assert (await a.store.pool_counts(time.time()))["free"] == BLOCKS
    a.svc.bb84.up = True
    await _fill(a, b)
    held = a.keys.held_out("B")
    assert LOW_BYTES <= held <= HIGH_BYTES
    a.keys.take("B", held)  # all of it
    with pytest.raises(NetworkError) as err:
        a.keys.take("B", 1)
    assert err.value.code is NetErrorCode.LINK_KEY and "exhausted" in err.value.reason
    # Bytes the receiver never got (a lost KEYS frame) fail closed too.
    lost = await a.keys.top_up("B")
    off, _pad = a.keys.take("B", 48)
    assert lost and off >= lost[0][0]
    with pytest.raises(NetworkError):
        b.keys.peek("A", off, 48)
    assert "<keys redacted>" in repr(a.keys)


async def test_a_real_share_decrypts_with_the_pool_material_only(hop: Any) -> None:
    """A one-hop relay through the relay core over these suppliers: the Share on the
    wire is E(K) = key | x | t XOR the pool's bytes (control: not XOR the secret
    derivation)."""
    a, b, material = hop
    a_out: list[tuple[int, str]] = []
    while entries := await a.keys.top_up("B"):
        a_out += entries
        await b.keys.accept("A", entries)
    while entries := await b.keys.top_up("A"):
        await a.keys.accept("B", entries)
    na, nb = RelayNode("A", a.keys), RelayNode("B", b.keys)
    now = time.monotonic()
    key_id = na.start_relay("sae-a", "sae-b", [("A", "B")], 32, now)
    (to, frame), = na.data_to_send()
    assert to == "B"
    msg, offset, _tag, _signed = decode_frame(frame)
    assert isinstance(msg, Share)
    assert len(msg.ciphertext) == msg.key_bytes + AMD_BYTES
    pad = _stream_material(a_out, material, offset + PAD_BYTES, len(msg.ciphertext))
    share = bytes(x ^ y for x, y in zip(msg.ciphertext, pad, strict=True))
    wrong = link_stream(SECRET, "A", "B", offset + PAD_BYTES, len(msg.ciphertext))
    nb.receive_data("A", frame, now)
    events = []
    while (ev := nb.next_event()) is not None:
        events.append(ev)
    got = [e for e in events if isinstance(e, KeyAssembled)]
    assert len(got) == 1 and got[0].key_id == key_id
    assert got[0].key == share[:-AMD_BYTES] and amd.tag_matches(share)
    assert got[0].key != bytes(x ^ y for x, y in zip(msg.ciphertext, wrong,
                                                     strict=True))[:-AMD_BYTES]

