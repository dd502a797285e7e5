"""Record-layer attacks by a man in the middle between two real gateways (issue 5).

Every attack runs on a live tunnel through `mitm_relay.MitmRelay` (real TCP, real
gateways, real KMEs). For each: the tunnel dies with the right close code, the
application sees a reset instead of wrong data, the sink never receives a byte that
was not sent (nothing tampered is decrypted and delivered), the responder counts it
in /metrics and logs it, and a fresh tunnel carries data again once the relay is
honest. Each family also has a positive control: with the protection switched off in
the test (monkeypatch), the same attack delivers wrong data.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

import gateway.tunnel.record as record_mod
from gateway.runtime.app_stream import AppStream
from gateway.tunnel.key_schedule import HybridKeySchedule
from gateway.tunnel.record import HEADER_LEN, MAX_PROTECTED_BODY, PROTECTED, TAG_LEN, RecordLimits
from gateway.tunnel.wire import ErrorCode
from tests.support.mitm_relay import (
    A2B,
    AppResult,
    Drop,
    FlipBit,
    Inject,
    OnceStrategy,
    Reflect,
    Reorder,
    Replay,
    SinkConnection,
    Sites,
    Substitute,
    Truncate,
    UncheckedAesGcm,
    WireRecord,
    frame,
)

PART1 = bytes(range(256)) * 80  # 20 KiB: one record of its own
PART2 = b"second part of the message " * 2600  # ~70 KiB: completes a stretched record
PAYLOAD = PART1 + PART2


def big_a2b(rec: WireRecord) -> bool:
    """The record that carries PART1 (the tunnel is otherwise idle)."""
    return rec.protected and len(rec.body) > 1000


async def closes(sites: Sites, site: str) -> dict[str, float]:
    """Unclean tunnel closes per code on one gateway, from its /metrics endpoint."""
    m = await sites.metrics(site)
    return {dict(labels)["code"]: v for (name, labels), v in m.items()
            if name == "qkdgw_tunnel_closes_total" and dict(labels).get("clean") == "false"}


def new_codes(before: dict[str, float], after: dict[str, float]) -> set[int]:
    return {int(c) for c, v in after.items() if v > before.get(c, 0.0)}


async def attack_live(sites: Sites, strategy: OnceStrategy, *, first: bytes = PART1,
                      rest: bytes = PART2) -> tuple[AppResult, SinkConnection]:
    """Arm `strategy` on the live tunnel, then send first ‖ rest and FIN on a stream
    that is already open end to end; returns what the app and the sink saw."""
    app, sink_conn = await sites.open_app()
    assert sites.relay is not None and sites.relay.live is not None
    sites.relay.live.strategy = strategy
    await app.send(first)
    await asyncio.sleep(0.05)
    await app.send(rest, eof=True)
    result = await app.result(timeout=10)
    await asyncio.wait_for(sink_conn.done.wait(), 10)
    assert strategy.fired.is_set(), "the relay never saw the record it was to attack"
    return result, sink_conn


async def check_rejected(sites: Sites, strategy_factory: Callable[[], OnceStrategy], *,
                         detector: str, codes: set[ErrorCode],
                         payload: tuple[bytes, bytes] = (PART1, PART2)) -> int:
    """One attack on a fresh live tunnel, every requirement checked; returns the code."""
    old = await sites.wait_tunnel()
    before = await closes(sites, detector)
    logged = len(sites.log_events("tunnel.closed"))
    result, sink_conn = await attack_live(sites, strategy_factory(), first=payload[0],
                                          rest=payload[1])
    sent = payload[0] + payload[1]
    # The application gets a reset, never wrong data and never a clean end.
    assert result.outcome(sent) in ("reset", "refused"), result
    # Nothing that was not sent reached the service, and it saw a clean end only if
    # everything arrived (an attack on B's records to A may come after the request).
    assert sent.startswith(bytes(sink_conn.data))
    if detector == "site-b":
        assert sink_conn.end == "reset"
    else:
        assert sink_conn.end == "reset" or bytes(sink_conn.data) == sent
    await sites.wait_for(lambda: sites.tunnel_of("site-a") is not old, 10, "the tunnel to drop")
    got = set()
    for _ in range(100):
        got = new_codes(before, await closes(sites, detector))
        if got:
            break
        await asyncio.sleep(0.02)
    assert len(got) == 1 and got <= {int(c) for c in codes}, (got, codes)
    code = got.pop()
    names = {e["code_name"] for e in sites.log_events("tunnel.closed")[logged:]}
    assert ErrorCode(code).name in names
    await sites.recover(old)
    return code


# ------------------------------------------------------------------------ bit flips

HEADER_CODES = {
    0: {ErrorCode.PROTOCOL_ERROR},  # 0x17 -> 0x16: a plaintext record after keys exist
    1: {ErrorCode.BAD_RECORD_MAC},  # the key-phase bit: the next key does not open it
    2: {ErrorCode.DECODE_ERROR},  # length + 64 KiB: over the record limit
    3: {ErrorCode.BAD_RECORD_MAC},  # length + 256: mis-framed, fails authentication
    4: {ErrorCode.BAD_RECORD_MAC},
}
BODY_POSITIONS = [HEADER_LEN, -TAG_LEN - 1, *range(-TAG_LEN, 0)]  # first, last, every tag byte


async def test_bit_flips_in_header_body_and_tag_are_fatal(sites: Sites) -> None:
    await sites.start()
    seen: dict[int, int] = {}
    for pos, codes in HEADER_CODES.items():
        seen[pos] = await check_rejected(
            sites, lambda p=pos: FlipBit(p, match=big_a2b), detector="site-b", codes=codes)
    for pos in BODY_POSITIONS:
        seen[pos] = await check_rejected(
            sites, lambda p=pos: FlipBit(p, match=big_a2b), detector="site-b",
            codes={ErrorCode.BAD_RECORD_MAC})
    # The same flips from B to A are fatal at A.
    for pos in (1, HEADER_LEN, -1):
        await check_rejected(
            sites, lambda p=pos: _flip_b2a(p), detector="site-a",
            codes={ErrorCode.BAD_RECORD_MAC})
    assert len(seen) == len(HEADER_CODES) + len(BODY_POSITIONS)


def _flip_b2a(pos: int) -> FlipBit:
    # B's first protected record after the request is a window grant or the reply.
    return FlipBit(pos, direction="b2a", match=lambda r: r.protected)


@pytest.mark.slow
async def test_every_bit_of_a_record_is_protected(sites: Sites) -> None:
    """Exhaustive: every bit of a small data record (header, body, tag) through TCP."""
    await sites.start()
    small = b"0123456789abcdef"
    size = HEADER_LEN + 1 + 9 + len(small) + TAG_LEN  # inner type, frame header
    for pos in range(size):
        for bit in range(8):
            await check_rejected(
                sites, lambda p=pos, b=bit: FlipBit(p, b, match=lambda r: r.protected),
                detector="site-b",
                codes={ErrorCode.BAD_RECORD_MAC, ErrorCode.DECODE_ERROR,
                       ErrorCode.PROTOCOL_ERROR},
                payload=(small, PART2))


async def test_positive_control_bit_flip_without_tag_check_delivers_wrong_data(
        sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_mod, "AESGCM", UncheckedAesGcm)
    await sites.start()
    await sites.wait_tunnel()
    # Byte 100 of the data: header, inner type, 9-byte DATA frame header, then data.
    pos = HEADER_LEN + 1 + 9 + 100
    result, sink_conn = await attack_live(sites, FlipBit(pos, 3, match=big_a2b))
    got = bytes(sink_conn.data)
    assert len(got) == len(PAYLOAD) and got != PAYLOAD
    assert [i for i in range(len(got)) if got[i] != PAYLOAD[i]] == [100]
    assert result.outcome(PAYLOAD) == "wrong"
    # A flipped tag byte is simply accepted once nobody checks it.
    await sites.wait_tunnel()
    result, sink_conn = await attack_live(sites, FlipBit(-1, match=big_a2b))
    assert result.outcome(PAYLOAD) == "ok" and bytes(sink_conn.data) == PAYLOAD


# --------------------------------------------------- replay, reordering, dropping

SEQUENCE_ATTACKS: dict[str, Callable[[], OnceStrategy]] = {
    "replay": lambda: Replay(match=big_a2b),
    "reorder": lambda: Reorder(match=big_a2b),
    "drop": lambda: Drop(match=big_a2b),
}


async def test_replay_reorder_and_drop_are_fatal(sites: Sites) -> None:
    await sites.start()
    for factory in SEQUENCE_ATTACKS.values():
        await check_rejected(sites, factory, detector="site-b",
                             codes={ErrorCode.BAD_RECORD_MAC})


def _no_sequence_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off the implicit sequence number: every record of a key gets the IV."""
    monkeypatch.setattr(record_mod._Direction, "nonce",
                        lambda self: self._iv.to_bytes(12, "big"))


