"""Cheap requests cannot cost dear: every limit holds whatever the request is made of, and is checked
before the work it bounds (decoding, parsing, tokenising)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_bytes, multipart_body, override

URL = "/syte_test/embeddings"


def post_raw(client, body: bytes, content_type: str, path: str = URL):
    return client.generic("POST", path, body, content_type=content_type)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.content
    return response.json()["error"]


def solid_png(side: int) -> bytes:
    return image_bytes(Image.new("RGB", (side, side), (200, 30, 30)), "PNG", optimize=True)


# --- pixels per request --------------------------------------------------------------------------
def test_the_decoded_pixels_of_a_whole_request_are_budgeted(client, clip, settings, monkeypatch):
    """Solid-colour PNGs are tiny on the wire and huge decoded: each is under the per-image limit, but
    together they are over the request's budget, which refuses the first one over it from its header."""
    override(settings, limits={"max_image_pixels": 1000 * 1000, "max_request_pixels": 3 * 1000 * 1000})
    png = solid_png(1000)
    assert len(png) < 20_000  # 3 MB of pixels in a few KB
    decoded = []
    from embeddings import services

    real = services.decode_image
    monkeypatch.setattr(services, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    body, content_type = multipart_body([(f"img{i}", png, f"{i}.png") for i in range(8)])
    error = error_of(post_raw(client, body, content_type), 413)
    assert error["code"] == "too_many_pixels" and error["key"] == "img3"
    assert len(decoded) == 4  # the fourth was refused from its header; the others were never opened


def test_a_request_within_the_pixel_budget_is_embedded(client, clip, settings):
    override(settings, limits={"max_request_pixels": 3 * 1000 * 1000})
    body, content_type = multipart_body([(f"img{i}", solid_png(1000), f"{i}.png") for i in range(3)])
    response = post_raw(client, body, content_type)
    assert response.status_code == 200 and len(response.json()["images_vectors"]) == 3


def test_jpeg_drafts_count_what_is_decoded_not_what_is_stored(client, clip, settings):
    photo = Image.open("embeddings/runtime/assets/photos/astronaut.jpg").convert("RGB").resize((4000, 3000))
    data = image_bytes(photo, "JPEG", quality=85)
    override(settings, limits={"max_request_pixels": 2 * 1000 * 750})  # two 1/4-scale drafts
    body, content_type = multipart_body([("a", data, "a.jpg"), ("b", data, "b.jpg")])
    assert post_raw(client, body, content_type).status_code == 200


def test_images_reach_the_engine_as_the_models_inputs_not_as_decoded_pictures(client, clip, monkeypatch):
    """Each image is decoded, preprocessed and let go before the next is decoded."""
    seen = []
    embed = clip.embed

    def spy(*, images=(), texts=(), **kwargs):
        seen.extend(type(i) for i in images)
        return embed(images=images, texts=texts, **kwargs)

    monkeypatch.setattr(clip, "embed", spy)
    body, content_type = multipart_body([("a", solid_png(640), "a.png"), ("b", solid_png(300), "b.png")])
    assert post_raw(client, body, content_type).status_code == 200
    assert seen == [np.ndarray, np.ndarray]


# --- parts the reader skips ------------------------------------------------------------------------
def raw_body(chunks: list[bytes], boundary: str = "b") -> tuple[bytes, str]:
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "skipped",
    [
        b"--b\r\n\r\nheaderless\r\n",
        b'--b\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\ntoken\r\n',
        b'--b\r\nContent-Disposition: form-data; name="f"; filename=""\r\n\r\n\r\n',
    ],
    ids=["header-less", "csrf-token", "empty-file-input"],
)
def test_every_delimiter_counts_toward_the_part_limit(client, clip, settings, skipped):
    override(settings, limits={"max_parts": 5})
    text = b'--b\r\nContent-Disposition: form-data; name="t"\r\n\r\na cat\r\n'
    body, content_type = raw_body([skipped] * 50 + [text])
    assert error_of(post_raw(client, body, content_type), 413)["code"] == "too_many_parts"
    body, content_type = raw_body([skipped] * 2 + [text])  # a few are fine
    assert post_raw(client, body, content_type).status_code == 200


def test_a_long_preamble_is_refused_as_malformed(client, clip):
    text = b'--b\r\nContent-Disposition: form-data; name="t"\r\n\r\na cat\r\n'
    body, content_type = raw_body([b"x" * (200 * 1024) + b"\r\n", text])
    assert error_of(post_raw(client, body, content_type), 400)["code"] == "malformed_multipart"
    body, content_type = raw_body([b"a short preamble\r\n", text])
    assert post_raw(client, body, content_type).status_code == 200


# --- bytes per text ---------------------------------------------------------------------------------
def test_a_text_of_millions_of_letters_is_refused_before_it_is_tokenised(client, clip, monkeypatch):
    def no_tokenising(texts):
        raise AssertionError("a text over the character limit reached the tokenizer")

    monkeypatch.setattr(clip.preprocessing, "tokenize", no_tokenising)
    body, content_type = multipart_body([("t", "a" * 3_000_000, None)])
    error = error_of(post_raw(client, body, content_type), 400)
    assert error["code"] == "text_too_long" and error["key"] == "t" and "characters" in error["message"]


def test_the_character_limit_counts_characters_not_bytes(client, clip, settings):
    override(settings, limits={"max_text_chars": 10})
    assert post_raw(client, *multipart_body([("t", "猫" * 10, None)])).status_code == 200  # 30 bytes, 10 characters
    error = error_of(post_raw(client, *multipart_body([("t", "猫" * 11, None)])), 400)
    assert error["code"] == "text_too_long"


# --- other bodies -----------------------------------------------------------------------------------
def test_a_json_body_over_its_own_small_limit_is_413_before_it_is_read(client, db):
    body = json.dumps({"request_id": "x", "categories": ["hat"] * 20_000}).encode()
    assert len(body) > 64 * 1024
    response = client.generic("POST", "/syte_test/feedback", body, content_type="application/json")
    assert error_of(response, 413)["code"] == "request_too_large"


def test_a_body_declaring_too_many_bytes_is_refused_on_every_path(client, settings):
    override(settings, limits={"max_request_bytes": 1000})
    for path in ("/", "/admin/login/", URL):
        response = client.generic("POST", path, b"x" * 2000, content_type="multipart/form-data; boundary=b")
        assert response.status_code == 413, path
    assert response.json()["error"]["code"] == "request_too_large"


def test_the_demo_compare_form_obeys_the_part_limit(client, clip, settings):
    override(settings, limits={"max_parts": 4})
    image = io.BytesIO(solid_png(64))
    image.name = "a.png"
    response = client.post("/", {"panel": "compare", "images": [image], "texts": "\n".join(["a cat"] * 10)})
    assert response.status_code == 413
    assert "too many images and texts at once" in response.content.decode()
