"""The example configs in configs/ against the schemas (issue 10): every field of the
schema appears in its example (set, or as a commented `# key = value` line under its
table), every field has a description, no key in an example is unknown, and a
commented value is one the schema accepts."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from gateway.config import GatewayConfig, GatewayFile
from qkd.common.schema import tables_of
from qkd.kme.config import KmeConfig, KmeFile

REPO = Path(__file__).resolve().parents[2]
NETWORK_EXAMPLES = sorted(str(p.relative_to(REPO / "configs"))
                          for p in (REPO / "configs" / "network").glob("**/*.toml"))
EXAMPLES = [("site-a.toml", GatewayFile), ("site-b.toml", GatewayFile),
            ("kme-a.toml", KmeFile), ("kme-b.toml", KmeFile),
            *((name, KmeFile) for name in NETWORK_EXAMPLES)]
# A KME file has one of two forms: one link ([peer] + [link], configs/kme-*.toml) or
# several ([[neighbour]] + [neighbour.link], configs/network/); each example documents
# the tables of its own form, and [network] goes with the second.
_ONE_LINK = ("peer", "link")
_SEVERAL = ("neighbour", "network")
_HEADER = re.compile(r"^(?:#\s*)?\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?\s*$")
_KEY = re.compile(r"^(#\s*)?([A-Za-z0-9_]+)\s*=\s*(\S.*)$")


def example_keys(text: str) -> dict[str, dict[str, tuple[bool, str]]]:
    """{table: {key: (commented, value text)}} for the set and the commented keys; a
    commented header (`# [[service]]`) opens its table like a real one."""
    out: dict[str, dict[str, tuple[bool, str]]] = {"": {}}
    table = ""
    for line in text.splitlines():
        header = _HEADER.match(line.strip())
        if header:
            table = header.group(1)
            out.setdefault(table, {})
            continue
        m = _KEY.match(line.strip())
        if m:
            commented = m.group(1) is not None
            out[table].setdefault(m.group(2), (commented, m.group(3)))
    return out


def _other_form(text: str, model: type[BaseModel]) -> tuple[str, ...]:
    """The KME tables an example of the other form need not show."""
    if model is not KmeFile:
        return ()
    return _ONE_LINK if re.search(r"^\[\[neighbour\]\]", text, re.M) else _SEVERAL


def problems(text: str, model: type[BaseModel]) -> list[str]:
    schema = tables_of(model)
    found = example_keys(text)
    skip = _other_form(text, model)
    out = []
    for table, (holder, _is_list, keys) in schema.items():
        if holder is not None and not (holder.description or "").strip():
            out.append(f"[{table}] has no description")
        shown = table.split(".")[0] not in skip
        if shown and table and table not in found:
            out.append(f"[{table}] is missing from the example")
        for key, info in keys.items():
            if not (info.description or "").strip():
                out.append(f"[{table}] {key} has no description")
            if shown and key not in found.get(table, {}):
                out.append(f"[{table}] {key} is missing from the example")
    for table, keys in found.items():
        if table not in schema:
            out.append(f"[{table}] is not in the schema")
            continue
        for key, (commented, value) in keys.items():
            known = schema[table][2]
            if key not in known:
                out.append(f"[{table}] {key} is not in the schema (stale)")
            elif commented:
                trouble = _value_trouble(key, value, known[key])
                if trouble:
                    out.append(f"[{table}] {key}: commented value {value} {trouble}")
    return out


def _value_trouble(key: str, value: str, info: FieldInfo) -> str:
    """Why a commented `key = value` could not be uncommented as it is, or ""."""
    try:
        parsed = tomllib.loads(f"{key} = {value}")[key]
    except tomllib.TOMLDecodeError:
        return "is not TOML"
    if "Path" in str(info.annotation):
        return ""  # files are relative to a PKI this check does not have
    try:
        annotation = (Annotated[info.annotation, *info.metadata] if info.metadata
                      else info.annotation)
        TypeAdapter(annotation).validate_python(parsed)
    except ValidationError as exc:
        return f"is refused by the schema ({exc.errors()[0]['type']})"
    return ""


@pytest.mark.parametrize(("name", "model"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_covers_the_schema(name: str, model: type[BaseModel]) -> None:
    text = (REPO / "configs" / name).read_text()
    assert problems(text, model) == []


def test_checker_finds_missing_and_stale_fields() -> None:
    # Positive control: the checker is not blind.
    text = (REPO / "configs" / "site-b.toml").read_text()
    assert "max_streams = 1024\n" in text
    missing = text.replace("max_streams = 1024\n", "")
    assert problems(missing, GatewayFile) == ["[tunnel] max_streams is missing from the example"]
    stale = text.replace("[peer]\n", "[peer]\n# old_field = 3\n", 1)
    assert problems(stale, GatewayFile) == ["[peer] old_field is not in the schema (stale)"]
    bad = text.replace('[peer]\n', '[peer]\n# sae_id = "unclosed\n', 1)
    assert "commented value" in " ".join(problems(bad, GatewayFile))
    assert "[nowhere] is not in the schema" in problems(text + "\n[nowhere]\n", GatewayFile)
    wrong = text.replace("# connect = ", "# connect = 7 #", 1)
    assert problems(wrong, GatewayFile) == [
        "[tunnel] connect: commented value 7 #\"127.0.0.1:7500\" is refused by the schema "
        "(value_error)"]



def test_checker_sees_each_kme_form() -> None:
    # A network example need not show [peer]/[link], but must show its own tables ...
    text = (REPO / "configs" / "network" / "line-3" / "kme-b.toml").read_text()
    assert problems(text, KmeFile) == []
    no_pool = text.replace("# pool_bits = 1099511627776\n", "")
    assert problems(no_pool, KmeFile) == [
        "[network.link] pool_bits is missing from the example"]
    assert "[network.pair] is missing from the example" in problems(
        text.replace("# [[network.pair]]\n", ""), KmeFile)
    # ... and a one-link example must show [peer] and [link].
    one = (REPO / "configs" / "kme-a.toml").read_text()
    assert "[peer] is missing from the example" in problems(
        one.replace("[peer]\n", ""), KmeFile)


def uncomment(text: str, keys: set[str], tables: set[str] = frozenset()) -> str:
    """`text` with the commented lines of `keys` set, and `tables` (commented header and
    every commented key under it) uncommented."""
    out, table = [], ""
    for line in text.splitlines():
        header = _HEADER.match(line.strip())
        if header:
            table = header.group(1)
            if table in tables:
                line = line.replace("# ", "", 1)
        m = _KEY.match(line.strip())
        if m and m.group(1) and (m.group(2) in keys or table in tables):
            line = line.replace("# ", "", 1)
        out.append(line)
    return "\n".join(out) + "\n"


# Commented lines that show a default (the others show an alternative: the other role,
# the other link type, an optional file, an example).
DEFAULT_LINES = {
    "site-a.toml": ({"crl_grace_s", "tls_min_version", "api"}, {"tunnel.admission"}),
    "site-b.toml": ({"crl_grace_s", "tls_min_version", "api"}, set()),
    "kme-a.toml": ({"frame_bits", "round_timeout_s", "state_file"}, set()),
    "kme-b.toml": ({"frame_bits", "round_timeout_s", "state_file"}, set()),
    **{name: ({"key_lifetime_s", "min_key_size", "max_key_size", "format", "db", "state",
               "pool_bits"}, set()) for name in NETWORK_EXAMPLES},
}


@pytest.mark.parametrize("name", sorted(DEFAULT_LINES))
def test_commented_defaults_are_the_schema_defaults(tmp_path: Path, pki_dir: Path,
                                                    name: str) -> None:
    """Uncommenting the lines that document a default loads to the same config: the
    comments cannot drift from the schema."""
    shutil.copytree(pki_dir, tmp_path / "pki")
    is_kme = Path(name).name.startswith("kme")
    load = KmeConfig.load if is_kme else GatewayConfig.load
    text = (REPO / "configs" / name).read_text()
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True)
    path.write_text(text)
    before = load(path)
    keys, tables = DEFAULT_LINES[name]
    changed = uncomment(text, keys, tables)
    for key in keys:
        assert re.search(rf"^{key} = ", changed, re.M), key
    path.write_text(changed)
    after = load(path)
    assert after == before
    if name.startswith("kme"):
        assert after.file is not None and after.file.link is not None
        assert {"frame_bits", "round_timeout_s"} <= after.file.link.model_fields_set
    elif is_kme:
        assert after.file is not None and after.file.network is not None
        assert {"key_lifetime_s", "max_key_size"} <= after.file.kme.model_fields_set
        assert "db" in after.file.neighbour[0].model_fields_set
        assert "pool_bits" in after.file.network.link[0].model_fields_set
    # Control: a commented value that is not the default is caught.
    path.write_text(_off_default(changed, name))
    assert load(path) != before


def _off_default(text: str, name: str) -> str:
    if name.startswith("network/"):
        return re.sub(r"^key_lifetime_s = .*$", "key_lifetime_s = 61", text, flags=re.M)
    if name.startswith("kme"):
        return re.sub(r"^round_timeout_s = .*$", "round_timeout_s = 61", text, flags=re.M)
    return re.sub(r'^tls_min_version = .*$', 'tls_min_version = "1.2"', text, flags=re.M)


def test_config_reference_is_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import config_doc

    assert config_doc.main(["--check"]) == 0, "run python -m gateway.config_doc"
    text = config_doc.DOC.read_text()
    for _name, model in EXAMPLES:
        for table, (_holder, _is_list, keys) in tables_of(model).items():
            for key in keys:
                assert f"| `{key}` |" in text, (table, key)
    # Control: a stale file is reported.
    stale = tmp_path / "config.md"
    stale.write_text(text.replace("| `max_streams` |", "| `max_stream` |"))
    monkeypatch.setattr(config_doc, "DOC", stale)
    assert config_doc.main(["--check"]) == 1


def test_json_schema_export(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from gateway import config_doc

    assert config_doc.main(["--json-schema", "gateway"]) == 0
    schema = json.loads(capsys.readouterr().out)
    tunnel = schema["$defs"]["TunnelSection"]["properties"]
    assert tunnel["max_streams"]["maximum"] == 65536 and tunnel["max_streams"]["default"] == 1024
    assert schema["additionalProperties"] is False
    assert config_doc.main(["--json-schema", "kme"]) == 0
    assert "LinkSection" in json.loads(capsys.readouterr().out)["$defs"]
