"""qkd/common/schema.py: pydantic validation errors become one ConfigError line naming
the file, the table, the key and the fix, for every kind of mistake a TOML file can
hold; each case has a control that the same document with a good value loads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import pytest
from pydantic import model_validator

from qkd.common.confload import HostPort
from qkd.common.errors import ConfigError
from qkd.common.schema import (
    Bool,
    ConfPath,
    ExistingFile,
    Float,
    FloatOrInf,
    HostPortT,
    Int,
    IpHostPort,
    Problem,
    Schema,
    Str,
    default_of,
    load_model,
    section,
    setting,
    tables,
    tables_of,
    validate,
)


class Inner(Schema):
    mode: Literal["a", "b"] = setting("a", doc="A mode.")
    count: Int = setting(3, ge=1, le=10, doc="A count.", fix="set it to 1..10 things")
    ratio: Float = setting(0.5, ge=0.0, le=1.0, doc="A ratio.")
    rate: FloatOrInf = setting(1.0, ge=0.0, doc="A rate; inf: unlimited.")
    on: Bool = setting(False, doc="A switch.")
    names: tuple[Str, ...] = setting((), doc="Names.")
    addr: IpHostPort | None = setting(None, doc="An address.")
    target: HostPortT | None = setting(None, doc="A target.")
    file: ConfPath | None = setting(None, doc="A path.", fix="point it at a file")

    @model_validator(mode="after")
    def _check(self) -> Inner:
        if self.on and self.count > 5:
            raise Problem("is above 5 while on is set", "lower it or turn on off", at="count")
        return self


class Entry(Schema):
    name: Str = setting(doc="A name.", fix='set it to a name such as "x"')


class Root(Schema):
    top: Inner = section(Inner, doc="A required table.", required=True)
    extra: Inner = section(Inner, doc="An optional table.")
    entry: tuple[Entry, ...] = tables(doc="Entries.")
    present: ExistingFile | None = setting(None, doc="A file that must exist.",
                                          fix="point it at the CA file")

    @model_validator(mode="after")
    def _across(self) -> Root:
        if self.extra.mode == "b" and self.top.mode == "b":
            raise Problem("both tables chose b", "choose a in one", at=("extra", "mode"))
        return self


SRC = Path("conf/x.toml")


def error(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(Root, data, SRC)
    message = str(info.value)
    assert message.startswith(f"{SRC}: ") and "(fix: " in message and "\n" not in message
    assert len(message) < 400, message
    return message


@pytest.mark.parametrize(("top", "expected"), [
    ({"count": "3"}, "[top] count: expected a whole number, got '3' (fix: set it to 1..10"),
    ({"count": True}, "[top] count: expected a whole number, got True"),
    ({"count": 3.0}, "[top] count: expected a whole number, got 3.0"),
    ({"count": 0}, "[top] count: 0 is below the minimum 1 (fix: use a value >= 1)"),
    ({"count": 11}, "[top] count: 11 is above the maximum 10 (fix: use a value <= 10)"),
    ({"count": 10 ** 5000}, "[top] count: an integer of about 5001 digits is above"),
    ({"ratio": math.nan}, "[top] ratio: nan is not a number"),
    ({"ratio": math.inf}, "[top] ratio: inf is not a finite number"),
    ({"ratio": 10 ** 400}, "[top] ratio: an integer of about 401 digits is too large"),
    ({"ratio": "x"}, "[top] ratio: expected a number, got 'x'"),
    ({"rate": math.nan}, "[top] rate: nan is not a number"),
    ({"rate": -1}, "[top] rate: -1 is below the minimum 0.0"),
    ({"mode": "c"}, "[top] mode: unknown value 'c' (fix: use one of a, b)"),
    ({"on": 1}, "[top] on: expected true or false, got 1"),
    ({"names": "a"}, "[top] names: expected a list of strings"),
    ({"names": ["a", 1]}, "[top] names: expected a string, got int"),
    ({"addr": "example.org:1"}, "[top] addr: 'example.org' is not an IP address"),
    ({"target": "nohost"}, "[top] target: expected 'host:port', got 'nohost'"),
    ({"target": "h:70000"}, "[top] target: port must be 0..65535, got 70000"),
    ({"file": "a\x00b"}, "[top] file: contains a NUL character (fix: point it at a file)"),
    ({"file": "a" * 300}, "[top] file: a name in the path is longer than 255 bytes"),
    ({"file": "a/" * 2100}, "[top] file: the path is longer than 4095 bytes"),
    ({"colour": 1}, "[top] colour: unknown field (fix: remove it or check its spelling"),
    ({"we ird": 1}, "[top] 'we ird': unknown field"),
    ({"on": True, "count": 7}, "[top] count: is above 5 while on is set (fix: lower it"),
])
def test_errors_name_table_key_and_fix(top: dict[str, object], expected: str) -> None:
    assert expected in error({"top": top})


def test_good_values_load() -> None:
    # The control for the table above: each field with a good value.
    root = validate(Root, {"top": {
        "count": 5, "ratio": 1, "rate": math.inf, "mode": "b", "on": True, "names": ["a"],
        "addr": "[::1]:7", "target": "example.org:1", "file": "f.pem"}}, SRC)
    assert root.top.count == 5 and root.top.ratio == 1.0 and root.top.rate == math.inf
    assert root.top.addr == HostPort("::1", 7) and root.top.file == Path("conf/f.pem")
    assert root.extra == Inner() and root.entry == ()


def test_tables_and_arrays_of_tables() -> None:
    assert error({}) == f"{SRC}: top: missing section (fix: add a [top] table)"
    assert "top: expected a table (fix: write it as [top])" in error({"top": 3})
    assert "entry: expected an array of tables (fix: write each entry as [[entry]])" in (
        error({"top": {}, "entry": 3}))
    assert "entry: expected an array of tables" in error({"top": {}, "entry": [3]})
    assert "[entry][1] name: missing (fix: set it to a name such as \"x\")" in error(
        {"top": {}, "entry": [{"name": "a"}, {}]})
    assert "bogus: unknown field" in error({"top": {}, "bogus": 1})


def test_problem_across_tables_names_the_field_it_points_at() -> None:
    assert "[extra] mode: both tables chose b (fix: choose a in one)" in error(
        {"top": {"mode": "b"}, "extra": {"mode": "b"}})
    validate(Root, {"top": {"mode": "b"}, "extra": {"mode": "a"}}, SRC)  # control


def test_prefix_names_the_table_of_a_sub_document() -> None:
    with pytest.raises(ConfigError, match=r"\[net\.top\] count: 0 is below"):
        validate(Root, {"top": {"count": 0}}, SRC, prefix=("net",))


def test_files_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    cfg = tmp_path / "x.toml"
    cfg.write_text('present = "ca.crt"\n[top]\n')
    root, source = load_model(Root, cfg)
    assert root.present == tmp_path / "ca.crt" and source == cfg
    cfg.write_text('present = "nope.crt"\n[top]\n')
    with pytest.raises(ConfigError, match=r"present: file '.*/nope.crt' does not exist or is "
                       r"not a file \(fix: point it at the CA file \(run `qkdgw pki init`"):
        load_model(Root, cfg)


def test_hostile_documents_are_refused_before_the_schema(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text("[top]\ncount = " + "[" * 1000 + "\n")
    with pytest.raises(ConfigError, match=r"\[top\] count: arrays or inline tables nested"):
        load_model(Root, cfg)
    cfg.write_text("[top]\ncount = " + "9" * 4301 + "\n")
    with pytest.raises(ConfigError, match=r"\[top\] count: an integer of more than 4300"):
        load_model(Root, cfg)


def test_schema_introspection() -> None:
    tables_ = tables_of(Root)
    assert set(tables_) == {"", "top", "extra", "entry"}
    assert tables_["entry"][1] and not tables_["top"][1]
    assert "count" in tables_["top"][2] and "present" in tables_[""][2]
    assert default_of(Inner, "count") == 3 and default_of(Root, "extra") == Inner()


def _is_strict(annotation: object) -> bool:
    """True if every scalar in the annotation is a Literal, a strict type or one with
    its own (plain) validator."""
    import types
    import typing

    from pydantic import PlainValidator, Strict

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal or annotation is type(None):
        return True
    if origin is typing.Annotated:
        meta = annotation.__metadata__  # type: ignore[attr-defined]
        return any(isinstance(m, Strict | PlainValidator) for m in meta) or _is_strict(args[0])
    if origin in (typing.Union, types.UnionType, tuple, list):
        return all(_is_strict(a) for a in args if a is not Ellipsis)
    return False


def test_every_config_field_is_strict() -> None:
    """A plain `int` or `float` field would take "3" or true; every scalar of the real
    config files is a strict, literal or validated type."""
    from pydantic import PlainValidator, Strict

    from gateway.config import GatewayFile
    from qkd.kme.config import KmeFile

    class Loose(Schema):
        n: int = setting(1, doc="A loose number.")

    def loose_fields(model: type[Schema]) -> list[str]:
        out = []
        for table, (_h, _l, keys) in tables_of(model).items():
            for key, info in keys.items():
                if not (any(isinstance(m, Strict | PlainValidator) for m in info.metadata)
                        or _is_strict(info.annotation)):
                    out.append(f"{model.__name__} [{table}] {key}")
        return out

    assert loose_fields(GatewayFile) == [] and loose_fields(KmeFile) == []
    assert loose_fields(Inner) == []
    assert loose_fields(Loose) == ["Loose [] n"]  # control: the check sees a plain int
    assert validate(Loose, {"n": "3"}, SRC).n == 3  # ... which is why it matters
