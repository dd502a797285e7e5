"""In-memory pumping between RelayNode cores (tests/qkd/network): frames go in FIFO
order, and a tap may drop, change, duplicate or hold back any frame on its way."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import pairwise

from qkd.network.relay import (
    Event,
    InMemoryLinkKeys,
    KeyAssembled,
    KeyDeliverable,
    KeyDiscarded,
    RelayNode,
)

Tap = Callable[[str, str, bytes], list[bytes]]


class Net:
    def __init__(self, pairs: list[tuple[str, str]], link_bytes: int = 1 << 15,
                 link_rng: Callable[[int], bytes] | None = None,
                 node_rng: dict[str, Callable[[int], bytes]] | None = None) -> None:
        kw = {} if link_rng is None else {"rng": link_rng}
        self.keys = InMemoryLinkKeys.links(pairs, link_bytes, **kw)
        self.nodes = {n: RelayNode(n, k, **({"rng": node_rng[n]} if node_rng and n in node_rng
                                            else {}))
                      for n, k in self.keys.items()}
        self.events: dict[str, list[Event]] = {n: [] for n in self.nodes}
        self.wire: list[tuple[str, str, bytes]] = []  # every frame delivered
        self.stored: dict[str, dict[str, bytes]] = {n: {} for n in self.nodes}
        self.delivered: dict[str, dict[str, bytes]] = {n: {} for n in self.nodes}

    def pump(self, now: float = 0.0, tap: Tap | None = None, store: bool = True) -> None:
        queue: deque[tuple[str, str, bytes]] = deque()
        while True:
            for name, node in self.nodes.items():
                self._drain(name, now, store)  # first: key_stored() queues the ACKs
                for to, frame in node.data_to_send():
                    queue.append((name, to, frame))
            if not queue:
                return
            src, dst, frame = queue.popleft()
            for f in tap(src, dst, frame) if tap else [frame]:
                self.wire.append((src, dst, f))
                self.nodes[dst].receive_data(src, f, now)

    def _drain(self, name: str, now: float, store: bool) -> None:
        node = self.nodes[name]
        while (ev := node.next_event()) is not None:
            self.events[name].append(ev)
            if isinstance(ev, KeyAssembled):
                self.stored[name][ev.key_id] = ev.key
                if store:
                    node.key_stored(ev.key_id, now)
            elif isinstance(ev, KeyDiscarded):
                self.stored[name].pop(ev.key_id, None)
            elif isinstance(ev, KeyDeliverable):
                assert ev.key_id not in self.delivered[name]  # delivered once
                self.delivered[name][ev.key_id] = ev.key

    def timers(self, now: float) -> None:
        for node in self.nodes.values():
            node.handle_timer(now)
        self.pump(now)

    def bits_taken(self) -> int:
        return sum(sum(k.bits_taken.values()) for k in self.keys.values())


def line(names: str) -> list[tuple[str, str]]:
    return list(pairwise(names))


def ring(names: str) -> list[tuple[str, str]]:
    return [*pairwise(names), (names[-1], names[0])]
