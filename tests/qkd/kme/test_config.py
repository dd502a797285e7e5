"""KME config loading: the shipped examples work, and every mistake names its field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.pki import init_pki
from qkd.common.confload import ConfigError
from qkd.kme.config import KmeConfig, KmeFile

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo-like tree: configs/ with the shipped examples, pki/ from `pki init`."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "configs", root / "configs",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    init_pki(root / "pki", ["site-a", "site-b"], algorithm="ecdsa-p256")
    return root


def test_shipped_examples_load_and_pair_up(layout: Path) -> None:
    a = KmeConfig.load(layout / "configs" / "kme-a.toml")
    b = KmeConfig.load(layout / "configs" / "kme-b.toml")
    assert (a.kme_id, b.kme_id) == ("kme-site-a", "kme-site-b")
    assert a.peer.kme_id == b.kme_id and b.peer.kme_id == a.kme_id
    assert a.peer.sae_ids == b.local_sae_ids == ("site-b-gw",)
    assert b.peer.sae_ids == a.local_sae_ids == ("site-a-gw",)
    assert a.link.secret == b.link.secret and len(a.link.secret) == 32
    assert a.tls.cert == layout / "configs" / "../pki/site-a/kme-server.crt"
    assert a.db != b.db and a.listen != b.listen
    assert a.link.secret.hex() not in repr(a)
    assert a.file is not None and a.link.secret.hex() not in repr(a.file)
    assert a.file.link.secret == a.link.secret


def write(layout: Path, text: str) -> Path:
    p = layout / "configs" / "test.toml"
    p.write_text(text)
    return p


def base(layout: Path) -> str:
    return (layout / "configs" / "kme-a.toml").read_text()


@pytest.mark.parametrize(("old", "new", "field"), [
    ('id = "kme-site-a"', 'id = "kme-site-a"\ncolour = "red"', "[kme] colour"),
    ('key_size = 256', 'key_size = 250', "[kme] key_size"),
    ('key_size = 256', 'key_size = 16', "[kme] key_size"),
    ('min_key_size = 64', 'min_key_size = 9000', "[kme] min_key_size"),
    ('max_key_per_request = 128', 'max_key_per_request = 5000', "[kme] max_key_per_request"),
    ('listen = "127.0.0.1:7441"', 'listen = "nowhere"', "[kme] listen"),
    ('cert = "../pki/site-a/kme-server.crt"', 'cert = "../pki/site-a/missing.crt"',
     "[tls] cert"),
    ('key = "../pki/site-a/kme-server.key"', 'key = "../pki/site-b/kme-server.key"',
     "[tls] key"),
    ('client_ca = "../pki/tls-ca.crt"', 'client_ca = "../pki/link-secret.key"',
     "[tls] client_ca"),
    ('secret_file = "../pki/link-secret.key"', 'secret_file = "../pki/tls-ca.crt"',
     "[link] secret_file"),
    ('secret_file = "../pki/link-secret.key"', 'secret_file = "../pki/nope.key"',
     "[link] secret_file"),
    ('type = "bb84"', 'type = "laser"', "[link] type"),
    ('distance_km = 25.0', 'distance_km = -1', "[link] distance_km"),
    ('role = "alice"', 'role = "carol"', "[link] role"),
    ('pulses = 40000000', 'pulses = 10', "[link] pulses"),
    ('sae_ids = ["site-b-gw"]', 'sae_ids = ["site-a-gw"]', "[peer] sae_ids"),
    ('sae_ids = ["site-b-gw"]', 'sae_ids = []', "[peer] sae_ids"),
    ('kme_id = "kme-site-b"', 'kme_id = "kme-site-a"', "[peer] kme_id"),
    ('id = "site-a-gw"', 'id = "site a/gw"', "[sae][0] id"),
    ('[[sae]]\nid = "site-a-gw"', '', "sae"),
    ('level = "info"', 'level = "loud"', "[logging] level"),
])
def test_errors_name_the_field(layout: Path, old: str, new: str, field: str) -> None:
    text = base(layout)
    assert old in text
    with pytest.raises(ConfigError) as ei:
        KmeConfig.load(write(layout, text.replace(old, new, 1)))
    message = str(ei.value)
    assert field in message and "fix:" in message


def test_unreadable_file_names_field(layout: Path) -> None:
    # A directory where the file should be: unreadable even for root, who ignores
    # permission bits (CI runs as root).
    secret = layout / "pki" / "unreadable.key"
    secret.mkdir()
    text = base(layout).replace("../pki/link-secret.key", "../pki/unreadable.key")
    with pytest.raises(ConfigError, match=r"\[link\] secret_file: cannot read"):
        KmeConfig.load(write(layout, text))


def test_directory_as_cert_names_field(layout: Path) -> None:
    text = base(layout).replace('"../pki/site-a/kme-server.crt"', '"../pki/site-a"')
    with pytest.raises(ConfigError, match=r"\[tls\] cert: cannot read"):
        KmeConfig.load(write(layout, text))


def test_one_more_table_is_one_model_and_one_field(layout: Path) -> None:
    """How a new table joins the KME file: a Schema class and a field on the root model;
    errors in it name it like any other table, unknown keys in it are refused."""
    from qkd.common.schema import Int, Schema, load_model, section, setting

    class ExtraSection(Schema):
        hops: Int = setting(1, ge=1, le=8, doc="Hops.")

    class Extended(KmeFile):
        extra: ExtraSection = section(ExtraSection, doc="An extra table.")

    text = base(layout)
    doc, _ = load_model(Extended, write(layout, text + "\n[extra]\nhops = 3\n"))
    assert doc.extra.hops == 3 and doc.kme.id == "kme-site-a"
    assert load_model(Extended, write(layout, text))[0].extra.hops == 1  # optional
    with pytest.raises(ConfigError, match=r"\[extra\] hops: 9 is above the maximum 8"):
        load_model(Extended, write(layout, text + "\n[extra]\nhops = 9\n"))
    with pytest.raises(ConfigError, match=r"\[extra\] hop: unknown field"):
        load_model(Extended, write(layout, text + "\n[extra]\nhop = 3\n"))
    # Control: the plain KME file does not know the table.
    with pytest.raises(ConfigError, match=r"extra: unknown field"):
        KmeConfig.load(write(layout, text + "\n[extra]\nhops = 3\n"))
