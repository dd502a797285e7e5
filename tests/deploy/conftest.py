"""A live two-site testbed for the deploy/ checks (KMEs on the emulated BB84 link with
their admin endpoints), started and scraped once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gateway.tools.testbed import TestbedOptions
from tests.support.ops_testbed import FAST, LiveSites, OpsTestbed, wait_for


@pytest.fixture(scope="session")
def live_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSites]:
    old = os.environ.get("QKDGW_BUDGET_POLL_S")
    os.environ["QKDGW_BUDGET_POLL_S"] = "0.5"
    work = tmp_path_factory.mktemp("live-sites")
    bed = OpsTestbed(work, TestbedOptions(**FAST))  # type: ignore[arg-type]
    try:
        bed.start_all()
        bed.wait_tunnel(timeout=60)
        live = LiveSites(bed)

        def ready() -> bool:
            for site in ("site-a", "site-b"):
                b = bed.status(site)["budget"]
                if "pool" not in b or b["pool"]["samples"] < 2 or "link" not in b:
                    return False
                if "qkdgw_kme_link_last_round_age_seconds" not in bed.kme_metrics(site):
                    return False
                if "qkdgw_kme_pool_exhaustion_seconds" not in bed.kme_metrics(site):
                    return False
            return True

        wait_for(ready, 60, "budget figures on both sites")
        for site in ("site-a", "site-b"):
            live.gateway_metrics[site] = bed.metrics(site)
            live.kme_metrics[site] = bed.kme_metrics(site)
        yield live
    finally:
        bed.stop()
        if old is None:
            os.environ.pop("QKDGW_BUDGET_POLL_S", None)
        else:
            os.environ["QKDGW_BUDGET_POLL_S"] = old


