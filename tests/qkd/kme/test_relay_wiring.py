"""The relay inside the KME (issue 11), in one event loop: [network] parsing,
StoreLinkKeys (same pads at both ends, each used once, across restarts, charged to
the link's pool) and B's pools dropping by exactly the relay cost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from qkd.common.confload import ConfigError
from qkd.common.storage_key import Sealer
from qkd.etsi014.client import EtsiClient
from qkd.kme.config import KmeConfig
from qkd.kme.relay_service import StoreLinkKeys, _LinkPool
from qkd.kme.relay_store import RelayStore
from qkd.kme.service import RunningKme, start_kme
from qkd.link.ideal import TokenBucket
from qkd.network.errors import NetErrorCode, NetworkError
from qkd.network.relay import relay_cost_bits
from tests.support.network_kmes import Nb, net_kme_toml, remote_sae_toml, topology_toml

LINE = topology_toml(["site-a", "site-b", "site-c"], [("site-a", "site-b"),
                                                      ("site-b", "site-c")])


def _load(tmp_path: Path, text: str, name: str = "kme.toml") -> KmeConfig:
    path = tmp_path / name
    path.write_text(text)
    return KmeConfig.load(path)


def _a(pki: Path, tmp_path: Path, network: str, nbs: list[Nb] | None = None) -> str:
    return net_kme_toml(pki, "site-a", tmp_path / "a.db", nbs or [Nb("site-b")],
                        network=network)


def test_network_section_parses(tmp_path: Path, pki: Path) -> None:
    extra = ('k = 1\nmax_hops = 4\n' + LINE + remote_sae_toml(["site-c"])
             + '[[network.pair]]\nmaster = "site-a-gw"\nslave = "site-c-gw"\nk = 2\n'
             'avoid = ["kme-site-b"]\n')
    cfg = _load(tmp_path, _a(pki, tmp_path, extra))
    net = cfg.network
    assert net is not None and net.remote_saes == {"site-c-gw": "kme-site-c"}
    assert net.policy("site-a-gw", "site-c-gw").k == 2
    assert net.policy("site-a-gw", "site-c-gw").avoid == ("kme-site-b",)
    assert net.policy("site-a-gw", "site-c-gw").max_hops == 4  # inherited
    assert net.policy("site-a-gw", "other").k == 1
    assert net.topology().neighbours("kme-site-b") == ["kme-site-a", "kme-site-c"]


@pytest.mark.parametrize(("network", "field", "fix"), [
    (LINE.replace('"kme-site-a", ', ""), "[network] nodes", "add the [kme] id"),
    (topology_toml(["site-a", "site-b", "site-c"], [("site-b", "site-c")]),
     "[network] link", 'a = "kme-site-a"'),
    (LINE + '[[network.link]]\na = "kme-site-a"\nb = "kme-site-c"\n', "[network] link",
     "add that [[neighbour]]"),
    (LINE + remote_sae_toml(["site-b"]), "[network.sae][0] id", "that [[neighbour]]"),
    (LINE + '[[network.sae]]\nid = "x-gw"\nkme_id = "kme-nowhere"\n',
     "[network.sae][0] kme_id", "name a KME"),
    ('avoid = ["kme-x"]\n' + LINE, "[network] avoid", "name KMEs"),
    ('avoid = ["kme-site-a"]\n' + LINE, "[network] avoid", "lists this KME"),
    (LINE + remote_sae_toml(["site-c"]) + '[[network.pair]]\nmaster = "site-a-gw"\n'
     'slave = "site-c-gw"\navoid = ["kme-y"]\n', "[network.pair][0] avoid", "name KMEs"),
    (LINE + remote_sae_toml(["site-c"]) + '[[network.pair]]\nmaster = "site-a-gw"\n'
     'slave = "site-c-gw"\nk = 0\n', "[network.pair][0] k", ">= 1"),
    (LINE + remote_sae_toml(["site-c", "site-c"]), "[network.sae][1] id", "remove the duplicate"),
    ('k = 9\n' + LINE, "[network] k", "<= 8"),
    (LINE + '[[network.pair]]\nmaster = "site-a-gw"\nslave = "nobody"\n',
     "[network.pair][0] slave", "one remote SAE"),
    (LINE + '[[network.link]]\na = "kme-site-a"\nb = "kme-site-b"\n',
     "[network] topology: links[2]", "list each link once"),
])
def test_bad_network_names_field_and_fix(tmp_path: Path, pki: Path, network: str,
                                         field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _a(pki, tmp_path, network))
    msg = str(err.value)
    assert str(tmp_path / "kme.toml") in msg and field in msg and fix in msg, msg


def test_relay_over_a_bb84_link_loads(tmp_path: Path, pki: Path) -> None:
    """BB84 neighbours relay with their pools' keys now (test_relay_bb84_keys.py)."""
    text = _a(pki, tmp_path, LINE).replace(
        'type = "ideal"', 'type = "bb84"\nrole = "bob"\nlisten = "127.0.0.1:0"\n'
        'quantum_listen = "127.0.0.1:0"').replace("key_rate = inf\n", "")
    cfg = _load(tmp_path, text)
    assert cfg.network is not None and cfg.neighbours[0].link.type == "bb84"


