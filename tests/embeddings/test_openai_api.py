"""The OpenAI-compatible API (/v1/embeddings, /v1/models): OpenAI's shapes, this server's vectors,
limits, errors, keys and metrics."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from access.services import api_key_create
from embeddings import metrics
from tests.conftest import assert_same_vectors, multipart_body, override, photo_bytes

URL = "/v1/embeddings"


def data_url(data: bytes, media: str = "image/jpeg") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def create(client, body, **headers):
    return client.post(URL, data=body, content_type="application/json", headers=headers)


def multipart_vectors(client, parts: list[tuple]) -> dict[str, np.ndarray]:
    body, content_type = multipart_body(parts)
    answer = client.generic("POST", "/syte_test/embeddings", body, content_type=content_type).json()
    return {key: np.array(vector, np.float32) for key, vector in answer["vectors"].items()}


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["request_id"]
    return body["error"]


def test_a_text_gets_the_embeddings_endpoints_vector_in_openai_shape(client, clip):
    answer = create(client, {"model": clip.name, "input": "a photo of a cat"})
    assert answer.status_code == 200 and answer["request_id"]
    body = answer.json()
    assert body["object"] == "list" and body["model"] == clip.name
    ((item),) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0 and len(item["embedding"]) == clip.dim
    want = multipart_vectors(client, [("t", "a photo of a cat", None)])["t"]
    assert_same_vectors(np.array([item["embedding"]], np.float32), want[None])
    assert abs(np.linalg.norm(item["embedding"]) - 1) < 1e-5  # unit length, as OpenAI's are
    tokens = len(clip.preprocessing.tokenize(["a photo of a cat"])[0].ids)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_images_and_texts_mixed_in_one_list_are_answered_in_order(client, clip):
    cat, rocket = photo_bytes("chelsea.jpg"), photo_bytes("rocket.jpg")
    inputs = ["a cat", data_url(cat), data_url(rocket, "image/JPEG"), "a rocket"]
    body = create(client, {"model": clip.name, "input": inputs}).json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    want = multipart_vectors(
        client, [("a", "a cat", None), ("b", cat, "b.jpg"), ("c", rocket, "c.jpg"), ("d", "a rocket", None)]
    )
    assert_same_vectors(got, np.stack([want[k] for k in "abcd"]))
    tokens = sum(len(t.ids) for t in clip.preprocessing.tokenize(["a cat", "a rocket"]))
    assert body["usage"]["prompt_tokens"] == tokens  # images count no tokens


def test_base64_encoding_is_little_endian_float32_of_the_same_vector(client, clip):
    inputs = ["a dog", data_url(photo_bytes("chelsea.jpg"))]
    floats = create(client, {"input": inputs}).json()["data"]  # model left out: the served one
    encoded = create(client, {"input": inputs, "encoding_format": "base64"}).json()["data"]
    for f, e in zip(floats, encoded, strict=True):
        decoded = np.frombuffer(base64.b64decode(e["embedding"]), "<f4")
        assert_same_vectors(decoded[None], np.array([f["embedding"]], np.float32))


def test_dimensions_other_than_the_models_is_a_clear_400(client, clip):
    ok = create(client, {"input": "a cat", "dimensions": clip.dim})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == clip.dim
    error = openai_error(create(client, {"input": "a cat", "dimensions": 8}), 400)
    assert error["code"] == "dimensions_unsupported" and error["param"] == "dimensions"
    assert error["type"] == "invalid_request_error" and f"{clip.dim} dimensions" in error["message"]


def test_another_model_is_404_model_not_found_naming_the_served_one(client, clip):
    error = openai_error(create(client, {"model": "text-embedding-3-small", "input": "a cat"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and clip.name in error["message"]
    assert error["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"input": []}, 400, "empty_request", None),
        ({"encoding_format": "float"}, 400, "empty_request", None),
        ({"input": [[101, 2023, 102]]}, 400, "invalid_parameter", "input[0]"),
        ({"input": ["ok", 7]}, 400, "invalid_parameter", "input[1]"),
        ({"input": {"text": "a"}}, 400, "invalid_parameter", "input"),
        ({"input": "a", "encoding_format": "int8"}, 400, "invalid_parameter", "encoding_format"),
        ({"input": "a", "temperature": 1}, 400, "invalid_parameter", "temperature"),
        ({"input": ["data:image/png;base64,***"]}, 400, "invalid_image", "input[0]"),
        ({"input": ["data:image/png,rawbytes"]}, 400, "invalid_image", "input[0]"),
        (
            {"input": ["data:image/png;base64," + base64.b64encode(b"not a png").decode()]},
            400,
            "invalid_image",
            "input[0]",
        ),
        ({"input": [""]}, 400, "empty_text", "input[0]"),
        (["a", "b"], 400, "malformed_request", None),
    ],
)
def test_bad_bodies_get_the_apis_codes_in_openai_shape(client, clip, body, status, code, param):
    error = openai_error(create(client, body), status)
    assert (error["code"], error["param"]) == (code, param), error


def test_not_json_is_malformed_request_and_another_media_type_is_415(client, clip):
    assert openai_error(client.post(URL, data="{nope", content_type="application/json"), 400)["code"] == (
        "malformed_request"
    )
    body, content_type = multipart_body([("t", "a cat", None)])
    wrong = client.generic("POST", URL, body, content_type=content_type)
    assert openai_error(wrong, 415)["code"] == "unsupported_media_type"


def test_the_apis_limits_hold_before_any_image_is_decoded(client, clip, settings):
    override(settings, limits={"max_parts": 3})
    assert openai_error(create(client, {"input": ["a"] * 4}), 413)["code"] == "too_many_parts"
    override(settings, limits={"max_file_bytes": 1000})
    big = data_url(b"\xff" * 4000, "image/png")  # refused from its length: never decoded
    error = openai_error(create(client, {"input": ["a", big]}), 413)
    assert (error["code"], error["param"]) == ("file_too_large", "input[1]")
    override(settings, limits={"max_text_chars": 10})
    assert openai_error(create(client, {"input": "x" * 11}), 400)["code"] == "text_too_long"


def test_models_lists_and_retrieves_the_served_model(client, clip):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [clip.name]
    assert listed["data"][0]["object"] == "model"
    one = client.get(f"/v1/models/{clip.name}")
    assert one.status_code == 200 and one.json()["id"] == clip.name
    assert openai_error(client.get("/v1/models/gpt-4o"), 404)["code"] == "model_not_found"
    assert openai_error(client.post("/v1/models"), 405)["code"] == "method_not_allowed"


def test_an_unknown_v1_path_is_404_in_openai_shape(client, clip):
    assert openai_error(client.post("/v1/chat/completions", data={}), 404)["code"] == "not_found"


@pytest.mark.django_db
def test_keys_are_those_of_the_api_and_an_sdks_placeholder_passes_where_none_is_required(client, clip, settings):
    assert create(client, {"input": "a cat"}, Authorization="Bearer sk-placeholder").status_code == 200
    override(settings, access={"require_api_key": True})
    error = openai_error(create(client, {"input": "a cat"}), 401)
    assert error["code"] == "not_authenticated" and error["type"] == "authentication_error"
    assert openai_error(create(client, {"input": "a"}, Authorization="Bearer sk-placeholder"), 401)["code"] == (
        "not_authenticated"
    )
    _, raw = api_key_create(name="openai-sdk")
    assert create(client, {"input": "a cat"}, Authorization=f"Bearer {raw}").status_code == 200
    assert client.get("/v1/models").status_code == 401


@pytest.mark.django_db
def test_the_rate_limit_and_the_metrics_cover_v1(client, clip, settings):
    from django.core.cache import caches

    caches["throttle"].clear()
    before = metrics.REQUESTS.labels(URL, "200")._value.get()
    override(settings, access={"rate_limit": "2/min"})
    statuses = [create(client, {"input": "a cat"}).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    throttled = create(client, {"input": "a cat"})
    assert openai_error(throttled, 429)["type"] == "rate_limit_error" and int(throttled["Retry-After"]) >= 1
    assert metrics.REQUESTS.labels(URL, "200")._value.get() == before + 2


def test_bodies_that_would_cost_far_more_than_their_size_are_refused_before_parsing(client, clip):
    deep = b"[" * 5000 + b"]" * 5000  # the stdlib's parser would recurse into a RecursionError
    assert openai_error(client.post(URL, data=deep, content_type="application/json"), 400)["code"] == (
        "malformed_request"
    )
    surrogate = b'{"input": "\\ud800"}'  # valid JSON, no valid UTF-8 text
    assert openai_error(client.post(URL, data=surrogate, content_type="application/json"), 400)["code"] == (
        "malformed_request"
    )
    tiny = b'{"input": [' + b",".join([b"[]"] * 1_000_000) + b"]}"  # 3 MB, some 60 MB once parsed
    error = openai_error(client.post(URL, data=tiny, content_type="application/json"), 413)
    assert error["code"] == "too_many_parts"


@pytest.mark.django_db
def test_a_database_that_does_not_answer_never_fails_v1(client, clip, settings, monkeypatch):
    from django.db import OperationalError

    import access.authentication as authentication

    def down(**kwargs):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(authentication, "api_key_check", down)
    # No key required: an SDK's placeholder costs no query, and even a key of ours is served keyless.
    assert create(client, {"input": "a cat"}, Authorization="Bearer sk-placeholder").status_code == 200
    assert create(client, {"input": "a cat"}, Authorization="Bearer clip_abc").status_code == 200
    override(settings, access={"require_api_key": True})
    error = openai_error(create(client, {"input": "a cat"}, Authorization="Bearer clip_abc"), 503)
    assert error["code"] == "database_unavailable" and error["type"] == "server_error"
