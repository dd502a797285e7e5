"""Relay link keys from a BB84 link's pool: the LinkKeySupplier part for BB84
neighbours (docs/network.md, "Relay link keys from the BB84 pool").

Per direction (me -> neighbour) the sender reserves pool keys for the pseudo SAE pair
(`relay:<me>`, `relay:<neighbour>`) through the link's RESERVE (the peer KME records the
same reservation), takes them out of its pool and appends them to its outgoing stream;
it then names them, with their stream offsets, in a KEYS frame on the relay channel and
the neighbour takes the same keys out of its pool into its incoming stream. Stream
byte o is byte o of the concatenated key material. The link's Wegman-Carter hash key is
the first HASH_KEY_BYTES of the stream from the smaller KME ID to the larger one.
"""

from __future__ import annotations

import math
import struct
import time
from typing import TYPE_CHECKING

from qkd.common.log import get_logger
from qkd.kme.network_config import RELAY_SAE_PREFIX
from qkd.kme.relay_store import RelayStore
from qkd.link.bb84 import LinkUnavailable
from qkd.link.pool import PoolError
from qkd.link.wegman_carter import HASH_KEY_BYTES, HashKey
from qkd.network.errors import NetErrorCode, NetworkError

if TYPE_CHECKING:
    from qkd.kme.service import KmeService

log = get_logger("qkd.kme.relay")

# Outgoing stream bytes kept reserved ahead of need: topped up below LOW to HIGH (a
# 3-key relay costs 3 * 64 bytes per hop with 256-bit keys).
LOW_BYTES = 2048
HIGH_BYTES = 4096
# Keys named in one KEYS frame (the channel's frame limit holds far more).
MAX_KEYS_PER_FRAME = 128
_COUNTERS = ("pool_out_next", "pool_in_mark", "pool_bits_out", "pool_bits_in",
             "pool_keys_out", "pool_keys_in")


def relay_sae(kme_id: str) -> str:
    """The pseudo SAE a KME's relay reserves link keys as (never a configured SAE)."""
    return RELAY_SAE_PREFIX + kme_id


def encode_keys(entries: list[tuple[int, str]]) -> bytes:
    """The KEYS frame body: (stream offset, pool key ID) in stream order."""
    out = [struct.pack(">H", len(entries))]
    for off, kid in entries:
        raw = kid.encode()
        out.append(struct.pack(">QB", off, len(raw)) + raw)
    return b"".join(out)


def decode_keys(body: bytes) -> list[tuple[int, str]]:
    """Inverse of encode_keys; ValueError on anything malformed."""
    (n,) = struct.unpack_from(">H", body)
    at, out = 2, []
    for _ in range(n):
        off, ln = struct.unpack_from(">QB", body, at)
        at += 9
        raw = body[at:at + ln]
        if len(raw) != ln:
            raise ValueError("KEYS frame truncated")
        at += ln
        out.append((off, raw.decode("ascii")))
    if at != len(body) or n > MAX_KEYS_PER_FRAME:
        raise ValueError("KEYS frame malformed")
    return out


