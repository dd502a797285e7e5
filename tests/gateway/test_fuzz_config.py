"""Property-based fuzzing of the config loaders: the gateway's (gateway/config.py) and
the KME's (qkd/kme/config.py), both schemas on qkd/common/schema.py after
qkd/common/confload.py's hostile-document checks.

Documents are the shipped example configs with random edits (values of every TOML
type, boundary numbers, NaN and infinities, odd strings and paths, missing and extra
keys, tables replaced by scalars), plus raw garbage text and bytes. Whatever the input,
a loader either returns a config or raises its documented `ConfigError`, and for a
document that is valid TOML the message names the field (`[section] key:`) and a fix.
The long run is marked slow."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig
from gateway.runtime import load_credentials
from qkd.common.confload import ConfigError
from qkd.kme.config import KmeConfig

REPO = Path(__file__).resolve().parents[2]

SHORT = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
LONG = settings(max_examples=5_000, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# "<file>: [section] key: problem (fix: ...)", "[listen][0] listen: ...", or for top-level
# keys "<file>: key: ...". Keys are printed as written, so a fuzzed key may hold anything.
_FIELD = re.compile(r"\.toml: (?:\[[^\]]+\](?:\[\d+\])? )?.+?: .+\(fix: .+\)", re.DOTALL)
_NOT_TOML = re.compile(r"\.toml: not valid TOML")


# --- a small TOML writer (enough for the values generated here) ------------------------


class Raw(str):
    """A value written into the document as raw TOML text: literals the writer cannot
    produce from Python values (integers past Python's 4,300-digit str limit, 1,000
    nested brackets, unclosed arrays), the classes issue 16.2 found."""


def _key(k: str) -> str:
    return json.dumps(k)  # a quoted key is always valid TOML


def _value(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # \uXXXX escapes are TOML too (no surrogates generated)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dump(doc: dict[str, Any]) -> str:
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{_key(k)}]")
            lines += [f"{_key(kk)} = {_value(vv)}" for kk, vv in v.items()]
        elif _is_table_array(v):
            for item in v:
                lines.append(f"[[{_key(k)}]]")
                lines += [f"{_key(kk)} = {_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


# --- strategies -----------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_interesting_str = st.sampled_from([
    "", " ", "site-a", "site-b", "SITE-A", "a" * 300, "127.0.0.1:0", "127.0.0.1:99999",
    "[::1]:7500", "[::1]", "localhost:7500", "host:", ":80", "1.2.3.4:-1", "https://",
    "https://127.0.0.1:7441", "http://127.0.0.1:7441", "ML-KEM-768", "ML-KEM-512",
    "hybrid", "auto", "liboqs", "json", "debug", "bb84", "ideal", "alice", "bob",
    "../pki/ca.crt", "/", ".", "..", "/dev/null", "/nonexistent/x", "a\x00b", "~/x",
    "\u202e", "ü", "$HOME", "%s", "{}", "../pki/crl.pem", "../pki/site-a/gateway.key",
])
_int = st.one_of(st.integers(-(2**63), 2**63 - 1),
                 st.sampled_from([0, 1, -1, 7, 8, 255, 256, 1023, 1024, 65535, 65536,
                                  2**31, 2**32, 10_000_001, 1 << 35, 1 << 36]))
_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 0.05, 0.1, 1.0, 1e-300, 1e300,
                                    math.inf, -math.inf, math.nan]))
_hostile = st.one_of(
    st.builds(lambda n, closed: Raw("[" * n + ("]" * n if closed else "")),
              st.integers(30, 1200), st.booleans()),
    st.builds(lambda n, sign: Raw(sign + "9" * n), st.integers(300, 4400),
              st.sampled_from(["", "-", "+"])),
    st.builds(lambda n: Raw("9" * n + ".0"), st.integers(300, 500)),
    st.builds(lambda n: Raw('"' + "a" * n + '"'), st.integers(250, 5000)),
    st.builds(lambda n: Raw('"' + "a/" * n + '"'), st.integers(100, 3000)),
    st.sampled_from([Raw("1e400"), Raw("-1e400"), Raw("0x" + "f" * 5000),
                     Raw("{a = " * 200 + "1" + "}" * 200)]),
)
_scalar = st.one_of(st.booleans(), _int, _float, _text, _interesting_str,
                    st.datetimes(timezones=st.just(dt.UTC)), st.dates(), _hostile)
_value_st = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)), max_leaves=6)
_new_key = st.one_of(_text.filter(bool), st.sampled_from(
    ["crl", "crl_grace_s", "listen", "connect", "id", "sae_ids", "type", "role", "bogus"]))


def _slots(doc: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every (table, key) that can be edited, top level included."""
    out = [(doc, k) for k in doc]
    for v in doc.values():
        tables = [v] if isinstance(v, dict) else v if _is_table_array(v) else []
        for table in tables:
            out += [(table, k) for k in table]
    return out