def test_an_sae_named_like_the_relay_pseudo_sae_is_refused(tmp_path: Path,
                                                           pki: Path) -> None:
    text = _a(pki, tmp_path, LINE).replace('id = "site-a-gw"', 'id = "relay:kme-site-a"')
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    msg = str(err.value)
    assert "[network] nodes" in msg and "'relay:kme-site-a'" in msg and "rename" in msg, msg
    # Control: the same file with the SAE's own name loads.
    assert _load(tmp_path, _a(pki, tmp_path, LINE), "ok.toml").network is not None


# --------------------------------------------------------------- link keys


def _pool(level: int, secret: bytes = b"s" * 32) -> tuple[_LinkPool, TokenBucket]:
    bucket = TokenBucket(1.0, level, 0.0)
    bucket._tokens = float(level)
    svc = SimpleNamespace(bucket=bucket, _clock=lambda: 0.0,
                          ideal_level=lambda: bucket.level(0.0),
                          config=SimpleNamespace(limits=SimpleNamespace(key_size=256)))
    return _LinkPool(secret, svc), bucket  # type: ignore[arg-type]


def _keys(tmp_path: Path, me: str, other: str, pool: _LinkPool) -> StoreLinkKeys:
    store = RelayStore(tmp_path / f"{me}.relay", Sealer(b"k" * 32))
    return StoreLinkKeys(me, store, {other: pool})


def test_store_link_keys_same_bytes_each_used_once_across_restarts(tmp_path: Path) -> None:
    pa, bucket_a = _pool(100)
    pb, bucket_b = _pool(100)
    a, b = _keys(tmp_path, "A", "B", pa), _keys(tmp_path, "B", "A", pb)
    assert a.hash_key("B").material == b.hash_key("A").material
    off, pad = a.take("B", 48)
    assert b.peek("A", off, 48) == pad
    b.consume("A", off, 48)
    with pytest.raises(NetworkError) as err:
        b.peek("A", off, 48)  # a replay of the same frame
    assert err.value.code is NetErrorCode.LINK_KEY
    # The other direction is its own stream: different bytes at the same offset.
    off_ba, pad_ba = b.take("A", 48)
    assert off_ba == 0 and pad_ba != pad
    assert a.peek("B", off_ba, 48) == pad_ba
    a.consume("B", off_ba, 48)
    # Both ends charged the same 48 + 48 bytes = 768 bits = 3 keys of 256 bits.
    assert bucket_a.level(0.0) == bucket_b.level(0.0) == 97
    # Restart both ends: no outgoing byte is handed out twice, no old frame accepted.
    a2, b2 = _keys(tmp_path, "A", "B", pa), _keys(tmp_path, "B", "A", pb)
    off2, pad2 = a2.take("B", 48)
    assert off2 >= off + 48 and pad2 != pad
    with pytest.raises(NetworkError):
        b2.peek("A", off, 48)
    assert b2.peek("A", off2, 48) == pad2
    # Control: a fresh store (state lost) would start again at offset 0 and reuse pads.
    fresh = StoreLinkKeys("A", RelayStore(tmp_path / "fresh.relay", Sealer(b"k" * 32)),
                          {"B": pa})
    assert fresh.take("B", 48) == (0, pad)


