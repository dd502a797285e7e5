"""Config schemas as pydantic models, with errors in the `ConfigError` format of confload.

Each config file is one root model; each TOML table one model class, each key one field
written once with its default, bounds, unit and description (`setting()`). A validation
error becomes one line naming the file, the section, the field and the fix::

    configs/site-a.toml: [kme] url: 'http://x' is not an https:// URL (fix: ...)

Checks that need the config file's directory (relative paths, files that must exist)
read it from the validation context `load_model` passes. Validators raise `Problem`
to say what is wrong and, where the field's own fix does not fit, how to fix it.
"""

from __future__ import annotations

import ipaddress
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from qkd.common.confload import (
    MAX_NAME,
    MAX_PATH,
    HostPort,
    _show,
    parse_host_port,
    read_toml,
)
from qkd.common.errors import ConfigError, QkdError

M = TypeVar("M", bound=BaseModel)

UNKNOWN_FIX = "remove it or check its spelling against the documented fields in configs/"


class Problem(QkdError, ValueError):
    """What a validator found wrong. `fix` replaces the field's own fix; `more` is added
    to it. A model validator names the field with `at`: a key of its own model, or a
    path below it (("peer", "site_id") from the file's root model)."""

    def __init__(self, problem: str, fix: str | None = None, *, more: str = "",
                 at: str | tuple[str | int, ...] | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.more = more
        self.at = at


class Schema(BaseModel):
    """A TOML table: unknown keys rejected, no NaN or infinities unless a field documents
    a meaning for them. Fields use the strict types below (Str, Int, Float, Bool: no "1"
    for 1, no true for 1); tests/qkd/common/test_schema.py checks every file's fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              validate_default=False)


def setting(default: Any = PydanticUndefined, *, doc: str, fix: str | None = None,
            unit: str | None = None, **kw: Any) -> Any:
    """One field: its description, the fix printed when it is wrong, its unit."""
    extra: dict[str, Any] = {}
    if fix is not None:
        extra["fix"] = fix
    if unit is not None:
        extra["unit"] = unit
    return Field(default, description=doc, json_schema_extra=extra or None, **kw)


def section(model: type[BaseModel], *, doc: str, required: bool = False) -> Any:
    """A sub-table; an optional one defaults to all its fields' defaults."""
    if required:
        return Field(description=doc)
    return Field(default_factory=model, description=doc)


def tables(*, doc: str) -> Any:
    """An array of tables, `[[key]]`; absent means none."""
    return Field(default=(), description=doc)


# --------------------------------------------------------------------------- types

Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
StrList = tuple[Str, ...]


def _context_dir(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir", "."))


def _path(value: Any, info: ValidationInfo) -> Path:
    """A path resolved against the config file's directory, within the OS's limits."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise Problem(f"expected a string, got {type(value).__name__}")
    if "\x00" in value:
        raise Problem("contains a NUL character")
    p = Path(value)
    if not p.is_absolute():
        p = _context_dir(info) / p
    if any(len(os.fsencode(part)) > MAX_NAME for part in p.parts):
        raise Problem(f"a name in the path is longer than {MAX_NAME} bytes",
                      more=f" (each name at most {MAX_NAME} bytes)")
    if len(os.fsencode(str(p))) > MAX_PATH:
        raise Problem(f"the path is longer than {MAX_PATH} bytes",
                      more=f" (at most {MAX_PATH} bytes)")
    return p


def _show_path(p: Path) -> str:
    """A path for an error message: its end (the file name) if it is long."""
    text = str(p)
    return repr(text if len(text) <= 80 else "..." + text[-77:])


def _not_nan(value: float) -> float:
    if value != value:
        raise Problem("nan is not a number")
    return value


def _is_file(p: Path) -> Path:
    try:
        is_file = p.is_file()
    except OSError as exc:  # is_file() only swallows "not found"-like errors
        raise Problem(f"cannot look at {_show_path(p)} ({exc.strerror})") from None
    if not is_file:
        raise Problem(f"file {_show_path(p)} does not exist or is not a file",
                      more=" (run `qkdgw pki init` to create one)")
    return p


def _readable(p: Path) -> Path:
    try:
        with p.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise Problem(f"cannot read {_show_path(p)} ({exc.strerror})",
                      more=", readable by this process") from None
    return p


def _host_port(value: Any) -> HostPort:
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise Problem(f"expected a string, got {type(value).__name__}")
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise Problem(str(exc)) from None


def _ip_host(hp: HostPort) -> HostPort:
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        if hp.host != "localhost":
            raise Problem(f"{_show(hp.host)} is not an IP address") from None
    return hp


# A number where inf has a documented meaning (e.g. "unlimited"); NaN never has one.
FloatOrInf = Annotated[float, Strict(), Field(allow_inf_nan=True), AfterValidator(_not_nan)]
_STRING = WithJsonSchema({"type": "string"})
ConfPath = Annotated[Path, PlainValidator(_path), _STRING]
ExistingFile = Annotated[Path, PlainValidator(_path), AfterValidator(_is_file), _STRING]
ReadableFile = Annotated[Path, PlainValidator(_path), AfterValidator(_readable), _STRING]
HostPortT = Annotated[HostPort, PlainValidator(_host_port), _STRING]
IpHostPort = Annotated[HostPort, PlainValidator(_host_port), AfterValidator(_ip_host),
                       _STRING]


# --------------------------------------------------------------------------- loading


def load_model(model: type[M], path: str | Path) -> tuple[M, Path]:
    """Read a TOML file (confload's hostile-document checks first) into `model`."""
    data, p = read_toml(path)
    return validate(model, data, p), p


def validate(model: type[M], data: dict[str, Any], source: Path,
             prefix: tuple[str | int, ...] = ()) -> M:
    """Validate `data` (the table at `prefix` of the file `source`) against `model`."""
    try:
        return model.model_validate(data, context={"base_dir": source.parent})
    except ValidationError as exc:
        raise config_error(exc, model, source, prefix) from None


def config_error(exc: ValidationError, model: type[BaseModel], source: Path,
                 prefix: tuple[str | int, ...] = ()) -> ConfigError:
    """The first error of `exc` as one ConfigError line."""
    err = exc.errors(include_url=False)[0]
    loc: tuple[str | int, ...] = (*prefix, *err["loc"])
    kind = err["type"]
    value = err.get("input")
    problem_obj = (err.get("ctx") or {}).get("error")
    if isinstance(problem_obj, Problem) and problem_obj.at is not None:
        at = problem_obj.at
        loc = (*loc, *((at,) if isinstance(at, str) else at))
    info, target, is_list = _walk(model, loc, prefix)
    names = list(loc)
    # Trailing list indexes belong to the field ("[policy] accept_kems"), except for an
    # entry of an array of tables that is not a table.
    while names and isinstance(names[-1], int):
        names.pop()
    key = str(names[-1]) if names else ""
    sec = _section_name(names[:-1])
    field_fix = _fix_of(info)
    table_name = _section_name(names) or key

    problem: str
    fix: str
    if kind == "missing":
        if target is not None and not is_list:
            problem, fix = "missing section", f"add a [{table_name}] table"
        else:
            problem, fix = "missing", field_fix or "set it"
    elif kind == "extra_forbidden":
        if not key.replace("_", "").replace("-", "").isalnum():
            key = repr(key)
        problem, fix = "unknown field", UNKNOWN_FIX
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        if is_list or (loc and isinstance(loc[-1], int)):
            problem, fix = "expected an array of tables", f"write each entry as [[{key}]]"
        else:
            problem, fix = "expected a table", f"write it as [{table_name}]"
    elif kind in ("list_type", "tuple_type"):
        if target is not None:
            problem, fix = "expected an array of tables", f"write each entry as [[{key}]]"
        else:
            problem = "expected a list of strings"
            fix = field_fix or 'set it to a list of strings, e.g. ["a", "b"]'
    elif kind == "string_type":
        problem = f"expected a string, got {type(value).__name__}"
        fix = field_fix or "set it to a string"
    elif kind == "int_type":
        problem, fix = f"expected a whole number, got {_show(value)}", (
            field_fix or "set it to a whole number")
    elif kind == "float_type":
        if isinstance(value, int) and not isinstance(value, bool):
            problem = f"{_show(value)} is too large for a number"
        else:
            problem = f"expected a number, got {_show(value)}"
        fix = field_fix or "set it to a number"
    elif kind == "finite_number":
        problem = ("nan is not a number" if value != value
                   else f"{value} is not a finite number")
        fix = field_fix or "set it to a number"
    elif kind == "bool_type":
        problem = f"expected true or false, got {_show(value)}"
        fix = field_fix or "set it to true or false"
    elif kind == "literal_error":
        choices = _choices(info)
        problem, fix = f"unknown value {_show(value)}", "use one of " + ", ".join(choices)
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        if isinstance(value, float) and value != value:  # where NaN is allowed, as a bound
            problem, fix = "nan is not a number", field_fix or "set it to a number"
            return ConfigError(f"{source}: {_field_label(sec, key)}: {problem} (fix: {fix})")
        ctx = err.get("ctx") or {}
        op, word = {"greater_than_equal": (">=", "below the minimum"),
                    "greater_than": (">", "not above"),
                    "less_than_equal": ("<=", "above the maximum"),
                    "less_than": ("<", "not below")}[kind]
        bound = next(iter(ctx.values()))
        problem, fix = f"{_show(value)} is {word} {bound}", f"use a value {op} {bound}"
    elif isinstance(problem_obj, Problem):
        problem = problem_obj.problem
        fix = problem_obj.fix or ((field_fix or "see the documented fields in configs/")
                                  + problem_obj.more)
    elif isinstance(problem_obj, ValueError):
        problem, fix = str(problem_obj), field_fix or "see the documented fields in configs/"
    else:
        problem, fix = err["msg"], field_fix or "see the documented fields in configs/"
    return ConfigError(f"{source}: {_field_label(sec, key)}: {problem} (fix: {fix})")


def _field_label(sec: str, key: str) -> str:
    return f"[{sec}] {key}" if sec else key


def _section_name(names: list[str | int]) -> str:
    out = ""
    for part in names:
        if isinstance(part, int):
            out += f"][{part}"
        else:
            out = f"{out}.{part}" if out else part
    return out


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model class inside an annotation, and whether it is a sequence of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        if arg is Ellipsis:
            continue
        found, seq = _model_in(arg)
        if found is not None:
            return found, seq or origin in (tuple, list)
    return None, False


def _walk(model: type[BaseModel], loc: tuple[str | int, ...],
          prefix: tuple[str | int, ...]) -> tuple[FieldInfo | None, type[BaseModel] | None, bool]:
    """The field at `loc` (a loc past `prefix`): its FieldInfo, its model if it is a
    table, and whether an index is expected next (an array of tables)."""
    cls: type[BaseModel] | None = model
    info: FieldInfo | None = None
    target: type[BaseModel] | None = None
    is_list = False
    for part in loc[len(prefix):]:
        if isinstance(part, int):
            is_list = False
            continue
        if cls is None:
            return None, None, False
        info = _field(cls, part)
        if info is None:
            return None, None, False
        target, is_list = _model_in(info.annotation)
        cls = target
    return info, target, is_list


def _field(cls: type[BaseModel], key: str) -> FieldInfo | None:
    if key in cls.model_fields:
        return cls.model_fields[key]
    for info in cls.model_fields.values():
        if info.alias == key or info.validation_alias == key:
            return info
    return None


def _fix_of(info: FieldInfo | None) -> str | None:
    extra = info.json_schema_extra if info is not None else None
    if isinstance(extra, dict):
        fix = extra.get("fix")
        return fix if isinstance(fix, str) else None
    return None


def _choices(info: FieldInfo | None) -> list[str]:
    if info is None:
        return []
    return _literals(info.annotation)


def _literals(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        found = _literals(arg)
        if found:
            return found
    return []


def fields_of(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The TOML keys of a table, in order, with their FieldInfo."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def default_of(model: type[BaseModel], key: str) -> Any:
    """A field's default, for code that must share it (a core's settings class)."""
    info = _field(model, key)
    if info is None:
        raise KeyError(key)
    return info.get_default(call_default_factory=True)


def tables_of(model: type[BaseModel], name: str = "") -> dict[str, tuple[FieldInfo | None,
                                                                         bool,
                                                                         dict[str, FieldInfo]]]:
    """Every table of a file schema by its TOML name ("tunnel.admission"; "" is the top
    level): (the FieldInfo that holds it, whether it is an array of tables, its keys)."""
    out: dict[str, tuple[FieldInfo | None, bool, dict[str, FieldInfo]]] = {}
    keys: dict[str, FieldInfo] = {}
    out[name] = (None, False, keys)
    for key, info in fields_of(model).items():
        sub, is_list = _model_in(info.annotation)
        if sub is None:
            keys[key] = info
            continue
        child = f"{name}.{key}" if name else key
        nested = tables_of(sub, child)
        _, _, child_keys = nested.pop(child)
        out[child] = (info, is_list, child_keys)
        out.update(nested)
    return out


def _type_name(annotation: Any) -> str:
    lits = _literals(annotation)
    if lits:
        return " \\| ".join(f'"{v}"' for v in lits)
    text = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path",
            HostPort: "host:port"}
    base = annotation
    for _ in range(4):  # through Annotated / Optional
        if base in text:
            return text[base]
        origin = typing.get_origin(base)
        args = [a for a in typing.get_args(base) if a is not type(None)]
        if origin in (tuple, list):
            return f"list of {_type_name(args[0])}" if args else "list"
        if not args:
            break
        base = args[0]
    return getattr(base, "__name__", str(base))


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[]" if not value else "[" + ", ".join(repr(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return _num(value)


def _bounds(info: FieldInfo) -> str:
    lo = hi = None
    for meta in info.metadata:
        lo = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else lo
        hi = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else hi
    for arg in typing.get_args(info.annotation):  # bounds inside an Annotated alias
        for meta in getattr(arg, "__metadata__", ()) or ():
            for inner in getattr(meta, "metadata", ()) or ():
                lo = getattr(inner, "ge", lo)
                hi = getattr(inner, "le", hi)
    if lo is None and hi is None:
        return ""
    return f"{_num(lo)}..{_num(hi)}"


def _num(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(model: type[BaseModel], title: str, intro: str) -> str:
    """A reference of a file schema: one table of keys per TOML table."""
    lines = [f"## {title}", "", intro, ""]
    for table, (holder, is_list, keys) in tables_of(model).items():
        if not table:
            continue
        head = f"[[{table}]]" if is_list else f"[{table}]"
        required = holder is not None and holder.is_required()
        lines += [f"### `{head}`{' (required)' if required else ''}", ""]
        if holder is not None and holder.description:
            lines += [holder.description, ""]
        lines += ["| key | type | default | range | unit | description |",
                  "|---|---|---|---|---|---|"]
        for key, info in keys.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            unit = str(extra.get("unit", ""))
            desc = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {_type_name(info.annotation)} | {_default_text(info)} "
                         f"| {_bounds(info)} | {unit} | {desc} |")
        lines.append("")
    return "\n".join(lines)
