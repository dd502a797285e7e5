"""The gateway runtime's handling of PSK state: a failed write drops the connection
before the peer hears of the new PSK, and the sites reconnect by PSK afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.runtime import Gateway
from gateway.runtime.psk_store import PskStoreError
from gateway.tunnel import events as ev
from tests.support import flood as ds


async def _pair(tmp_path: Path, pki: Path, link: ds.FakeKmeLink,
                b: Gateway | None = None) -> tuple[Gateway, Gateway]:
    if b is None:
        b = await ds.start_gateway(ds.write_config(tmp_path / "b", pki, "site-b", "site-a",
                                                   listen=True), link)
    assert b.tunnel_port is not None
    a = await ds.start_gateway(ds.write_config(tmp_path / "a", pki, "site-a", "site-b",
                                               connect_port=b.tunnel_port), link)
    return a, b


async def test_failed_psk_write_drops_the_session_and_psk_recovers(
        tmp_path: Path, pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = ds.FakeKmeLink()
    a, b = await _pair(tmp_path, pki_dir, link)
    try:
        assert await ds.wait_for(lambda: ds.tunnel_up(a) and ds.tunnel_up(b), 15.0)
        assert b.psk is not None and a.psk is not None
        epoch = b.psk.status().current_epoch
        await a.close()
        # The responder's next PSK write fails (say, the disk is full).
        real_apply = b.psk.apply
        failures: list[ev.Event] = []

        def failing_apply(event: ev.Event) -> None:
            if isinstance(event, ev.NextPskDerived) and not failures:
                failures.append(event)
                raise PskStoreError("disk full (test)")
            real_apply(event)

        monkeypatch.setattr(b.psk, "apply", failing_apply)
        a, _ = await _pair(tmp_path, pki_dir, link, b)
        assert await ds.wait_for(lambda: ds.tunnel_up(a) and ds.tunnel_up(b), 20.0)
        assert failures, "the write never failed: the test did not test anything"
        # The failed session never became the tunnel, and the one that did is PSK-
        # authenticated with both sides on the same epoch.
        assert b.tunnel is not None and b.tunnel.bootstrap_auth == "psk"
        assert a.tunnel is not None and a.tunnel.bootstrap_auth == "psk"
        assert b.psk.status().current_epoch > epoch
        assert await ds.wait_for(
            lambda: a.psk.status().current_epoch == b.psk.status().current_epoch, 5.0)
        assert b"qkdgw_psk_store_failures_total 1.0" in b.metrics.render()
    finally:
        await a.close()
        await b.close()