@pytest.mark.parametrize("attack", sorted(SEQUENCE_ATTACKS))
async def test_positive_control_sequence_attacks_without_sequence_numbers(
        sites: Sites, monkeypatch: pytest.MonkeyPatch, attack: str) -> None:
    _no_sequence_numbers(monkeypatch)
    await sites.start()
    await sites.wait_tunnel()
    result, sink_conn = await attack_live(sites, SEQUENCE_ATTACKS[attack]())
    got = bytes(sink_conn.data)
    expected = {"replay": PART1 + PART1 + PART2, "drop": PART2}
    if attack in expected:
        assert got == expected[attack]
    else:  # the record with PART1 arrives after the next one
        assert got != PAYLOAD and sorted(got) == sorted(PAYLOAD) and got.find(PART1) > 0
    assert result.outcome(PAYLOAD) == "wrong"
    assert sink_conn.end == "eof"


# ------------------------------------------------------------------------ reflection


async def test_reflected_records_are_fatal(sites: Sites) -> None:
    await sites.start()
    await check_rejected(sites, lambda: Reflect(match=big_a2b), detector="site-a",
                         codes={ErrorCode.BAD_RECORD_MAC})


async def test_positive_control_reflection_with_one_key_for_both_directions(
        sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    session_keys = HybridKeySchedule.session_keys

    def same_key_both_ways(self: Any, th: bytes) -> Any:
        keys = session_keys(self, th)
        return dataclasses.replace(keys, r2i_traffic=keys.i2r_traffic)

    monkeypatch.setattr(HybridKeySchedule, "session_keys", same_key_both_ways)
    _no_sequence_numbers(monkeypatch)
    await sites.start()
    await sites.wait_tunnel()
    result, _ = await attack_live(sites, Reflect(match=big_a2b))
    # A takes its own record for the sink's and hands its own bytes to the application.
    assert result.outcome(PAYLOAD) == "wrong"
    assert result.reply.startswith(PART1)


# ------------------------------------------------------ splicing another session's records


async def _record_first_session(sites: Sites) -> WireRecord:
    old = await sites.wait_tunnel()
    app, _ = await sites.open_app()
    await app.send(PART1, eof=True)
    assert (await app.result()).outcome(PART1) == "ok"
    assert sites.relay is not None and sites.relay.live is not None
    first = next(r for r in sites.relay.live.records[A2B] if big_a2b(r))
    sites.relay.live.abort()
    await sites.wait_tunnel(not_=old)
    return first


async def test_records_spliced_from_another_session_are_fatal(sites: Sites) -> None:
    await sites.start()
    rec = await _record_first_session(sites)

    def splice() -> Substitute:
        return Substitute(rec.raw, match=lambda r: big_a2b(r) and r.seq == rec.seq)

    await check_rejected(sites, splice, detector="site-b", codes={ErrorCode.BAD_RECORD_MAC},
                         payload=(b"another session's data " * 900, PART2))


async def test_positive_control_splicing_with_the_same_keys_in_every_session(
        sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    session_keys = HybridKeySchedule.session_keys

    def same_keys_every_session(self: Any, th: bytes) -> Any:
        keys = session_keys(self, th)
        return dataclasses.replace(keys, i2r_traffic=b"\x01" * 48, r2i_traffic=b"\x02" * 48)

    monkeypatch.setattr(HybridKeySchedule, "session_keys", same_keys_every_session)
    await sites.start()
    rec = await _record_first_session(sites)
    second = b"another session's data " * 900
    result, sink_conn = await attack_live(
        sites, Substitute(rec.raw, match=lambda r: big_a2b(r) and r.seq == rec.seq),
        first=second[: len(PART1)], rest=second[len(PART1):])
    # The service got the first session's bytes in place of this session's.
    assert bytes(sink_conn.data).startswith(PART1)
    assert result.outcome(second) == "wrong"


# ------------------------------------------------------------------------- truncation


async def test_truncation_mid_record_and_fin_without_close(sites: Sites) -> None:
    await sites.start()
    mid = await check_rejected(sites, lambda: Truncate(keep=HEADER_LEN + 100, match=big_a2b),
                               detector="site-b", codes={ErrorCode.TRUNCATED})
    fin = await check_rejected(sites, lambda: Truncate(match=big_a2b), detector="site-b",
                               codes={ErrorCode.TRUNCATED})
    assert mid == fin == ErrorCode.TRUNCATED
    reasons = {e["reason"] for e in sites.log_events("tunnel.closed", code_name="TRUNCATED")}
    assert "transport closed in the middle of a record" in reasons
    assert "transport closed without an authenticated close" in reasons


async def test_positive_control_truncation_ended_cleanly_is_taken_as_complete(
        sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    def graceful_reset(self: Any) -> None:
        # The protection switched off: a lost tunnel ends app connections with a FIN.
        self._done = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    monkeypatch.setattr(AppStream, "reset", graceful_reset)
    await sites.start()
    await sites.wait_tunnel()
    _, sink_conn = await attack_live(sites, Truncate(match=big_a2b))
    # The service sees a clean end after a part of the message: truncation accepted.
    assert sink_conn.end == "eof" and bytes(sink_conn.data) == PART1


# ------------------------------------------------------- oversize and zero-length frames


async def test_oversize_and_zero_length_frames_are_fatal(sites: Sites) -> None:
    await sites.start()
    oversize = frame(PROTECTED, b"", length=MAX_PROTECTED_BODY + 1)
    await check_rejected(sites, lambda: Inject(oversize, keep=True, match=big_a2b),
                         detector="site-b", codes={ErrorCode.DECODE_ERROR})
    await check_rejected(sites, lambda: Inject(frame(PROTECTED, b""), keep=True,
                                               match=big_a2b),
                         detector="site-b", codes={ErrorCode.DECODE_ERROR})
    reasons = [e["reason"] for e in sites.log_events("tunnel.closed", code_name="DECODE_ERROR")]
    assert any("exceeds the limit" in r for r in reasons)
    assert any("zero-length record" in r for r in reasons)


async def test_positive_control_without_the_size_check_the_receiver_buffers(
        sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_mod, "_check_header", lambda rtype, length: None)
    await sites.start()
    old = await sites.wait_tunnel()
    app, _ = await sites.open_app()
    assert sites.relay is not None and sites.relay.live is not None
    strategy = Inject(frame(PROTECTED, b"", length=(1 << 24) - 1), match=big_a2b)
    sites.relay.live.strategy = strategy
    await app.send(PART1 + PART2 + PART2)
    tb = sites.tunnel_of("site-b")
    await sites.wait_for(lambda: tb.conn._reader.buffered > MAX_PROTECTED_BODY, 10,
                         "the responder to buffer past the record limit")
    # B holds more than any legal record and still waits for the 16 MiB "record".
    assert not tb.conn.closed
    sites.relay.live.abort()
    await sites.recover(old)


# ------------------------------------------------------------------------ AEAD limits


def _limits(**kw: int) -> Callable[[Any], None]:
    def setup(gw: Any) -> None:
        gw.settings = dataclasses.replace(gw.settings, record_limits=RecordLimits(**kw))
    return setup


def _phase_runs(records: list[WireRecord]) -> list[int]:
    runs: list[int] = []
    last = None
    for r in records:
        phase = r.flags & 1
        if phase == last:
            runs[-1] += 1
        else:
            runs.append(1)
            last = phase
    return runs


BIG = bytes(range(256)) * 4096  # 1 MiB: 17 records of at most 64 KiB


async def test_small_limits_rotate_keys_and_data_flows(sites: Sites) -> None:
    small = _limits(update_after_records=4, hard_max_records=8)
    await sites.start(setup_a=small, setup_b=small)
    await sites.wait_tunnel()
    result = await sites.exchange(BIG, timeout=30)
    assert result.outcome(BIG) == "ok"
    assert sites.relay is not None and sites.relay.live is not None
    runs = _phase_runs(sites.relay.live.protected(A2B))
    # The relay sees the key phase flip: no key carried more than its hard limit.
    assert len(runs) >= 4 and max(runs) <= 8, runs


@pytest.mark.parametrize("limit", ["records", "bytes"])
async def test_peer_past_the_key_limit_is_cut_off(sites: Sites, limit: str) -> None:
    hard = ({"hard_max_records": 8} if limit == "records"
            else {"hard_max_bytes": 200_000})
    never_updates = _limits(update_after_records=1 << 30, update_after_bytes=1 << 40)
    await sites.start(setup_a=never_updates,
                      setup_b=_limits(update_after_records=4, update_after_bytes=50_000, **hard))
    old = await sites.wait_tunnel()
    before = await closes(sites, "site-b")
    result = await sites.exchange(BIG, timeout=20)
    assert result.outcome(BIG) in ("reset", "refused")
    assert sites.sink.connections and BIG.startswith(bytes(sites.sink.connections[-1].data))
    assert len(sites.sink.connections[-1].data) < len(BIG)
    await sites.wait_for(lambda: sites.tunnel_of("site-a") is not old, 10, "the tunnel to drop")
    assert new_codes(before, await closes(sites, "site-b")) == {ErrorCode.KEY_LIMIT}
    assert sites.log_events("tunnel.closed", code_name="KEY_LIMIT",
                            reason="peer kept using a key past its limit")
    # Positive control: without B's hard limit the same sender gets everything through.
    sites.b.settings = dataclasses.replace(sites.b.settings, record_limits=RecordLimits())
    await sites.recover(old)
    assert (await sites.exchange(BIG, timeout=20)).outcome(BIG) == "ok"
