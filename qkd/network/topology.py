"""The KME network: nodes, links, node-disjoint paths and the link-state database.

A *node* is a KME, a *link* a QKD link between two KMEs with a state (up or down) and a
pool level (bits of link key left). Key relay (qkd.network.relay) sends each XOR share
of a key over its own path; the paths must share no node but the two ends, or a single
intermediate node would see every share and so the key (docs/network.md).

Path selection is a min-cost flow on the node-split graph: every node v becomes
v_in -> v_out with capacity 1 (the two ends: k), so any integral flow of value k is k
vertex-disjoint paths. Successive shortest paths (Bellman-Ford on the residual graph,
the graphs are small) find the flow of least total cost; a link costs one hop times a
weight larger than any sum of tie-break terms, plus a tie-break that is smaller for a
link with more key, so the result has the fewest total hops and, among those, prefers
full pools. Fewer than k paths is an error (fail closed), never a weaker relay.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from qkd.network.constants import (
    DEFAULT_MAX_HOPS,
    LSA_VERSION,
    MAX_LINKS,
    MAX_LSA_LINKS,
    MAX_NAME_BYTES,
    MAX_NODES,
    MAX_PATH_NODES,
    MAX_POOL_BITS,
    MAX_SHARES,
    MIN_KEY_BYTES,
    NAME_PATTERN,
    PAD_BYTES,
)
from qkd.network.errors import NetErrorCode, NetworkError

Path = tuple[str, ...]

# A link's pool must hold at least one minimal share, its pad and the ack's pad to be
# worth routing over; below that it has "run dry".
DEFAULT_MIN_POOL_BITS = 8 * (MIN_KEY_BYTES + 2 * PAD_BYTES)

_HOP_WEIGHT = 1 << 40
_TIE_MAX = 1 << 20  # tie-break per link; 2 * MAX_LINKS * _TIE_MAX < _HOP_WEIGHT


def _config_error(field_name: str, problem: str, fix: str) -> NetworkError:
    return NetworkError(NetErrorCode.BAD_CONFIG, f"{field_name}: {problem} (fix: {fix})")


def valid_name(value: object) -> bool:
    return (type(value) is str and NAME_PATTERN.fullmatch(value) is not None
            and len(value.encode()) <= MAX_NAME_BYTES)


def _link_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


@dataclass
class Link:
    """A QKD link between two KMEs. `a` < `b`, so each link has one spelling."""

    a: str
    """One end's node name (the smaller)."""
    b: str
    """The other end's node name."""
    up: bool
    """False while the link is down (no key flows, no relay over it)."""
    pool_bits: int
    """Bits of link key left in the pool, as last reported."""

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a


