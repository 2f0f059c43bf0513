"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis, issue 13).

Every operation is called with generated parameters and bodies, as a navigator (the role that
reaches the most routes) and anonymously: no answer may be a 5xx, and every answer must match
its documented status codes, content type and schema. The example budget is small by default
(CI); raise it with ``AGGREGATOR_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aggregator.api.app import ApiConfig
from tests.api.conftest import Api, make_api

EXAMPLES = int(os.environ.get("AGGREGATOR_FUZZ_EXAMPLES", "8"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# schemathesis parametrizes at collection time, so the app under test is made then too
_TMP = tempfile.TemporaryDirectory(prefix="aggregator-fuzz-")
_API = make_api(Path(_TMP.name) / "home", None,
                ApiConfig(rate_per_second=100000, burst=100000, max_upload=1 << 20))
# checking an endpoint connects to the URL it was given: never fuzzed (no traffic off this machine)
schema = schemathesis.openapi.from_asgi("/openapi.json", _API.client.app).exclude(path="/endpoints/{name}/check")


@pytest.fixture(scope="module")
def fuzz_api() -> Iterator[Api]:
    with _API.client:
        _API.client.post("/cases", headers=_API.h("navigator"), json={"case": "c1", "checklist": "oncology"})
        yield _API
    _API.core.close()
    _TMP.cleanup()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_answers_match_the_schema(case: Any, fuzz_api: Api) -> None:
    case.call_and_validate(headers=fuzz_api.h("navigator"), checks=CHECKS)
    case.call_and_validate(checks=CHECKS)  # anonymous: 401 problems, documented too


def test_problem_answers_have_no_trace(fuzz_api: Api, tmp_path: Path) -> None:
    r = fuzz_api.client.post("/cases", headers=fuzz_api.h("navigator"), content=b"{not json",
                             )
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in r.text and "{not json" not in r.text
