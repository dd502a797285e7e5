"""The KME's key budget on its admin endpoint (qkd/kme/budget.py): per-peer pool level,
rates and forecast in /status (figures and words) and /metrics, from a real KME whose
pool an SAE drains over ETSI 014. The BB84 figures (auth pad, last round) are checked on
a live two-site testbed in tests/deploy/test_prometheus.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import pytest

from qkd.common.budget import BudgetForecaster
from qkd.etsi014.client import EtsiClient
from qkd.kme.admin import BUDGET
from qkd.kme.config import KmeConfig
from qkd.kme.service import RunningKme, start_kme

ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'


async def _get(port: int, path: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        assert r.status == 200
        return await r.text()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_budget_follows_a_draining_pool(make_config: Callable[..., KmeConfig],
                                              sae: Callable[..., EtsiClient]) -> None:
    # 200 keys/s fill the pool (capacity 200) within a second; then production stops
    # while the pool is full, and draining it shows as a falling pool.
    kme: RunningKme = await start_kme(make_config("a", extra=ADMIN, key_rate="200",
                                                  max_key_count=200))
    try:
        assert kme.admin_port and kme.admin_runner is not None
        budget = kme.admin_runner.app[BUDGET]
        # The test takes the samples itself, at the moments it needs.
        await budget.stop()
        # A short time constant, so the refill below wins over the drain within a second.
        budget.pool = BudgetForecaster(tau=0.1)
        await asyncio.sleep(1.2)
        # Before two samples nothing is forecast, and /metrics leaves the forecast out
        # (a 0 there would read as "dry now").
        status = json.loads(await _get(kme.admin_port, "/status"))
        assert status["budget"]["peer"] == "kme-site-b"
        await budget.sample()
        async with sae("site-a", kme) as gw:
            for _ in range(10):
                await gw.get_enc_keys("site-b-gw", number=16)
        await budget.sample()
        status = json.loads(await _get(kme.admin_port, "/status"))
        pool = status["budget"]["pool"]
        assert pool["trend"] == "falling", pool
        assert pool["net_rate"] < 0 and pool["consumption_rate"] > 0
        assert isinstance(pool["seconds_to_empty"], float)
        assert pool["words"].startswith(f"pool {pool['level']:.0f} keys, falling ")
        assert "dry in ~" in pool["words"]
        text = await _get(kme.admin_port, "/metrics")
        assert _metric(text, "qkdgw_kme_pool_net_rate") < 0
        assert 'qkdgw_kme_pool_exhaustion_seconds{peer="kme-site-b"}' in text
        tte = _metric(text, "qkdgw_kme_pool_exhaustion_seconds")
        # Same sample, same figure (rounded in JSON).
        assert abs(tte - pool["seconds_to_empty"]) < 1e-3 + 1e-6 * tte
        # Refilling: the ideal link tops the bucket up at 200/s; after ten time
        # constants the pool counts as rising again and the forecast is +Inf.
        await asyncio.sleep(1.0)
        await budget.sample()
        status = json.loads(await _get(kme.admin_port, "/status"))
        assert status["budget"]["pool"]["trend"] == "rising", status["budget"]
        assert status["budget"]["pool"]["seconds_to_empty"] == "inf"
        assert "+Inf" in [line.split()[-1] for line in (await _get(
            kme.admin_port, "/metrics")).splitlines()
            if line.startswith("qkdgw_kme_pool_exhaustion_seconds{")]
    finally:
        await kme.close()



async def test_sampler_runs_with_the_admin_endpoint(make_config: Callable[..., KmeConfig]
                                                    ) -> None:
    kme: RunningKme = await start_kme(make_config("a", extra=ADMIN))
    try:
        assert kme.admin_runner is not None
        budget = kme.admin_runner.app[BUDGET]
        assert budget._task is not None and not budget._task.done()
        await asyncio.sleep(0.1)
        assert budget.pool_figures is not None  # the first sample is taken at once
    finally:
        await kme.close()
    assert budget._task is None


async def test_readyz_and_healthz(make_config: Callable[..., KmeConfig]) -> None:
    """Ready = serving keys (or producing them); a KME whose ideal link makes no key and
    has none is alive but not ready."""
    for rate, ready in (("inf", True), ("0", False)):
        kme: RunningKme = await start_kme(make_config("a", extra=ADMIN, key_rate=rate))
        try:
            assert kme.admin_port
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{kme.admin_port}/readyz") as r:
                    assert r.status == (200 if ready else 503)
                    assert (await r.json())["ready"] is ready
                async with s.get(f"http://127.0.0.1:{kme.admin_port}/healthz") as r:
                    assert r.status == 200 and (await r.json())["alive"] is True
        finally:
            await kme.close()


async def test_qkdgw_status_reads_a_kme_in_words(make_config: Callable[..., KmeConfig],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    kme: RunningKme = await start_kme(make_config("a", extra=ADMIN))
    try:
        await asyncio.sleep(0.1)  # the first budget sample
        url = f"http://127.0.0.1:{kme.admin_port}"
        # urllib blocks: run the CLI in a thread so this loop keeps serving it.
        assert await asyncio.to_thread(main, ["status", "--url", url]) == 0
        status = json.loads(await _get(kme.admin_port, "/status"))  # type: ignore[arg-type]
    finally:
        await kme.close()
    out = capsys.readouterr().out
    assert any(x.startswith("KME kme-site-a (peer kme-site-b, ideal link)")
               for x in out.splitlines())
    budget_line = next(x for x in out.splitlines() if x.strip().startswith("key budget"))
    assert status["budget"]["pool"]["words"] in budget_line
