"""What the BB84 link needs of the KME's key store: the `KeyPool` interface and the two
types that cross it. The store (qkd/kme/keystore.py) implements it, so the link sits
below the KME and never imports it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from qkd.common.errors import QkdError


class PoolError(QkdError):
    """A pool request cannot be served; `reason` says why, no key material inside."""

    def __init__(self, reason: str, key_ids: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_ids = list(key_ids)


@dataclass(frozen=True)
class ReservedKey:
    """A key made of one or more pool blocks, reserved for master -> slave."""

    key_id: str
    block_ids: tuple[str, ...]
    size_bits: int


class KeyPool(Protocol):
    """The key store as the link adapter uses it (all calls are the store's own
    transactions; none returns key material)."""

    async def deposit(self, blocks: Sequence[tuple[str, bytes]], now: float,
                      lifetime: float, limit: int | None = None,
                      count_reserved: bool = False) -> int:
        """Store a committed round's blocks; returns how many the limit trimmed."""
        ...

    async def pool_level(self, now: float) -> int:
        """Blocks that count against the pool limit now."""
        ...

    async def release(self, keys: Sequence[ReservedKey]) -> None:
        """Give reserved blocks back to the free pool."""
        ...

    async def apply_reservation(self, master: str, slave: str,
                                keys: Sequence[ReservedKey], now: float) -> None:
        """Reserve the peer's chosen blocks for (master, slave); PoolError if it cannot."""
        ...
