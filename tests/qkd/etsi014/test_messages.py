"""ETSI 014 request parsing (KME side) and answer validation (SAE side), no I/O."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkd.etsi014 import messages as etsi014
from qkd.etsi014.messages import EtsiError, Limits, QkdKey, SchemaError

LIMITS = Limits(key_size=256, min_key_size=64, max_key_size=1024, max_key_count=100,
                max_key_per_request=10)


def q(**kw: str) -> dict[str, list[str]]:
    return {k: [v] for k, v in kw.items()}


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


# ----------------------------------------------------------------- enc_keys requests


def test_enc_get_defaults() -> None:
    req = etsi014.parse_enc_keys_get({}, LIMITS)
    assert (req.number, req.size) == (1, 256)


def test_enc_get_values() -> None:
    req = etsi014.parse_enc_keys_get(q(number="3", size="512"), LIMITS)
    assert (req.number, req.size) == (3, 512)


@pytest.mark.parametrize(("query", "param"), [
    (q(size="100"), "size"),          # not a multiple of 8
    (q(size="56"), "size"),           # below min
    (q(size="1032"), "size"),         # above max
    (q(number="0"), "number"),
    (q(number="11"), "number"),       # above max_key_per_request
    (q(number="-1"), "number"),
    (q(number="+1"), "number"),
    (q(number="1.0"), "number"),
    (q(number="x"), "number"),
    ({"number": ["1", "2"]}, "number"),
    (q(colour="red"), "colour"),
])
def test_enc_get_rejects(query: dict[str, list[str]], param: str) -> None:
    with pytest.raises(EtsiError) as ei:
        etsi014.parse_enc_keys_get(query, LIMITS)
    assert ei.value.status == 400
    assert param in json.dumps(ei.value.body())


def test_enc_post_values_and_defaults() -> None:
    assert etsi014.parse_enc_keys_post(b"{}", LIMITS).number == 1
    req = etsi014.parse_enc_keys_post(body({"number": 2, "size": 128,
                                            "extension_optional": [{"x": 1}]}), LIMITS)
    assert (req.number, req.size) == (2, 128)


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[1]", b'{"number": 1, "number": 2}', b'{"number": NaN}',
    body({"number": True}), body({"number": 1.0}), body({"size": "256"}),
    body({"size": 260}), body({"number": 11}), body({"bogus": 1}),
    body({"additional_slave_SAE_IDs": ["site-c-gw"]}),   # max_SAE_ID_count is 0
    body({"additional_slave_SAE_IDs": "site-c-gw"}),
    body({"extension_mandatory": [{"abc_route_type": "direct"}]}),
    body({"extension_mandatory": [{}]}),
    body({"extension_mandatory": "x"}),
    body({"extension_optional": [1]}),
])
def test_enc_post_rejects(payload: bytes) -> None:
    with pytest.raises(EtsiError) as ei:
        etsi014.parse_enc_keys_post(payload, LIMITS)
    assert ei.value.status == 400
    assert ei.value.body()["message"]
    assert isinstance(ei.value.body()["details"], list)


def test_unsupported_mandatory_extension_is_named() -> None:
    with pytest.raises(EtsiError) as ei:
        etsi014.parse_enc_keys_post(body({"extension_mandatory": [{"abc_route": 1}]}), LIMITS)
    assert "abc_route" in json.dumps(ei.value.details)


def test_empty_mandatory_extension_list_is_fine() -> None:
    assert etsi014.parse_enc_keys_post(body({"extension_mandatory": []}), LIMITS).number == 1


# ----------------------------------------------------------------- dec_keys requests


def test_dec_get_and_post() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert etsi014.parse_dec_keys_get(q(key_ID=a.upper())) == [a]
    assert etsi014.parse_dec_keys_post(body({"key_IDs": [{"key_ID": a}, {"key_ID": b}]}),
                                       LIMITS) == [a, b]


@pytest.mark.parametrize("query", [{}, q(key_ID="nope"), {"key_ID": ["a", "b"]},
                                   q(key_ID="{" + "0" * 32 + "}"), q(key_ID=str(uuid.uuid4()),
                                                                     number="1")])
def test_dec_get_rejects(query: dict[str, list[str]]) -> None:
    with pytest.raises(EtsiError) as ei:
        etsi014.parse_dec_keys_get(query)
    assert ei.value.status == 400


def test_dec_post_rejects() -> None:
    a = str(uuid.uuid4())
    bad = [
        b"{", body({}), body({"key_IDs": []}), body({"key_IDs": [a]}),
        body({"key_IDs": [{"key_ID": a}, {"key_ID": a}]}),
        body({"key_IDs": [{"key_ID": a}, {"key_ID": a.upper()}]}),
        body({"key_IDs": [{"key_ID": "x"}]}),
        body({"key_IDs": [{"key_ID": a, "extra": 1}]}),
        body({"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(11)]}),
    ]
    for payload in bad:
        with pytest.raises(EtsiError):
            etsi014.parse_dec_keys_post(payload, LIMITS)


# -------------------------------------------------------------------- KME answers


def test_status_body_fields_and_cap() -> None:
    status = etsi014.build_status(source_kme_id="kme-a", target_kme_id="kme-b",
                                  master_sae_id="a", slave_sae_id="b", limits=LIMITS,
                                  stored_key_count=10_000)
    assert set(status) == set(etsi014.STATUS_FIELDS_STR) | set(etsi014.STATUS_FIELDS_INT)
    assert status["stored_key_count"] == LIMITS.max_key_count
    assert status["max_SAE_ID_count"] == 0
    assert etsi014.parse_status(status, "b") == status


def test_key_container_roundtrip() -> None:
    keys = [QkdKey(str(uuid.uuid4()), bytes(range(32))) for _ in range(3)]
    obj = json.loads(json.dumps(etsi014.build_key_container(keys)))
    assert etsi014.parse_enc_keys_answer(obj, 3, 256) == keys
    ids = [k.key_id for k in reversed(keys)]
    # dec_keys answers come back in the caller's order even if the KME reorders.
    assert etsi014.parse_dec_keys_answer(obj, ids, 256) == list(reversed(keys))


def test_qkdkey_repr_hides_key() -> None:
    key = QkdKey("id", b"\xaa" * 32)
    assert "aa" not in repr(key).lower() and "\\xaa" not in repr(key)
    assert "170" not in repr(key)


# ------------------------------------------------------------------ SAE validation


def _container(*items: tuple[str, object]) -> dict[str, object]:
    return {"keys": [{"key_ID": i, "key": k} for i, k in items]}


K = base64.b64encode(b"\x01" * 32).decode()


@pytest.mark.parametrize(("obj", "number"), [
    ([], 1),
    ({}, 1),
    ({"keys": {}}, 1),
    (_container((str(uuid.uuid4()), K)), 2),                       # too few
    (_container((str(uuid.uuid4()), K), (str(uuid.uuid4()), K)), 1),  # too many
    ({"keys": [1]}, 1),
    (_container(("not-a-uuid", K)), 1),
    (_container(("{" + str(uuid.uuid4()) + "}", K)), 1),
    (_container((str(uuid.uuid4()), "!!!!")), 1),                  # bad base64
    (_container((str(uuid.uuid4()), K + "\n")), 1),
    (_container((str(uuid.uuid4()), base64.b64encode(b"x" * 31).decode())), 1),  # short
    (_container((str(uuid.uuid4()), 5)), 1),
])
def test_enc_answer_rejects(obj: object, number: int) -> None:
    with pytest.raises(SchemaError):
        etsi014.parse_enc_keys_answer(obj, number, 256)


def test_enc_answer_rejects_duplicate_ids() -> None:
    kid = str(uuid.uuid4())
    with pytest.raises(SchemaError, match="twice"):
        etsi014.parse_enc_keys_answer(_container((kid, K), (kid.upper(), K)), 2, 256)


def test_dec_answer_rejects_other_ids() -> None:
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    with pytest.raises(SchemaError):
        etsi014.parse_dec_keys_answer(_container((a, K), (c, K)), [a, b])
    with pytest.raises(SchemaError):
        etsi014.parse_dec_keys_answer(_container((a, K)), [a, b])
    with pytest.raises(SchemaError):
        etsi014.parse_dec_keys_answer(_container((a, K), (a, K)), [a, a])


def test_errors_never_contain_key_material() -> None:
    secret = base64.b64encode(b"S3cr3tKeyBytes!!" * 2).decode()
    with pytest.raises(SchemaError) as ei:
        etsi014.parse_enc_keys_answer(_container((str(uuid.uuid4()), secret)), 1, 128)
    assert secret not in str(ei.value) and "S3cr3t" not in str(ei.value)


@pytest.mark.parametrize("status", [
    {"slave_SAE_ID": "b"},
    {**etsi014.build_status(source_kme_id="a", target_kme_id="b", master_sae_id="m",
                            slave_sae_id="other", limits=LIMITS, stored_key_count=1)},
])
def test_status_answer_rejects(status: dict[str, object]) -> None:
    with pytest.raises(SchemaError):
        etsi014.parse_status(status, "b")


def test_status_answer_rejects_bad_counts() -> None:
    good = etsi014.build_status(source_kme_id="a", target_kme_id="b", master_sae_id="m",
                                slave_sae_id="b", limits=LIMITS, stored_key_count=1)
    for name, value in [("stored_key_count", 101), ("key_size", -1), ("max_key_count", True),
                        ("min_key_size", 2048), ("source_KME_ID", 3)]:
        with pytest.raises(SchemaError):
            etsi014.parse_status({**good, name: value}, "b")


@given(st.binary(max_size=200))
def test_request_parsers_only_raise_etsi_errors(data: bytes) -> None:
    for parse in (etsi014.parse_enc_keys_post, etsi014.parse_dec_keys_post):
        try:
            parse(data, LIMITS)
        except EtsiError as exc:
            assert exc.status == 400


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                    lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.sampled_from(["keys", "key_ID", "key", "x"]), c,
                                      max_size=4), max_leaves=20))
def test_answer_parsers_only_raise_schema_errors(obj: object) -> None:
    for call in (lambda: etsi014.parse_enc_keys_answer(obj, 1, 256),
                 lambda: etsi014.parse_dec_keys_answer(obj, [str(uuid.uuid4())]),
                 lambda: etsi014.parse_status(obj, "b")):
        with contextlib.suppress(SchemaError):
            call()
