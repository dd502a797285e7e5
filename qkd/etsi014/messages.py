"""ETSI GS QKD 014 v1.1.1 data formats, sans-I/O.

Both ends of the REST key-delivery API live here as pure functions over bytes, dicts
and strings: the KME side parses and validates requests and builds answers, the SAE
side validates answers. No sockets, no aiohttp: `qkd.kme.service` and `qkd.etsi014.client` only
move bytes to and from these functions, so every rule can be tested directly.

Objects (spec clause 6): Status, Key request, Key container, Key IDs, Error. Sizes are
in bits; keys travel base64 (RFC 4648) in `key`; key IDs are UUID strings.

The SAE-side parsers are deliberately strict: a KME that answers with other key IDs
than asked, duplicate IDs or keys of the wrong length would make two gateways derive
different (or shared-with-someone-else) keys, so any deviation is an error, never a
repair.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qkd.common.errors import QkdError

# The `X as X` imports are re-exports: qkd.kme, qkd.link, qkd.skip and tests import
# them from here.
from qkd.etsi014.constants import API_PREFIX as API_PREFIX
from qkd.etsi014.constants import (
    BAD_REQUEST,
    BITS_PER_BYTE,
    DEFAULT_NUMBER,
    KEY_ID_CHARS,
    MAX_ID_CHARS,
    STATUS_FIELDS_INT,
    STATUS_FIELDS_STR,
)
from qkd.etsi014.constants import HKDF_MAX_BITS as HKDF_MAX_BITS
from qkd.etsi014.constants import NO_KEY_MESSAGE as NO_KEY_MESSAGE
from qkd.etsi014.constants import SERVER_ERROR as SERVER_ERROR
from qkd.etsi014.constants import UNAUTHORIZED as UNAUTHORIZED

# Clients match the no-key 503 on NO_KEY_PATTERN rather than our NO_KEY_MESSAGE, so
# other vendors' wording also counts.
NO_KEY_PATTERN = re.compile(
    r"no (?:more )?keys? (?:is |are )?(?:available|left)|not enough key|insufficient key"
    r"|keys? (?:pool )?(?:exhausted|depleted)|out of keys?",
    re.IGNORECASE,
)

# SAE and KME IDs end up in URL paths, logs and SQLite; a conservative alphabet keeps
# all three unambiguous (no '/', no whitespace, no control characters).
_ID_RE = re.compile(rf"[A-Za-z0-9._~:@-]{{1,{MAX_ID_CHARS}}}")


class EtsiError(QkdError):
    """A request the KME must refuse; carries the HTTP status and the ETSI Error body.

    Messages name the offending parameter and never contain key material."""

    def __init__(self, status: int, message: str,
                 details: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = [dict(d) for d in details]

    def body(self) -> dict[str, Any]:
        return build_error(self.message, self.details)


class SchemaError(QkdError, ValueError):
    """An answer from a KME violates the spec or does not match the request."""


@dataclass(frozen=True)
class QkdKey:
    """One delivered key. `key` is excluded from repr so it cannot leak into logs."""

    key_id: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Limits:
    """What a KME serves for one master/slave pair; also the Status body's numbers."""

    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_count: int
    max_key_per_request: int
    # We do not support key multicast (additional slave SAEs): the ideal link binds
    # each key to exactly one master and one slave. The spec's answer for that is 0.
    max_sae_id_count: int = 0


@dataclass(frozen=True)
class KeyRequest:
    number: int
    size: int
    additional_slave_sae_ids: tuple[str, ...] = ()


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def canonical_key_id(value: object) -> str:
    """The canonical (lower-case, hyphenated) form of a UUID key ID; ValueError if not one."""
    if not isinstance(value, str) or len(value) != KEY_ID_CHARS:
        raise ValueError("key_ID must be a UUID string like 'xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx'")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError("key_ID is not a valid UUID") from None
    text = str(parsed)
    # uuid.UUID also accepts braces and 'urn:uuid:' forms; 36 chars with hyphens in
    # the standard places is the only form the spec allows.
    if text != value.lower():
        raise ValueError("key_ID is not in the standard 8-4-4-4-12 UUID form")
    return text


