"""Two real KME processes on the BB84 link; one is SIGKILLed exactly between a round's
COMMIT and its COMMIT_ACK (test hook `QKDGW_TEST_LINK_CRASH`), restarted from what it
persisted, and the pair must go on producing the same keys without a new bootstrap.

The sans-I/O version, with the positive control (without the persisted commit the
pair cannot authenticate any more), is tests/qkd/link/test_recovery.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qkd.etsi014.client import EtsiClient
from qkd.link.bb84 import CRASH_ENV
from tests.support.kme_processes import KmeProcess, bb84_link, kme_toml, wait_until


def _client(pki: Path, kme: KmeProcess, site: str) -> EtsiClient:
    return EtsiClient(kme.url, ca_file=pki / "tls-ca.crt",
                      cert_file=pki / site / "sae-client.crt",
                      key_file=pki / site / "sae-client.key", timeout=15)


async def _matching_keys(pki: Path, alice: KmeProcess, bob: KmeProcess, n: int) -> int:
    """enc_keys at Alice's KME, dec_keys of the same IDs at Bob's: same bytes."""
    async with _client(pki, alice, "site-a") as a, _client(pki, bob, "site-b") as b:
        keys = await a.get_enc_keys("site-b-gw", number=n)
        got = await b.get_dec_keys("site-a-gw", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    return len(keys)


@pytest.mark.parametrize("crash", [
    "alice-before-ack:1",
    pytest.param("alice-commit-sent:2", marks=pytest.mark.slow),
    pytest.param("bob-before-ack:2", marks=pytest.mark.slow),
])
def test_kill_between_commit_and_ack_then_both_sides_go_on(tmp_path: Path, pki: Path,
                                                           crash: str) -> None:
    point, _, round_no = crash.partition(":")
    crashed_round = int(round_no)
    victim = "bob" if point.startswith("bob") else "alice"
    cfg_b = tmp_path / "kme-b.toml"
    cfg_b.write_text(kme_toml(pki, "b", tmp_path / "b.sqlite3",
                              link=bb84_link(pki, "bob")))
    env = {CRASH_ENV: crash}
    bob = KmeProcess(cfg_b, tmp_path, "kme-b", env=env if victim == "bob" else None)
    ports = bob.link_ports()
    cfg_a = tmp_path / "kme-a.toml"
    cfg_a.write_text(kme_toml(pki, "a", tmp_path / "a.sqlite3", link=bb84_link(
        pki, "alice", peer=ports["classical"], quantum=ports["quantum"])))
    alice = KmeProcess(cfg_a, tmp_path, "kme-a", env=env if victim == "alice" else None)
    procs = [alice, bob]
    try:
        dead = alice if victim == "alice" else bob
        assert dead.wait_exit(120) == -9  # SIGKILL, at the hook
        assert "link_test_crash" in dead.log.read_text()
        survivor = bob if victim == "alice" else alice
        survivor_side = ("b", "site-b", "site-a-gw") if victim == "alice" else \
            ("a", "site-a", "site-b-gw")
        st = survivor.link_status(pki, survivor_side[1], survivor_side[2])
        if point == "alice-before-ack":
            # Bob's commit point had passed: he sent the ACK Alice died on.
            assert int(st["committed_round"]) == crashed_round  # type: ignore[call-overload]

        # Restart the victim from its own state files, without the hook.
        cfg = cfg_a if victim == "alice" else cfg_b
        restarted = KmeProcess(cfg, tmp_path, f"kme-{victim}-2")
        if victim == "alice":
            alice = restarted
        else:
            # Bob's ports are new; Alice dials the old ones, so point her at the new.
            bob = restarted
            alice.stop()
            ports = bob.link_ports()
            cfg_a.write_text(kme_toml(pki, "a", tmp_path / "a.sqlite3", link=bb84_link(
                pki, "alice", peer=ports["classical"], quantum=ports["quantum"])))
            alice = KmeProcess(cfg_a, tmp_path, "kme-a-2")
        procs += [alice, bob]

        def past_crash() -> bool:
            la = alice.link_status(pki, "site-a", "site-b-gw")
            lb = bob.link_status(pki, "site-b", "site-a-gw")
            return (la.get("connected") and int(la["committed_round"]) > crashed_round  # type: ignore[call-overload, return-value]
                    and int(lb["committed_round"]) > crashed_round)  # type: ignore[call-overload]

        wait_until(past_crash, 120, "rounds after the crash", (alice, bob))
        la = alice.link_status(pki, "site-a", "site-b-gw")
        lb = bob.link_status(pki, "site-b", "site-a-gw")
        assert la["auth_failures"] == lb["auth_failures"] == 0
        assert la["auth_mode"] == lb["auth_mode"] == "qkd"
        # Alice hands out the oldest blocks first: the crashed round's (or earlier),
        # so matching bytes show that round was resumed alike on both sides.
        assert asyncio.run(_matching_keys(pki, alice, bob, 8)) == 8
        text = alice.log.read_text()
        if point == "alice-before-ack":
            assert "rolled back" not in text  # Bob had committed: Alice resumed
    finally:
        for p in procs:
            p.stop()
