"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis) against a real uvicorn server."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.service.conftest import serve

pytest_plugins = ["tests.service.conftest"]


@pytest.fixture(scope="module")
def live_url(model_repository):
    with serve(model_repository, max_batch_size=8, max_queue_delay_ms=20) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(live_url):
    return schemathesis.openapi.from_url(f"{live_url}/openapi.json")


def test_no_server_error_for_any_generated_request(api_schema, live_url):
    """Every operation the app declares: generated requests never get a 5xx and never crash the server."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert operations, "the OpenAPI schema declares no operations"
    for operation in operations:
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def run(case):
            case.call_and_validate(base_url=live_url, checks=[not_a_server_error, response_schema_conformance])

        run()
