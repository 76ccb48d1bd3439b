"""schemathesis against the real server (scripts/start.sh -> gunicorn): every operation of /api/schema/,
with requests generated from the schema itself, answers without a 5xx and as the schema says."""

from __future__ import annotations

import re
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server import serving

pytestmark = pytest.mark.server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with serving(tmp_path_factory.mktemp("schemathesis"), tiny_model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/api/schema/?format=json", timeout=30)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=50,  # per operation, in the fuzzing phase (the examples and coverage phases add theirs)
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_its_schema_says(case, server):
    case.call_and_validate(checks=CHECKS, timeout=30)


def test_docs_page_assets_are_served_by_the_server(server):
    with urllib.request.urlopen(server.url + "/api/docs/", timeout=10) as response:
        html = response.read().decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 4 and all(a.startswith("/static/") for a in assets), assets
    for asset in assets:
        with urllib.request.urlopen(server.url + asset, timeout=10) as response:
            assert response.status == 200 and response.read(), asset
