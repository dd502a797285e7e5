"""Reading TOML config files with errors that name the field and the fix.

`read_toml` is the first stage of every config load: it refuses hostile documents
(nesting, huge integers) by field before tomllib can fail on them. The gateway and KME
configs are then validated by their schemas (qkd/common/schema.py); `Section` is the
older hand-written accessor style, kept for tables not yet described by a schema. A
bad value always ends in one `ConfigError` such as::

    configs/site-a.toml: [kme] url: 'http://x' is not an https:// URL (fix: ...)

Relative paths in a config are resolved against the config file's directory, so a
config works from whatever directory the service is started in.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkd.common.errors import ConfigError

_MISSING = object()

# Limits checked before or around tomllib, so hostile documents end in a ConfigError
# that names the field: tomllib recurses once per nested array/inline table (about
# 1,000 levels exhaust Python's stack: RecursionError) and converts integers with int()
# (more than 4,300 digits: ValueError from Python's int-digits limit).
MAX_NESTING = 32
MAX_INT_DIGITS = 4300
# Linux's NAME_MAX and PATH_MAX: longer names make every os call fail with ENAMETOOLONG.
MAX_NAME = 255
MAX_PATH = 4095
_SHOW = 60
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]*?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*([^=\s][^=]*?)\s*=")
_DIGITS = re.compile(r"[0-9][0-9_]*")


def _show(value: Any) -> str:
    """A value for an error message: repr, shortened so the message stays one line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        # str() of an int past 4,300 digits raises (hex literals get there): estimate.
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(value)
    except ValueError:  # a list or table holding such an integer
        return f"a {type(value).__name__} holding a huge integer"
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def _exists(p: Path, sec: Section, key: str, fix: str) -> bool:
    try:
        return p.exists()
    except OSError as exc:  # EACCES on a parent, ELOOP, ...: say which field
        raise sec.error(key, f"cannot look at {_show(str(p))} ({exc.strerror})",
                        fix) from None


def _locate(text: str, bad: Any) -> tuple[str, str] | None:
    """(section, key) of the first `key = value` line whose value `bad(value_text,
    depth_before)` flags, tracking [table] headers and brackets that span lines. A
    rough scan (strings are skipped, comments dropped), only used to name the field in
    an error about a document tomllib could not finish."""
    section, key, depth = "", "", 0
    for line in text.splitlines():
        rest = line
        if depth == 0:
            m = _HEADER.match(line)
            if m and "=" not in line:
                section = m.group(1).replace('"', "")
                continue
            k = _KEY.match(line)
            if not k:
                continue
            key = k.group(1).strip().strip('"').strip("'")
            rest = line[k.end():]
        scrubbed = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', '""', rest).split("#", 1)[0]
        if bad(scrubbed, depth):
            return section, key
        depth = max(0, depth + scrubbed.count("[") + scrubbed.count("{")
                    - scrubbed.count("]") - scrubbed.count("}"))
    return None


def _too_deep(value: str, depth: int) -> bool:
    for ch in value:
        if ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _too_long_int(value: str, _depth: int) -> bool:
    return any(len(m.group().replace("_", "")) > MAX_INT_DIGITS
               for m in _DIGITS.finditer(value))


def _field_error(p: Path, where: tuple[str, str] | None, problem: str, fix: str
                 ) -> ConfigError:
    if where is None:
        return ConfigError(f"{p}: not valid TOML: {problem} (fix: {fix})")
    section, key = where
    field = f"[{section}] {key}" if section else key
    return ConfigError(f"{p}: {field}: {problem} (fix: {fix})")