@dataclass
class Topology:
    """Nodes and links. Build with `from_config`, which validates everything."""

    nodes: tuple[str, ...]
    links: dict[tuple[str, str], Link] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Topology:
        """Parse {"nodes": [name, ...], "links": [{"a", "b", "state", "pool_bits"}]}.

        Every problem ends in one NetworkError(BAD_CONFIG) naming the field and the fix."""
        if not isinstance(config, Mapping):
            raise _config_error("topology", f"expected a table, got {type(config).__name__}",
                                "give a table with 'nodes' and 'links'")
        unknown = sorted(set(config) - {"nodes", "links"})
        if unknown:
            raise _config_error(f"topology.{unknown[0]}", "unknown field",
                                "remove it; the fields are 'nodes' and 'links'")
        nodes = config.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise _config_error("nodes", "missing or not a non-empty list",
                                "list the KME names, e.g. nodes = [\"kme-a\", \"kme-b\"]")
        if len(nodes) > MAX_NODES:
            raise _config_error("nodes", f"{len(nodes)} nodes, more than {MAX_NODES}",
                                "split the network")
        seen: set[str] = set()
        for i, name in enumerate(nodes):
            if not valid_name(name):
                raise _config_error(f"nodes[{i}]", f"{str(name)[:70]!r} is not a node name",
                                    "use 1-64 characters of A-Z a-z 0-9 _ . : - "
                                    "starting with a letter or digit")
            if name in seen:
                raise _config_error(f"nodes[{i}]", f"{name!r} is listed twice",
                                    "list each node once")
            seen.add(name)
        topo = cls(tuple(nodes))
        links = config.get("links", [])
        if not isinstance(links, list):
            raise _config_error("links", "not a list", "give a list of link tables")
        if len(links) > MAX_LINKS:
            raise _config_error("links", f"{len(links)} links, more than {MAX_LINKS}",
                                "split the network")
        for i, raw in enumerate(links):
            topo._add_config_link(f"links[{i}]", raw, seen)
        return topo

    def _add_config_link(self, where: str, raw: object, nodes: set[str]) -> None:
        if not isinstance(raw, Mapping):
            raise _config_error(where, "not a table", "give {a, b, state, pool_bits}")
        unknown = sorted(set(raw) - {"a", "b", "state", "pool_bits"})
        if unknown:
            raise _config_error(f"{where}.{unknown[0]}", "unknown field",
                                "remove it; a link has a, b, state and pool_bits")
        ends = []
        for end in ("a", "b"):
            name = raw.get(end)
            if type(name) is not str or name not in nodes:
                raise _config_error(f"{where}.{end}", f"{str(name)[:70]!r} is not a listed node",
                                    "name a node from 'nodes'")
            ends.append(name)
        if ends[0] == ends[1]:
            raise _config_error(f"{where}.b", "a link from a node to itself",
                                "connect two different nodes")
        state = raw.get("state", "up")
        if state not in ("up", "down"):
            raise _config_error(f"{where}.state", f"{str(state)[:70]!r}",
                                "use \"up\" or \"down\"")
        pool = raw.get("pool_bits", 0)
        if type(pool) is not int or not 0 <= pool <= MAX_POOL_BITS:
            raise _config_error(f"{where}.pool_bits", f"{str(pool)[:70]!r} is not an "
                                f"integer in [0, {MAX_POOL_BITS}]", "give the pool in bits")
        key = _link_key(ends[0], ends[1])
        if key in self.links:
            raise _config_error(where, f"a second link between {key[0]!r} and {key[1]!r}",
                                "list each link once")
        self.links[key] = Link(key[0], key[1], state == "up", pool)

    def link(self, a: str, b: str) -> Link:
        try:
            return self.links[_link_key(a, b)]
        except KeyError:
            raise NetworkError(NetErrorCode.UNKNOWN_NODE,
                               f"no link between {a!r} and {b!r}") from None

    def neighbours(self, node: str) -> list[str]:
        return sorted(link.other(node) for link in self.links.values()
                      if node in (link.a, link.b))

    def set_link(self, a: str, b: str, *, up: bool | None = None,
                 pool_bits: int | None = None) -> None:
        link = self.link(a, b)
        if up is not None:
            link.up = up
        if pool_bits is not None:
            link.pool_bits = pool_bits


# ----------------------------------------------------------------- disjoint paths


class _Flow:
    """A small residual graph for min-cost flow (adjacency lists of edge indices)."""

    def __init__(self, n: int) -> None:
        self.adj: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[int] = []
        self.cost: list[int] = []

    def add(self, u: int, v: int, cap: int, cost: int) -> None:
        for a, b, c, w in ((u, v, cap, cost), (v, u, 0, -cost)):
            self.adj[a].append(len(self.to))
            self.to.append(b)
            self.cap.append(c)
            self.cost.append(w)

    def augment(self, s: int, t: int) -> bool:
        """One shortest (least cost) augmenting path of one unit; False if none."""
        n = len(self.adj)
        inf = float("inf")
        dist: list[float] = [inf] * n
        via = [-1] * n
        dist[s] = 0
        queue = deque([s])
        queued = [False] * n
        queued[s] = True
        while queue:  # SPFA: residual edges have negative costs, Dijkstra would need potentials
            u = queue.popleft()
            queued[u] = False
            for e in self.adj[u]:
                if self.cap[e] > 0 and dist[u] + self.cost[e] < dist[self.to[e]]:
                    v = self.to[e]
                    dist[v] = dist[u] + self.cost[e]
                    via[v] = e
                    if not queued[v]:
                        queued[v] = True
                        queue.append(v)
        if dist[t] == inf:
            return False
        v = t
        while v != s:
            e = via[v]
            self.cap[e] -= 1
            self.cap[e ^ 1] += 1
            v = self.to[e ^ 1]
        return True


