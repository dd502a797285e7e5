"""Issue 17: a storm of concurrent enc_keys / dec_keys from several SAEs on two real KME
processes on the BB84 link (real TLS sockets). With keys in the pool no request gets a
503, no key ID or key is handed out twice, and the slave's answer equals the master's.

The reservations behind it are batched (one RESERVE for every request waiting, plus
standing slices), so far fewer RESERVE messages than requests cross the link. The
positive control runs the same storm on the old per-key path (one RESERVE per
request, the test hook `QKDGW_TEST_PER_KEY_RESERVATIONS=1`) and must fail that check.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from qkd.kme.service import PER_KEY_ENV
from tests.support.kme_processes import KmeProcess, bb84_link, kme_toml, wait_until

API = "/api/v1/keys"
POOL = 400
# (master SAE's site, its KME, slave SAE) for the three master -> slave pairs.
PAIRS = [("site-a", "a", "site-b-gw"), ("site-c", "a", "site-d-gw"),
         ("site-b", "b", "site-a-gw")]
SLAVE_SITE = {"site-b-gw": "site-b", "site-d-gw": "site-d", "site-a-gw": "site-a"}


def _ctx(pki: Path, site: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "tls-ca.crt"))
    ctx.load_cert_chain(pki / site / "sae-client.crt", pki / site / "sae-client.key")
    return ctx


def _start_pair(tmp_path: Path, pki: Path, env: dict[str, str] | None = None,
                refill_below: float | None = None) -> tuple[KmeProcess, KmeProcess]:
    cfg_b = tmp_path / "kme-b.toml"
    cfg_b.write_text(kme_toml(pki, "b", tmp_path / "b.sqlite3", max_key_count=POOL,
                              link=bb84_link(pki, "bob")))
    bob = KmeProcess(cfg_b, tmp_path, "kme-b", env=env)
    ports = bob.link_ports()
    cfg_a = tmp_path / "kme-a.toml"
    cfg_a.write_text(kme_toml(pki, "a", tmp_path / "a.sqlite3", max_key_count=POOL,
                              link=bb84_link(pki, "alice", peer=ports["classical"],
                                             quantum=ports["quantum"])
                              + ("" if refill_below is None
                                 else f"refill_below = {refill_below}\n")))
    try:
        alice = KmeProcess(cfg_a, tmp_path, "kme-a", env=env)
    except BaseException:
        bob.stop()
        raise
    return alice, bob


def _free(pki: Path, kme: KmeProcess, site: str, peer_sae: str) -> int:
    return int(kme.status(pki, site, peer_sae)["stored_key_count"])  # type: ignore[call-overload]


def _wait_full(pki: Path, alice: KmeProcess, bob: KmeProcess, level: int) -> None:
    wait_until(lambda: _free(pki, alice, "site-a", "site-b-gw") >= level
               and _free(pki, bob, "site-b", "site-a-gw") >= level,
               300, f"{level} keys in both pools", (alice, bob))


async def _post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]
                ) -> tuple[int, dict[str, Any]]:
    async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, await r.json(content_type=None)


async def _storm(pki: Path, kmes: dict[str, KmeProcess], per_worker: int,
                 workers: int) -> dict[str, Any]:
    """Every pair's master SAE asks for keys from `workers` concurrent tasks; each
    answer's keys are fetched at once by the slave SAE (so enc and dec overlap)."""
    enc: list[tuple[str, str, str]] = []  # (pair, key_id, key)
    dec: list[tuple[str, str, str]] = []
    statuses: list[tuple[str, int, Any]] = []
    requests: list[tuple[str, int, Any, str]] = []  # (op, status, message, master)
    sessions: list[aiohttp.ClientSession] = []

    def session(site: str) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ctx(pki, site)))
        sessions.append(s)
        return s

    async def worker(master_site: str, side: str, slave: str) -> None:
        peer_side = "b" if side == "a" else "a"
        m, sl = session(master_site), session(SLAVE_SITE[slave])
        enc_url = f"{kmes[side].url}{API}/{slave}/enc_keys"
        dec_url = f"{kmes[peer_side].url}{API}/{master_site}-gw/dec_keys"
        for _ in range(per_worker):
            st, body = await _post(m, enc_url, {"number": random.randint(1, 3)})
            statuses.append(("enc", st, body.get("message")))
            requests.append(("enc", st, body.get("message"), master_site))
            if st != 200:
                continue
            ids = [k["key_ID"] for k in body["keys"]]
            enc.extend((master_site, k["key_ID"], k["key"]) for k in body["keys"])
            st, got = await _post(sl, dec_url, {"key_IDs": [{"key_ID": i} for i in ids]})
            statuses.append(("dec", st, got.get("message")))
            if st == 200:
                dec.extend((master_site, k["key_ID"], k["key"]) for k in got["keys"])

    try:
        await asyncio.gather(*(worker(*p) for p in PAIRS for _ in range(workers)))
    finally:
        for s in sessions:
            await s.close()
    return {"enc": enc, "dec": dec, "statuses": statuses, "requests": requests}


