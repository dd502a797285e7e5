"""qkd.etsi014.constants against the OpenAPI description the KME publishes (both
written from ETSI GS QKD 014): a typo in one is caught by the other."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import yaml

from qkd.etsi014 import constants as c
from qkd.etsi014 import messages

SPEC = yaml.safe_load((Path(c.__file__).parent / "openapi.yaml").read_text())


def test_paths_and_error_codes() -> None:
    paths = SPEC["paths"]
    for segment, param in ((c.STATUS, "slave_SAE_ID"), (c.ENC_KEYS, "slave_SAE_ID"),
                           (c.DEC_KEYS, "master_SAE_ID")):
        path = f"{c.API_PREFIX}/{{{param}}}/{segment}"
        assert path in paths, path
        for op in paths[path].values():
            assert {str(c.BAD_REQUEST), str(c.UNAUTHORIZED), str(c.SERVER_ERROR)} <= set(
                op["responses"])


def test_status_fields_and_sizes() -> None:
    schemas = SPEC["components"]["schemas"]
    assert set(schemas["Status"]["required"]) == set(c.STATUS_FIELDS_STR) | set(
        c.STATUS_FIELDS_INT)
    for name in c.STATUS_FIELDS_INT:
        assert schemas["Status"]["properties"][name]["type"] == "integer"
    assert schemas["KeyRequest"]["properties"]["size"]["multipleOf"] == c.BITS_PER_BYTE
    assert f"{{1,{c.MAX_ID_CHARS}}}" in schemas["SaeID"]["pattern"]
    assert len(str(uuid.uuid4())) == c.KEY_ID_CHARS
    assert re.fullmatch(schemas["KeyID"]["pattern"], str(uuid.uuid4()))


def test_messages_keeps_its_names() -> None:
    # Importers of qkd.etsi014.messages (qkd.kme, qkd.link, qkd.skip) are unchanged.
    for name in ("API_PREFIX", "BAD_REQUEST", "UNAUTHORIZED", "SERVER_ERROR",
                 "HKDF_MAX_BITS", "NO_KEY_MESSAGE", "STATUS_FIELDS_STR", "STATUS_FIELDS_INT"):
        assert getattr(messages, name) == getattr(c, name)
    assert messages.NO_KEY_PATTERN.search(c.NO_KEY_MESSAGE)
    assert messages.is_valid_id("a" * c.MAX_ID_CHARS)
    assert not messages.is_valid_id("a" * (c.MAX_ID_CHARS + 1))