def _bfs_hops(adj: Mapping[str, list[str]], start: str) -> dict[str, int]:
    dist = {start: 0}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def disjoint_paths(topo: Topology, src: str, dst: str, k: int, *,
                   max_hops: int = DEFAULT_MAX_HOPS, avoid: Iterable[str] = (),
                   min_pool_bits: int = DEFAULT_MIN_POOL_BITS) -> list[Path]:
    """k paths from `src` to `dst` that share no node but the ends, fewest total hops
    first, then most key; sorted by (hops, -smallest pool on the path).

    Links that are down or hold less than `min_pool_bits` and the nodes in `avoid` are
    not used. Raises NetworkError(NO_PATHS) when fewer than k such paths of at most
    `max_hops` hops exist (the flow minimises the total, so in rare graphs a set whose
    longest path fits may exist that this does not find: it fails closed then too)."""
    nodes = set(topo.nodes)
    for end in (src, dst):
        if end not in nodes:
            raise NetworkError(NetErrorCode.UNKNOWN_NODE, f"{end!r} is not in the topology")
    if src == dst:
        raise NetworkError(NetErrorCode.PATH, "source and destination are the same node")
    if type(k) is not int or not 1 <= k <= MAX_SHARES:
        raise NetworkError(NetErrorCode.NO_PATHS, f"k={k!r} is not in [1, {MAX_SHARES}]")
    if type(max_hops) is not int or not 1 <= max_hops <= MAX_PATH_NODES - 1:
        raise NetworkError(NetErrorCode.NO_PATHS,
                           f"max_hops={max_hops!r} is not in [1, {MAX_PATH_NODES - 1}]")
    avoided = set(avoid)
    if src in avoided or dst in avoided:
        raise NetworkError(NetErrorCode.PATH, "the source or destination is in avoid")
    usable = {n for n in topo.nodes if n not in avoided}
    adj: dict[str, list[str]] = {n: [] for n in usable}
    for link in topo.links.values():
        if (link.up and link.pool_bits >= min_pool_bits
                and link.a in usable and link.b in usable):
            adj[link.a].append(link.b)
            adj[link.b].append(link.a)
    # A node that cannot lie on any path of at most max_hops hops only misleads the
    # flow into a long detour; drop it first.
    from_src, to_dst = _bfs_hops(adj, src), _bfs_hops(adj, dst)
    keep = sorted(n for n in usable if n in from_src and n in to_dst
                  and from_src[n] + to_dst[n] <= max_hops)
    index = {n: i for i, n in enumerate(keep)}
    paths: list[Path] = []
    if src in index and dst in index:
        flow = _Flow(2 * len(keep))
        for n, i in index.items():
            flow.add(2 * i, 2 * i + 1, k if n in (src, dst) else 1, 0)
        arcs: dict[tuple[int, int], int] = {}
        for link in topo.links.values():
            if link.a in index and link.b in index and link.b in adj[link.a]:
                tie = _TIE_MAX - min(link.pool_bits >> 10, _TIE_MAX)
                for u, v in ((link.a, link.b), (link.b, link.a)):
                    arcs[(index[u], index[v])] = len(flow.to)
                    flow.add(2 * index[u] + 1, 2 * index[v], 1, _HOP_WEIGHT + tie)
        s, t = 2 * index[src] + 1, 2 * index[dst]
        found = 0
        while found < k and flow.augment(s, t):
            found += 1
        used = {pair for pair, e in arcs.items() if flow.cap[e] == 0}
        for _ in range(found):
            path = [src]
            while path[-1] != dst:
                u = index[path[-1]]
                v = next(v for (a, v) in sorted(used) if a == u)
                used.discard((u, v))
                path.append(keep[v])
            paths.append(tuple(path))
    too_long = [p for p in paths if len(p) - 1 > max_hops]
    if len(paths) < k or too_long:
        raise NetworkError(
            NetErrorCode.NO_PATHS,
            f"{len(paths) - len(too_long)} node-disjoint path(s) from {src!r} to {dst!r} "
            f"within {max_hops} hops, {k} needed (links down or below {min_pool_bits} "
            f"bits and avoided nodes {sorted(avoided)} are not used)")

    def rank(p: Path) -> tuple[int, int]:
        return (len(p) - 1, -min(topo.link(a, b).pool_bits for a, b in pairwise(p)))

    return sorted(paths, key=rank)


# ----------------------------------------------------------- link-state adverts


@dataclass(frozen=True)
class LinkReport:
    """One link as its end node sees it, inside a LinkStateAd."""

    neighbour: str
    """The node at the link's other end."""
    up: bool
    """Whether the link runs (key flows) now."""
    pool_bits: int
    """Bits of link key in the reporting node's pool for this link."""


