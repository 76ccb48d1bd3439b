"""The demo page's view (clipsite/demo.py) over Django's test client: what it shows, its no-script forms."""

from __future__ import annotations

import io
import re

import pytest
from django.test import Client

from embeddings.runtime.state import runtime
from tests.conftest import override, photo_bytes
from wearable.models import Category
from wearable.services import category_cache

PAGE = "/"


def upload(data: bytes, name: str):
    f = io.BytesIO(data)
    f.name = name
    return f


def matrix_on_page(html: str) -> list[list[float]]:
    rows = re.findall(r"<tr>\s*<th scope=\"row\">.*?</tr>", html, flags=re.S)
    return [[float(v) for v in re.findall(r'<span class="score">([-0-9.]+)</span>', row)] for row in rows]


@pytest.fixture
def categories(db):
    """The seeded categories, with no category vectors cached from another test's database."""
    category_cache.clear()
    yield Category.objects.all()
    category_cache.clear()


def test_page_names_the_model_and_warns_of_a_test_model(client, clip):
    response = client.get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    assert clip.name in html
    assert 'id="test-model-banner"' in html and "random-weight model" in html
    assert 'name="csrfmiddlewaretoken"' in html


def test_page_says_when_the_model_is_still_loading(client, monkeypatch):
    monkeypatch.setattr(runtime, "_engine", None)
    monkeypatch.setattr(runtime, "status", "loading")
    html = client.get(PAGE).content.decode()
    assert "Model loading" in html and 'id="model-loading-banner"' in html
    assert 'id="test-model-banner"' not in html


def test_page_links_to_the_browsable_apis_the_reference_and_the_admin(client, clip):
    html = client.get(PAGE).content.decode()
    for href in ('href="/syte_test/embeddings"', 'href="/syte_test/wearable"', 'href="/api"', 'href="/admin/"'):
        assert href in html


def test_api_reference_documents_both_endpoints(client, clip):
    response = client.get("/api")
    assert response.status_code == 200
    html = response.content.decode()
    assert "POST /syte_test/embeddings" in html and "POST /syte_test/wearable" in html
    assert "invalid_image" in html and "similarity_matrix" in html


def test_wearable_form_without_script_renders_the_top_three(client, clip, categories):
    photo = photo_bytes("astronaut.jpg")
    response = client.post(PAGE, {"panel": "wearable", "image": upload(photo, "astronaut.jpg")})
    assert response.status_code == 200, response.content
    html = response.content.decode()
    api = client.post("/syte_test/wearable", {"image": upload(photo, "astronaut.jpg")}).json()
    assert re.findall(r'<span class="category-name">([^<]+)</span>', html) == api["top_categories"][:3]
    assert html.count('<div class="bar"') == 3
    assert 'alt="Your photo: astronaut.jpg"' in html and 'src="data:image/jpeg;base64,' in html


def test_wearable_form_without_script_explains_a_file_that_is_not_an_image(client, clip, categories):
    response = client.post(PAGE, {"panel": "wearable", "image": upload(b"plain text\n", "holiday.jpg")})
    assert response.status_code == 400
    assert "That file isn&#x27;t an image we can read. Try a JPEG or PNG." in response.content.decode()


def test_wearable_form_without_script_says_when_no_category_is_enabled(client, clip, categories):
    categories.update(enabled=False)
    response = client.post(PAGE, {"panel": "wearable", "image": upload(photo_bytes("chelsea.jpg"), "cat.jpg")})
    assert response.status_code == 503
    assert "No wearable categories are set up yet" in response.content.decode()


def test_wearable_form_without_script_says_when_the_model_is_loading(client, categories, monkeypatch):
    monkeypatch.setattr(runtime, "_engine", None)
    response = client.post(PAGE, {"panel": "wearable", "image": upload(photo_bytes("chelsea.jpg"), "cat.jpg")})
    assert response.status_code == 503
    assert "The model is still loading. Try again in a few seconds." in response.content.decode()


def test_compare_form_without_script_renders_the_api_matrix(client, clip):
    cat, rocket = photo_bytes("chelsea.jpg"), photo_bytes("rocket.jpg")
    texts = ["a photo of a cat", "a rocket on its launch pad"]
    response = client.post(
        PAGE,
        {
            "panel": "compare",
            "images": [upload(cat, "cat.jpg"), upload(rocket, "rocket.jpg")],
            "texts": "\n".join(texts),
        },
    )
    assert response.status_code == 200, response.content
    html = response.content.decode()
    api = client.post(
        "/syte_test/embeddings",
        {
            "image-1": upload(cat, "cat.jpg"),
            "image-2": upload(rocket, "rocket.jpg"),
            "text-1": texts[0],
            "text-2": texts[1],
        },
    ).json()
    assert matrix_on_page(html) == api["similarity_matrix"]
    assert "cat.jpg" in html and "rocket.jpg" in html and "Best text for each image" in html
    assert "a photo of a cat\na rocket on its launch pad</textarea>" in html  # kept for another try


def test_compare_form_without_script_explains_a_file_that_is_not_an_image(client, clip):
    response = client.post(
        PAGE, {"panel": "compare", "images": [upload(b"just some text\n", "notes.jpg")], "texts": "a cat"}
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "That file isn&#x27;t an image we can read. Try a JPEG or PNG." in html
    assert '"error"' not in html.split('id="demo-config"')[0]  # words, not the API's JSON


def test_compare_form_without_script_refuses_a_file_over_the_limit(client, clip, settings):
    override(settings, limits={"max_file_bytes": 1000})
    response = client.post(
        PAGE, {"panel": "compare", "images": [upload(photo_bytes("chelsea.jpg"), "cat.jpg")], "texts": "a cat"}
    )
    assert response.status_code == 413
    assert "That file is too large" in response.content.decode()


def test_compare_form_needs_an_image_and_a_text(client, clip):
    response = client.post(PAGE, {"panel": "compare", "texts": "a cat"})
    assert response.status_code == 400
    assert "Add at least one image and one text" in response.content.decode()


def test_forms_are_protected_by_csrf(clip):
    browser = Client(enforce_csrf_checks=True)
    data = {"panel": "compare", "texts": "a cat"}
    assert browser.post(PAGE, data).status_code == 403
    page = browser.get(PAGE).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    assert browser.post(PAGE, {**data, "csrfmiddlewaretoken": token}).status_code == 400  # past CSRF: no image


def test_unknown_form_is_400(client, clip):
    assert client.post(PAGE, {"panel": "nope"}).status_code == 400