def _tables(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = [doc]
    for v in doc.values():
        out += [v] if isinstance(v, dict) else v if _is_table_array(v) else []
    return out


def mutate(doc: dict[str, Any], data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(["set", "set", "set", "delete", "add", "table"]))
    if op in ("set", "delete"):
        slots = _slots(doc)
        if not slots:
            return
        table, key = data.draw(st.sampled_from(slots))
        if op == "delete":
            del table[key]
        else:
            table[key] = data.draw(_value_st)
    elif op == "add":
        table = data.draw(st.sampled_from(_tables(doc)))
        table[data.draw(_new_key)] = data.draw(_value_st)
    else:
        name = data.draw(st.sampled_from([*doc, "extra", "listen", "service", "sae"]))
        doc[name] = data.draw(st.one_of(
            st.dictionaries(_new_key, _value_st, max_size=3),
            st.lists(st.dictionaries(_new_key, _value_st, max_size=3), min_size=1,
                     max_size=2),
            _value_st))


# --- the loaders under test ------------------------------------------------------------------


def _load_gateway(path: Path) -> None:
    config = GatewayConfig.load(path)
    load_credentials(config)  # also reads and checks the files the config points at


def _load_kme(path: Path) -> None:
    KmeConfig.load(path)


def check(loader: Callable[[Path], None], path: Path, text: str | bytes) -> None:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    try:
        loader(path)
    except ConfigError as exc:
        message = str(exc)
        assert str(path) in message, message
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        try:
            tomllib.loads(raw.decode("utf-8"))
            valid_toml = True
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            valid_toml = False
        except (RecursionError, ValueError):
            # Syntactically TOML, but beyond what tomllib converts (nesting, int
            # digits): the loader still names the field.
            valid_toml = True
        if valid_toml:
            assert _FIELD.search(message), message
        else:
            # A document cut short inside 1,000 brackets is refused for its nesting
            # (checked before parsing), by field.
            assert _NOT_TOML.search(message) or _FIELD.search(message), message


# --- fixtures: the example configs wired to a real PKI ------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> Path:
    """configs/ and pki/ side by side, as in the repository after `qkdgw pki init`."""
    root = tmp_path_factory.mktemp("fuzz-config")
    shutil.copytree(pki_dir, root / "pki")
    (root / "configs").mkdir()
    return root


@pytest.fixture(scope="module")
def gateway_doc(workdir: Path) -> dict[str, Any]:
    doc = tomllib.loads((REPO / "configs" / "site-a.toml").read_text())
    path = workdir / "configs" / "base-gw.toml"
    path.write_text(dump(doc))
    GatewayConfig.load(path)  # positive control: the unmutated document loads
    return doc


def _kme_doc(workdir: Path, link: str) -> dict[str, Any]:
    pki, state = workdir / "pki", workdir / "state"
    state.mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "kme": {"id": "kme-site-a", "listen": "127.0.0.1:0",
                "db": str(state / "kme.sqlite3"), "key_size": 256, "min_key_size": 64,
                "max_key_size": 1024, "max_key_count": 1000, "max_key_per_request": 16},
        "tls": {"cert": str(pki / "site-a" / "kme-server.crt"),
                "key": str(pki / "site-a" / "kme-server.key"),
                "client_ca": str(pki / "tls-ca.crt")},
        "sae": [{"id": "site-a-gw"}],
        "peer": {"kme_id": "kme-site-b", "sae_ids": ["site-b-gw"]},
        "link": {"type": "ideal", "secret_file": str(pki / "link-secret.key"),
                 "key_rate": 100.0},
        "logging": {"level": "info", "format": "json"},
    }
    if link == "bb84":
        doc["link"] = {"type": "bb84", "secret_file": str(pki / "link-secret.key"),
                       "role": "alice", "peer": "127.0.0.1:7451",
                       "quantum": "127.0.0.1:7452", "distance_km": 25.0,
                       "pulses": 40_000_000, "mu": 0.5}
    path = workdir / "configs" / f"base-kme-{link}.toml"
    path.write_text(dump(doc))
    KmeConfig.load(path)  # positive control
    return doc


@pytest.fixture(scope="module")
def kme_docs(workdir: Path) -> list[dict[str, Any]]:
    return [_kme_doc(workdir, "ideal"), _kme_doc(workdir, "bb84")]


