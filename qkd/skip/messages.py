"""Cisco SKIP (draft-cisco-skip) messages, sans-I/O: request checks for the KME and
answer checks for the client.

SKIP names keys by `keyId`, a hex string, and carries key bytes as hex. Here a SKIP key
ID is the 32 hex digits of the ETSI 014 key ID (a UUID) of the same key in the same
store, so a key fetched through one API is the same delivery through the other.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from qkd.etsi014.messages import BAD_REQUEST, EtsiError, Limits, QkdKey, SchemaError

CAPABILITIES_PATH = "/capabilities"
KEY_PATH = "/key"
NOT_FOUND = 404

_KEY_ID_RE = re.compile(r"[0-9a-fA-F]{32}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")


def _bad(parameter: str, reason: str, status: int = BAD_REQUEST) -> EtsiError:
    return EtsiError(status, f"invalid {parameter}: {reason}",
                     [{"parameter": parameter, "reason": reason}])


def skip_key_id(etsi_key_id: str) -> str:
    """The SKIP keyId of a key whose ETSI 014 key ID is `etsi_key_id` (a UUID)."""
    return uuid.UUID(etsi_key_id).hex


def etsi_key_id(skip_id: object) -> str:
    """The ETSI 014 key ID (canonical UUID) of a SKIP keyId; ValueError if malformed."""
    if not isinstance(skip_id, str) or _KEY_ID_RE.fullmatch(skip_id) is None:
        raise ValueError("keyId must be 32 hexadecimal digits")
    return str(uuid.UUID(hex=skip_id))


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _bad(name, "given more than once")
    return values[0]


def _check_names(query: Mapping[str, Sequence[str]], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise EtsiError(BAD_REQUEST, f"unknown query parameter {unknown[0]!r}",
                        [{"parameter": n, "reason": "not a SKIP parameter"} for n in unknown])


def parse_remote(query: Mapping[str, Sequence[str]], remotes: frozenset[str]) -> str:
    remote = _one(query, "remoteSystemID")
    if remote is None:
        raise _bad("remoteSystemID", "missing; name the peer system the key is shared with")
    if remote not in remotes:
        raise _bad("remoteSystemID", f"{remote[:64]!r} is not a remote system of this "
                   f"key provider (known: {', '.join(sorted(remotes))})")
    return remote


def parse_new_key(query: Mapping[str, Sequence[str]], limits: Limits,
                  remotes: frozenset[str]) -> tuple[str, int]:
    """GET /key?remoteSystemID=R[&size=BITS]: the remote system and the key size."""
    _check_names(query, ("remoteSystemID", "size"))
    remote = parse_remote(query, remotes)
    text = _one(query, "size")
    if text is None:
        return remote, limits.key_size
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise _bad("size", "must be a whole number of bits")
    size = int(text)
    if size % 8 or not limits.min_key_size <= size <= limits.max_key_size:
        raise _bad("size", f"{size} bits is not a multiple of 8 between "
                   f"{limits.min_key_size} and {limits.max_key_size}")
    return remote, size


def parse_key_by_id(key_id: str, query: Mapping[str, Sequence[str]],
                    remotes: frozenset[str]) -> tuple[str, str]:
    """GET /key/{keyId}?remoteSystemID=R: the remote system and the ETSI key ID."""
    _check_names(query, ("remoteSystemID",))
    remote = parse_remote(query, remotes)
    try:
        return remote, etsi_key_id(key_id)
    except ValueError as exc:
        raise _bad("keyId", str(exc)) from None


def build_key(key: QkdKey) -> dict[str, Any]:
    return {"keyId": skip_key_id(key.key_id), "key": key.key.hex()}


def build_capabilities(*, entity_info: str, local_id: str, remotes: Sequence[str],
                       limits: Limits) -> dict[str, Any]:
    return {
        "entityInfo": entity_info,
        "localSystemID": local_id,
        "remoteSystemID": sorted(remotes),
        "minKeySize": limits.min_key_size,
        "maxKeySize": limits.max_key_size,
        "defaultKeySize": limits.key_size,
    }


# ------------------------------------------------------------------ client: answers


def parse_key_answer(obj: object, size_bits: int | None,
                     expected_id: str | None = None) -> QkdKey:
    """A key answer as a QkdKey named by its ETSI key ID. `expected_id` (ETSI form) is
    the ID asked for; `size_bits` None accepts any non-empty key."""
    if not isinstance(obj, dict):
        raise SchemaError("SKIP key answer is not a JSON object")
    try:
        key_id = etsi_key_id(obj.get("keyId"))
    except ValueError as exc:
        raise SchemaError(f"SKIP key answer: {exc}") from None
    if expected_id is not None and key_id != expected_id:
        raise SchemaError("SKIP key answer names another keyId than the one asked for")
    value = obj.get("key")
    if not isinstance(value, str) or _HEX_RE.fullmatch(value) is None:
        raise SchemaError("SKIP key answer: key is not an even-length hex string")
    raw = bytes.fromhex(value)
    if size_bits is not None and len(raw) * 8 != size_bits:
        raise SchemaError(f"SKIP key answer: key has {len(raw) * 8} bits, "
                          f"expected {size_bits}")
    return QkdKey(key_id, raw)


def parse_capabilities(obj: object) -> dict[str, Any]:
    """The fields of /capabilities this client relies on, checked."""
    if not isinstance(obj, dict):
        raise SchemaError("SKIP capabilities answer is not a JSON object")
    remotes = obj.get("remoteSystemID")
    if isinstance(remotes, str):
        remotes = [remotes]
    if not isinstance(remotes, list) or not all(isinstance(r, str) for r in remotes):
        raise SchemaError("SKIP capabilities: remoteSystemID is not a list of names")
    out: dict[str, Any] = {"localSystemID": obj.get("localSystemID"),
                           "remoteSystemID": remotes}
    for name in ("minKeySize", "maxKeySize", "defaultKeySize"):
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SchemaError(f"SKIP capabilities: {name} is not a positive integer")
        out[name] = value
    if not out["minKeySize"] <= out["defaultKeySize"] <= out["maxKeySize"]:
        raise SchemaError("SKIP capabilities: defaultKeySize outside min..max")
    return out
