"""Tampering with the real TCP classical channel between two KME processes, through a
relay process (_qkd_tamper_relay.py): flipped bits, replayed and injected frames and a
dropped frame each stop the round without key; the authentication failures show in the
ETSI status extension, the admin /metrics and the logs. Positive control: with the
relay passing traffic unchanged, the same pair makes matching keys.

One KME pair for all attacks (the relay reads its mode before each frame), rounds of
1.2e7 pulses over 10 km. The dropped-frame case waits for the (10 s) round timeout, so
it runs with `-m slow` only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from qkd.etsi014.client import EtsiClient
from tests.support.kme_processes import KmeProcess, bb84_link, kme_toml, wait_until

RELAY = Path(__file__).resolve().parents[3] / "tests" / "support" / "tamper_relay.py"
ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'
TIMEOUT = "round_timeout_s = 10\n"


def _metrics(kme: KmeProcess) -> str:
    admin = json.loads(kme.port_file.with_name(kme.port_file.name + ".admin").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{admin['admin']}/metrics",
                                timeout=10) as r:
        return str(r.read().decode())


@pytest.mark.parametrize("with_drop", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["flip-replay-inject", "and-drop"])
def test_tampering_relay_stops_rounds_and_is_counted(tmp_path: Path, pki: Path,
                                                     with_drop: bool) -> None:
    cfg_b = tmp_path / "kme-b.toml"
    cfg_b.write_text(kme_toml(pki, "b", tmp_path / "b.sqlite3",
                              link=bb84_link(pki, "bob") + TIMEOUT, extra=ADMIN))
    bob = KmeProcess(cfg_b, tmp_path, "kme-b")
    procs = [bob]
    mode = tmp_path / "relay.mode"
    mode.write_text("flip-pp")
    relay_port = tmp_path / "relay.port"
    relay_log = tmp_path / "relay.log"
    with open(relay_log, "wb") as out:
        relay = subprocess.Popen([sys.executable, str(RELAY),
                                  "--forward", f"127.0.0.1:{bob.link_ports()['classical']}",
                                  "--port-file", str(relay_port), "--mode-file", str(mode)],
                                 stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    try:
        wait_until(relay_port.exists, 20, "the relay", procs)
        cfg_a = tmp_path / "kme-a.toml"
        cfg_a.write_text(kme_toml(pki, "a", tmp_path / "a.sqlite3", extra=ADMIN, link=bb84_link(
            pki, "alice", peer=int(relay_port.read_text()),
            quantum=bob.link_ports()["quantum"]) + TIMEOUT))
        alice = KmeProcess(cfg_a, tmp_path, "kme-a")
        procs.append(alice)

        def links() -> tuple[dict[str, object], dict[str, object]]:
            return (alice.link_status(pki, "site-a", "site-b-gw"),
                    bob.link_status(pki, "site-b", "site-a-gw"))

        def no_key_anywhere() -> None:
            la, lb = links()
            assert la["rounds_committed"] == lb["rounds_committed"] == 0, (la, lb)
            for kme, site, peer in ((alice, "site-a", "site-b-gw"),
                                    (bob, "site-b", "site-a-gw")):
                assert kme.status(pki, site, peer)["stored_key_count"] == 0

        seen_failures = 0
        for attack in ("flip-pp", "replay", "inject"):
            mode.write_text(attack)
            before = seen_failures
            aborted_before = int(links()[0]["rounds_aborted"])  # type: ignore[call-overload]

            def counted(before: int = before, attack: str = attack,
                        aborted_before: int = aborted_before) -> bool:
                la, lb = links()
                if int(la["auth_failures"]) + int(lb["auth_failures"]) > before:  # type: ignore[call-overload]
                    return True
                # A flipped Cascade reply can be refused by Cascade's own consistency
                # checks, or by the decoder when the flip lands in a bit array's padding,
                # before the transcript tag is ever compared: the round still aborts,
                # counted, with no key.
                reasons = str(la.get("last_abort_reason", "")) + str(
                    lb.get("last_abort_reason", ""))
                return (attack == "flip-pp"
                        and int(la["rounds_aborted"]) > aborted_before  # type: ignore[call-overload]
                        and any(r in reasons for r in ("Cascade", "parities", "padding bits")))

            wait_until(counted, 60, f"an authentication failure under {attack}", procs)
            no_key_anywhere()
            la, lb = links()
            seen_failures = int(la["auth_failures"]) + int(lb["auth_failures"])  # type: ignore[call-overload]

        if with_drop:
            # A dropped frame is not an authentication failure (loss looks the same);
            # the round times out and yields nothing.
            mode.write_text("drop")
            aborted = int(links()[0]["rounds_aborted"])  # type: ignore[call-overload]

            def timed_out() -> bool:
                # A round started under "inject" may time out first: only a timeout
                # after the relay has really dropped a frame counts.
                if '"action": "drop"' not in relay_log.read_text():
                    return False
                la = links()[0]
                return (int(la["rounds_aborted"]) > aborted  # type: ignore[call-overload]
                        and "timed out" in str(la["last_abort_reason"]))

            wait_until(timed_out, 60, "a round timing out behind a dropped TRANSCRIPT", procs)
            no_key_anywhere()

        # Visible outside the ETSI API too: admin metrics and the logs.
        failures = [line for line in _metrics(bob).splitlines()
                    if line.startswith("qkdgw_kme_link_auth_failures_total")]
        assert failures and float(failures[0].split()[-1]) >= 1
        assert 'qkdgw_kme_link_rounds_total{outcome="committed"} 0.0' in _metrics(alice)
        logs = alice.log.read_text() + bob.log.read_text()
        assert "failed authentication" in logs and "link_round_aborted" in logs
        relay_text = relay_log.read_text()
        for attack in ("flip-pp", "replay", "inject") + (("drop",) if with_drop else ()):
            assert f'"action": "{attack}"' in relay_text

        # Positive control: the same relay, passing frames unchanged, lets keys flow.
        mode.write_text("pass")
        failures_before = links()
        wait_until(lambda: all(int(x["rounds_committed"]) >= 1 for x in links()),  # type: ignore[call-overload]
              90, "a committed round through the passive relay", procs)

        async def matching() -> None:
            def client(kme: KmeProcess, site: str) -> EtsiClient:
                return EtsiClient(kme.url, ca_file=pki / "tls-ca.crt",
                                  cert_file=pki / site / "sae-client.crt",
                                  key_file=pki / site / "sae-client.key", timeout=15)
            async with client(alice, "site-a") as a, client(bob, "site-b") as b:
                keys = await a.get_enc_keys("site-b-gw", number=4)
                got = await b.get_dec_keys("site-a-gw", [k.key_id for k in keys])
            assert [k.key for k in got] == [k.key for k in keys]

        asyncio.run(matching())
        la, lb = links()
        assert la["auth_failures"] == failures_before[0]["auth_failures"]
        assert lb["auth_failures"] == failures_before[1]["auth_failures"]
    finally:
        relay.terminate()
        relay.wait(10)
        for p in procs:
            p.stop()
