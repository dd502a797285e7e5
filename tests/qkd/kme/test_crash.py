"""SIGKILL the KME processes in the middle of request storms (real processes, real TLS)
and check, across restarts, that no key ID is ever delivered twice and no answered
key disappears.

Phase 1 storms KME-A with enc_keys from two master SAEs and kills it several times.
Phase 2 storms KME-B with dec_keys for every key phase 1 answered, killing it too.
"Answered" means the client read a 200 with the key; a delivery the store committed
but whose answer died with the process is lost, which is the safe direction, and may
only happen to requests that were in flight at a kill.

The bookkeeping: a dec_keys batch whose answer never arrived (the connection died with
the KME) is re-queued for after the restart, and its key IDs are remembered as *in
flight at a kill*. The KME commits a delivery before its answer leaves, so such a batch
may already be recorded: the retry then gets "already delivered" and the key is lost
once, never delivered twice. Every other answered key must reach the slave exactly
once. `_account` turns this into a list of vanished key IDs; the control drops one
recorded delivery from the client's record and must see exactly that key vanish.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.kme_processes import KmeProcess, kme_toml

API = "/api/v1/keys"


def _ctx(pki: Path, site: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "tls-ca.crt"))
    ctx.load_cert_chain(pki / site / "sae-client.crt", pki / site / "sae-client.key")
    return ctx


class Storm:
    def __init__(self) -> None:
        self.answered: list[tuple[str, bytes, str]] = []  # (key_id, key, master)
        self.dec_answered: list[tuple[str, bytes]] = []
        self.in_flight_at_kill: set[str] = set()
        self.errors = 0


async def _enc_worker(url: str, ctx: ssl.SSLContext, master: str, storm: Storm,
                      stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        while not stop.is_set():
            try:
                async with s.post(f"{url}{API}/site-b-gw/enc_keys",
                                  json={"number": random.randint(1, 4)},
                                  timeout=aiohttp.ClientTimeout(total=5)) as r:
                    body = await r.read()
                    if r.status == 200:
                        for item in json.loads(body)["keys"]:
                            storm.answered.append((item["key_ID"],
                                                   base64.b64decode(item["key"]), master))
                    else:
                        storm.errors += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                storm.errors += 1
                await asyncio.sleep(0.02)


async def _dec_worker(url: str, ctx: ssl.SSLContext, queue: list[list[str]], storm: Storm,
                      stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        while not stop.is_set() and queue:
            batch = queue.pop()
            try:
                async with s.post(f"{url}{API}/site-a-gw/dec_keys",
                                  json={"key_IDs": [{"key_ID": k} for k in batch]},
                                  timeout=aiohttp.ClientTimeout(total=5)) as r:
                    body = await r.read()
                    if r.status == 200:
                        for item in json.loads(body)["keys"]:
                            storm.dec_answered.append((item["key_ID"],
                                                       base64.b64decode(item["key"])))
                    else:
                        storm.errors += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                # The answer is lost; the KME may have committed the delivery before
                # it died. Remember the batch as in flight at a kill, retry it later.
                storm.errors += 1
                storm.in_flight_at_kill.update(batch)
                queue.insert(0, batch)
                await asyncio.sleep(0.02)


async def _account(wanted: dict[str, bytes], delivered: list[tuple[str, bytes]],
                   in_flight_at_kill: set[str], fetch: Any,
                   redeemed: list[tuple[str, bytes]]) -> list[str]:
    """Ask the KME for every answered key the record says the slave has not got yet.
    A 200 must carry the master's bytes (appended to `redeemed`); "already delivered"
    is fine only for a key in flight at a kill. Returns the key IDs that vanished."""
    got = {kid for kid, _ in delivered}
    vanished = []
    for kid in [k for k in wanted if k not in got]:
        status, body = await fetch(kid)
        if status == 200:
            key = base64.b64decode(body["keys"][0]["key"])
            assert key == wanted[kid], "the slave got other bytes than the master"
            redeemed.append((kid, key))
        else:
            assert status == 400 and "already delivered" in body["message"], body
            if kid not in in_flight_at_kill:
                vanished.append(kid)
    return vanished


async def _storm_with_kills(start: Any, run: Any, kills: int) -> None:
    for _ in range(kills):
        proc = start()
        stop = asyncio.Event()
        task = asyncio.ensure_future(run(proc.url, stop))
        await asyncio.sleep(random.uniform(0.4, 0.9))
        proc.kill()            # SIGKILL mid-storm: no cleanup, no flush
        stop.set()
        await task


async def run_crash_test(pki: Path, work: Path, kills: int) -> None:
    random.seed(1)
    configs = {}
    for side in ("a", "b"):
        configs[side] = work / f"kme-{side}.toml"
        configs[side].write_text(kme_toml(pki, side, work / f"kme-{side}.sqlite3"))
    storm = Storm()

    # ---- phase 1: masters at KME-A
    async def enc_run(url: str, stop: asyncio.Event) -> None:
        await asyncio.gather(*(
            _enc_worker(url, _ctx(pki, site), f"{site}-gw", storm, stop)
            for site in ("site-a", "site-a", "site-c", "site-c")))

    await _storm_with_kills(lambda: KmeProcess(configs["a"], work, "kme-a"), enc_run, kills)
    ids = [k for k, _, _ in storm.answered]
    assert len(ids) > 5 * kills, "the storm answered too few requests to mean anything"
    assert len(set(ids)) == len(ids), "a key ID was delivered twice"
    assert len({key for _, key, _ in storm.answered}) == len(ids), "a key was repeated"

    # ---- phase 2: the slave site-b-gw redeems every answered site-a-gw key at KME-B
    wanted = {k: key for k, key, master in storm.answered if master == "site-a-gw"}
    ordered = list(wanted)
    random.shuffle(ordered)
    queue = [ordered[i:i + 5] for i in range(0, len(ordered), 5)]

    async def dec_run(url: str, stop: asyncio.Event) -> None:
        await asyncio.gather(*(_dec_worker(url, _ctx(pki, "site-b"), queue, storm, stop)
                               for _ in range(4)))

    await _storm_with_kills(lambda: KmeProcess(configs["b"], work, "kme-b"), dec_run, kills)

    got = [k for k, _ in storm.dec_answered]
    assert len(set(got)) == len(got), "dec_keys delivered a key ID twice"
    for kid, key in storm.dec_answered:
        assert wanted[kid] == key, "the slave got other bytes than the master"

    # ---- after the last restart: every answered key is either delivered to the slave
    # already, or still obtainable exactly once, or was lost in flight at a kill.
    proc = KmeProcess(configs["b"], work, "kme-b")
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_ctx(pki, "site-b"))) as s:
            async def fetch(kid: str) -> tuple[int, dict[str, Any]]:
                async with s.get(f"{proc.url}{API}/site-a-gw/dec_keys",
                                 params={"key_ID": kid}) as r:
                    return r.status, json.loads(await r.read())

            redeemed: list[tuple[str, bytes]] = []
            vanished = await _account(wanted, storm.dec_answered, storm.in_flight_at_kill,
                                      fetch, redeemed)
            assert vanished == [], \
                f"{len(vanished)} answered key(s) vanished without being in flight at a kill"
            for kid in got[:20]:
                status, _ = await fetch(kid)
                assert status == 400, "a redeemed key was delivered again"

            # Control: a delivery the slave really got, dropped from the record (as a
            # lost delivery would look), must be reported as vanished, and only it.
            delivered = storm.dec_answered + redeemed
            clean = [kid for kid, _ in delivered if kid not in storm.in_flight_at_kill]
            assert clean, "no delivery outside the kills to drop for the control"
            dropped = clean[len(clean) // 2]
            doctored = [(kid, key) for kid, key in delivered if kid != dropped]
            assert await _account(wanted, doctored, storm.in_flight_at_kill, fetch,
                                  []) == [dropped], "the control did not trip"
    finally:
        proc.stop()

    # The keys lost at a kill are lost in the safe direction: KME-B recorded them as
    # delivered to the slave (committed before the answer left), never handed out again.
    lost = set(wanted) - {kid for kid, _ in storm.dec_answered + redeemed}
    db_b = sqlite3.connect(work / "kme-b.sqlite3")
    on_disk_b = {row[0] for row in db_b.execute(
        "SELECT key_id FROM deliveries WHERE role='slave'")}
    assert lost <= on_disk_b, "a key lost at a kill is not recorded as delivered"
    assert lost <= storm.in_flight_at_kill

    # Every key KME-A answered is on its disk as delivered to its master.
    db = sqlite3.connect(work / "kme-a.sqlite3")
    on_disk = {row[0] for row in db.execute(
        "SELECT key_id FROM deliveries WHERE role='master'")}
    assert set(ids) <= on_disk, "an answered key is missing from the master's store"


async def test_sigkill_during_request_storms(pki: Path, tmp_path: Path) -> None:
    await run_crash_test(pki, tmp_path, kills=2)


@pytest.mark.slow
async def test_sigkill_during_request_storms_many_times(pki: Path, tmp_path: Path) -> None:
    await run_crash_test(pki, tmp_path, kills=12)
