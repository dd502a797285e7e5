"""Topology config, node-disjoint paths (fail closed), link-state adverts and the
database that recomputes routes when a link goes down or runs dry."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd.network.errors import NetErrorCode, NetworkError
from qkd.network.topology import (
    LinkReport,
    LinkStateAd,
    LinkStateDb,
    RoutesChanged,
    RoutesUnavailable,
    Topology,
    disjoint_paths,
)


def ring(names: str, pool: int = 10**6) -> dict[str, Any]:
    return {"nodes": list(names), "links": [
        {"a": a, "b": b, "pool_bits": pool} for a, b in zip(names, names[1:] + names[0],
                                                          strict=True)]}


def test_ring_gives_two_disjoint_paths_shortest_first() -> None:
    paths = disjoint_paths(Topology.from_config(ring("ABCDE")), "A", "C", 2)
    assert paths == [("A", "B", "C"), ("A", "E", "D", "C")]
    inner = [set(p[1:-1]) for p in paths]
    assert not inner[0] & inner[1]


def test_fewer_than_k_paths_fails_closed() -> None:
    topo = Topology.from_config(ring("ABCDE"))
    with pytest.raises(NetworkError) as exc:
        disjoint_paths(topo, "A", "C", 3)
    assert exc.value.code is NetErrorCode.NO_PATHS
    with pytest.raises(NetworkError):
        disjoint_paths(topo, "A", "C", 2, avoid=["D"])
    with pytest.raises(NetworkError):
        disjoint_paths(topo, "A", "C", 2, max_hops=2)
    assert disjoint_paths(topo, "A", "C", 1, avoid=["B"]) == [("A", "E", "D", "C")]


def test_node_splitting_refuses_paths_that_share_a_node() -> None:
    # A bowtie: two edge-disjoint but not node-disjoint A-Z routes through M.
    cfg = {"nodes": ["A", "P", "Q", "M", "R", "S", "Z"], "links": [
        {"a": a, "b": b, "pool_bits": 10**6} for a, b in
        [("A", "P"), ("A", "Q"), ("P", "M"), ("Q", "M"), ("M", "R"), ("M", "S"),
         ("R", "Z"), ("S", "Z")]]}
    topo = Topology.from_config(cfg)
    assert len(disjoint_paths(topo, "A", "Z", 1)) == 1
    with pytest.raises(NetworkError):
        disjoint_paths(topo, "A", "Z", 2)


def test_ties_prefer_the_fuller_pool() -> None:
    cfg = {"nodes": ["A", "B", "C", "D"], "links": [
        {"a": "A", "b": "B", "pool_bits": 10**5}, {"a": "B", "b": "D", "pool_bits": 10**5},
        {"a": "A", "b": "C", "pool_bits": 10**8}, {"a": "C", "b": "D", "pool_bits": 10**8}]}
    topo = Topology.from_config(cfg)
    assert disjoint_paths(topo, "A", "D", 1) == [("A", "C", "D")]
    topo.set_link("A", "C", pool_bits=10)  # below the minimum: dry
    assert disjoint_paths(topo, "A", "D", 1) == [("A", "B", "D")]


@pytest.mark.parametrize(("cfg", "field"), [
    ({"nodes": []}, "nodes"),
    ({"nodes": ["A", "A"]}, "nodes[1]"),
    ({"nodes": ["bad name"]}, "nodes[0]"),
    ({"nodes": ["A", "B"], "links": [{"a": "A", "b": "X"}]}, "links[0].b"),
    ({"nodes": ["A", "B"], "links": [{"a": "A", "b": "A"}]}, "links[0].b"),
    ({"nodes": ["A", "B"], "links": [{"a": ["A"], "b": "B"}]}, "links[0].a"),
    ({"nodes": ["A", "B"], "links": [{"a": "A", "b": "B", "state": "sideways"}]},
     "links[0].state"),
    ({"nodes": ["A", "B"], "links": [{"a": "A", "b": "B", "pool_bits": -1}]},
     "links[0].pool_bits"),
    ({"nodes": ["A", "B"], "links": [{"a": "A", "b": "B"}, {"a": "B", "b": "A"}]},
     "links[1]"),
    ({"nodes": ["A"], "colour": 1}, "topology.colour"),
])
def test_config_errors_name_the_field_and_the_fix(cfg: dict[str, Any], field: str) -> None:
    with pytest.raises(NetworkError) as exc:
        Topology.from_config(cfg)
    assert exc.value.code is NetErrorCode.BAD_CONFIG
    assert exc.value.reason.startswith(field + ":") and "(fix: " in exc.value.reason


def test_lsa_roundtrip_canonical_and_strict() -> None:
    lsa = LinkStateAd("A", 7, (LinkReport("B", True, 5), LinkReport("E", False, 0)))
    raw = lsa.encode()
    assert LinkStateAd.decode(raw) == lsa
    with pytest.raises(NetworkError):
        LinkStateAd.decode(raw + b"\x00")
    unsorted = LinkStateAd("A", 7, (LinkReport("E", False, 0), LinkReport("B", True, 5)))
    with pytest.raises(NetworkError):
        unsorted.encode()


def test_link_down_and_dry_recompute_routes_stale_ignored() -> None:
    db = LinkStateDb(Topology.from_config(ring("ABCDE")))
    assert db.watch("A", "C", 1) == (("A", "B", "C"),)
    down = LinkStateAd("B", 1, (LinkReport("A", True, 10**6), LinkReport("C", False, 10**6)))
    assert db.receive(down.encode()) == [RoutesChanged("A", "C", 1, (("A", "E", "D", "C"),))]
    # An older advert saying the link is up again is stale: nothing changes.
    old = LinkStateAd("B", 0, (LinkReport("A", True, 10**6), LinkReport("C", True, 10**6)))
    assert db.receive(old.encode()) == [] and db.stale == 1
    dry = LinkStateAd("E", 1, (LinkReport("A", True, 0), LinkReport("D", True, 10**6)))
    events = db.receive(dry.encode())
    assert len(events) == 1 and isinstance(events[0], RoutesUnavailable)
    back = LinkStateAd("B", 2, (LinkReport("A", True, 10**6), LinkReport("C", True, 10**6)))
    assert db.receive(back.encode()) == [RoutesChanged("A", "C", 1, (("A", "B", "C"),))]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_lsa_decoder_raises_only_the_layer_error(data: bytes) -> None:
    with contextlib.suppress(NetworkError):
        LinkStateAd.decode(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABCDEF"), st.booleans(),
                          st.integers(0, 2**62)), max_size=6), st.integers(0, 2**64 - 1))
def test_lsa_decoder_fuzz_from_valid_encodings(reports: list[tuple[str, bool, int]],
                                               seq: int) -> None:
    links = tuple(LinkReport(n, u, p) for n, u, p in sorted({r[0]: r for r in reports}.values()))
    raw = LinkStateAd("Z", seq, links).encode()
    assert LinkStateAd.decode(raw) == LinkStateAd("Z", seq, links)
    for i in range(len(raw)):
        with contextlib.suppress(NetworkError):
            LinkStateAd.decode(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["a", "b", "state", "pool_bits", "x"]),
                                       inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["nodes", "links", "x"]), _json, max_size=3))
def test_config_parser_raises_only_the_layer_error(cfg: dict[str, Any]) -> None:
    with contextlib.suppress(NetworkError):
        Topology.from_config(cfg)


@settings(max_examples=150, deadline=None)
@given(st.lists(_json, max_size=4))
def test_config_parser_on_bad_links_raises_only_the_layer_error(links: list[Any]) -> None:
    with contextlib.suppress(NetworkError):
        Topology.from_config({"nodes": ["A", "B"], "links": links})
