"""The API's OpenAPI schema in the tests, and answers checked against it."""

from __future__ import annotations

import copy
import json

import jsonschema
from django.test import Client

SCHEMA_URL = "/api/schema/?format=json"


def api_schema() -> dict:
    """The schema as /api/schema/ serves it."""
    response = Client().get(SCHEMA_URL)
    assert response.status_code == 200, response.content
    return json.loads(response.content)


def _as_json_schema(node):
    """OpenAPI 3.0's schema objects as JSON Schema: ``nullable: true`` becomes a "null" type."""
    if isinstance(node, list):
        return [_as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("nullable") and "enum" in node:
        out["enum"] = [*node["enum"], None]
    return out


def response_schema(schema: dict, path: str, method: str, status: int) -> dict:
    """The JSON Schema of one documented answer; fails when the status is not documented."""
    responses = schema["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not documented ({sorted(responses)})"
    body = responses[str(status)]["content"]["application/json"]["schema"]
    return {**_as_json_schema(copy.deepcopy(body)), "components": _as_json_schema(schema["components"])}


def assert_conforms(schema: dict, path: str, method: str, status: int, body) -> None:
    """``body`` (parsed JSON) is what the schema says ``method path`` answers with ``status``."""
    jsonschema.Draft4Validator(response_schema(schema, path, method, status)).validate(body)
