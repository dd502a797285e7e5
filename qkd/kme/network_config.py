"""A KME's place in the QKD network: the `[network]` schema, its checks against the
rest of the file, and the views the relay service reads (`NeighbourConfig`,
`NetworkConfig`, `Policy`).

`[[neighbour]]` (the schema `NeighbourEntry`) lives in qkd/kme/config.py beside the
[peer] and [link] tables it reuses; configs/network/ has examples and docs/network.md
explains the relay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from qkd.common.confload import HostPort
from qkd.common.schema import (
    Int,
    IpHostPort,
    Problem,
    Schema,
    Str,
    StrList,
    setting,
    tables,
)
from qkd.etsi014.messages import is_valid_id
from qkd.network.constants import DEFAULT_MAX_HOPS, MAX_PATH_NODES, MAX_POOL_BITS, MAX_SHARES
from qkd.network.errors import NetworkError
from qkd.network.topology import Topology

if TYPE_CHECKING:
    from qkd.kme.config import LinkConfig, PeerConfig

# SAE IDs the relay reserves BB84 link keys under (qkd.kme.relay_keys): never a real SAE.
RELAY_SAE_PREFIX = "relay:"
# A [[network.link]] without pool_bits is assumed to have key: this KME only sees the
# pools of its own links (and uses those), so a far link's level is unknown, not empty.
ASSUMED_POOL_BITS = 1 << 40
_K_FIX = ("node-disjoint paths per relayed key (the key is the XOR of k shares; k >= 2: "
          "no single trusted node learns it), e.g. 2")
_HOPS_FIX = "most hops on one path, e.g. 4"
_AVOID_FIX = 'KME IDs no relay path may cross, e.g. ["kme-site-x"]'
# Topology.from_config's reason: "field: problem (fix: fix)".
_REASON = re.compile(r"^(?P<field>[^:]+): (?P<problem>.*) \(fix: (?P<fix>.*)\)$", re.S)


# --------------------------------------------------------------------------- schema


class NetLinkEntry(Schema):
    a: Str = setting(doc="One end's KME ID (from [network] nodes).", fix="one end's KME ID")
    b: Str = setting(doc="The other end's KME ID.", fix="the other end's KME ID")
    state: Literal["up", "down"] = setting("up", doc='"down": no relay path uses the link.')
    pool_bits: Int = setting(
        ASSUMED_POOL_BITS, ge=0, le=MAX_POOL_BITS, unit="bits",
        doc="Link-key bits the link is known to hold; the default (2^40) means assumed "
        "available. The KME's own links report their real pools.",
        fix="link-key bits this link is known to hold (leave it out: assumed available)")


class NetSaeEntry(Schema):
    id: Str = setting(doc="SAE ID of a gateway behind a KME that is not a neighbour.",
                      fix="the SAE ID of a gateway behind a non-adjacent KME")
    kme_id: Str = setting(doc="The KME that SAE uses (from [network] nodes).",
                          fix="the KME that SAE uses, from [network] nodes")

    @model_validator(mode="after")
    def _valid(self) -> NetSaeEntry:
        if not is_valid_id(self.id):
            raise Problem(f"{self.id[:60]!r} is not a valid SAE ID",
                          "use 1-255 characters from A-Z a-z 0-9 . _ ~ : @ -", at="id")
        return self


class PairEntry(Schema):
    master: Str = setting(doc="Master SAE ID of the pair (a local [[sae]] or a "
                          "[[network.sae]]).", fix="the master SAE ID of the pair")
    slave: Str = setting(doc="Slave SAE ID of the pair.", fix="the slave SAE ID of the pair")
    k: Int | None = setting(None, ge=1, le=MAX_SHARES, unit="paths",
                            doc="As [network] k, for this pair. Default: [network] k.",
                            fix=_K_FIX)
    max_hops: Int | None = setting(None, ge=1, le=MAX_PATH_NODES - 1, unit="hops",
                                   doc="As [network] max_hops, for this pair. Default: "
                                   "[network] max_hops.", fix=_HOPS_FIX)
    avoid: StrList | None = setting(None, doc="As [network] avoid, for this pair. Default: "
                                    "[network] avoid.", fix=_AVOID_FIX)


class NetworkSection(Schema):
    relay_listen: IpHostPort | None = setting(
        None, doc="Where neighbours dial in for the relay channel ('ip:port'; port 0 picks "
        "a free port). Unset: this KME dials every neighbour ([[neighbour]] relay).",
        fix="where neighbours dial in for relayed keys, 'ip:port', e.g. '127.0.0.1:7461' "
        "('127.0.0.1:0' picks a free port)")
    nodes: StrList = setting(doc="Every KME ID in the network, this one included.",
                             fix='list every KME ID in the network, e.g. '
                             '["kme-site-a", "kme-site-b", "kme-site-c"]')
    k: Int = setting(1, ge=1, le=MAX_SHARES, unit="paths",
                     doc="Node-disjoint paths per relayed key; the key is the XOR of k "
                     "shares, so with k >= 2 no single trusted node learns it.", fix=_K_FIX)
    max_hops: Int = setting(DEFAULT_MAX_HOPS, ge=1, le=MAX_PATH_NODES - 1, unit="hops",
                            doc="Most hops on one relay path.", fix=_HOPS_FIX)
    avoid: StrList = setting((), doc="KME IDs no relay path may cross.", fix=_AVOID_FIX)
    link: tuple[NetLinkEntry, ...] = tables(
        doc="One [[network.link]] per QKD link in the network (the static topology); "
        "every link of this KME must be listed, with a [[neighbour]] for each.")
    sae: tuple[NetSaeEntry, ...] = tables(
        doc="One [[network.sae]] per SAE behind a KME that is not a neighbour.")
    pair: tuple[PairEntry, ...] = tables(
        doc="Policy overrides for one (master SAE, slave SAE) pair.")

    @model_validator(mode="after")
    def _avoid_known(self) -> NetworkSection:
        for name in self.avoid:
            if name not in self.nodes:
                raise Problem(f"{name[:60]!r} is not in [network] nodes",
                              "name KMEs from [network] nodes", at="avoid")
        for i, pair in enumerate(self.pair):
            for name in pair.avoid or ():
                if name not in self.nodes:
                    raise Problem(f"{name[:60]!r} is not in [network] nodes",
                                  "name KMEs from [network] nodes", at=("pair", i, "avoid"))
        return self

    def links(self) -> tuple[dict[str, object], ...]:
        return tuple({"a": x.a, "b": x.b, "state": x.state, "pool_bits": x.pool_bits}
                     for x in self.link)

    def topology(self) -> Topology:
        return Topology.from_config({"nodes": list(self.nodes),
                                     "links": [dict(x) for x in self.links()]})


def check_network(net: NetworkSection, kme_id: str, local: tuple[str, ...],
                  neighbours: dict[str, tuple[tuple[str, ...], str]]) -> None:
    """The [network] checks that need the rest of the file: `neighbours` is
    {KME ID: (its SAE IDs, its link type)}. Raises Problem at a path from the root."""
    if kme_id not in net.nodes:
        raise Problem(f"this KME ({kme_id!r}) is not listed", "add the [kme] id to "
                      "[network] nodes", at=("network", "nodes"))
    try:
        topo = net.topology()
    except NetworkError as exc:
        # links[i] is the i-th [[network.link]].
        m = _REASON.match(exc.reason)
        if m is None:
            raise Problem(exc.reason, "see [network] in docs/config.md",
                          at=("network", "topology")) from None
        raise Problem(f"{m['field']}: {m['problem']}", m["fix"],
                      at=("network", "topology")) from None
    mine = set(topo.neighbours(kme_id))
    # The relay reserves BB84 link keys as pseudo SAEs "relay:<KME ID>" (relay_keys);
    # a real SAE by such a name could be handed them.
    taken = [s for s in (*local, *(x for saes, _t in neighbours.values() for x in saes),
                         *(x.id for x in net.sae)) if s.startswith(RELAY_SAE_PREFIX)]
    if taken:
        raise Problem(f"SAE ID {taken[0][:60]!r} starts with {RELAY_SAE_PREFIX!r}, which "
                      "the relay's link-key reservations use", "rename that SAE",
                      at=("network", "nodes"))
    for name in neighbours:
        if name not in mine:
            raise Problem(f"no [[network.link]] between {kme_id!r} and the neighbour "
                          f"{name!r}", f'add [[network.link]] a = "{kme_id}", b = "{name}"',
                          at=("network", "link"))
    unconfigured = sorted(mine - set(neighbours))
    if unconfigured:
        name = unconfigured[0]
        raise Problem(f"a link from {kme_id!r} to {name!r} but no [[neighbour]] with "
                      f"kme_id = {name!r}", "add that [[neighbour]] or remove the link",
                      at=("network", "link"))
    adjacent = {s for saes, _t in neighbours.values() for s in saes}
    remote: set[str] = set()
    for i, sae in enumerate(net.sae):
        if sae.kme_id not in net.nodes:
            raise Problem(f"{sae.kme_id[:60]!r} is not in [network] nodes",
                          "name a KME from [network] nodes", at=("network", "sae", i, "kme_id"))
        at = ("network", "sae", i, "id")
        if sae.kme_id == kme_id or sae.id in local:
            raise Problem(f"{sae.id!r} is local to this KME",
                          "list local SAEs as [[sae]], remote ones here", at=at)
        if sae.kme_id in neighbours or sae.id in adjacent:
            raise Problem(f"{sae.id!r} is behind neighbour {sae.kme_id!r}",
                          "list it in that [[neighbour]]'s sae_ids instead", at=at)
        if sae.id in remote:
            raise Problem(f"{sae.id!r} is listed twice", "remove the duplicate", at=at)
        remote.add(sae.id)
    if kme_id in net.avoid:
        raise Problem("lists this KME", "remove it", at=("network", "avoid"))
    known = set(local) | remote
    for i, pair in enumerate(net.pair):
        if not {pair.master, pair.slave} <= known:
            raise Problem("the pair is not a local SAE and a [[network.sae]]",
                          "name one local [[sae]] and one remote SAE",
                          at=("network", "pair", i, "slave"))


# --------------------------------------------------------------------------- service view


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

    @classmethod
    def from_section(cls, net: NetworkSection) -> NetworkConfig:
        default = Policy(net.k, net.max_hops, tuple(net.avoid))
        pairs = {(p.master, p.slave): Policy(
            default.k if p.k is None else p.k,
            default.max_hops if p.max_hops is None else p.max_hops,
            default.avoid if p.avoid is None else tuple(p.avoid)) for p in net.pair}
        return cls(net.relay_listen, {s.id: s.kme_id for s in net.sae}, tuple(net.nodes),
                   net.links(), default, pairs)
