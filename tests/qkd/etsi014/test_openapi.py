"""The running KME (a real `qkdgw kme` process over mutual TLS) against the shipped
OpenAPI description of ETSI GS QKD 014, with schemathesis-generated requests.

The default run is a few seconds (few examples per operation); `-m slow` runs many more.
Checks: every answer's status code is declared, its Content-Type is JSON, its body
matches the schema (Status, Key container, Error), and requests that violate the
schema are refused with a 4xx (never accepted, never a 5xx).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.kme_processes import KmeProcess, kme_toml  # noqa: E402

SPEC = resources.files("qkd.etsi014").joinpath("openapi.yaml")
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]



def _load_schema() -> schemathesis.schemas.BaseSchema:
    """The shipped spec with the SAE ID path parameters narrowed to the test topology
    (plus one unknown ID), so generated requests reach the handlers' success paths
    instead of all failing on an unknown SAE."""
    import yaml

    raw = yaml.safe_load(SPEC.read_text())
    for name in ("slave_SAE_ID", "master_SAE_ID"):
        raw["components"]["parameters"][name]["schema"] = {
            "type": "string", "enum": ["site-b-gw", "site-d-gw", "site-a-gw", "nobody"]}
    return schemathesis.openapi.from_dict(raw)


schema = _load_schema()


@pytest.fixture(scope="module")
def kme_url(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("openapi-kme")
    config = work / "kme-a.toml"
    config.write_text(kme_toml(pki, "a", work / "a.sqlite3", key_rate="inf"))
    proc = KmeProcess(config, work)
    try:
        yield proc.url
    finally:
        proc.stop()


def _call(case: schemathesis.Case, url: str, pki: Path) -> None:
    response = case.call(base_url=url, verify=str(pki / "tls-ca.crt"),
                         cert=(str(pki / "site-a" / "sae-client.crt"),
                               str(pki / "site-a" / "sae-client.key")), timeout=10)
    # 503 is the standard's "no key available"; the pool here is always full, so any
    # 5xx would be a bug and fails status_code_conformance only if undeclared.
    assert response.status_code < 500 or response.status_code == 503, response.text
    case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_kme_conforms_to_openapi(case: schemathesis.Case, kme_url: str, pki: Path) -> None:
    _call(case, kme_url, pki)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_kme_conforms_to_openapi_long(case: schemathesis.Case, kme_url: str,
                                      pki: Path) -> None:
    _call(case, kme_url, pki)


def test_spec_names_every_route_the_server_has() -> None:
    from types import SimpleNamespace

    from qkd.kme.service import build_app

    async def handler(_request: object) -> None:  # never called
        return None

    fake = SimpleNamespace(status=handler, enc_keys=handler, dec_keys=handler,
                           config=SimpleNamespace(peer=SimpleNamespace(sae_ids=())))
    # SKIP's routes (outside the ETSI prefix) are docs/kme.md's, not this spec's.
    served = {(r.method, r.resource.canonical) for r in build_app(fake).router.routes()
              if r.resource.canonical.startswith("/api/v1/keys/")}
    ops = {(method.upper(), path) for path, item in schema.raw_schema["paths"].items()
           for method in item}
    # The spec's path parameter names differ per route; aiohttp's are all {sae_id}.
    assert {(m, p.replace("{slave_SAE_ID}", "{sae_id}").replace("{master_SAE_ID}",
                                                              "{sae_id}"))
            for m, p in ops} == served
    assert len(ops) == 5