def test_store_link_keys_fail_closed_when_the_pool_is_dry(tmp_path: Path) -> None:
    pool, bucket = _pool(1)
    a = _keys(tmp_path, "A", "B", pool)
    a.take("B", 32)  # 256 bits: the one key
    assert bucket.level(0.0) == 0
    with pytest.raises(NetworkError) as err:
        a.take("B", 16)
    assert err.value.code is NetErrorCode.LINK_KEY
    assert "exhausted" in err.value.reason and "B" in repr(a)
    assert "73" not in repr(a)  # repr names neighbours only


# ------------------------------------------------- pools, in one event loop


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_pools_drop_by_the_relay_cost(tmp_path: Path, pki: Path,
                                            sae: Callable[..., EtsiClient]) -> None:
    clock = _Clock()
    kmes: dict[str, RunningKme] = {}
    try:
        c = _load(tmp_path, net_kme_toml(pki, "site-c", tmp_path / "c.db", [Nb("site-b", "1")],
                                         network=LINE + remote_sae_toml(["site-a"]),
                                         relay_listen=True), "c.toml")
        kmes["c"] = await start_kme(c, clock=clock)
        b = _load(tmp_path, net_kme_toml(
            pki, "site-b", tmp_path / "b.db",
            [Nb("site-a", "1"), Nb("site-c", "1", relay_port=kmes["c"].relay_port)],
            network=LINE, relay_listen=True), "b.toml")
        kmes["b"] = await start_kme(b, clock=clock)
        a = _load(tmp_path, net_kme_toml(
            pki, "site-a", tmp_path / "a.db",
            [Nb("site-b", "1", relay_port=kmes["b"].relay_port)],
            network=LINE + remote_sae_toml(["site-c"])), "a.toml")
        kmes["a"] = await start_kme(a, clock=clock)
        clock.now += 5000  # every bucket full (1000 keys); frozen from here on
        relay_a = kmes["a"].relay
        assert relay_a is not None
        for _ in range(100):  # channels up, and adverts of the now full pools arrived
            with contextlib.suppress(NetworkError):
                if relay_a.paths("site-a-gw", "site-c-gw"):
                    break
            await asyncio.sleep(0.05)
        async with sae("site-b", kmes["b"]) as b_gw, sae("site-a", kmes["a"]) as a_gw, \
                sae("site-c", kmes["c"]) as c_gw:
            assert (await b_gw.status("site-a-gw"))["stored_key_count"] == 1000
            assert (await b_gw.status("site-c-gw"))["stored_key_count"] == 1000
            enc = await a_gw.get_enc_keys("site-c-gw", number=4, size=256)
            assert await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
            per_hop_keys = relay_cost_bits([("x", "y")], 32) // 256  # 3 pool keys (768 bits)
            assert (await b_gw.status("site-a-gw"))["stored_key_count"] == 1000 - 4 * per_hop_keys
            assert (await b_gw.status("site-c-gw"))["stored_key_count"] == 1000 - 4 * per_hop_keys
            # The end KMEs' pools paid the same hop (one pool per link, both ends).
            assert (await a_gw.status("site-b-gw"))["stored_key_count"] == 1000 - 4 * per_hop_keys
    finally:
        for k in kmes.values():
            await k.close()


def test_a_link_pools_repr_holds_no_link_secret() -> None:
    from qkd.kme.relay_service import _LinkPool

    secret = bytes(range(32))
    text = repr(_LinkPool(secret, object()))  # type: ignore[arg-type]
    assert secret.hex() not in text and repr(secret) not in text
    # Control: a dataclass field left at the default repr would show them.
    import dataclasses

    plain = dataclasses.make_dataclass("Plain", [("secret", bytes)])
    assert repr(secret) in repr(plain(secret))
