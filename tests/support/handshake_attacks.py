"""What the man-in-the-middle handshake tests share: failure counts and waits, key logs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gateway.tunnel.handshake import (
    KeyLogEntry,
)
from gateway.tunnel.wire import ErrorCode
from tests.support.mitm_relay import (
    Sites,
)


async def failures(sites: Sites, site: str) -> dict[int, float]:
    m = await sites.metrics(site)
    return {int(dict(labels)["reason"]): v for (name, labels), v in m.items()
            if name == "qkdgw_handshake_failures_total"}


async def wait_failure(sites: Sites, site: str, code: ErrorCode, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await failures(sites, site)).get(int(code), 0) < 1:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{site} counted no handshake failure {code.name}: "
                                 f"{await failures(sites, site)}")
        await asyncio.sleep(0.02)
    assert sites.log_events("tunnel.closed", code_name=code.name)


async def assert_no_session(sites: Sites) -> None:
    """While the attack runs: no tunnel, and the application is refused, not served."""
    assert sites.tunnel_of("site-a") is None and sites.tunnel_of("site-b") is None
    assert sites.a.totals["handshakes"] == 0 and sites.b.totals["handshakes"] == 0
    payload = b"must not cross an unconfirmed tunnel"
    assert (await sites.exchange(payload, timeout=10)).outcome(payload) in ("reset", "refused")
    assert all(not c.data for c in sites.sink.connections)


def keylog_into(entries: list[KeyLogEntry]) -> Callable[[Any], None]:
    def setup(gw: Any) -> None:
        gw.keylog = entries.append
    return setup


class _NeverSeen(set):  # type: ignore[type-arg]
    def __contains__(self, item: object) -> bool:
        return False
