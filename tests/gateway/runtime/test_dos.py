"""Denial of service on the tunnel listener: cookies, per-source rates, pending caps,
slow senders (gateway/tunnel/admission.py and its wiring in gateway/runtime/).

The unit tests drive `Admission` with a fake clock. The attack tests run a real
responder gateway and a real initiator gateway in this process over loopback TCP; the
attacker connects from other loopback addresses (127.0.0.2, ...). The expensive work a
ClientHello can cause is counted at the (fake, in-memory) KME: every `dec_keys` call.
Every attack test has a positive control with the protection switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.runtime import Gateway
from gateway.tunnel.admission import (
    COOKIE_LEN,
    Admission,
    AdmissionConfig,
    AdmissionSettings,
    CookieJar,
    LogThrottle,
    Refused,
    TokenBucketTable,
    source_key,
)
from gateway.tunnel.handshake import MSG_HELLO_RETRY, decode_hello_retry
from gateway.tunnel.wire import ErrorCode
from qkd.common.confload import ConfigError
from tests.support import flood as ds

DIGEST = bytes(range(48))
OTHER_DIGEST = bytes(reversed(range(48)))
OFF = {"cookie": "off", "rate_per_s": 10000.0, "burst": 100000, "max_pending": 100000,
       "max_pending_per_source": 100000, "load_threshold": 100000}


def adm(gw: Gateway) -> Admission:
    assert gw.admission is not None, "only a listening gateway has admission control"
    return gw.admission


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """One sample of the gateway's Prometheus output (0 when absent)."""
    text = gw.metrics.render().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search("^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------------ unit: pieces


def test_token_bucket_burst_then_refill() -> None:
    t = TokenBucketTable(rate=2.0, burst=3, max_sources=10)
    assert [t.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert t.take("b", 0.0)  # another source has its own bucket
    assert not t.take("a", 0.4)  # 0.8 tokens: not yet
    assert t.take("a", 0.5)  # 1.0 token
    assert not t.take("a", 0.5)
    # Refill is capped at the burst, however long the source was quiet.
    assert [t.take("a", 100.0) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_table_is_bounded_and_evicts_least_recent() -> None:
    t = TokenBucketTable(rate=0.001, burst=1, max_sources=16)
    for i in range(1000):
        t.take(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(t) == 16 and t.evictions == 1000 - 16
    assert not t.take("10.0.3.231", 1000.0)  # recent: still tracked, still empty
    assert t.take("10.0.0.0", 1000.0)  # evicted long ago: starts with a fresh burst


def test_source_key_groups_ipv6_by_64() -> None:
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_key("2001:db8:0:1::1") != source_key("2001:db8::1")
    assert source_key("::ffff:127.0.0.2") == "127.0.0.2"
    assert source_key("127.0.0.2") != source_key("127.0.0.3")
    assert source_key("") == "?"  # no peer name: one shared bucket, not a crash
    jar = CookieJar(10.0, 30.0)
    assert jar.check(jar.make("", DIGEST, 0.0), "", DIGEST, 0.0) is None


def test_pending_caps_and_the_load_signal() -> None:
    a = Admission(AdmissionSettings(cookie="under-load", max_pending=4,
                                    max_pending_per_source=2, load_threshold=3, burst=100))
    t1, t2 = a.admit("127.0.0.2", 0.0), a.admit("127.0.0.2", 0.0)
    third = a.admit("127.0.0.2", 0.0)
    assert isinstance(third, Refused) and third.reason == "source_pending_cap"
    assert not a.cookie_required(0.0)
    t3 = a.admit("127.0.0.3", 0.0)
    assert a.cookie_required(0.0) and a.under_load  # 3 pending >= threshold 3
    t4 = a.admit("127.0.0.4", 0.0)
    refused = a.admit("127.0.0.5", 0.0)
    assert isinstance(refused, Refused) and refused.reason == "pending_cap"
    assert a.stats_refused == {"source_pending_cap": 1, "pending_cap": 1}
    for t in (t1, t2, t3, t4):
        assert not isinstance(t, Refused)
        t.release()
        t.release()  # idempotent: a double release must not free someone else's slot
    assert a.pending == 0 and not a.cookie_required(0.0)
    assert not isinstance(a.admit("127.0.0.5", 0.0), Refused)  # recovered


@pytest.mark.parametrize(("mode", "pending", "expected"), [
    ("off", 10, False), ("always", 0, True), ("under-load", 1, False),
    ("under-load", 2, True)])
def test_cookie_modes(mode: str, pending: int, expected: bool) -> None:
    a = Admission(AdmissionSettings(cookie=mode, load_threshold=2, max_pending=10,
                                    max_pending_per_source=10, burst=100))
    for _ in range(pending):
        assert not isinstance(a.admit("127.0.0.2", 0.0), Refused)
    assert a.cookie_required(0.0) is expected


def test_cookie_binds_source_ip_and_hello_and_expires() -> None:
    jar = CookieJar(lifetime=10.0, rotation=30.0)
    c = jar.make("127.0.0.2", DIGEST, 100.0)
    assert len(c) == COOKIE_LEN <= 64
    # Positive control: the same source with the same hello, in time, is accepted ...
    assert jar.check(c, "127.0.0.2", DIGEST, 105.0) is None
    # ... and the port is not part of it, so only these change the answer:
    assert jar.check(c, "127.0.0.3", DIGEST, 105.0) == "bad_mac"
    assert jar.check(c, "::ffff:127.0.0.3", DIGEST, 105.0) == "bad_mac"
    assert jar.check(c, "127.0.0.2", OTHER_DIGEST, 105.0) == "bad_mac"
    assert jar.check(c, "127.0.0.2", DIGEST, 110.5) == "expired"
    assert jar.check(c[:-1], "127.0.0.2", DIGEST, 101.0) == "malformed"
    assert jar.check(b"", "127.0.0.2", DIGEST, 101.0) == "malformed"


def test_cookie_every_bit_flip_is_rejected() -> None:
    jar = CookieJar(lifetime=10.0, rotation=30.0)
    c = jar.make("127.0.0.2", DIGEST, 1.0)
    assert jar.check(c, "127.0.0.2", DIGEST, 1.0) is None
    for i in range(len(c) * 8):
        bad = bytearray(c)
        bad[i // 8] ^= 1 << (i % 8)
        assert jar.check(bytes(bad), "127.0.0.2", DIGEST, 1.0) is not None, i


def test_cookie_secret_rotation_keeps_one_previous_secret() -> None:
    jar = CookieJar(lifetime=10.0, rotation=10.0)
    c = jar.make("127.0.0.2", DIGEST, 9.0)  # generation 0
    assert jar.check(c, "127.0.0.2", DIGEST, 12.0) is None  # generation 1: previous secret
    assert jar.check(c, "127.0.0.2", DIGEST, 19.5) == "expired"  # still known, too old
    assert jar.check(c, "127.0.0.2", DIGEST, 21.0) == "unknown_secret"  # generation 2
    fresh = jar.make("127.0.0.2", DIGEST, 21.0)
    assert jar.check(fresh, "127.0.0.2", DIGEST, 21.0) is None
    # Another process (another jar) never accepts this one's cookies.
    assert CookieJar(10.0, 10.0).check(fresh, "127.0.0.2", DIGEST, 21.0) == "bad_mac"


def test_cookie_gate_counts_and_reports_without_secrets() -> None:
    a = Admission(AdmissionSettings(cookie="always"))
    ticket = a.admit("127.0.0.2", 0.0)
    assert not isinstance(ticket, Refused)
    gate = ticket.cookie_gate()
    cookie = gate.make_cookie(DIGEST, 0.0)
    assert gate.cookie_valid(cookie, DIGEST, 1.0)
    assert not gate.cookie_valid(cookie, OTHER_DIGEST, 1.0)
    assert (gate.issued, a.stats_cookies_issued, a.stats_cookies_rejected) == (1, 1, 1)
    events = list(a.events)
    assert [type(e).__name__ for e in events] == ["CookieIssued", "CookieRejected"]
    assert cookie.hex() not in repr(events) + repr(a) + repr(gate) + repr(a.jar)


def test_log_throttle() -> None:
    th = LogThrottle(1.0)
    assert th.allow("x", 0.0) == 0
    assert [th.allow("x", 0.1 * i) for i in range(1, 6)] == [None] * 5
    assert th.allow("y", 0.2) == 0  # keys are independent
    assert th.allow("x", 1.2) == 5  # the next line says how many were held back


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="cookie mode"):
        AdmissionSettings(cookie="sometimes")
    with pytest.raises(ValueError, match="cookie_lifetime"):
        AdmissionSettings(cookie_lifetime=120.0, secret_rotation=60.0)


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(("admission", "field", "fix"), [
    ({"cookie": "sometimes"}, "cookie", "use one of off, under-load, always"),
    ({"cookie_lifetime_s": 90, "cookie_secret_rotation_s": 60}, "cookie_lifetime_s",
     "at most cookie_secret_rotation_s"),
    ({"rate_per_s": 0}, "rate_per_s", "use a value >= 0.01"),
    ({"max_pending": 8, "load_threshold": 9}, "load_threshold", "at most max_pending"),
    ({"max_pending": 8, "max_pending_per_source": 9}, "max_pending_per_source",
     "at most max_pending"),
    ({"first_record_timeout_s": 20}, "first_record_timeout_s", "at most handshake_timeout_s"),
    ({"max_handshake_bytes": 100}, "max_handshake_bytes", "use a value >= 16384"),
    ({"burts": 3}, "burts", "check its spelling"),
])
def test_config_errors_name_field_and_fix(tmp_path: Path, pki_dir: Path,
                                          admission: dict[str, Any], field: str,
                                          fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        ds.write_config(tmp_path, pki_dir, "site-b", "site-a", listen=True,
                        admission=admission)
    msg = str(err.value)
    assert f"[tunnel.admission] {field}:" in msg and fix in msg, msg


def test_config_defaults(tmp_path: Path, pki_dir: Path) -> None:
    cfg = ds.write_config(tmp_path, pki_dir, "site-b", "site-a", listen=True)
    assert cfg.admission == AdmissionSettings()
    assert cfg.admission.cookie == "under-load"
    short = ds.write_config(tmp_path, pki_dir, "site-b", "site-a", listen=True,
                            handshake_timeout=2.0)
    assert short.admission.first_record_timeout == 2.0  # follows a short handshake timeout


def test_documented_example_matches_the_defaults() -> None:
    """configs/site-b.toml spells out every [tunnel.admission] field: with its values
    the loader must produce exactly the built-in defaults, so the two cannot drift."""
    import tomllib

    path = Path(__file__).resolve().parents[3] / "configs" / "site-b.toml"
    data = tomllib.loads(path.read_text())
    assert set(data["tunnel"]["admission"]) == {
        "cookie", "load_threshold", "cookie_lifetime_s", "cookie_secret_rotation_s",
        "rate_per_s", "burst", "max_sources", "max_pending", "max_pending_per_source",
        "first_record_timeout_s", "max_handshake_bytes", "peer_sources", "peer_reserved"}
    section = AdmissionConfig.model_validate(data["tunnel"]["admission"])
    # The example names its peer (site A dials from loopback); everything else is default.
    assert section.settings(data["tunnel"]["handshake_timeout_s"]) == AdmissionSettings(
        peer_sources=("127.0.0.1",))


# --------------------------------------------------------------- attacks over real TCP


@pytest.fixture
def sources() -> list[str]:
    addrs = ds.free_sources(4)
    if not all(ds.can_bind(a) for a in addrs):
        pytest.fail("this test needs 127.0.0.2-5 on the loopback interface (Linux routes "
                    "all of 127/8 to lo)")
    return addrs


@contextlib.asynccontextmanager
async def responder(tmp_path: Path, pki: Path, link: ds.FakeKmeLink,
                    admission: dict[str, Any], **kw: Any) -> AsyncIterator[Gateway]:
    cfg = ds.write_config(tmp_path / "b", pki, "site-b", "site-a", listen=True,
                          admission=admission, **kw)
    gw = await ds.start_gateway(cfg, link)
    try:
        yield gw
    finally:
        await gw.close()


@contextlib.asynccontextmanager
async def initiator(tmp_path: Path, pki: Path, link: ds.FakeKmeLink,
                    port: int, **kw: Any) -> AsyncIterator[Gateway]:
    cfg = ds.write_config(tmp_path / "a", pki, "site-a", "site-b", connect_port=port, **kw)
    gw = await ds.start_gateway(cfg, link)
    try:
        yield gw
    finally:
        await gw.close()


FLOOD = 200


async def _flood_with_legit(tmp_path: Path, pki: Path, sources: list[str],
                            admission: dict[str, Any]) -> tuple[int, bool, dict[str, int],
                                                                Gateway, float]:
    """A flood of valid-looking ClientHellos from `sources`; the real initiator dials
    in while it runs. Returns (flood dec_keys calls, legit tunnel up, tally, B, time).

    PSK authentication is off here, so every hello in the flood is a PKI bootstrap
    attempt the responder must take seriously; with PSK on, hellos that arrive after
    the real peer bootstrapped are refused cheaply (test_psk_mode_flood covers that
    phase)."""
    link = ds.FakeKmeLink(dec_delay=0.002)
    async with responder(tmp_path, pki, link, admission, psk=False) as b:
        assert b.tunnel_port is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        flood = asyncio.ensure_future(ds.hello_flood(b.tunnel_port, sources, FLOOD,
                                                     linger=0.5, concurrency=60,
                                                     hello_fields=lambda: ds.hello_fields_for(b)))
        await asyncio.sleep(0.1)  # the flood is in full swing before the peer dials
        async with initiator(tmp_path, pki, link, b.tunnel_port, psk=False) as a:
            up = await ds.wait_for(lambda: ds.tunnel_up(b) and ds.tunnel_up(a), 15.0)
            tally = await flood
            elapsed = loop.time() - start
            legit = b.totals["handshakes"] + sum(s.conn.stats.handshakes for s in b.sessions)
            return link.dec_calls - legit, up, tally, b, elapsed


async def test_hello_flood_bounded_and_legit_handshake_completes(
        tmp_path: Path, pki_dir: Path, sources: list[str]) -> None:
    admission = {"cookie": "under-load", "load_threshold": 4, "max_pending": 64,
                 "max_pending_per_source": 8, "burst": 10, "rate_per_s": 2.0}
    with structlog.testing.capture_logs() as logs:
        work, up, tally, b, elapsed = await _flood_with_legit(tmp_path, pki_dir, sources,
                                                              admission)
    assert up, "the legitimate handshake did not complete under the flood"
    # Rate limits alone admit at most burst + rate * t per source; the cookies (pending
    # is above the load threshold for most of the flood) keep most of those from
    # reaching the KME at all.
    rate_bound = len(sources) * (10 + 2.0 * elapsed)
    assert work <= rate_bound / 2, (work, rate_bound, tally)
    assert tally["refused"] >= FLOOD / 2, tally
    refused = sum(metric(b, "qkdgw_tunnel_refused_total", reason=r)
                  for r in ("rate_limited", "pending_cap", "source_pending_cap"))
    assert refused == sum(adm(b).stats_refused.values()) >= tally["refused"] > 0
    # The real initiator may have had to come back with a cookie too.
    assert metric(b, "qkdgw_cookie_retries_total") == adm(b).stats_cookies_issued
    assert tally["retry"] <= adm(b).stats_cookies_issued <= tally["retry"] + 2
    assert tally["retry"] > 0
    assert any(e["event"] == "tunnel.refused" for e in logs)


async def test_hello_flood_positive_control_without_protection(
        tmp_path: Path, pki_dir: Path, sources: list[str]) -> None:
    work, _up, tally, b, _ = await _flood_with_legit(tmp_path, pki_dir, sources, OFF)
    # Every valid-looking hello costs a KME request when nothing stands in the way.
    assert work >= 0.9 * FLOOD, (work, tally)
    assert tally["refused"] == 0 and tally["retry"] == 0, tally
    assert metric(b, "qkdgw_cookie_retries_total") == 0


async def test_cookie_always_flood_costs_no_kme_work(
        tmp_path: Path, pki_dir: Path, sources: list[str]) -> None:
    admission = {"cookie": "always", "max_pending": 64, "max_pending_per_source": 16,
                 "burst": 1000, "rate_per_s": 1000.0, "load_threshold": 64}
    work, up, tally, _b, _ = await _flood_with_legit(tmp_path, pki_dir, sources, admission)
    assert up
    assert work == 0, tally  # no flood hello without its cookie ever reached the KME
    assert tally["retry"] > 0


async def test_cookie_echoing_flood_is_bounded_by_the_rate_limit(
        tmp_path: Path, pki_dir: Path, sources: list[str]) -> None:
    link = ds.FakeKmeLink()
    admission = {"cookie": "always", "burst": 5, "rate_per_s": 1.0, "max_pending": 64,
                 "max_pending_per_source": 64, "load_threshold": 64}
    async with responder(tmp_path, pki_dir, link, admission) as b:
        assert b.tunnel_port is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        tally = await ds.hello_flood(b.tunnel_port, sources[:1], 60, echo_cookie=True,
                                     linger=0.3,
                                     hello_fields=lambda: ds.hello_fields_for(b))
        bound = 5 + 1.0 * (loop.time() - start)
        assert 0 < link.dec_calls <= bound, (link.dec_calls, bound, tally)
        assert metric(b, "qkdgw_tunnel_refused_total", reason="rate_limited") >= 60 - bound


@pytest.mark.parametrize("binder_check", [True, False], ids=["binder", "control-binder-off"])
async def test_psk_mode_flood(tmp_path: Path, pki_dir: Path, sources: list[str],
                              binder_check: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the sites share a PSK, a hello naming the current PSK epoch (sent in the
    clear) must also carry a binder, an HMAC under the PSK, which the responder checks
    before asking its KME. A flood of copied epochs, with admission control off, costs
    no QKD key. Positive control: with the binder check disabled, the same flood reaches
    the KME."""
    if not binder_check:
        import gateway.tunnel.handshake as hs

        monkeypatch.setattr(hs, "psk_binder", lambda _psk, hello: hello.psk_binder)
    link = ds.FakeKmeLink()
    async with responder(tmp_path, pki_dir, link, OFF) as b:
        assert b.tunnel_port is not None
        async with initiator(tmp_path, pki_dir, link, b.tunnel_port) as a:
            assert await ds.wait_for(lambda: ds.tunnel_up(b) and ds.tunnel_up(a), 15.0)
            fields = ds.hello_fields_for(b)
            assert fields.get("auth") == "psk"
            before = link.dec_calls
            await ds.hello_flood(b.tunnel_port, sources, 100, linger=0.3,
                                 hello_fields=lambda: fields)
            work = link.dec_calls - before
            if binder_check:
                assert work == 0, work
                failures = metric(b, "qkdgw_handshake_failures_total",
                                  reason=str(int(ErrorCode.HANDSHAKE_FAILURE)))
                assert failures >= 90, failures
            else:
                assert work >= 90, work
            assert ds.tunnel_up(b) and ds.tunnel_up(a)  # the live tunnel is untouched


async def _admitted(port: int, source: str, n: int) -> tuple[list[bool], list[Any]]:
    conns = [await ds.open_from(source, port) for _ in range(n)]
    refused = await asyncio.gather(*(ds.refused_quickly(r, 1.0) for r, _ in conns))
    return [not x for x in refused], [w for _, w in conns]


@pytest.mark.parametrize("protected", [True, False], ids=["rate-limit", "control-off"])
async def test_per_source_rate_limit(tmp_path: Path, pki_dir: Path, sources: list[str],
                                     protected: bool) -> None:
    link = ds.FakeKmeLink()
    # 0.05/s: even on a slow machine no token comes back while the 20 connections open.
    admission = ({"cookie": "off", "burst": 5, "rate_per_s": 0.05, "max_pending": 100,
                  "max_pending_per_source": 100, "load_threshold": 100}
                 if protected else OFF)
    async with responder(tmp_path, pki_dir, link, admission) as b:
        assert b.tunnel_port is not None
        admitted, writers = await _admitted(b.tunnel_port, sources[0], 20)
        other, other_w = await _admitted(b.tunnel_port, sources[1], 1)
        try:
            if protected:
                assert sum(admitted) == 5, admitted
                assert metric(b, "qkdgw_tunnel_refused_total", reason="rate_limited") == 15
            else:
                assert all(admitted)
                assert metric(b, "qkdgw_tunnel_refused_total", reason="rate_limited") == 0
            assert other == [True]  # another source is not affected
        finally:
            for w in writers + other_w:
                w.transport.abort()
        # The flooding source does not lock out the real peer (127.0.0.1).
        async with initiator(tmp_path, pki_dir, link, b.tunnel_port) as a:
            assert await ds.wait_for(lambda: ds.tunnel_up(b) and ds.tunnel_up(a), 15.0)


async def _trickle(port: int, source: str, first: bytes, every: float,
                   max_time: float) -> float:
    """Send `first`, then one byte every `every` s; seconds until the server hung up
    (max_time if it never did)."""
    loop = asyncio.get_running_loop()
    reader, writer = await ds.open_from(source, port)
    start = loop.time()
    try:
        writer.write(first)
        while loop.time() - start < max_time:
            try:
                data = await asyncio.wait_for(reader.read(4096), every)
            except TimeoutError:
                writer.write(b"\x00")
                continue
            except ConnectionResetError:
                return loop.time() - start
            if not data:
                return loop.time() - start
        return max_time
    finally:
        writer.transport.abort()


# A plaintext handshake record that announces 64 KiB and never delivers them.
HUGE_HEADER = bytes((0x16, 0, 0x01, 0x00, 0x00))


@pytest.mark.parametrize("protected", [True, False], ids=["deadline", "control-off"])
async def test_slow_sender_is_cut_at_the_first_record_deadline(
        tmp_path: Path, pki_dir: Path, sources: list[str], protected: bool) -> None:
    link = ds.FakeKmeLink()
    deadline = 0.5 if protected else 5.0  # off: only the handshake timeout is left
    admission = {"first_record_timeout_s": deadline}
    async with responder(tmp_path, pki_dir, link, admission, handshake_timeout=5.0) as b:
        assert b.tunnel_port is not None
        with structlog.testing.capture_logs() as logs:
            lasted = await _trickle(b.tunnel_port, sources[0], HUGE_HEADER + b"\x01" * 100,
                                    0.1, 2.0)
        cut = metric(b, "qkdgw_tunnel_refused_total", reason="first_record_timeout")
        if protected:
            assert 0.4 <= lasted < 2.0, lasted
            assert cut == 1
            assert [e["reason"] for e in logs if e["event"] == "tunnel.refused"] == [
                "first_record_timeout"]
        else:
            assert lasted == 2.0 and cut == 0  # the trickle holds its slot
        assert await ds.wait_for(lambda: adm(b).pending == 0 or not protected, 2.0)
        async with initiator(tmp_path, pki_dir, link, b.tunnel_port) as a:
            assert await ds.wait_for(lambda: ds.tunnel_up(b) and ds.tunnel_up(a), 15.0)


@pytest.mark.parametrize("protected", [True, False], ids=["byte-cap", "control-off"])
async def test_bytes_before_the_handshake_are_capped(
        tmp_path: Path, pki_dir: Path, sources: list[str], protected: bool) -> None:
    link = ds.FakeKmeLink()
    admission = {"max_handshake_bytes": 16384 if protected else 1 << 20,
                 "first_record_timeout_s": 5.0}
    async with responder(tmp_path, pki_dir, link, admission, handshake_timeout=5.0) as b:
        assert b.tunnel_port is not None
        lasted = await _trickle(b.tunnel_port, sources[0], HUGE_HEADER + bytes(40000), 0.1,
                                1.5)
        cut = metric(b, "qkdgw_tunnel_refused_total", reason="handshake_bytes")
        if protected:
            assert lasted < 1.0 and cut == 1, (lasted, cut)  # at once, not at a deadline
        else:
            assert lasted == 1.5 and cut == 0


async def test_pending_caps_refuse_then_recover(tmp_path: Path, pki_dir: Path,
                                                sources: list[str]) -> None:
    link = ds.FakeKmeLink()
    admission = {"cookie": "off", "max_pending": 4, "max_pending_per_source": 3,
                 "load_threshold": 4, "burst": 100}
    async with responder(tmp_path, pki_dir, link, admission) as b:
        assert b.tunnel_port is not None
        port = b.tunnel_port
        first, w1 = await _admitted(port, sources[0], 4)
        assert first == [True, True, True, False]  # per-source cap
        assert metric(b, "qkdgw_tunnel_refused_total", reason="source_pending_cap") == 1
        second, w2 = await _admitted(port, sources[1], 2)
        assert second == [True, False]  # global cap: 3 + 1 = 4
        assert metric(b, "qkdgw_tunnel_refused_total", reason="pending_cap") == 1
        assert metric(b, "qkdgw_pending_handshakes") == 4
        for w in w1 + w2:
            w.transport.abort()
        assert await ds.wait_for(lambda: adm(b).pending == 0, 5.0)
        async with initiator(tmp_path, pki_dir, link, port) as a:
            assert await ds.wait_for(lambda: ds.tunnel_up(b) and ds.tunnel_up(a), 15.0)
        # A confirmed tunnel does not hold a pending slot.
        assert adm(b).pending == 0


async def test_silent_client_after_hello_retry_is_cut(tmp_path: Path, pki_dir: Path,
                                                      sources: list[str]) -> None:
    link = ds.FakeKmeLink()
    admission = {"cookie": "always", "first_record_timeout_s": 0.5}
    async with responder(tmp_path, pki_dir, link, admission, handshake_timeout=5.0) as b:
        assert b.tunnel_port is not None
        hello = ds.plaintext_record(
            ds.valid_looking_hello(**ds.hello_fields_for(b)).encode())
        lasted = await _trickle(b.tunnel_port, sources[0], hello, 3.0, 3.0)
        assert 0.4 <= lasted < 2.0, lasted
        assert metric(b, "qkdgw_tunnel_refused_total", reason="cookie_retry_timeout") == 1
        assert link.dec_calls == 0


async def _hello_with(port: int, source: str, cookie: bytes, hello: Any) -> bytes:
    """Send `hello` (with `cookie`) from `source`; the cookie of the answer's
    HelloRetryRequest, or b"" if the server did something else."""
    reader, writer = await ds.open_from(source, port)
    try:
        again = type(hello)(**{**hello.__dict__, "cookie": cookie})
        writer.write(ds.plaintext_record(again.encode()))
        buf = bytearray()
        with contextlib.suppress(asyncio.TimeoutError, ConnectionResetError):
            while not (recs := ds.read_records(buf)):
                chunk = await asyncio.wait_for(reader.read(4096), 2.0)
                if not chunk:
                    break
                buf += chunk
            for _, body in recs:
                if body[:1] == bytes((MSG_HELLO_RETRY,)):
                    return decode_hello_retry(body)
        await asyncio.sleep(0.1)  # let a KME request, if any, happen
        return b""
    finally:
        writer.transport.abort()


async def test_cookie_replay_from_another_source_or_late_is_rejected(
        tmp_path: Path, pki_dir: Path, sources: list[str]) -> None:
    link = ds.FakeKmeLink()
    admission = {"cookie": "always", "cookie_lifetime_s": 1.0,
                 "cookie_secret_rotation_s": 30.0}
    async with responder(tmp_path, pki_dir, link, admission) as b:
        assert b.tunnel_port is not None
        port = b.tunnel_port
        hello = ds.valid_looking_hello(**ds.hello_fields_for(b))
        cookie = await _hello_with(port, sources[0], b"", hello)
        assert cookie and link.dec_calls == 0
        # Another source replays it: another HelloRetryRequest, no KME request.
        assert await _hello_with(port, sources[1], cookie, hello)
        assert link.dec_calls == 0
        assert metric(b, "qkdgw_cookies_rejected_total", reason="bad_mac") == 1
        # Positive control: from the source it was made for, in time, it is accepted
        # and the hello reaches the KME.
        assert await _hello_with(port, sources[0], cookie, hello) == b""
        assert link.dec_calls == 1
        # After its lifetime the same cookie from the same source is rejected.
        fresh = await _hello_with(port, sources[0], b"", hello)
        await asyncio.sleep(1.2)
        assert await _hello_with(port, sources[0], fresh, hello)
        assert link.dec_calls == 1
        assert metric(b, "qkdgw_cookies_rejected_total", reason="expired") == 1


def test_recent_key_id_memory_is_bounded() -> None:
    """Flood hellos name random key IDs; the replay memory in front of the KME stays
    bounded."""
    from gateway.runtime import RecentKeyIds

    ids = RecentKeyIds(limit=100)
    ids.update([f"k{i}" for i in range(1000)])
    assert len(ids) == 100
    assert "k999" in ids and "k900" in ids and "k899" not in ids


# ------------------------------------------------ the configured peer's reserved slots


def test_configured_peer_has_slots_no_flood_can_take() -> None:
    settings = AdmissionSettings(cookie="off", max_pending=4, max_pending_per_source=1,
                                 burst=100, peer_sources=("192.0.2.7", "2001:db8:1::/64"),
                                 peer_reserved=2)
    a = Admission(settings)
    flood = [a.admit(f"198.51.100.{i}", 0.0) for i in range(10)]  # more sources than the cap
    assert sum(not isinstance(t, Refused) for t in flood) == 4 and a.pending == 4
    peer = [a.admit("192.0.2.7", 0.0), a.admit("::ffff:192.0.2.7", 0.0),
            a.admit("2001:db8:1::5", 0.0)]
    assert not isinstance(peer[0], Refused) and not isinstance(peer[1], Refused)
    assert isinstance(peer[2], Refused) and peer[2].reason == "peer_reserved_full"
    assert a.pending == 4 and a.peer_pending == 2  # the peer never used a global slot
    assert not a.is_peer("2001:db8:2::1") and a.is_peer("2001:db8:1::ffff")
    peer[0].release()  # type: ignore[union-attr]
    assert not isinstance(a.admit("2001:db8:1::5", 0.0), Refused)
    # Positive control: without the reservation the peer is one more refused source.
    b = Admission(dataclasses.replace(settings, peer_sources=()))
    for i in range(10):
        b.admit(f"198.51.100.{i}", 0.0)
    locked_out = b.admit("192.0.2.7", 0.0)
    assert isinstance(locked_out, Refused) and locked_out.reason == "pending_cap"


def test_peer_sources_config_is_checked(tmp_path: Path, pki_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[tunnel.admission\] peer_sources.*not an IP"):
        ds.write_config(tmp_path, pki_dir, "site-b", "site-a", listen=True,
                        admission={"peer_sources": ["site-a.example"]})
    cfg = ds.write_config(tmp_path, pki_dir, "site-b", "site-a", listen=True,
                          admission={"peer_sources": ["127.0.0.1", "fd00::/8"]})
    assert cfg.admission.peer_sources == ("127.0.0.1", "fd00::/8")


@pytest.mark.parametrize("reserved", [True, False])
async def test_flood_from_more_sources_than_the_cap_cannot_lock_the_peer_out(
        tmp_path: Path, pki_dir: Path, reserved: bool) -> None:
    """12 flood sources (127.0.0.10-21) hold every one of the 8 global slots with silent
    connections and come straight back when cut. The real initiator dials from
    127.0.0.1: with it configured as the peer it gets in; without (the positive
    control) it is refused as long as the flood lasts."""
    flood_sources = ds.free_sources(12, first=10)
    if not all(ds.can_bind(a) for a in flood_sources):
        pytest.fail("this test needs 127.0.0.10-21 on the loopback interface")
    link = ds.FakeKmeLink()
    admission: dict[str, Any] = {"cookie": "off", "max_pending": 8,
                                 "max_pending_per_source": 1, "load_threshold": 8,
                                 "burst": 1000, "rate_per_s": 1000.0,
                                 "first_record_timeout_s": 5.0}
    if reserved:
        admission["peer_sources"] = ["127.0.0.1"]
    async with responder(tmp_path, pki_dir, link, admission) as b:
        assert b.tunnel_port is not None
        stop = asyncio.Event()
        flood = asyncio.ensure_future(ds.hold_slots(b.tunnel_port, flood_sources, 1, stop))
        try:
            assert await ds.wait_for(lambda: adm(b).pending == 8, 5.0)
            async with initiator(tmp_path, pki_dir, link, b.tunnel_port) as a:
                up = await ds.wait_for(lambda: ds.tunnel_up(b) and ds.tunnel_up(a),
                                       8.0 if reserved else 2.5)
                assert adm(b).pending == 8  # the flood still holds every global slot
        finally:
            stop.set()
            tally = await flood
        assert tally["opened"] > 8
        refused_peer = metric(b, "qkdgw_tunnel_refused_total", reason="pending_cap")
        if reserved:
            assert up, "the configured peer was locked out by the flood"
        else:
            assert not up and refused_peer > 0