# --- tests ---------------------------------------------------------------------------------


def test_hostile_values_reach_every_loader(workdir: Path, gateway_doc: dict[str, Any],
                                          kme_docs: list[dict[str, Any]]) -> None:
    # The issue 16.2 reproducers through the fuzzer's own writer and oracle, in every
    # field of every shipped document; before the fix each escaped as a bare exception.
    cases = [Raw("[" * 1000), Raw("[" * 1000 + "]" * 1000), Raw("9" * 4301),
             Raw("9" * 400), Raw("9" * 400 + ".0"), Raw('"' + "a" * 300 + '"')]
    for base, loader in [(gateway_doc, _load_gateway),
                         *((d, _load_kme) for d in kme_docs)]:
        for i, (table, key) in enumerate(_slots(base)):
            if isinstance(table[key], dict) or _is_table_array(table[key]):
                continue
            for j, raw in enumerate(cases):
                doc = copy.deepcopy(base)
                [(t, k)] = [slot for n, slot in enumerate(_slots(doc)) if n == i]
                t[k] = raw
                check(loader, workdir / "configs" / f"hostile-{i}-{j}.toml", dump(doc))


def test_writer_round_trips(gateway_doc: dict[str, Any], kme_docs: list[dict[str, Any]]) -> None:
    # The fuzzer's documents are what they claim to be.
    for doc in (gateway_doc, *kme_docs):
        assert tomllib.loads(dump(doc)) == doc


def test_field_pattern_matches_real_errors(workdir: Path, gateway_doc: dict[str, Any]) -> None:
    # Positive control for the oracle: a known bad field is reported in the form checked.
    doc = copy.deepcopy(gateway_doc)
    doc["tunnel"]["rekey_interval_s"] = "soon"
    path = workdir / "configs" / "control.toml"
    path.write_text(dump(doc))
    with pytest.raises(ConfigError) as info:
        GatewayConfig.load(path)
    assert _FIELD.search(str(info.value)) and "[tunnel] rekey_interval_s" in str(info.value)
    assert not _FIELD.search("x.toml: something broke")


@SHORT
@given(data=st.data())
def test_gateway_config_mutations(workdir: Path, gateway_doc: dict[str, Any],
                                  data: st.DataObject) -> None:
    doc = copy.deepcopy(gateway_doc)
    for _ in range(data.draw(st.integers(1, 4))):
        mutate(doc, data)
    check(_load_gateway, workdir / "configs" / "fuzz-gw.toml", dump(doc))


@SHORT
@given(data=st.data())
def test_kme_config_mutations(workdir: Path, kme_docs: list[dict[str, Any]],
                              data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(kme_docs)))
    for _ in range(data.draw(st.integers(1, 4))):
        mutate(doc, data)
    check(_load_kme, workdir / "configs" / "fuzz-kme.toml", dump(doc))


@SHORT
@given(text=st.one_of(st.text(max_size=400), st.binary(max_size=400)))
def test_garbage_documents(workdir: Path, text: str | bytes) -> None:
    if isinstance(text, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = text.encode("utf-8", "surrogatepass")  # what a file would hold
    check(_load_gateway, workdir / "configs" / "garbage-gw.toml", text)
    check(_load_kme, workdir / "configs" / "garbage-kme.toml", text)


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_config_mutations_long_run(workdir: Path, gateway_doc: dict[str, Any],
                                   kme_docs: list[dict[str, Any]], data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([gateway_doc, *kme_docs]))
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 8))):
        mutate(doc, data)
    loader = _load_gateway if base is gateway_doc else _load_kme
    check(loader, workdir / "configs" / "fuzz-long.toml", dump(doc))


# --- bugs the fuzzer found in qkd/common/confload.py, now fixed: kept as regressions ---------


def test_nul_in_a_kme_path_is_a_config_error(workdir: Path,
                                             kme_docs: list[dict[str, Any]]) -> None:
    doc = copy.deepcopy(kme_docs[0])
    doc["tls"]["cert"] = "kme\x00.crt"
    check(_load_kme, workdir / "configs" / "nul-kme.toml", dump(doc))


def test_nan_is_refused_by_name(workdir: Path, gateway_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(gateway_doc)
    doc["tunnel"]["rekey_interval_s"] = math.nan
    path = workdir / "configs" / "nan-gw.toml"
    path.write_text(dump(doc))
    try:
        config = GatewayConfig.load(path)
    except ConfigError as exc:
        assert "[tunnel] rekey_interval_s" in str(exc)
        return
    raise AssertionError(f"NaN accepted: rekey_interval = {config.rekey_interval}")
