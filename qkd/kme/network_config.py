"""A KME's links and its place in the QKD network: `[[neighbour]]` and `[network]`.

Called from `KmeConfig.load` (qkd/kme/config.py); configs/network/ has examples and
docs/network.md explains every field. The old `[peer]` + `[link]` form is one neighbour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qkd.common.confload import ConfigError, HostPort, Section
from qkd.etsi014.messages import is_valid_id
from qkd.network.constants import DEFAULT_MAX_HOPS, MAX_PATH_NODES, MAX_SHARES
from qkd.network.errors import NetworkError
from qkd.network.topology import Topology

if TYPE_CHECKING:
    from qkd.kme.config import LinkConfig, PeerConfig

# A [[network.link]] without pool_bits is assumed to have key: this KME only sees the
# pools of its own links (and uses those), so a far link's level is unknown, not empty.
ASSUMED_POOL_BITS = 1 << 40


@dataclass(frozen=True)
class NeighbourConfig:
    """One link of this KME: the KME at its other end, the link, and the SQLite file
    holding that link's pool and deliveries."""

    peer: PeerConfig
    link: LinkConfig
    db: Path
    relay: HostPort | None = None  # dial the neighbour's [network] relay_listen here


@dataclass(frozen=True)
class Policy:
    """Multipath policy for relayed keys: k node-disjoint paths (the key is the XOR of
    k shares), at most max_hops hops per path, never through `avoid`."""

    k: int = 1
    max_hops: int = DEFAULT_MAX_HOPS
    avoid: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkConfig:
    """[network]: where remote SAEs are, the static topology and the relay policy."""

    relay_listen: HostPort | None
    """Where neighbours dial in for the relay channel (None: this KME dials them all)."""
    remote_saes: dict[str, str]
    """SAE ID -> KME ID, for SAEs behind KMEs that are not neighbours."""
    nodes: tuple[str, ...]
    links: tuple[dict[str, object], ...]
    """As for Topology.from_config (a fresh Topology per use: it is mutable)."""
    default: Policy = field(default_factory=Policy)
    pairs: dict[tuple[str, str], Policy] = field(default_factory=dict)
    """(master SAE, slave SAE) -> its own policy."""

    def topology(self) -> Topology:
        return Topology.from_config({"nodes": list(self.nodes),
                                     "links": [dict(x) for x in self.links]})

    def policy(self, master: str, slave: str) -> Policy:
        return self.pairs.get((master, slave), self.default)


def load_neighbours(root: Section, kme_id: str, local: tuple[str, ...], db: Path,
                    parse_peer: Callable[[Section, str, list[str]], PeerConfig],
                    parse_link: Callable[[Section, Path], LinkConfig],
                    ) -> tuple[NeighbourConfig, ...]:
    """Every [[neighbour]] table: kme_id, sae_ids, optional db and relay, and a
    [neighbour.link] table with the fields of today's [link]. The [peer] and [link]
    parsers come from qkd.kme.config (passed in: config imports this module)."""
    for old in ("peer", "link"):
        if root.has(old):
            raise root.error(old, "given together with [[neighbour]]",
                             "describe every link as a [[neighbour]] table (with its "
                             "[neighbour.link]) and remove [peer] and [link]")
    out: list[NeighbourConfig] = []
    seen_saes: dict[str, str] = {}
    dbs: set[Path] = set()
    for i, sec in enumerate(root.sections("neighbour")):
        peer = parse_peer(sec, kme_id, list(local))
        if any(n.peer.kme_id == peer.kme_id for n in out):
            raise sec.error("kme_id", f"KME {peer.kme_id!r} is listed twice",
                            "one [[neighbour]] table per neighbour KME")
        for sae in peer.sae_ids:
            if sae in seen_saes:
                raise sec.error("sae_ids", f"{sae!r} is also behind {seen_saes[sae]!r}",
                                "an SAE belongs to exactly one KME; remove it from one list")
            seen_saes[sae] = peer.kme_id
        # The first link keeps [kme] db, so a KME that gains a second link keeps the
        # deliveries and pool of its first.
        default_db = db if i == 0 else Path(f"{db}.{peer.kme_id}")
        ndb = sec.path("db", default_db, fix="set it to this link's SQLite file, e.g. "
                       f'"../state/{kme_id}.{peer.kme_id}.sqlite3" (one per link)')
        if ndb in dbs:
            raise sec.error("db", f"{str(ndb)!r} is also another link's db",
                            "give every [[neighbour]] its own db file")
        dbs.add(ndb)
        relay = sec.host_port("relay", None, fix="the neighbour's [network] relay_listen "
                              "address as 'host:port', e.g. '127.0.0.1:7461'; or leave it "
                              "out when the neighbour dials this KME")
        link_sec = sec.section("link")
        # confload would say "[neighbour][1.link] key"; name the table as it is written.
        link_sec._name = f"neighbour.link][{i}"
        link = parse_link(link_sec, ndb)
        link_sec.finish()
        sec.finish()
        out.append(NeighbourConfig(peer, link, ndb, relay))
    if not out:
        raise root.error("neighbour", "no [[neighbour]] table",
                         "add one [[neighbour]] table (kme_id, sae_ids, [neighbour.link]) "
                         "per link, or use [peer] and [link]")
    return tuple(out)


