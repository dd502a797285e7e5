from __future__ import annotations

import builtins
import json

import pytest

from gateway.cli import main


def test_simulate_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["qkd", "simulate", "--distance-km", "5", "--pulses", "2e7", "--seed", "1",
                 "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("qber", "sifted_bits", "final_key_bits", "key_rate_per_pulse", "key_rate_bps",
                "aborted", "abort_reason"):
        assert key in r
    assert set(r["theory"]) >= {"gllp_infinite_decoy", "gllp_vacuum_weak", "plob"}
    assert r["key_rate_bps"] == pytest.approx(r["key_rate_per_pulse"] * 1e9)


def test_simulate_reports_the_per_frame_check(capsys: pytest.CaptureFixture[str]) -> None:
    """A session that gets through Cascade reports the per-frame check: its tag bits are
    leakage inside leaked_ec_bits, and an honest run drops no frame."""
    code = main(["qkd", "simulate", "--distance-km", "5", "--pulses", "1e8", "--seed", "1",
                 "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cascade_round_trips"] > 0
    assert 0 < r["leaked_frame_check_bits"] < r["leaked_ec_bits"]
    assert r["frames_dropped"] == 0 and r["frames_checked_bad"] >= 0


def test_simulate_bad_option_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["qkd", "simulate", "--detector-efficiency", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--detector-efficiency" in err and "(0, 1]" in err


def test_sweep_json_and_plot(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "rate.png"
    code = main(["qkd", "sweep", "--distances", "0:100:50", "--pulses", "1e7", "--seed", "3",
                 "--json", "--plot", str(out)])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["distance_km"] for r in rows] == [0, 50, 100]
    assert out.stat().st_size > 1000


def test_sweep_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    real_import = builtins.__import__

    def fake(name, *a, **k):  # type: ignore[no-untyped-def]
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    assert main(["qkd", "sweep", "--distances", "0:10:10", "--plot", "x.png"]) == 2
    assert "pip install 'qkd-gateway[plot]'" in capsys.readouterr().err


def test_sweep_bad_distances(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["qkd", "sweep", "--distances", "10:0:5"]) == 2
    assert "--distances" in capsys.readouterr().err


def test_reconcile_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["qkd", "reconcile", "--qber", "0.02,0.04", "--frame-bits", "4096",
                 "--frames", "16", "--variant", "option8", "--seed", "1", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["qber"] for r in rows] == [0.02, 0.04]
    for r in rows:
        assert set(r) >= {"qber", "variant", "mean_efficiency", "efficiency_std",
                          "frame_error_rate", "channel_uses", "throughput_mbps"}
        assert r["frame_error_rate"] == 0.0 and 1.0 < r["mean_efficiency"] < 1.2


def test_reconcile_bad_qber(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["qkd", "reconcile", "--qber", "0.7"]) == 2
    assert "--qber" in capsys.readouterr().err