# --------------------------------------------------------------------------- JSON


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # Two values for one field: which one wins differs between parsers, so a
            # proxy and the KME could disagree on what was asked. Refuse instead.
            raise _DuplicateKey(f"duplicate field {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(data: bytes | str) -> Any:
    """json.loads without NaN/Infinity and without duplicate object keys."""
    return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _parse_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise EtsiError(BAD_REQUEST, "request body is empty; send a JSON object",
                        [{"parameter": "body", "reason": "empty"}])
    try:
        obj = loads_strict(body)
    except (ValueError, RecursionError) as exc:
        # exc text is from the JSON parser (position, duplicate field name), not from
        # anything secret; the body itself is never echoed.
        raise EtsiError(BAD_REQUEST, "request body is not valid JSON",
                        [{"parameter": "body", "reason": str(exc)[:200]}]) from None
    if not isinstance(obj, dict):
        raise EtsiError(BAD_REQUEST, "request body must be a JSON object",
                        [{"parameter": "body", "reason": f"got {type(obj).__name__}"}])
    return obj


def _bad(parameter: str, reason: str) -> EtsiError:
    return EtsiError(BAD_REQUEST, f"invalid {parameter}: {reason}",
                     [{"parameter": parameter, "reason": reason}])


# ------------------------------------------------------------------ KME: requests


def _check_number(value: object, limits: Limits) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad("number", "must be a whole number")
    if value < 1:
        raise _bad("number", "must be at least 1")
    if value > limits.max_key_per_request:
        raise _bad("number", f"{value} exceeds max_key_per_request {limits.max_key_per_request}")
    return value


def _check_size(value: object, limits: Limits) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad("size", "must be a whole number of bits")
    if value % BITS_PER_BYTE:
        raise _bad("size", f"{value} bits is not a multiple of 8")
    if value < limits.min_key_size:
        raise _bad("size", f"{value} bits is below min_key_size {limits.min_key_size}")
    if value > limits.max_key_size:
        raise _bad("size", f"{value} bits is above max_key_size {limits.max_key_size}")
    return value


def _query_int(query: Mapping[str, Sequence[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _bad(name, "given more than once")
    text = values[0]
    # Only plain decimal digits: int() would also take '+1', ' 1' and '1_000'.
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise _bad(name, "must be a whole number")
    return int(text)


def _check_query_names(query: Mapping[str, Sequence[str]], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise EtsiError(BAD_REQUEST, f"unknown query parameter {unknown[0]!r}",
                        [{"parameter": name, "reason": "not defined by ETSI GS QKD 014"}
                         for name in unknown])


def parse_enc_keys_get(query: Mapping[str, Sequence[str]], limits: Limits) -> KeyRequest:
    """GET enc_keys: optional `number` and `size` query parameters."""
    _check_query_names(query, ("number", "size"))
    number = _query_int(query, "number")
    size = _query_int(query, "size")
    return KeyRequest(
        number=_check_number(1 if number is None else number, limits),
        size=_check_size(limits.key_size if size is None else size, limits),
    )


def _check_extension_list(obj: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = obj.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _bad(name, "must be an array of objects")
    return value


def _check_extension_object(obj: dict[str, Any], name: str, where: str = "") -> None:
    # The spec types every *_extension as an object; anything else is a malformed
    # request, not an extension we may ignore.
    if name in obj and not isinstance(obj[name], dict):
        raise _bad(where + name, "must be a JSON object")


def parse_enc_keys_post(body: bytes, limits: Limits) -> KeyRequest:
    """POST enc_keys: the Key request object (number, size, additional_slave_SAE_IDs,
    extension_mandatory, extension_optional)."""
    obj = _parse_body(body)
    allowed = ("number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
               "extension_optional")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _bad(unknown[0], "unknown field in Key request")
    number = _check_number(obj.get("number", DEFAULT_NUMBER), limits)
    size = _check_size(obj.get("size", limits.key_size), limits)

    extras = obj.get("additional_slave_SAE_IDs", [])
    if not isinstance(extras, list) or not all(is_valid_id(v) for v in extras):
        raise _bad("additional_slave_SAE_IDs", "must be an array of SAE ID strings")
    if len(set(extras)) != len(extras):
        raise _bad("additional_slave_SAE_IDs", "contains duplicates")
    if len(extras) > limits.max_sae_id_count:
        raise _bad("additional_slave_SAE_IDs",
                   f"{len(extras)} given, this KME allows max_SAE_ID_count "
                   f"{limits.max_sae_id_count} (no key multicast)")

    mandatory = _check_extension_list(obj, "extension_mandatory")
    _check_extension_list(obj, "extension_optional")  # optional ones may be ignored
    # We implement no extensions, so every mandatory one is unsupported; the spec
    # requires refusing the whole request rather than silently ignoring it.
    if mandatory:
        # An empty object still asks for *something* mandatory we cannot name; refuse it.
        names = [name for ext in mandatory for name in ext] or ["(empty object)"]
        raise EtsiError(
            BAD_REQUEST,
            "not all extension_mandatory parameters are supported",
            [{"extension_mandatory_unsupported": names}],
        )
    return KeyRequest(number=number, size=size, additional_slave_sae_ids=tuple(extras))


def parse_dec_keys_get(query: Mapping[str, Sequence[str]]) -> list[str]:
    """GET dec_keys: exactly one `key_ID` query parameter."""
    _check_query_names(query, ("key_ID",))
    values = query.get("key_ID")
    if not values:
        raise _bad("key_ID", "missing; give the key ID the master SAE received")
    if len(values) > 1:
        raise _bad("key_ID", "given more than once; use POST with key_IDs for several keys")
    try:
        return [canonical_key_id(values[0])]
    except ValueError as exc:
        raise _bad("key_ID", str(exc)) from None


def parse_dec_keys_post(body: bytes, limits: Limits) -> list[str]:
    """POST dec_keys: the Key IDs object `{"key_IDs": [{"key_ID": ...}, ...]}`."""
    obj = _parse_body(body)
    unknown = sorted(set(obj) - {"key_IDs", "key_IDs_extension"})
    if unknown:
        raise _bad(unknown[0], "unknown field in Key IDs")
    _check_extension_object(obj, "key_IDs_extension")
    items = obj.get("key_IDs")
    if not isinstance(items, list) or not items:
        raise _bad("key_IDs", "must be a non-empty array of {\"key_ID\": ...} objects")
    if len(items) > limits.max_key_per_request:
        raise _bad("key_IDs", f"{len(items)} IDs exceed max_key_per_request "
                   f"{limits.max_key_per_request}")
    ids: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "key_ID" not in item:
            raise _bad(f"key_IDs[{i}]", "must be an object with a key_ID")
        extra = set(item) - {"key_ID", "key_ID_extension"}
        if extra:
            raise _bad(f"key_IDs[{i}]", f"unknown field {sorted(extra)[0]!r}")
        _check_extension_object(item, "key_ID_extension", f"key_IDs[{i}].")
        try:
            ids.append(canonical_key_id(item["key_ID"]))
        except ValueError as exc:
            raise _bad(f"key_IDs[{i}].key_ID", str(exc)) from None
    if len(set(ids)) != len(ids):
        raise _bad("key_IDs", "contains the same key_ID more than once")
    return ids


# ----------------------------------------------------------------- KME: answers


def build_status(*, source_kme_id: str, target_kme_id: str, master_sae_id: str,
                 slave_sae_id: str, limits: Limits, stored_key_count: int) -> dict[str, Any]:
    return {
        "source_KME_ID": source_kme_id,
        "target_KME_ID": target_kme_id,
        "master_SAE_ID": master_sae_id,
        "slave_SAE_ID": slave_sae_id,
        "key_size": limits.key_size,
        "stored_key_count": max(0, min(stored_key_count, limits.max_key_count)),
        "max_key_count": limits.max_key_count,
        "max_key_per_request": limits.max_key_per_request,
        "max_key_size": limits.max_key_size,
        "min_key_size": limits.min_key_size,
        "max_SAE_ID_count": limits.max_sae_id_count,
    }


def build_key_container(keys: Sequence[QkdKey]) -> dict[str, Any]:
    return {"keys": [{"key_ID": k.key_id, "key": base64.b64encode(k.key).decode("ascii")}
                     for k in keys]}


def build_key_ids(key_ids: Sequence[str]) -> dict[str, Any]:
    return {"key_IDs": [{"key_ID": k} for k in key_ids]}


def build_key_request(number: int, size: int) -> dict[str, Any]:
    return {"number": number, "size": size}


def build_error(message: str, details: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    return {"message": message, "details": [dict(d) for d in details]}


# ---------------------------------------------------------------- SAE: answers


def _require_dict(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SchemaError(f"{what} is not a JSON object")
    return obj


def parse_status(obj: object, slave_sae_id: str) -> dict[str, Any]:
    """Validate a Status answer for `slave_sae_id`; returns it unchanged."""
    status = _require_dict(obj, "Status")
    for name in STATUS_FIELDS_STR:
        if not isinstance(status.get(name), str):
            raise SchemaError(f"Status field {name} missing or not a string")
    for name in STATUS_FIELDS_INT:
        value = status.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SchemaError(f"Status field {name} missing or not a non-negative integer")
    if status["slave_SAE_ID"] != slave_sae_id:
        raise SchemaError(f"Status is for slave SAE {status['slave_SAE_ID']!r}, "
                          f"asked about {slave_sae_id!r}")
    if status["stored_key_count"] > status["max_key_count"]:
        raise SchemaError("Status stored_key_count exceeds max_key_count")
    if status["min_key_size"] > status["max_key_size"]:
        raise SchemaError("Status min_key_size exceeds max_key_size")
    return status


def _decode_key(value: object, index: int, size_bits: int | None) -> bytes:
    if not isinstance(value, str):
        raise SchemaError(f"keys[{index}].key is not a string")
    try:
        # validate=True rejects characters outside the alphabet instead of skipping them.
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SchemaError(f"keys[{index}].key is not valid base64") from None
    if size_bits is None:
        if not raw:
            raise SchemaError(f"keys[{index}].key is empty")
    elif len(raw) * BITS_PER_BYTE != size_bits:
        raise SchemaError(f"keys[{index}].key has {len(raw) * BITS_PER_BYTE} bits, "
                          f"expected {size_bits}")
    return raw


def _parse_container(obj: object) -> list[tuple[str, object]]:
    container = _require_dict(obj, "Key container")
    items = container.get("keys")
    if not isinstance(items, list):
        raise SchemaError("Key container has no keys array")
    out: list[tuple[str, object]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise SchemaError(f"keys[{i}] is not an object")
        try:
            key_id = canonical_key_id(item.get("key_ID"))
        except ValueError as exc:
            raise SchemaError(f"keys[{i}].key_ID: {exc}") from None
        if key_id in seen:
            raise SchemaError(f"keys[{i}].key_ID {key_id} appears twice")
        seen.add(key_id)
        out.append((key_id, item.get("key")))
    return out


def parse_enc_keys_answer(obj: object, number: int, size_bits: int) -> list[QkdKey]:
    """Validate an enc_keys Key container: exactly `number` distinct keys of `size_bits`."""
    items = _parse_container(obj)
    if len(items) != number:
        raise SchemaError(f"asked for {number} keys, got {len(items)}")
    return [QkdKey(key_id, _decode_key(value, i, size_bits))
            for i, (key_id, value) in enumerate(items)]


def parse_dec_keys_answer(obj: object, key_ids: Sequence[str],
                          size_bits: int | None = None) -> list[QkdKey]:
    """Validate a dec_keys Key container: exactly the requested IDs, each once.

    Returned in the order of `key_ids` (the spec does not promise the KME keeps the
    order; a permutation of exactly the asked-for set is as safe). `size_bits` None
    accepts any non-empty key: the slave did not choose the size, so only a caller
    that agreed on it with the master can check it."""
    items = _parse_container(obj)
    wanted = [canonical_key_id(k) for k in key_ids]
    got = {key_id for key_id, _ in items}
    if len(items) != len(wanted) or got != set(wanted):
        missing = len(set(wanted) - got)
        extra = len(got - set(wanted))
        raise SchemaError(f"asked for {len(wanted)} key IDs, answer has {len(items)} "
                          f"({missing} missing, {extra} not asked for)")
    by_id: dict[str, QkdKey] = {}
    for i, (key_id, value) in enumerate(items):
        by_id[key_id] = QkdKey(key_id, _decode_key(value, i, size_bits))
    return [by_id[k] for k in wanted]


def parse_error(obj: object) -> tuple[str, list[Any]]:
    """Message and details of an Error body; tolerant, since it only feeds a message."""
    if isinstance(obj, dict):
        message = obj.get("message")
        details = obj.get("details")
        return (message if isinstance(message, str) else "",
                details if isinstance(details, list) else [])
    return "", []