def _policy(sec: Section, base: Policy, nodes: tuple[str, ...]) -> Policy:
    k = sec.int("k", base.k, min=1, max=MAX_SHARES,
                fix="node-disjoint paths per relayed key (the key is the XOR of k shares; "
                    "k >= 2: no single trusted node learns it), e.g. 2")
    hops = sec.int("max_hops", base.max_hops, min=1, max=MAX_PATH_NODES - 1,
                   fix="most hops on one path, e.g. 4")
    avoid = sec.str_list("avoid", list(base.avoid),
                         fix='KME IDs no relay path may cross, e.g. ["kme-site-x"]')
    for name in avoid:
        if name not in nodes:
            raise sec.error("avoid", f"{name!r} is not in [network] nodes",
                            "name KMEs from [network] nodes")
    return Policy(k, hops, tuple(avoid))


def load_network(root: Section, kme_id: str, local: tuple[str, ...],
                 neighbours: tuple[NeighbourConfig, ...]) -> NetworkConfig:
    """[network]: relay_listen, nodes, [[network.link]], [[network.sae]], the default
    policy (k, max_hops, avoid) and [[network.pair]] overrides."""
    net = root.section("network")
    relay_listen = net.ip_host_port("relay_listen", None, fix="where neighbours dial in for "
                                    "relayed keys, 'ip:port', e.g. '127.0.0.1:7461' "
                                    "('127.0.0.1:0' picks a free port)")
    nodes = tuple(net.str_list("nodes", fix='list every KME ID in the network, e.g. '
                               '["kme-site-a", "kme-site-b", "kme-site-c"]'))
    if kme_id not in nodes:
        raise net.error("nodes", f"this KME ({kme_id!r}) is not listed",
                        "add the [kme] id to [network] nodes")
    links: list[dict[str, object]] = []
    for sec in net.sections("link"):
        a = sec.str("a", fix="one end's KME ID")
        b = sec.str("b", fix="the other end's KME ID")
        state = sec.str("state", "up", choices=("up", "down"))
        pool = sec.int("pool_bits", ASSUMED_POOL_BITS, min=0,
                       fix="link-key bits this link is known to hold (leave it out: assumed "
                           "available)")
        sec.finish()
        links.append({"a": a, "b": b, "state": state, "pool_bits": pool})
    try:
        topo = Topology.from_config({"nodes": list(nodes), "links": links})
    except NetworkError as exc:
        # exc.reason is "field: problem (fix: ...)"; links[i] is the i-th [[network.link]].
        raise ConfigError(f"{root.source}: [network] topology: {exc.reason}") from None
    mine = set(topo.neighbours(kme_id))
    configured = {n.peer.kme_id: n for n in neighbours}
    for name, nb in configured.items():
        if name not in mine:
            raise net.error("link", f"no [[network.link]] between {kme_id!r} and the "
                            f"neighbour {name!r}", f'add [[network.link]] a = "{kme_id}", '
                            f'b = "{name}"')
        if nb.link.type != "ideal":
            raise net.error("nodes", f"neighbour {name!r} has a {nb.link.type} link: relay "
                            "link keys are wired to ideal links only so far",
                            'use type = "ideal" for relaying links, or remove [network]')
    unconfigured = sorted(mine - set(configured))
    if unconfigured:
        name = unconfigured[0]
        raise net.error("link", f"a link from {kme_id!r} to {name!r} but no [[neighbour]] "
                        f"with kme_id = {name!r}", "add that [[neighbour]] or remove the link")
    adjacent = {s for n in neighbours for s in n.peer.sae_ids}
    remote: dict[str, str] = {}
    for sec in net.sections("sae"):
        sae = sec.str("id", fix="the SAE ID of a gateway behind a non-adjacent KME")
        owner = sec.str("kme_id", fix="the KME that SAE uses, from [network] nodes")
        sec.finish()
        if not is_valid_id(sae):
            raise sec.error("id", f"{sae!r} is not a valid SAE ID",
                            "use 1-255 characters from A-Z a-z 0-9 . _ ~ : @ -")
        if owner not in nodes:
            raise sec.error("kme_id", f"{owner!r} is not in [network] nodes",
                            "name a KME from [network] nodes")
        if owner == kme_id or sae in local:
            raise sec.error("id", f"{sae!r} is local to this KME",
                            "list local SAEs as [[sae]], remote ones here")
        if owner in configured or sae in adjacent:
            raise sec.error("id", f"{sae!r} is behind neighbour {owner!r}",
                            "list it in that [[neighbour]]'s sae_ids instead")
        if sae in remote:
            raise sec.error("id", f"{sae!r} is listed twice", "remove the duplicate")
        remote[sae] = owner
    default = _policy(net, Policy(), nodes)
    if kme_id in default.avoid:
        raise net.error("avoid", "lists this KME", "remove it")
    pairs: dict[tuple[str, str], Policy] = {}
    known = set(local) | set(remote)
    for sec in net.sections("pair"):
        master = sec.str("master", fix="the master SAE ID of the pair")
        slave = sec.str("slave", fix="the slave SAE ID of the pair")
        if not {master, slave} <= known:
            raise sec.error("slave", "the pair is not a local SAE and a [[network.sae]]",
                            "name one local [[sae]] and one remote SAE")
        pairs[(master, slave)] = _policy(sec, default, nodes)
        sec.finish()
    net.finish()
    return NetworkConfig(relay_listen, remote, nodes, tuple(links), default, pairs)

