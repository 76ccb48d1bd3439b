"""DRF's browsable page for the image endpoints, and what its HTML form posts (a CSRF token, empty fields)."""

from __future__ import annotations

import re

from tests.conftest import multipart_body, photo_bytes

URL = "/syte_test/embeddings"


def test_a_browser_gets_drfs_page_with_an_image_and_a_text_field(client, clip):
    response = client.get(URL, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert response.status_code == 200
    html = response.content.decode()
    form = re.search(
        r'<form action="/syte_test/embeddings" method="POST" enctype="multipart/form-data".*?</form>', html, re.S
    )
    assert form, "no HTML form on the page"
    assert '<input name="image"  type="file"' in form.group(0)
    assert '<input name="text" class="form-control" type="text"' in form.group(0)
    assert 'name="csrfmiddlewaretoken"' in form.group(0)


def test_an_api_client_get_stays_a_405(client, clip):
    for accept in ("application/json", "*/*"):
        response = client.get(URL, headers={"Accept": accept})
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"


def test_the_forms_csrf_token_is_not_an_input(client, clip):
    body, content_type = multipart_body([("csrfmiddlewaretoken", "x" * 64, None), ("text", "a photo of a cat", None)])
    response = client.generic("POST", URL, body, content_type=content_type)
    assert response.status_code == 200, response.content
    assert response.json()["texts_keys"] == ["text"] and response.json()["images_keys"] == []


def test_a_browser_form_may_leave_its_text_empty(client, clip):
    body, content_type = multipart_body(
        [("csrfmiddlewaretoken", "x" * 64, None), ("image", photo_bytes("chelsea.jpg"), "cat.jpg"), ("text", "", None)]
    )
    response = client.generic("POST", URL, body, content_type=content_type)
    assert response.status_code == 200, response.content
    assert response.json()["images_keys"] == ["image"] and response.json()["texts_keys"] == []


def test_an_api_clients_empty_text_is_still_an_error(client, clip):
    body, content_type = multipart_body([("image", photo_bytes("chelsea.jpg"), "cat.jpg"), ("text", "", None)])
    response = client.generic("POST", URL, body, content_type=content_type)
    assert response.status_code == 400 and response.json()["error"]["code"] == "empty_text"


def test_a_browser_form_sent_empty_is_an_empty_request(client, clip):
    body, content_type = multipart_body(
        [("csrfmiddlewaretoken", "x" * 64, None), ("image", b"", ""), ("text", "", None)]
    )
    response = client.generic("POST", URL, body, content_type=content_type)
    assert response.status_code == 400 and response.json()["error"]["code"] == "empty_request"
