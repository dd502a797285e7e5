"""The recorded-traffic check, as in `qkdgw rndl`: separate processes, a real recording."""

from __future__ import annotations

import pytest

from gateway.tools.rndl import SCENARIOS, run_rndl


@pytest.fixture(scope="module")
def rndl_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_rndl(tmp_path_factory.mktemp("rndl"))


def test_recording_covers_a_rekey(rndl_result: dict) -> None:
    assert rndl_result["sessions_in_recording"] >= 2
    assert rndl_result["recorded_bytes"]["a2b"] > rndl_result["plaintext_bytes"]


def test_positive_control_recovers_exact_plaintext(rndl_result: dict) -> None:
    # Handing over both per-session secrets must open everything: otherwise the failures
    # below could just mean the decryptor is broken.
    row = next(s for s in rndl_result["scenarios"] if s["name"] == "mlkem_secrets_and_qkd_keys")
    assert row["plaintext_recovered"] is True
    assert row["sessions_opened"] == rndl_result["sessions_in_recording"]


@pytest.mark.parametrize("name", [n for n, _, expected in SCENARIOS if not expected])
def test_partial_secrets_recover_nothing(rndl_result: dict, name: str) -> None:
    row = next(s for s in rndl_result["scenarios"] if s["name"] == name)
    assert row["plaintext_recovered"] is False
    if name != "mlkem_and_qkd_of_first_session_only":
        assert row["sessions_opened"] == 0 and row["bytes_decrypted"] == 0


def test_first_session_secrets_open_only_the_first_session(rndl_result: dict) -> None:
    row = next(s for s in rndl_result["scenarios"]
               if s["name"] == "mlkem_and_qkd_of_first_session_only")
    assert row["sessions_opened"] == 1
    assert 0 < row["bytes_decrypted"] < rndl_result["plaintext_bytes"]


def test_overall_verdict(rndl_result: dict) -> None:
    assert rndl_result["ok"] is True
    assert all(s["ok"] for s in rndl_result["scenarios"])


