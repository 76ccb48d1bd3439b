"""The embeddings API over Django's test client: shapes, options and every error code."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from embeddings.runtime.state import runtime
from embeddings.services import l2_normalize
from tests.conftest import assert_same_vectors, gradient_image, image_bytes, multipart_body, override, photo_bytes

URL = "/syte_test/embeddings"


def upload(data: bytes, name: str = "photo.jpg"):
    f = io.BytesIO(data)
    f.name = name
    return f


def post(client, parts: dict, path: str = URL, **extra):
    return client.post(path, data=parts, **extra)


def post_raw(client, parts: list[tuple], path: str = URL, **extra):
    body, content_type = multipart_body(parts)
    return client.generic("POST", path, body, content_type=content_type, **extra)


@pytest.fixture
def jpeg() -> bytes:
    return photo_bytes("chelsea.jpg")


def test_original_example_returns_both_vectors_and_their_similarity(client, clip, jpeg):
    response = post(
        client,
        {"image-1": upload(jpeg, "cat.jpg"), "text-1": "a photo of a cat sitting on a couch"},
        headers={"request_id": "1"},
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["request_id"] == "1"
    assert response["request_id"] == "1"
    assert body["model"] == clip.name
    assert body["dim"] == clip.dim == len(body["texts_vectors"][0]) == len(body["images_vectors"][0])
    assert body["texts_keys"] == ["text-1"] and body["images_keys"] == ["image-1"]
    assert body["vectors"]["text-1"] == body["texts_vectors"][0]
    assert body["vectors"]["image-1"] == body["images_vectors"][0]
    image, text = np.array(body["images_vectors"][0]), np.array(body["texts_vectors"][0])
    assert np.linalg.norm(image) == pytest.approx(1.0, abs=1e-5)
    expected = round(float(100 * image @ text), 2)
    assert body["similarities"] == [{"image": "image-1", "text": "text-1", "score": pytest.approx(expected, abs=0.011)}]
    assert body["similarity_matrix"] == [[body["similarities"][0]["score"]]]
    assert body["truncated"] == []


def test_clip_path_and_doubled_slash_reach_the_same_view(client, clip):
    # The test client parses "//x" as a host; the raw path goes in the WSGI environ (gunicorn: test_server).
    for path in ("/syte_test/clip", "//syte_test/embeddings", "//syte_test/clip"):
        response = post(client, {"text-1": "hello"}, PATH_INFO=path)
        assert response.status_code == 200, (path, response.content)
        assert response.json()["texts_keys"] == ["text-1"]


def test_vectors_follow_the_order_and_keys_sent(client, clip):
    img_a, img_b = image_bytes(gradient_image(seed=1)), image_bytes(gradient_image(200, 300, seed=2))
    parts = [
        ("zeta", "first text", None),
        ("pic_b", img_b, "b.png"),
        ("alpha", "second text", None),
        ("pic_a", img_a, "a.png"),
    ]
    response = post_raw(client, parts)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["texts_keys"] == ["zeta", "alpha"]
    assert body["images_keys"] == ["pic_b", "pic_a"]
    assert list(body["vectors"]) == ["zeta", "pic_b", "alpha", "pic_a"]
    assert body["similarities"] == []  # no key pairs image-X / text-X
    assert np.array(body["similarity_matrix"]).shape == (2, 2)
    assert_same_vectors(body["texts_vectors"], l2_normalize(clip.embed_texts(["first text", "second text"])))


def test_only_texts_leaves_images_empty_and_no_matrix(client, clip):
    body = post(client, {"text-1": "a dog", "text-2": "a cat"}).json()
    assert body["images_vectors"] == [] and body["images_keys"] == []
    assert "similarity_matrix" not in body
    assert body["similarities"] == []


def test_pairs_are_matched_by_suffix(client, clip):
    img = image_bytes(gradient_image())
    parts = [
        ("image_7", img, "x.png"),
        ("text_7", "seven", None),
        ("image-1", img, "y.png"),
        ("text-1", "one", None),
        ("text-9", "nine", None),
    ]
    body = post_raw(client, parts).json()
    assert [(s["image"], s["text"]) for s in body["similarities"]] == [("image_7", "text_7"), ("image-1", "text-1")]


def test_normalize_false_returns_raw_projections(client, clip):
    body = post(client, {"t": "a red car"}, path=URL + "?normalize=false").json()
    assert_same_vectors(body["texts_vectors"][0], clip.embed_texts(["a red car"])[0])
    assert body["normalized"] is False


def test_base64_encoding_is_little_endian_float32(client, clip):
    plain = post(client, {"t": "a red car"}).json()
    packed = post(client, {"t": "a red car"}, path=URL + "?encoding=base64").json()
    decoded = np.frombuffer(base64.b64decode(packed["vectors"]["t"]), dtype="<f4")
    assert_same_vectors(decoded, plain["vectors"]["t"])  # two requests: two forward passes
    assert len(packed["vectors"]["t"]) < 0.6 * len(json.dumps(plain["vectors"]["t"], separators=(",", ":")))


@pytest.mark.parametrize("query", ["normalize=maybe", "encoding=hex"])
def test_bad_query_parameter_is_400(client, clip, query):
    response = post(client, {"t": "x"}, path=f"{URL}?{query}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parameter"


def test_long_text_is_truncated_and_reported(client, clip):
    text = " ".join(["supercalifragilistic"] * 30)  # 30 words, far more than 77 tokens
    body = post(client, {"long": text, "short": "hi"}).json()
    assert body["truncated"] == ["long"]


def test_request_id_variants(client, clip):
    for header in ("Request-Id", "X-Request-ID"):
        response = post(client, {"t": "x"}, headers={header: "abc-42"})
        assert response.json()["request_id"] == "abc-42" and response["request_id"] == "abc-42"
    generated = post(client, {"t": "x"}).json()["request_id"]
    assert len(generated) == 36 and generated.count("-") == 4
    for bad in ("x" * 129, "caf\u00e9", "a\tb"):
        response = post(client, {"t": "x"}, headers={"X-Request-ID": bad})
        assert response.json()["request_id"] != bad and len(response.json()["request_id"]) == 36


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"request_id", "error"}
    assert response["request_id"] == body["request_id"]
    return body["error"]


def test_empty_request_is_400(client, clip):
    assert error_of(post_raw(client, []), 400)["code"] == "empty_request"


def test_empty_text_is_400(client, clip):
    error = error_of(post(client, {"blank": "   "}), 400)
    assert error["code"] == "empty_text" and error["key"] == "blank"


def test_invalid_utf8_text_is_400(client, clip):
    error = error_of(post_raw(client, [("bad", b"caf\xe9 \xff", None)]), 400)
    assert error["code"] == "invalid_text" and error["key"] == "bad"


def test_text_over_word_limit_is_400(client, clip, settings):
    override(settings, limits={"max_text_words": 5})
    error = error_of(post(client, {"t": "one two three four five six"}), 400)
    assert error["code"] == "text_too_long" and error["key"] == "t"
    assert post(client, {"t": "one two three four five"}).status_code == 200


def test_not_an_image_is_400(client, clip):
    error = error_of(post(client, {"img": upload(b"this is just text", "fake.jpg")}), 400)
    assert error["code"] == "invalid_image" and error["key"] == "img"


def test_unsupported_image_format_is_415(client, clip):
    ico = image_bytes(gradient_image(32, 32), "ICO")
    error = error_of(post(client, {"icon": upload(ico, "x.ico")}), 415)
    assert error["code"] == "unsupported_image"


def test_duplicate_key_is_400(client, clip):
    error = error_of(post_raw(client, [("k", "one", None), ("k", "two", None)]), 400)
    assert error["code"] == "duplicate_key" and error["key"] == "k"


def test_not_multipart_is_415(client, clip):
    error = error_of(client.post(URL, data={"t": "x"}, content_type="application/json"), 415)
    assert error["code"] == "unsupported_media_type"


def test_malformed_multipart_is_400(client, clip):
    # The original spec's body: delimiters without the leading "--".
    body = b'boundary\r\nContent-Disposition: form-data; name="text-1"\r\n\r\nhello\r\nboundary--\r\n'
    response = client.generic("POST", URL, body, content_type="multipart/form-data; boundary=boundary")
    assert error_of(response, 400)["code"] == "malformed_multipart"


def test_wrong_method_is_405_in_the_api_shape(client, clip):
    response = client.get(URL, headers={"Accept": "application/json"})
    assert error_of(response, 405)["code"] == "method_not_allowed"
    response = client.put(URL, headers={"Accept": "application/json"})
    assert error_of(response, 405)["code"] == "method_not_allowed"


def test_unknown_api_path_is_404_in_the_api_shape(client):
    assert error_of(client.get("/syte_test/nothing-here"), 404)["code"] == "not_found"


def test_not_ready_is_503(client, tiny_model_dir):
    runtime.close()
    try:
        response = post(client, {"t": "x"})
        assert error_of(response, 503)["code"] == "not_ready"
        assert response["Retry-After"]
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
    finally:
        runtime.close()


def test_readyz_answers_anyone_in_short_without_the_database(client, clip):
    # No database in this test (no django_db): a query would fail the probe, a key presented included.
    for headers in ({}, {"Authorization": "Bearer clip_not-looked-up"}):
        response = client.get("/readyz", headers=headers)
        body = response.json()
        assert response.status_code == 200 and set(body) <= {"status", "ready", "database", "workers", "model"}
        assert (body["status"], body["ready"], body["model"]) == ("ready", True, clip.served_name)
    assert "random" in body["model"]  # the test model says what it is


@pytest.mark.django_db
def test_readyz_details_need_an_api_key_or_a_staff_login(client, admin_client, django_user_model, clip):
    from access.services import api_key_create

    refused = [client.get("/readyz?verbose=1")]
    refused.append(client.get("/readyz?verbose=1", headers={"Authorization": "Bearer clip_unknown"}))
    client.force_login(django_user_model.objects.create_user("not-staff", password="x"))
    refused.append(client.get("/readyz?verbose=1"))
    for response in refused:
        assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    _, key = api_key_create(name="ops")
    keyed = client.get("/readyz?verbose=true", headers={"Authorization": f"Bearer {key}"})
    staff = admin_client.get("/readyz?verbose=1")
    for response in (keyed, staff):
        body = response.json()
        assert response.status_code == 200 and body["model"] == clip.served_name and body["source"] == clip.name
        assert body["test_model"] is True and body["backend"] and body["measured"] and body["cpu"]
        assert body["ready_seconds"] >= 0 and body["faithful"] is True
    assert set(admin_client.get("/readyz?verbose=0").json()) <= {"status", "ready", "database", "workers", "model"}


@pytest.mark.django_db
def test_readyz_details_say_why_loading_failed(admin_client, client, clip, monkeypatch):
    monkeypatch.setattr(runtime, "_engine", None)
    monkeypatch.setattr(runtime, "status", "failed")
    monkeypatch.setattr(runtime, "error", "cannot load /models/secret-path")
    response = admin_client.get("/readyz?verbose=1")
    assert response.status_code == 503 and response.json()["error"] == "cannot load /models/secret-path"
    assert "error" not in client.get("/readyz").json()


# --- limits ------------------------------------------------------------------------------------
def test_file_over_byte_limit_is_413(client, clip, settings):
    override(settings, limits={"max_file_bytes": 1000})
    error = error_of(post(client, {"big": upload(b"\xff" * 2000, "big.jpg")}), 413)
    assert error["code"] == "file_too_large" and error["key"] == "big"


def test_request_over_byte_limit_is_413_before_reading(client, clip, settings):
    override(settings, limits={"max_request_bytes": 5000})
    override(settings, limits={"max_file_bytes": 10_000})
    error = error_of(post(client, {"big": upload(b"\xff" * 6000, "big.jpg")}), 413)
    assert error["code"] == "request_too_large"


def test_image_over_pixel_limit_is_413(client, clip, settings):
    override(settings, limits={"max_image_pixels": 100 * 100})
    error = error_of(post(client, {"px": upload(image_bytes(gradient_image(200, 200)), "px.png")}), 413)
    assert error["code"] == "image_too_large" and error["key"] == "px"


def test_too_many_parts_is_413(client, clip, settings):
    override(settings, limits={"max_parts": 3})
    error = error_of(post(client, {f"t{i}": "x" for i in range(4)}), 413)
    assert error["code"] == "too_many_parts"


def test_key_over_character_limit_is_413(client, clip, settings):
    override(settings, limits={"max_key_chars": 10})
    error = error_of(post(client, {"k" * 11: "x"}), 413)
    assert error["code"] == "key_too_long"


def test_empty_image_file_input_is_ignored_like_an_unfilled_form_field(client, clip):
    body = post_raw(client, [("t", "x", None), ("file", b"", "")]).json()
    assert body["texts_keys"] == ["t"] and body["images_keys"] == []


def test_rgba_png_and_greyscale_are_accepted(client, clip):
    rgba = gradient_image(mode="RGBA")
    grey = gradient_image(mode="L")
    parts = [("rgba", image_bytes(rgba), "a.png"), ("grey", image_bytes(grey, "JPEG"), "g.jpg")]
    body = post_raw(client, parts).json()
    assert body["images_keys"] == ["rgba", "grey"]


def test_no_internal_text_leaks_from_a_failing_model(client, clip, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(clip, "embed", boom)
    response = post(client, {"t": "x"})
    error = error_of(response, 500)
    assert error["code"] == "internal_error" and "secret" not in response.content.decode()


def test_image_bytes_are_never_a_text(client, clip):
    img = Image.new("RGB", (10, 10))
    # A file part is an image whatever its name; a part without filename is a text, even if binary.
    response = post_raw(client, [("x", image_bytes(img), None)])
    assert error_of(response, 400)["code"] == "invalid_text"


def test_part_without_a_name_is_400(client, clip):
    body = b'--b\r\nContent-Disposition: form-data; filename="x.jpg"\r\n\r\nabc\r\n--b--\r\n'
    response = client.generic("POST", URL, body, content_type="multipart/form-data; boundary=b")
    assert error_of(response, 400)["code"] == "invalid_key"


def test_multipart_without_boundary_is_400(client, clip):
    response = client.generic("POST", URL, b"abc", content_type="multipart/form-data")
    assert error_of(response, 400)["code"] == "malformed_multipart"


def test_float_vectors_are_exact_float32_in_their_shortest_form(client, clip, monkeypatch):
    """The JSON parses back to exactly the float32 array the service computed, in the same call."""
    computed = []
    embed = clip.embed

    def keep(**kwargs):
        out = embed(**kwargs)
        computed.append(out.texts.copy())
        return out

    monkeypatch.setattr(clip, "embed", keep)
    response = post(client, {"t": "a red car"})
    want = l2_normalize(computed[0])[0]
    got = np.array(response.json()["vectors"]["t"], dtype=np.float32)
    assert np.array_equal(got, want)  # bit for bit after the round trip
    first = response.content.split(b"[", 2)[2].split(b",")[0]
    assert len(first.lstrip(b"-").rstrip(b"]")) <= 14  # no 17-digit double expansions


def test_the_renderer_writes_each_float32_exactly_and_shortest():
    from embeddings.renderers import FastJSONRenderer

    values = np.array([0.1, -1 / 3, 1e-8, 123456.79, np.float32(0.088972285), 2**-126], dtype=np.float32)
    rendered = FastJSONRenderer().render({"v": values}, "application/json", {})
    parsed = np.array(json.loads(rendered)["v"], dtype=np.float32)
    assert np.array_equal(parsed, values)
    assert b"0.1," in rendered and b"0.088972285" in rendered  # float32's shortest digits, not float64's


def test_a_sliver_image_is_refused_before_it_is_resized_to_gigabytes(client, clip):
    sliver = image_bytes(Image.new("RGB", (1, 5000), (200, 10, 10)))
    error = error_of(post(client, {"s": upload(sliver, "s.png")}), 413)
    assert error["code"] == "image_too_large" and error["key"] == "s"


def test_too_many_query_fields_is_a_400_not_a_500(client, clip):
    response = post(client, {"t": "x"}, path=URL + "?" + "&".join(f"a{i}=1" for i in range(1100)))
    assert error_of(response, 400)["code"] == "bad_request"


def test_concurrent_text_requests_do_not_race_on_the_tokenizer(clip):
    import threading

    texts = [" ".join(["word"] * (i % 90 + 1)) for i in range(60)]  # some over the 77-token context
    failures = []

    def call(text):
        try:
            vectors = clip.embed_texts([text])
            assert vectors.shape == (1, clip.dim)
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_every_log_line_of_a_request_carries_its_request_id_the_500_included(client, clip, monkeypatch):
    import logging

    def boom(**kwargs):
        logging.getLogger("embeddings.services").warning("about to fail")
        raise RuntimeError("internal")

    console = next(h for h in logging.getLogger().handlers if getattr(h, "name", "") == "console")
    stream = io.StringIO()
    monkeypatch.setattr(clip, "embed", boom)
    old = console.setStream(stream)
    try:
        response = post(client, {"t": "x"}, headers={"request_id": "rid-500"})
    finally:
        console.setStream(old)
    assert response.status_code == 500
    lines = [line for line in stream.getvalue().splitlines() if " WARNING " in line or " ERROR " in line]
    assert any("about to fail" in line for line in lines) and any("Unhandled error" in line for line in lines)
    assert all("[rid-500]" in line for line in lines), lines


def test_every_documented_error_code_is_one_row_of_the_error_table():
    import re
    from pathlib import Path

    from embeddings import errors

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", readme.split("### Errors", 1)[1].split("\n### ", 1)[0]))
    documented -= {"filename", "request_id", "key"}
    rows = {
        cls.default_code: cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ApiError)
    }
    assert documented <= set(rows), documented - set(rows)
    for code in ("not_ready", "overloaded", "timeout"):
        assert rows[code].retry_after and rows[code].status_code in (503, 504)
    assert rows["file_too_large"].status_code == 413 and rows["file_too_large"]().code == "file_too_large"


def test_health_probes_answer_whatever_the_host_header(client, clip, settings):
    """The container's HEALTHCHECK calls 127.0.0.1 while DJANGO_ALLOWED_HOSTS names the public host."""
    settings.ALLOWED_HOSTS = ["clip.example.com"]
    assert client.get("/healthz", HTTP_HOST="127.0.0.1:8081").status_code == 200
    ready = client.get("/readyz", HTTP_HOST="127.0.0.1:8081")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get("/", HTTP_HOST="127.0.0.1:8081").status_code == 400  # everything else still checks
    assert client.get("/healthz", HTTP_HOST="clip.example.com").status_code == 200
