"""SIGKILL the KME processes in the middle of request storms (real processes, real TLS)
and check, across restarts, that no key ID is ever delivered twice and no answered
key disappears.

Phase 1 storms KME-A with enc_keys from two master SAEs and kills it several times.
Phase 2 storms KME-B with dec_keys for every key phase 1 answered, killing it too.
"Answered" means the client read a 200 with the key; a delivery the store committed
but whose answer died with the process is lost, which is the safe direction, and may
only happen to requests that were in flight at a kill.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _qkd_support import KmeProcess, kme_toml

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
                      stop: asyncio.Event, pending: set[str]) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        while not stop.is_set() and queue:
            batch = queue.pop()
            pending.update(batch)
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
                storm.errors += 1
                queue.insert(0, batch)  # retried after the restart
                await asyncio.sleep(0.02)
            finally:
                pending.difference_update(batch)


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
    pending: set[str] = set()

    async def dec_run(url: str, stop: asyncio.Event) -> None:
        await asyncio.gather(*(_dec_worker(url, _ctx(pki, "site-b"), queue, storm, stop,
                                           pending) for _ in range(4)))
        storm.in_flight_at_kill.update(pending)

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
            for kid in [k for k in wanted if k not in set(got)]:
                async with s.get(f"{proc.url}{API}/site-a-gw/dec_keys",
                                 params={"key_ID": kid}) as r:
                    body = json.loads(await r.read())
                if r.status == 200:
                    assert base64.b64decode(body["keys"][0]["key"]) == wanted[kid]
                else:
                    assert r.status == 400 and "already delivered" in body["message"]
                    assert kid in storm.in_flight_at_kill, \
                        "an answered key vanished without being in flight at a kill"
            for kid in got[:20]:
                async with s.get(f"{proc.url}{API}/site-a-gw/dec_keys",
                                 params={"key_ID": kid}) as r:
                    assert r.status == 400, "a redeemed key was delivered again"
    finally:
        proc.stop()

    # Every key KME-A answered is on its disk as delivered to its master.
    import sqlite3

    db = sqlite3.connect(work / "kme-a.sqlite3")
    on_disk = {row[0] for row in db.execute(
        "SELECT key_id FROM deliveries WHERE role='master'")}
    assert set(ids) <= on_disk, "an answered key is missing from the master's store"


async def test_sigkill_during_request_storms(pki: Path, tmp_path: Path) -> None:
    await run_crash_test(pki, tmp_path, kills=2)


@pytest.mark.slow
async def test_sigkill_during_request_storms_many_times(pki: Path, tmp_path: Path) -> None:
    await run_crash_test(pki, tmp_path, kills=12)