# Wire (big-endian):
#   version u8 | type u8 = 'L' | origin: len u8 + ASCII | seq u64 | count u16 |
#   count x (neighbour: len u8 + ASCII | state u8 (0 down, 1 up) | pool_bits u64)
# 12 + len(origin) + sum(10 + len(neighbour)) bytes; at most
# 12 + 64 + 256 * 74 = 19,020 bytes. Reports are sorted by neighbour, one per
# neighbour, so each advert has exactly one encoding.
_LSA_TYPE = 0x4C


@dataclass(frozen=True)
class LinkStateAd:
    """A node's advertisement of its links' state and pool levels."""

    origin: str
    """The node whose links these are."""
    seq: int
    """Increases with every advert of `origin`; older or equal ones are stale."""
    links: tuple[LinkReport, ...]
    """Sorted by neighbour, one per neighbour."""

    def encode(self) -> bytes:
        _check_lsa(self)
        out = [struct.pack(">BB", LSA_VERSION, _LSA_TYPE), _name(self.origin),
               struct.pack(">QH", self.seq, len(self.links))]
        for r in self.links:
            out += [_name(r.neighbour), struct.pack(">BQ", int(r.up), r.pool_bits)]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> LinkStateAd:
        r = Reader(data)
        if r.u8() != LSA_VERSION or r.u8() != _LSA_TYPE:
            raise NetworkError(NetErrorCode.DECODE, "LSA: unknown version or type")
        origin = r.name("LSA origin")
        seq = r.u64()
        count = r.u16()
        if count > MAX_LSA_LINKS:
            raise NetworkError(NetErrorCode.DECODE, f"LSA: {count} links, at most "
                               f"{MAX_LSA_LINKS}")
        links = []
        for _ in range(count):
            neighbour = r.name("LSA neighbour")
            state = r.u8()
            if state > 1:
                raise NetworkError(NetErrorCode.DECODE, "LSA: link state is not 0 or 1")
            links.append(LinkReport(neighbour, bool(state), r.u64()))
        r.end("LSA")
        lsa = cls(origin, seq, tuple(links))
        _check_lsa(lsa)
        return lsa


def _check_lsa(lsa: LinkStateAd) -> None:
    names = [r.neighbour for r in lsa.links]
    if names != sorted(set(names)):
        raise NetworkError(NetErrorCode.DECODE,
                           "LSA: neighbours are not sorted or one is listed twice")
    if lsa.origin in names:
        raise NetworkError(NetErrorCode.DECODE, "LSA: a node reports a link to itself")
    if not 0 <= lsa.seq < 1 << 64 or len(lsa.links) > MAX_LSA_LINKS:
        raise NetworkError(NetErrorCode.DECODE, "LSA: seq or link count out of range")
    for r in lsa.links:
        if not 0 <= r.pool_bits <= MAX_POOL_BITS:
            raise NetworkError(NetErrorCode.DECODE, f"LSA: pool_bits above {MAX_POOL_BITS}")
    for n in [lsa.origin, *names]:
        if not valid_name(n):
            raise NetworkError(NetErrorCode.DECODE, "LSA: a node name is not valid")


def _name(value: str) -> bytes:
    raw = value.encode("ascii")
    return bytes([len(raw)]) + raw