def test_storm_of_concurrent_requests_never_503_with_keys_in_the_pool(
        tmp_path: Path, pki: Path) -> None:
    alice, bob = _start_pair(tmp_path, pki)
    try:
        _wait_full(pki, alice, bob, POOL * 3 // 4)
        res = asyncio.run(_storm(pki, {"a": alice, "b": bob}, per_worker=6, workers=6))
        bad = [s for s in res["statuses"] if s[1] != 200]
        # The storm asks for 3 pairs * 6 workers * 6 requests * 1-3 keys (~220 keys)
        # from a pool of at least 300, refilled by rounds meanwhile: it never runs dry.
        free_a = _free(pki, alice, "site-a", "site-b-gw")
        assert free_a > 0
        assert bad == [], bad[:5]
        enc_ids = [k for _, k, _ in res["enc"]]
        dec_ids = [k for _, k, _ in res["dec"]]
        assert len(enc_ids) == len(set(enc_ids)) >= 3 * 6 * 6
        assert len(dec_ids) == len(set(dec_ids))
        # Every key reached both ends, identical, and to the pair it was made for.
        assert sorted(res["enc"]) == sorted(res["dec"])
        assert len({key for _, _, key in res["enc"]}) == len(enc_ids)
        # A key ID is delivered once: asking again is refused.
        again = asyncio.run(_redeem_again(pki, bob, res["enc"]))
        assert again == 400
        # One RESERVE covered many requests: far fewer messages than answered enc_keys.
        link_a = alice.link_status(pki, "site-a", "site-b-gw")
        enc_ok_a = sum(1 for p, _, _ in res["enc"] if p in ("site-a", "site-c"))
        assert int(link_a["reservations_requested"]) * 4 < enc_ok_a  # type: ignore[call-overload]
        assert int(link_a["auth_failures"]) == 0  # type: ignore[call-overload]
    finally:
        alice.stop()
        bob.stop()


def test_the_level_a_master_sees_falls_while_its_standing_slice_drains(
        tmp_path: Path, pki: Path) -> None:
    """Keys drawn from a pair's standing slice leave the pool the link refills: once
    the link has refilled, the free blocks and the slice together stay at the cap, so
    drawing from the slice lowers the master's stored_key_count. (Before, the link
    kept the free blocks alone at the cap: the level read full while the slice
    drained, and the second check below failed.) Refills at once here (refill_below
    = 1, the rule before the low-water mark): the accounting is under test."""
    alice, bob = _start_pair(tmp_path, pki, refill_below=1.0)

    def level() -> int:
        return _free(pki, alice, "site-a", "site-b-gw")

    async def draw(n: int) -> list[str]:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_ctx(pki, "site-a"))) as s:
            url = f"{alice.url}{API}/site-b-gw/enc_keys"
            ids: list[str] = []
            for _ in range(n):
                st, body = await _post(s, url, {"number": 16})
                assert st == 200, body
                ids += [k["key_ID"] for k in body["keys"]]
            return ids

    try:
        wait_until(lambda: level() == POOL, 300, "a full pool", (alice, bob))
        first = asyncio.run(draw(1))  # a batch: 16 keys and a slice of 64 beside them
        wait_until(lambda: level() == POOL, 120, "the pool refilled", (alice, bob))
        free = int(alice.link_status(pki, "site-a", "site-b-gw")  # type: ignore[call-overload]
                   ["pool_free_blocks"])
        assert free <= POOL - 32, free  # the slice (32..64 keys) counts as pool
        more = asyncio.run(draw(2))  # from the slice: no round trip, no new blocks
        # A round that started meanwhile refills at most what was drawn before it
        # began (rounds here take ~2 s, the two draws far less).
        assert level() <= POOL - 16
        assert len(set(first + more)) == 48
        wait_until(lambda: level() == POOL, 120, "the pool refilled", (alice, bob))
    finally:
        alice.stop()
        bob.stop()


async def _redeem_again(pki: Path, bob: KmeProcess, enc: list[tuple[str, str, str]]
                        ) -> int:
    kid = next(k for p, k, _ in enc if p == "site-a")
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=_ctx(pki, "site-b"))) as s:
        st, _ = await _post(s, f"{bob.url}{API}/site-a-gw/dec_keys",
                            {"key_IDs": [{"key_ID": kid}]})
    return st


def test_control_per_key_path_sends_one_reserve_per_request(tmp_path: Path,
                                                           pki: Path) -> None:
    """Positive control: the same storm on the old path (one RESERVE per request, no
    standing slice) fails the batching check above, since every answered enc_keys
    had its own RESERVE (each one pad per direction). Whether that path also runs
    out of pads and answers 503 depends on whether a refilling round slips in
    between two reservations, so it is not asserted (the benchmark shows it)."""
    alice, bob = _start_pair(tmp_path, pki, env={PER_KEY_ENV: "1"})
    try:
        _wait_full(pki, alice, bob, POOL * 3 // 4)
        res = asyncio.run(_storm(pki, {"a": alice, "b": bob}, per_worker=4, workers=4))
        link_a = alice.link_status(pki, "site-a", "site-b-gw")
        enc_ok_a = sum(1 for p, _, _ in res["enc"] if p in ("site-a", "site-c"))
        answered_a = sum(1 for op, st, _, m in res["requests"]
                         if op == "enc" and st == 200 and m in ("site-a", "site-c"))
        assert answered_a > 0
        requested = int(link_a["reservations_requested"])  # type: ignore[call-overload]
        assert requested >= answered_a
        assert not requested * 4 < enc_ok_a  # the storm test's check fails here
        # Whatever was answered is still right on this path too.
        assert sorted(res["enc"]) == sorted(res["dec"])
    finally:
        alice.stop()
        bob.stop()
