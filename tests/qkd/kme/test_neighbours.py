"""Several links per KME (issue 11, stage 1): [[neighbour]] parsing, the old [peer] +
[link] form as one neighbour, and one pool per link in a running KME."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from qkd.common.confload import ConfigError
from qkd.etsi014.client import EtsiClient, KmeNoKey
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme
from tests.support.kme_processes import kme_toml
from tests.support.network_kmes import Nb, net_kme_toml


def _load(tmp_path: Path, text: str, name: str = "kme.toml") -> KmeConfig:
    path = tmp_path / name
    path.write_text(text)
    return KmeConfig.load(path)


def test_old_form_is_one_neighbour(tmp_path: Path, pki: Path) -> None:
    cfg = _load(tmp_path, kme_toml(pki, "a", tmp_path / "a.db"))
    assert len(cfg.neighbours) == 1
    (nb,) = cfg.neighbours
    assert nb.peer == cfg.peer and nb.link == cfg.link and nb.db == cfg.db
    assert cfg.network is None


def test_two_neighbours(tmp_path: Path, pki: Path) -> None:
    cfg = _load(tmp_path, net_kme_toml(pki, "site-a", tmp_path / "a.db",
                                       [Nb("site-b"), Nb("site-c", "5")]))
    assert [n.peer.kme_id for n in cfg.neighbours] == ["kme-site-b", "kme-site-c"]
    assert [n.peer.sae_ids for n in cfg.neighbours] == [("site-b-gw",), ("site-c-gw",)]
    assert [n.link.key_rate for n in cfg.neighbours] == [float("inf"), 5.0]
    # The first link keeps [kme] db; every other gets its own file.
    assert cfg.neighbours[0].db == cfg.db
    assert cfg.neighbours[1].db == Path(f"{cfg.db}.kme-site-c")
    assert cfg.peer == cfg.neighbours[0].peer and cfg.link == cfg.neighbours[0].link


@pytest.mark.parametrize(("edit", "field", "fix"), [
    (lambda t: t + '\n[peer]\nkme_id = "kme-site-b"\nsae_ids = ["x-gw"]\n', "peer",
     "remove [peer] and [link]"),
    (lambda t: t.replace('sae_ids = ["site-c-gw"]', 'sae_ids = ["site-b-gw"]'),
     "[neighbour][1] sae_ids", "exactly one KME"),
    (lambda t: t.replace('kme_id = "kme-site-c"', 'kme_id = "kme-site-b"'),
     "[neighbour][1] kme_id", "one [[neighbour]] table per neighbour"),
    (lambda t: t.replace('key_rate = 5', 'key_rate = 5\nbogus = 1'),
     # The schema's label: the [neighbour.link] of [[neighbour]] number 1.
     "[neighbour][1.link] bogus", "spelling"),
    (lambda t: t.replace('sae_ids = ["site-c-gw"]', 'sae_ids = ["site-a-gw"]'),
     "[neighbour][1] sae_ids", "also a local"),
    # The second link given the first link's db ([kme] db, its default).
    (lambda t: t.replace('kme_id = "kme-site-c"\n', 'kme_id = "kme-site-c"\n'
                         + re.search(r"^db = .*\n", t, re.M).group(0)),
     "[neighbour][1] db", "its own db file"),
    (lambda t: t.replace('kme_id = "kme-site-c"\n', 'kme_id = "kme-site-c"\nrelay = "x"\n'),
     "[neighbour][1] relay", "relay_listen address as 'host:port'"),
    (lambda t: t.replace('[neighbour.link]\ntype = "ideal"\nsecret_file',
                         '[neighbour.link]\ntype = "ideal"\nsecret_fil', 1),
     "[neighbour][0.link] secret_file: missing", "the same file on both KMEs"),
])
def test_bad_neighbours_name_file_field_and_fix(tmp_path: Path, pki: Path,
                                                edit: Callable[[str], str], field: str,
                                                fix: str) -> None:
    text = net_kme_toml(pki, "site-a", tmp_path / "a.db", [Nb("site-b"), Nb("site-c", "5")])
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, edit(text))
    msg = str(err.value)
    assert str(tmp_path / "kme.toml") in msg
    assert field in msg
    assert fix in msg


def test_no_link_at_all_names_both_forms(tmp_path: Path, pki: Path) -> None:
    text = net_kme_toml(pki, "site-a", tmp_path / "a.db", [])
    with pytest.raises(ConfigError, match=r"kme\.toml: peer: missing section \(fix: add a "
                                          r"\[peer\] table \(or one \[\[neighbour\]\] "):
        _load(tmp_path, text)
    # Control: one neighbour is enough.
    assert len(_load(tmp_path, net_kme_toml(pki, "site-a", tmp_path / "a.db",
                                            [Nb("site-b")])).neighbours) == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_each_link_has_its_own_pool(tmp_path: Path, pki: Path,
                                          sae: Callable[..., EtsiClient]) -> None:
    clock = _Clock()
    a_cfg = _load(tmp_path, net_kme_toml(pki, "site-a", tmp_path / "a.db",
                                         [Nb("site-b", "10"), Nb("site-c", "0")]), "a.toml")
    b_cfg = _load(tmp_path, net_kme_toml(pki, "site-b", tmp_path / "b.db",
                                         [Nb("site-a")]), "b.toml")
    c_cfg = _load(tmp_path, net_kme_toml(pki, "site-c", tmp_path / "c.db",
                                         [Nb("site-a")]), "c.toml")
    kmes: dict[str, RunningKme] = {}
    try:
        kmes["a"] = await start_kme(a_cfg, clock=clock)
        clock.now += 10_000  # the A-B bucket fills to max_key_count; A-C makes none
        kmes["b"] = await start_kme(b_cfg)
        kmes["c"] = await start_kme(c_cfg)
        async with sae("site-a", kmes["a"]) as a_gw, sae("site-b", kmes["b"]) as b_gw:
            assert (await a_gw.status("site-b-gw"))["stored_key_count"] == 1000
            assert (await a_gw.status("site-c-gw"))["stored_key_count"] == 0
            st = await a_gw.status("site-c-gw")
            assert st["target_KME_ID"] == "kme-site-c"
            enc = await a_gw.get_enc_keys("site-b-gw", number=5)
            assert await b_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
            # Only the A-B pool paid for them.
            assert (await a_gw.status("site-b-gw"))["stored_key_count"] == 995
            assert (await a_gw.status("site-c-gw"))["stored_key_count"] == 0
            with pytest.raises(KmeNoKey):
                await a_gw.get_enc_keys("site-c-gw")
        # Positive control for the refusal above: the A-C link works once it makes keys.
        await kmes["a"].close()
        del kmes["a"]
        a2 = _load(tmp_path, net_kme_toml(pki, "site-a", tmp_path / "a.db",
                                          [Nb("site-b"), Nb("site-c")]), "a2.toml")
        kmes["a"] = await start_kme(a2)
        async with sae("site-a", kmes["a"]) as a_gw, sae("site-c", kmes["c"]) as c_gw:
            enc = await a_gw.get_enc_keys("site-c-gw", number=2)
            assert await c_gw.get_dec_keys("site-a-gw", [k.key_id for k in enc]) == enc
            with pytest.raises(Exception, match="unknown slave SAE 'site-d-gw'"):
                await a_gw.get_enc_keys("site-d-gw")
    finally:
        for k in kmes.values():
            await k.close()


def test_shipped_line_of_three_configs_load_and_agree(tmp_path: Path) -> None:
    import shutil

    from gateway.pki import init_pki

    repo = Path(__file__).resolve().parents[3]
    shutil.copytree(repo / "configs" / "network", tmp_path / "configs" / "network")
    init_pki(tmp_path / "pki", ["site-a", "site-b", "site-c"], algorithm="ecdsa-p256")
    line = tmp_path / "configs" / "network" / "line-3"
    a, b, c = (KmeConfig.load(line / f"kme-{s}.toml") for s in "abc")
    assert [n.peer.kme_id for n in b.neighbours] == ["kme-site-a", "kme-site-c"]
    assert a.network is not None and b.network is not None and c.network is not None
    assert a.network.remote_saes == {"site-c-gw": "kme-site-c"}
    assert c.network.remote_saes == {"site-a-gw": "kme-site-a"}
    assert a.network.nodes == b.network.nodes == c.network.nodes
    # Every dialled relay address is the neighbour's relay_listen.
    listen = {cfg.kme_id: cfg.network.relay_listen for cfg in (a, b, c)
              if cfg.network is not None}
    dials = [(cfg.kme_id, nb.peer.kme_id, nb.relay) for cfg in (a, b, c)
             for nb in cfg.neighbours if nb.relay is not None]
    assert sorted((x, y) for x, y, _ in dials) == [("kme-site-a", "kme-site-b"),
                                                  ("kme-site-b", "kme-site-c")]
    for _me, nb_id, addr in dials:
        assert addr == listen[nb_id]


async def test_admin_shows_every_link_by_neighbour(tmp_path: Path, pki: Path) -> None:
    import aiohttp

    cfg = _load(tmp_path, net_kme_toml(pki, "site-a", tmp_path / "a.db",
                                       [Nb("site-b"), Nb("site-c", "0")], admin=True))
    kme = await start_kme(cfg)
    try:
        base = f"http://127.0.0.1:{kme.admin_port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/status") as resp:
                status = await resp.json()
            async with s.get(base + "/metrics") as resp:
                metrics = await resp.text()
        nbs = status["network"]["neighbours"]
        assert nbs["kme-site-b"]["pool_keys"] == 1000 and nbs["kme-site-c"]["pool_keys"] == 0
        assert nbs["kme-site-c"]["saes"] == ["site-c-gw"]
        assert 'qkdgw_kme_neighbour_pool_keys{neighbour="kme-site-b"} 1000.0' in metrics
        assert 'qkdgw_kme_neighbour_pool_keys{neighbour="kme-site-c"} 0.0' in metrics
        # No relay configured: no relay series.
        assert "qkdgw_kme_relay_link_key_bits" not in metrics
    finally:
        await kme.close()