class Reader:
    """Strict reader: every short read or bad name is a NetworkError(DECODE)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise NetworkError(NetErrorCode.DECODE, "input is not bytes")
        self._data = bytes(data)
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise NetworkError(NetErrorCode.DECODE, "truncated")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def name(self, what: str) -> str:
        n = self.u8()
        if not 1 <= n <= MAX_NAME_BYTES:
            raise NetworkError(NetErrorCode.DECODE, f"{what}: name length {n}")
        raw = self.take(n)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise NetworkError(NetErrorCode.DECODE, f"{what}: name is not ASCII") from None
        if not valid_name(text):
            raise NetworkError(NetErrorCode.DECODE, f"{what}: not a valid name")
        return text

    @property
    def offset(self) -> int:
        return self._pos

    def end(self, what: str) -> None:
        if self._pos != len(self._data):
            raise NetworkError(NetErrorCode.DECODE, f"{what}: trailing bytes")


# ------------------------------------------------------------ link-state database


@dataclass(frozen=True)
class RoutesChanged:
    """The paths for a watched (src, dst, k) changed; relays should use these now."""

    src: str
    """Source node of the watched pair."""
    dst: str
    """Destination node."""
    k: int
    """Node-disjoint paths asked for."""
    paths: tuple[Path, ...]
    """The new paths, best first."""


@dataclass(frozen=True)
class RoutesUnavailable:
    """A watched (src, dst, k) has fewer than k disjoint paths now: relays must stop
    (fail closed) until a RoutesChanged brings paths back."""

    src: str
    """Source node of the watched pair."""
    dst: str
    """Destination node."""
    k: int
    """Node-disjoint paths asked for."""
    reason: str
    """Why, from the NetworkError (no key bytes)."""


RouteEvent = RoutesChanged | RoutesUnavailable


@dataclass(frozen=True)
class _Watch:
    src: str
    dst: str
    k: int
    max_hops: int
    avoid: tuple[str, ...]


class LinkStateDb:
    """The latest advert of every node and the routes they give, sans-I/O.

    A link counts as up only while no end's latest advert says it is down, and its
    pool is the smaller of the two ends' reports: one side's optimism never routes key
    over a link the other side cannot serve."""

    def __init__(self, topology: Topology, *,
                 min_pool_bits: int = DEFAULT_MIN_POOL_BITS) -> None:
        self.topology = topology
        self.min_pool_bits = min_pool_bits
        self._seq: dict[str, int] = {}
        self._reports: dict[tuple[str, str], LinkReport] = {}  # (origin, neighbour)
        self._watches: dict[_Watch, tuple[Path, ...] | None] = {}
        self.stale = 0  # adverts ignored as older than or equal to the latest
        self.rejected = 0  # adverts that did not decode or named unknown links

    def watch(self, src: str, dst: str, k: int, *, max_hops: int = DEFAULT_MAX_HOPS,
              avoid: Sequence[str] = ()) -> tuple[Path, ...]:
        """Recompute these routes on every change from now on; returns the current ones
        (raises NetworkError(NO_PATHS) if there are none, after registering)."""
        w = _Watch(src, dst, k, max_hops, tuple(sorted(avoid)))
        self._watches[w] = None
        paths = self._compute(w)
        self._watches[w] = paths
        return paths

    def routes(self, src: str, dst: str, k: int, *, max_hops: int = DEFAULT_MAX_HOPS,
               avoid: Sequence[str] = ()) -> tuple[Path, ...]:
        return self._compute(_Watch(src, dst, k, max_hops, tuple(sorted(avoid))))

    def _compute(self, w: _Watch) -> tuple[Path, ...]:
        return tuple(disjoint_paths(self.topology, w.src, w.dst, w.k, max_hops=w.max_hops,
                                    avoid=w.avoid, min_pool_bits=self.min_pool_bits))

    def receive(self, data: bytes) -> list[RouteEvent]:
        """Decode and apply one advert's bytes. A bad advert is counted and re-raised."""
        try:
            lsa = LinkStateAd.decode(data)
        except NetworkError:
            self.rejected += 1
            raise
        return self.apply(lsa)

    def apply(self, lsa: LinkStateAd) -> list[RouteEvent]:
        if lsa.origin not in self.topology.nodes:
            self.rejected += 1
            raise NetworkError(NetErrorCode.UNKNOWN_NODE,
                               f"advert from {lsa.origin!r}, not in the topology")
        for r in lsa.links:
            if _link_key(lsa.origin, r.neighbour) not in self.topology.links:
                self.rejected += 1
                raise NetworkError(NetErrorCode.UNKNOWN_NODE,
                                   f"advert from {lsa.origin!r} names a link to "
                                   f"{r.neighbour!r} the topology does not have")
        if lsa.seq <= self._seq.get(lsa.origin, -1):
            self.stale += 1
            return []
        self._seq[lsa.origin] = lsa.seq
        for r in lsa.links:
            self._reports[(lsa.origin, r.neighbour)] = r
            self._merge(lsa.origin, r.neighbour)
        return self._recompute()

    def _merge(self, a: str, b: str) -> None:
        reports = [r for r in (self._reports.get((a, b)), self._reports.get((b, a))) if r]
        self.topology.set_link(a, b, up=all(r.up for r in reports),
                               pool_bits=min(r.pool_bits for r in reports))

    def _recompute(self) -> list[RouteEvent]:
        events: list[RouteEvent] = []
        for w, old in self._watches.items():
            try:
                new: tuple[Path, ...] | None = self._compute(w)
            except NetworkError as exc:
                new = None
                if old is not None:
                    events.append(RoutesUnavailable(w.src, w.dst, w.k, exc.reason))
            if new is not None and new != old:
                events.append(RoutesChanged(w.src, w.dst, w.k, new))
            self._watches[w] = new
        return events