class PoolLinkKeys:
    """LinkKeySupplier for BB84 neighbours over their pools and the relay store.

    Synchronous calls (the relay core's) only read and write the relay store; the
    pool work (reserve, RESERVE to the peer, take) is the async `top_up` and
    `accept`, run ahead of need by the relay service."""

    def __init__(self, me: str, store: RelayStore, services: dict[str, KmeService]) -> None:
        self.me = me
        self._store = store
        self._services = services
        saved = store.counters()
        self._c: dict[tuple[str, str], int] = {}
        for nb in services:
            for name in _COUNTERS:
                self._c[(nb, name)] = saved.get((nb, name), 0)
            # The hash key's bytes open the smaller ID's stream: data starts after them.
            if self.me < nb:
                self._c[(nb, "pool_out_next")] = max(self._c[(nb, "pool_out_next")],
                                                     HASH_KEY_BYTES)
            else:
                self._c[(nb, "pool_in_mark")] = max(self._c[(nb, "pool_in_mark")],
                                                    HASH_KEY_BYTES)
        self._hash: dict[str, HashKey] = {}
        self.free_blocks: dict[str, int] = dict.fromkeys(services, 0)  # cached levels

    def __repr__(self) -> str:
        return f"PoolLinkKeys({self.me!r}, neighbours={sorted(self._services)}, " \
               "<keys redacted>)"

    def neighbours(self) -> list[str]:
        return sorted(self._services)

    def _check(self, nb: str) -> None:
        if nb not in self._services:
            raise NetworkError(NetErrorCode.UNKNOWN_NODE,
                               f"no link key for neighbour {nb!r}")

    def _save(self, nb: str) -> None:
        self._store.set_counters({k: v for k, v in self._c.items() if k[0] == nb})

    # ------------------------------------------------------ LinkKeySupplier

    def hash_key(self, neighbour: str) -> HashKey:
        self._check(neighbour)
        hk = self._hash.get(neighbour)
        if hk is None:
            raw = self._store.hash_key(neighbour)
            if raw is None:
                raw = self._store.stream_bytes(
                    neighbour, "out" if self.me < neighbour else "in", 0, HASH_KEY_BYTES)
                if raw is None:
                    raise NetworkError(NetErrorCode.LINK_KEY, "no hash key yet for the "
                                       f"link to {neighbour!r} (its pool keys have not "
                                       "been reserved)")
                self._store.set_hash_key(neighbour, raw)
                self._store.erase_stream_below(
                    neighbour, "out" if self.me < neighbour else "in", HASH_KEY_BYTES)
            hk = self._hash[neighbour] = HashKey(raw)
        return hk

    def take(self, neighbour: str, nbytes: int) -> tuple[int, bytes]:
        # The hash key first: erasing used keys below would take its bytes with them.
        self.hash_key(neighbour)
        off = self._c[(neighbour, "pool_out_next")]
        data = self._store.stream_bytes(neighbour, "out", off, nbytes)
        if data is None:
            raise NetworkError(NetErrorCode.LINK_KEY, f"link key to {neighbour!r} "
                               "exhausted (not enough pool key reserved for the relay)")
        self._c[(neighbour, "pool_out_next")] = off + nbytes
        self._c[(neighbour, "pool_bits_out")] += 8 * nbytes
        self._save(neighbour)  # on disk before the frame under these bytes leaves
        self._store.erase_stream_below(neighbour, "out", off + nbytes)
        return off, data

    def peek(self, neighbour: str, offset: int, nbytes: int) -> bytes:
        self._check(neighbour)
        data = None
        if offset >= self._c[(neighbour, "pool_in_mark")]:
            data = self._store.stream_bytes(neighbour, "in", offset, nbytes)
        if data is None:
            raise NetworkError(NetErrorCode.LINK_KEY, f"link key from {neighbour!r} at "
                               f"offset {offset} already used or not held")
        return data

    def consume(self, neighbour: str, offset: int, nbytes: int) -> None:
        mark = max(self._c[(neighbour, "pool_in_mark")], offset + nbytes)
        self._c[(neighbour, "pool_in_mark")] = mark
        self._c[(neighbour, "pool_bits_in")] += 8 * nbytes
        self._save(neighbour)
        self._store.erase_stream_below(neighbour, "in", mark)

    # ------------------------------------------------------------ pool side

    def held_out(self, nb: str) -> int:
        """Outgoing stream bytes reserved and not yet used."""
        return max(0, self._store.stream_end(nb, "out") - self._c[(nb, "pool_out_next")])

    def announce_list(self, nb: str) -> list[tuple[int, str]]:
        """Outgoing keys still held here: what the neighbour is told again when the
        channel comes back (it ignores the ones it has)."""
        return self._store.stream_keys(nb, "out")

    async def refresh_level(self, nb: str) -> None:
        svc = self._services[nb]
        self.free_blocks[nb] = await svc.store.free_blocks(time.time())

    async def top_up(self, nb: str) -> list[tuple[int, str]]:
        """Reserve pool keys for (relay:me, relay:nb) at both KMEs and append them to
        the outgoing stream; returns the (offset, key ID) entries to announce."""
        svc = self._services[nb]
        assert svc.bb84 is not None
        key_size = svc.config.limits.key_size
        end = self._store.stream_end(nb, "out")
        held = end - self._c[(nb, "pool_out_next")]  # < 0 before the hash key's bytes
        if held >= LOW_BYTES:
            return []
        free = await svc.store.free_blocks(time.time())
        self.free_blocks[nb] = free
        want = math.ceil((HIGH_BYTES - held) / (key_size // 8))
        # Never more than half the free pool at once: the link's SAEs keep theirs.
        n = min(want, free // 2, MAX_KEYS_PER_FRAME)
        if n <= 0:
            return []
        master, slave = relay_sae(self.me), relay_sae(nb)
        try:
            keys = await svc.store.reserve(master, slave, n, key_size, time.time(),
                                           newest_first=svc.config.link.role == "bob")
        except PoolError:
            return []
        try:
            await svc.bb84.reserve_at_peer(master, slave, keys)
        except LinkUnavailable as exc:
            await svc.store.release(keys)
            log.info("relay_keys_not_reserved", neighbour=nb, reason=str(exc))
            return []
        taken = await svc.store.take([k.key_id for k in keys], master, slave, time.time())
        entries: list[tuple[int, str, bytes]] = []
        off = end
        for kid, material in taken:
            entries.append((off, kid, material))
            off += len(material)
        self._store.add_stream_keys(nb, "out", entries)
        self._c[(nb, "pool_keys_out")] += len(entries)
        self._save(nb)
        log.info("relay_keys_reserved", neighbour=nb, keys=len(entries), offset=end)
        return [(o, k) for o, k, _ in entries]

    async def accept(self, nb: str, entries: list[tuple[int, str]]) -> int:
        """The neighbour reserved these keys for (relay:nb, relay:me): take them out of
        this pool into the incoming stream at their offsets. Keys already held, below
        the watermark, or that this pool cannot give are skipped (frames under them
        fail closed). Returns how many joined."""
        svc = self._services[nb]
        known = {k for _, k in self._store.stream_keys(nb, "in", held=False)}
        mark = self._c[(nb, "pool_in_mark")]
        if nb < self.me and self._store.hash_key(nb) is None:
            mark = 0  # the hash key's bytes (below the first data offset) are still due
        key_bytes = svc.config.limits.key_size // 8
        new = [(o, k) for o, k in entries if k not in known and o + key_bytes > mark]
        got: list[tuple[int, str, bytes]] = []
        master, slave = relay_sae(nb), relay_sae(self.me)
        try:  # all at once (one WAL checkpoint) ...
            taken = dict(await svc.store.take([k for _, k in new], master, slave,
                                              time.time())) if new else {}
            got = [(o, k, taken[k]) for o, k in new]
        except PoolError:
            # ... else one by one: a key this pool cannot give (expired) must not cost
            # the rest.
            for o, k in new:
                try:
                    ((_, material),) = await svc.store.take([k], master, slave, time.time())
                except PoolError as exc:
                    log.warning("relay_key_not_taken", neighbour=nb, key_id=k,
                                reason=exc.reason)
                    continue
                got.append((o, k, material))
        if got:
            self._store.add_stream_keys(nb, "in", got)
            self._c[(nb, "pool_keys_in")] += len(got)
            self._save(nb)
        return len(got)

    def usage(self) -> dict[str, dict[str, int]]:
        return {nb: {"bits_out": self._c[(nb, "pool_bits_out")],
                     "bits_in": self._c[(nb, "pool_bits_in")],
                     "pool_keys_charged": self._c[(nb, "pool_keys_out")]
                     + self._c[(nb, "pool_keys_in")],
                     "relay_keys_reserved_out": self._c[(nb, "pool_keys_out")],
                     "relay_keys_taken_in": self._c[(nb, "pool_keys_in")],
                     "relay_bytes_held_out": self.held_out(nb)}
                for nb in sorted(self._services)}
