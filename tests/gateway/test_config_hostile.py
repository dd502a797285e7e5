"""Hostile config files through the real CLI (issue 16.2): each ends in one line naming
the file, the section and field and a fix, with exit code 2, never a traceback.

Reproducers from the fuzzing run: 1,000 nested `[` (tomllib recursed into
RecursionError), an integer of 4,301 digits (ValueError from Python's int-digits
limit), a float field set to 400 nines (OverflowError converting the integer, or inf
written as a float), a path field of 300 characters (OSError "file name too long" from
is_file()). The control for each: the unedited file passes the config stage (the same
command with `--check-config` where it exists, or the loader)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from qkd.kme.config import KmeConfig

REPO = Path(__file__).resolve().parents[2]
NINES = "9" * 400
DEEP = "[" * 1000
LONG_INT = "9" * 4301
LONG_PATH = "a" * 300


@pytest.fixture()
def configs(tmp_path: Path, pki_dir: Path) -> Path:
    shutil.copytree(pki_dir, tmp_path / "pki")
    (tmp_path / "configs").mkdir()
    for name in ("site-a.toml", "kme-a.toml"):
        (tmp_path / "configs" / name).write_text((REPO / "configs" / name).read_text())
    return tmp_path / "configs"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _cli(command: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", command, "--config",
                           str(config)], capture_output=True, text=True, timeout=60,
                          cwd=config.parent)


GATEWAY_CASES = [
    ("deep-nesting", "handshake_timeout_s = 15", f"handshake_timeout_s = 15\na = {DEEP}",
     "[tunnel] a"),
    ("deep-nesting-closed", "handshake_timeout_s = 15",
     f"handshake_timeout_s = {DEEP}{']' * 1000}", "[tunnel] handshake_timeout_s"),
    ("4301-digits", "key_update_records = 1048576", f"key_update_records = {LONG_INT}",
     "[tunnel] key_update_records"),
    ("400-nines-int", "handshake_timeout_s = 15", f"handshake_timeout_s = {NINES}",
     "[tunnel] handshake_timeout_s"),
    ("400-nines-float", "handshake_timeout_s = 15", f"handshake_timeout_s = {NINES}.0",
     "[tunnel] handshake_timeout_s"),
    ("300-char-path", 'ca = "../pki/ca.crt"', f'ca = "{LONG_PATH}"', "[pki] ca"),
]
KME_CASES = [
    ("deep-nesting", "distance_km = 25.0", f"distance_km = 25.0\na = {DEEP}", "[link] a"),
    ("4301-digits", "pulses = 40000000", f"pulses = {LONG_INT}", "[link] pulses"),
    ("400-nines-int", "distance_km = 25.0", f"distance_km = {NINES}", "[link] distance_km"),
    ("400-nines-float", "distance_km = 25.0", f"distance_km = {NINES}.0",
     "[link] distance_km"),
    ("300-char-path", 'client_ca = "../pki/tls-ca.crt"', f'client_ca = "{LONG_PATH}"',
     "[tls] client_ca"),
]


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], config: Path,
                           field: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and err.count("\n") == 1, err[-2000:]
    assert str(config) in err and f": {field}: " in err and "(fix: " in err, err
    assert len(err) < 400, err  # the offending value is not echoed in full


@pytest.mark.parametrize(("name", "old", "new", "field"), GATEWAY_CASES,
                         ids=[c[0] for c in GATEWAY_CASES])
def test_gateway_cli_hostile_config(configs: Path, name: str, old: str, new: str,
                                    field: str) -> None:
    config = configs / "site-a.toml"
    GatewayConfig.load(config)  # control: the unedited file loads
    _edit(config, old, new)
    _assert_one_line_error(_cli("gateway", config), config, field)


@pytest.mark.parametrize(("name", "old", "new", "field"), KME_CASES,
                         ids=[c[0] for c in KME_CASES])
def test_kme_cli_hostile_config(configs: Path, name: str, old: str, new: str,
                                field: str) -> None:
    config = configs / "kme-a.toml"
    KmeConfig.load(config)  # control: the unedited file loads
    _edit(config, old, new)
    _assert_one_line_error(_cli("kme", config), config, field)
