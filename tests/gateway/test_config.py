"""Gateway config errors name the field and the fix; the example configs load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import GatewayConfig
from gateway.runtime import load_credentials
from qkd.common.confload import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def site(tmp_path: Path, pki_dir: Path) -> Path:
    """A copy of configs/site-a.toml wired to the session PKI."""
    shutil.copytree(pki_dir, tmp_path / "pki")
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "site-a.toml"
    cfg.write_text((REPO / "configs" / "site-a.toml").read_text())
    return cfg


def edit(cfg: Path, old: str, new: str) -> None:
    text = cfg.read_text()
    assert old in text, old
    cfg.write_text(text.replace(old, new, 1))


def test_example_configs_load(site: Path) -> None:
    cfg = GatewayConfig.load(site)
    assert cfg.site_id == "site-a" and cfg.initiator and cfg.listeners[0].service == "sink"
    creds = load_credentials(cfg)
    assert creds.chain[0] is not None
    shutil.copy(REPO / "configs" / "site-b.toml", site.parent / "site-b.toml")
    cfg_b = GatewayConfig.load(site.parent / "site-b.toml")
    assert not cfg_b.initiator and cfg_b.services[0].name == "sink"


@pytest.mark.parametrize(("old", "new", "field"), [
    ('site_id = "site-a"', 'site_id = 7', "[gateway] site_id"),
    ('site_id = "site-a"', 'site_id = "Site A!"', "[gateway] site_id"),
    ('connect = "127.0.0.1:7500"', 'connect = "127.0.0.1"', "[tunnel] connect"),
    ('connect = "127.0.0.1:7500"', 'connect = "127.0.0.1:99999"', "[tunnel] connect"),
    ('connect = "127.0.0.1:7500"', '', "[tunnel] listen"),
    ('connect = "127.0.0.1:7500"', 'connect = "127.0.0.1:7500"\nlisten = "127.0.0.1:1"',
     "[tunnel] connect"),
    ('rekey_interval_s = 600', 'rekey_interval_s = 0', "[tunnel] rekey_interval_s"),
    ('rekey_interval_s = 600', 'rekey_intervall_s = 600', "[tunnel] rekey_intervall_s"),
    ('url = "https://127.0.0.1:7441"', 'url = "http://127.0.0.1:7441"', "[kme] url"),
    ('kem = "ML-KEM-768"', 'kem = "ML-KEM-512"', "[policy] kem"),
    ('allow_degraded = false', 'allow_degraded = "no"', "[policy] allow_degraded"),
    ('qkd_key_bits = 256', 'qkd_key_bits = 250', "[policy] qkd_key_bits"),
    ('cert = "../pki/site-a/gateway.crt"', 'cert = "../pki/site-a/nope.crt"', "[pki] cert"),
    ('site_id = "site-b"', 'site_id = "site-a"', "[peer] site_id"),
    ('[gateway]', '[gateway]\nbogus = 1', "[gateway] bogus"),
])
def test_bad_field_is_named(site: Path, old: str, new: str, field: str) -> None:
    edit(site, old, new)
    with pytest.raises(ConfigError) as exc:
        GatewayConfig.load(site)
    message = str(exc.value)
    assert field in message and "fix:" in message
    assert str(site) in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\nsite_id = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        GatewayConfig.load(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        GatewayConfig.load(tmp_path / "missing.toml")


def test_certificate_of_another_site_is_refused(site: Path) -> None:
    edit(site, 'cert = "../pki/site-a/gateway.crt"', 'cert = "../pki/site-b/gateway.crt"')
    edit(site, 'key = "../pki/site-a/gateway.key"', 'key = "../pki/site-b/gateway.key"')
    with pytest.raises(ConfigError, match="is for site 'site-b'"):
        load_credentials(GatewayConfig.load(site))


def test_unreadable_or_exposed_key_file(site: Path) -> None:
    key = site.parent.parent / "pki" / "site-a" / "gateway.key"
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_credentials(GatewayConfig.load(site))
    os.chmod(key, 0o600)
    key.write_text("not a key")
    with pytest.raises(ConfigError):
        load_credentials(GatewayConfig.load(site))


def test_cli_prints_one_line_and_exits_2(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(site, 'kem = "ML-KEM-768"', 'kem = "X"')
    assert main(["gateway", "--config", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[policy] kem" in err and "Traceback" not in err


def test_cli_process_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "gateway", "--config",
                           str(tmp_path / "nope.toml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "cannot read config file" in proc.stderr and "Traceback" not in proc.stderr


def test_relative_state_dir_resolves_once_from_a_relative_config_path(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/site-a.toml says state_dir = "../state/site-a": run from the directory
    above configs/, that is ./state/site-a, not ./configs/state/site-a."""
    monkeypatch.chdir(site.parent.parent)
    cfg = GatewayConfig.load(Path("configs") / site.name)
    assert cfg.state_dir.resolve() == (site.parent.parent / "state" / "site-a").resolve()
    edit(site, 'state_dir = "../state/site-a"\n', "")
    cfg = GatewayConfig.load(Path("configs") / site.name)
    assert cfg.state_dir.resolve() == (site.parent / "state" / "site-a").resolve()