# Section has methods named str/int/float/bool/path; inside the class body those names
# would shadow the builtins in annotations, so annotations use these aliases.
_Str = str
_Int = int
_Float = float
_Bool = bool


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str) -> HostPort:
    """Parse `host:port` or `[v6]:port`; raises ValueError with a readable reason."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected 'host:port'")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected '[ipv6]:port', got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected 'host:port', got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return HostPort(host, port)


def load_toml(path: str | Path) -> Section:
    """Load a TOML file into the root `Section`; unreadable or invalid files raise ConfigError."""
    data, p = read_toml(path)
    return Section(data, p, "")


def read_toml(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A TOML file as a dict, hostile documents (nesting, huge integers) refused by
    field; unreadable or invalid files raise ConfigError."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{p}: cannot read config file ({exc.strerror}); check the path given to --config"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    deep = _locate(text, _too_deep)
    if deep is not None:
        raise _field_error(p, deep, f"arrays or inline tables nested more than {MAX_NESTING} "
                           "levels deep", f"flatten the value to at most {MAX_NESTING} levels")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except RecursionError:  # nesting the scan above did not see (it is only a rough scan)
        raise _field_error(p, None, "values nested too deeply",
                           f"flatten nested arrays and tables to at most {MAX_NESTING} "
                           "levels") from None
    except ValueError:
        # int() refused a literal: more than Python's 4,300-digit limit.
        raise _field_error(p, _locate(text, _too_long_int),
                           f"an integer of more than {MAX_INT_DIGITS} digits",
                           "use a number in the documented range") from None
    return data, p


class Section:
    """One TOML table. Accessors validate, convert and record which keys were read,
    so `finish()` can reject unknown keys (usually typos) by name."""

    def __init__(self, data: dict[str, Any], source: Path, name: _Str) -> None:
        self._data = data
        self._source = source
        self._name = name
        self._seen: set[_Str] = set()

    @property
    def source(self) -> Path:
        return self._source

    @property
    def base_dir(self) -> Path:
        return self._source.parent

    def field_name(self, key: _Str) -> _Str:
        return f"[{self._name}] {key}" if self._name else key

    def error(self, key: _Str, problem: _Str, fix: _Str) -> ConfigError:
        return ConfigError(f"{self._source}: {self.field_name(key)}: {problem} (fix: {fix})")

    def has(self, key: _Str) -> _Bool:
        return key in self._data

    def _get(self, key: _Str, default: Any, fix: _Str) -> Any:
        self._seen.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise self.error(key, "missing", fix)
        return default

    def str(self, key: _Str, default: Any = _MISSING, *, fix: _Str = "set it to a string",
            choices: tuple[_Str, ...] | None = None) -> Any:
        value = self._get(key, default, fix)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__}", fix)
        if choices is not None and value not in choices:
            raise self.error(key, f"unknown value {_show(value)}",
                             "use one of " + ", ".join(choices))
        return value

    def int(self, key: _Str, default: Any = _MISSING, *, fix: _Str = "set it to a whole number",
            min: _Int | None = None, max: _Int | None = None) -> Any:
        value = self._get(key, default, fix)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected a whole number, got {_show(value)}", fix)
        if min is not None and value < min:
            raise self.error(key, f"{_show(value)} is below the minimum {min}",
                             f"use a value >= {min}")
        if max is not None and value > max:
            raise self.error(key, f"{_show(value)} is above the maximum {max}",
                             f"use a value <= {max}")
        return value

    def float(self, key: _Str, default: Any = _MISSING, *, fix: _Str = "set it to a number",
              min: _Float | None = None, max: _Float | None = None,
              allow_inf: _Bool = False) -> Any:
        """A number; inf only where the field documents a meaning for it (`allow_inf`)."""
        value = self._get(key, default, fix)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {_show(value)}", fix)
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range (about 1.8e308)
            raise self.error(key, f"{_show(value)} is too large for a number",
                             fix) from None
        if value != value:  # NaN passes every comparison below
            raise self.error(key, "nan is not a number", fix)
        if math.isinf(value) and not allow_inf:  # also 400 nines as a float: TOML reads inf
            raise self.error(key, f"{value} is not a finite number", fix)
        if min is not None and value < min:
            raise self.error(key, f"{value} is below the minimum {min}", f"use a value >= {min}")
        if max is not None and value > max:
            raise self.error(key, f"{value} is above the maximum {max}", f"use a value <= {max}")
        return value

    def bool(self, key: _Str, default: Any = _MISSING, *,
             fix: _Str = "set it to true or false") -> Any:
        value = self._get(key, default, fix)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_show(value)}", fix)
        return value

    def str_list(self, key: _Str, default: Any = _MISSING, *,
                 fix: _Str = 'set it to a list of strings, e.g. ["a", "b"]') -> Any:
        value = self._get(key, default, fix)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "expected a list of strings", fix)
        return list(value)

    def path(self, key: _Str, default: Any = _MISSING, *, fix: _Str = "set it to a file path",
             must_exist: _Bool = False) -> Any:
        """A filesystem path, resolved relative to the config file's directory."""
        value = self.str(key, default, fix=fix)
        if value is default and default is not _MISSING:
            return value
        if "\x00" in value:
            raise self.error(key, "contains a NUL character", fix)
        p = Path(value)
        if not p.is_absolute():
            p = self.base_dir / p
        if any(len(os.fsencode(part)) > MAX_NAME for part in p.parts):
            raise self.error(key, f"a name in the path is longer than {MAX_NAME} bytes",
                             fix + f" (each name at most {MAX_NAME} bytes)")
        if len(os.fsencode(str(p))) > MAX_PATH:
            raise self.error(key, f"the path is longer than {MAX_PATH} bytes",
                             fix + f" (at most {MAX_PATH} bytes)")
        if must_exist and not _exists(p, self, key, fix):
            raise self.error(key, f"file {_show(str(p))} does not exist", fix)
        return p

    def host_port(self, key: _Str, default: Any = _MISSING, *,
                  fix: _Str = "write it as 'host:port', e.g. '127.0.0.1:7443'") -> Any:
        value = self.str(key, default, fix=fix)
        if value is default and default is not _MISSING and not isinstance(default, str):
            return value
        try:
            return parse_host_port(value)
        except ValueError as exc:
            raise self.error(key, str(exc), fix) from None

    def ip_host_port(self, key: _Str, default: Any = _MISSING, *,
                     fix: _Str = "write it as 'ip:port', e.g. '127.0.0.1:7443'") -> Any:
        hp = self.host_port(key, default, fix=fix)
        if hp is default and default is not _MISSING:
            return hp
        try:
            ipaddress.ip_address(hp.host)
        except ValueError:
            if hp.host != "localhost":
                raise self.error(key, f"{hp.host!r} is not an IP address", fix) from None
        return hp

    def section(self, key: _Str, *, required: _Bool = True) -> Section:
        self._seen.add(key)
        value = self._data.get(key)
        if value is None:
            if required:
                raise self.error(key, "missing section", f"add a [{self._child(key)}] table")
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, "expected a table", f"write it as [{self._child(key)}]")
        return Section(value, self._source, self._child(key))

    def sections(self, key: _Str) -> Iterator[Section]:
        """An array of tables, `[[key]]`; absent means empty."""
        self._seen.add(key)
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "expected an array of tables", f"write each entry as [[{key}]]")
        for i, item in enumerate(value):
            yield Section(item, self._source, f"{self._child(key)}][{i}")

    def _child(self, key: _Str) -> _Str:
        return f"{self._name}.{key}" if self._name else key

    def finish(self) -> None:
        """Reject keys nobody read: almost always a typo the user wants to hear about."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            key = unknown[0]
            if not key.replace("_", "").replace("-", "").isalnum():
                key = repr(key)
            raise self.error(key, "unknown field", "remove it or check its spelling against "
                             "the documented fields in configs/")
