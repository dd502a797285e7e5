"""A set that remembers only its newest `limit` entries: the replay checks in front of
durable once-only delivery (a gateway's recent QKD key IDs, a client's delivered ones).
Bounded, because a flood of hellos can name any number of random IDs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class BoundedSet:
    def __init__(self, limit: int = 65536) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._items: dict[str, None] = {}  # insertion order: oldest first

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def update(self, items: Iterable[str]) -> None:
        """Add `items`; past the limit the oldest entries are forgotten."""
        for item in items:
            self._items.pop(item, None)  # re-adding makes an entry the newest again
            self._items[item] = None
        while len(self._items) > self.limit:
            del self._items[next(iter(self._items))]
