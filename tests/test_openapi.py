"""The OpenAPI schema (/api/schema/) and its reference page (/api/docs/): valid, complete, local, true."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.validation import validate_schema

from embeddings import schema as embeddings_schema
from embeddings.runtime.state import runtime
from tests.conftest import gradient_image, image_bytes, multipart_body, photo_bytes
from tests.openapi import SCHEMA_URL, api_schema, assert_conforms

API_PATHS = {
    "/syte_test/embeddings",
    "/syte_test/clip",
    "/syte_test/wearable",
    "/syte_test/feedback",
    "/v1/embeddings",
    "/v1/models",
    "/v1/models/{model_id}",
    "/healthz",
    "/readyz",
}
GETS = {"/healthz", "/readyz", "/v1/models", "/v1/models/{model_id}"}
POSTS = API_PATHS - GETS


@pytest.fixture(scope="module")
def schema() -> dict:
    return api_schema()


def test_schema_is_valid_openapi_3(schema):
    assert schema["openapi"].startswith("3.")
    validate_schema(schema)


def test_schema_generates_without_a_warning(tmp_path):
    # --fail-on-warn: a view drf-spectacular cannot describe (an unknown authenticator, a serializer it
    # has to guess) fails here instead of leaving a vague part in the schema.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert (tmp_path / "schema.yaml").read_text().startswith("openapi: 3.")


def test_schema_is_served_as_yaml_by_default_and_as_json_on_request(client):
    assert client.get("/api/schema/")["Content-Type"].startswith("application/vnd.oai.openapi")
    response = client.get("/api/schema/", headers={"Accept": "application/json"})
    assert response["Content-Type"].startswith("application/json") and json.loads(response.content)["paths"]


def test_every_api_path_is_in_the_schema(schema):
    assert set(schema["paths"]) == API_PATHS
    for path in POSTS:
        assert set(schema["paths"][path]) == {"post"}, path
    for path in GETS:
        assert set(schema["paths"][path]) == {"get"}, path


def _routes(patterns, prefix=""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.callback


def test_every_drf_view_routed_is_described(schema):
    """A DRF view added to the URLs is in the schema (its trailing-slash alias is the same operation)."""
    documented = {p.rstrip("/") for p in schema["paths"]}
    for route, callback in _routes(get_resolver().url_patterns):
        view = getattr(callback, "cls", None)
        if view is None or view.__module__.startswith("drf_spectacular"):
            continue
        route = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)  # Django's <path:model_id> is OpenAPI's {model_id}
        assert "/" + route.rstrip("/") in documented, f"/{route} ({view.__name__}) is not in the schema"


def test_error_codes_are_those_of_the_error_table(schema):
    documented = set(schema["components"]["schemas"]["ErrorCodeEnum"]["enum"])
    assert documented == set(embeddings_schema.error_table())
    assert {"invalid_image", "no_image", "unknown_request_id", "throttled", "internal_error"} <= documented
    assert "too_large" not in documented  # a base class's, never answered
    description = schema["info"]["description"]
    assert all(f"`{code}`" in description for code in documented)


def test_each_operation_documents_its_errors(schema):
    def codes(path, status):
        return schema["paths"][path]["post"]["responses"][str(status)]["description"]

    assert "`invalid_image`" in codes("/syte_test/embeddings", 400) and "`no_image`" not in codes(
        "/syte_test/embeddings", 400
    )
    assert "`too_many_images`" in codes("/syte_test/wearable", 400)
    assert "`no_categories`" in codes("/syte_test/wearable", 503)
    assert "`unknown_request_id`" in codes("/syte_test/feedback", 404)
    assert "`model_not_found`" in codes("/v1/embeddings", 404) and "`dimensions_unsupported`" in codes(
        "/v1/embeddings", 400
    )
    assert "404" not in schema["paths"]["/syte_test/embeddings"]["post"]["responses"]  # no model_not_found there
    for path in POSTS:
        responses = schema["paths"][path]["post"]["responses"]
        assert {"400", "405", "413", "415", "500"} <= set(responses), path
    for path in API_PATHS - {"/healthz", "/readyz"}:
        (method,) = schema["paths"][path]
        for status, response in schema["paths"][path][method]["responses"].items():
            if status.startswith(("4", "5")):
                ref = response["content"]["application/json"]["schema"]["$ref"]
                shape = "OpenAiError" if path.startswith("/v1/") else "Error"
                assert ref == f"#/components/schemas/{shape}", (path, status)


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def docs_assets(client) -> tuple[str, list[str]]:
    """The docs page, and the URLs of what it loads (src and href)."""
    response = client.get("/api/docs/")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    parser = _Assets()
    parser.feed(html)
    return html, parser.urls


def test_docs_page_loads_every_asset_from_this_server(client, settings):
    html, urls = docs_assets(client)
    assert len(urls) >= 4, urls  # icon, stylesheet, two scripts
    for url in urls:
        assert not re.search(r"cdn|jsdelivr|unpkg|googleapis|https?:|^//", url), url
        assert url.startswith("/" + settings.STATIC_URL.lstrip("/")), url
    assert "https://" not in html and "http://" not in html  # not in the inline script either
    assert SCHEMA_URL.split("?")[0] in html  # the UI reads this server's schema


def test_docs_page_assets_are_served(client, settings):
    _, urls = docs_assets(client)
    static_prefix = "/" + settings.STATIC_URL.lstrip("/")
    # The tests run with DEBUG off and no collectstatic: let whitenoise serve from the finders, as
    # it serves from STATIC_ROOT after collectstatic (scripts/start.sh, the Dockerfile).
    settings.WHITENOISE_USE_FINDERS = True
    fresh = Client()  # its middleware reads the setting above
    for url in urls:
        assert finders.find(url.removeprefix(static_prefix)), url
        served = fresh.get(url)
        assert served.status_code == 200, url
        assert b"".join(served.streaming_content if served.streaming else [served.content])


def test_short_api_reference_stays_and_links_to_the_schema(client, clip):
    response = client.get("/api")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'href="/api/schema/"' in html and 'href="/api/docs/"' in html


# --- Answers are what the schema says ------------------------------------------------------------------
def post_parts(client, path: str, parts: list[tuple], query: str = ""):
    body, content_type = multipart_body(parts)
    return client.generic("POST", path + query, body, content_type=content_type, headers={"request_id": "r-1"})


def check(schema, response, path: str, method: str = "POST") -> dict:
    body = json.loads(response.content)
    assert_conforms(schema, path, method, response.status_code, body)
    return body


def test_embeddings_answers_match_the_schema(client, clip, schema):
    photo = ("image-1", photo_bytes("chelsea.jpg"), "chelsea.jpg")
    text = ("text-1", "a photo of a cat", None)
    both = check(schema, post_parts(client, "/syte_test/embeddings", [photo, text]), "/syte_test/embeddings")
    assert both["request_id"] == "r-1" and "similarity_matrix" in both
    assert all(isinstance(x, float) for x in both["texts_vectors"][0])
    texts = check(schema, post_parts(client, "/syte_test/clip", [text]), "/syte_test/clip")
    assert "similarity_matrix" not in texts and texts["images_vectors"] == []
    encoded = check(
        schema,
        post_parts(client, "/syte_test/embeddings", [photo, text], "?encoding=base64&normalize=false"),
        "/syte_test/embeddings",
    )
    assert isinstance(encoded["texts_vectors"][0], str) and isinstance(encoded["vectors"]["image-1"], str)


def test_error_answers_match_the_schema(client, clip, schema):
    empty = check(schema, post_parts(client, "/syte_test/embeddings", []), "/syte_test/embeddings")
    assert empty["error"]["code"] == "empty_request" and empty["request_id"] == "r-1"
    bad = check(
        schema, post_parts(client, "/syte_test/embeddings", [("x", b"not an image", "x.png")]), "/syte_test/embeddings"
    )
    assert bad["error"] == {"code": "invalid_image", "message": bad["error"]["message"], "key": "x"}
    wrong_type = client.post("/syte_test/embeddings", data="{}", content_type="application/json")
    assert check(schema, wrong_type, "/syte_test/embeddings")["error"]["code"] == "unsupported_media_type"
    bad_option = post_parts(client, "/syte_test/embeddings", [("t", "hi", None)], "?normalize=maybe")
    assert check(schema, bad_option, "/syte_test/embeddings")["error"]["key"] == "normalize"


@pytest.mark.django_db
def test_wearable_and_feedback_answers_match_the_schema(client, clip, schema):
    png = image_bytes(gradient_image(64, 48))
    answer = check(schema, post_parts(client, "/syte_test/wearable", [("image", png, "a.png")]), "/syte_test/wearable")
    assert answer["request_id"] == "r-1" and len(answer["scores"]) == len(answer["top_categories"])
    two = post_parts(client, "/syte_test/wearable", [("a", png, "a.png"), ("b", png, "b.png")], "?top_k=1")
    assert check(schema, two, "/syte_test/wearable")["error"]["code"] == "too_many_images"
    feedback = client.post(
        "/syte_test/feedback",
        data={"request_id": "r-1", "categories": [answer["top_categories"][0]]},
        content_type="application/json",
    )
    assert check(schema, feedback, "/syte_test/feedback")["answer_was_wrong"] is False
    unknown = client.post(
        "/syte_test/feedback", data={"request_id": "nope", "categories": []}, content_type="application/json"
    )
    assert check(schema, unknown, "/syte_test/feedback")["error"]["code"] == "unknown_request_id"


def test_health_answers_match_the_schema(client, clip, schema, monkeypatch):
    check(schema, client.get("/healthz"), "/healthz", "GET")
    ready = check(schema, client.get("/readyz"), "/readyz", "GET")
    assert ready["ready"] is True
    monkeypatch.setattr(runtime, "_engine", None)
    monkeypatch.setattr(runtime, "status", "loading")
    response = client.get("/readyz")
    assert response.status_code == 503
    check(schema, response, "/readyz", "GET")
