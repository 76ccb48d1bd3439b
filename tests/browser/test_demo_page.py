"""The demo page and DRF's browsable API in headless Chromium, against gunicorn with DEBUG off."""

from __future__ import annotations

import base64
import json
import re

import pytest
import requests

from tests.browser.conftest import PHONE
from tests.conftest import PHOTOS

pytestmark = [pytest.mark.browser, pytest.mark.server]

CAT, ROCKET, ASTRONAUT = PHOTOS / "chelsea.jpg", PHOTOS / "rocket.jpg", PHOTOS / "astronaut.jpg"
TEXTS = ["a photo of a cat", "a rocket on its launch pad"]
NOT_AN_IMAGE = "That file isn't an image we can read. Try a JPEG or PNG."


def api_matrix(server, images, texts) -> list[list[float]]:
    files = {f"image-{i}": (p.name, p.read_bytes(), "image/jpeg") for i, p in enumerate(images, start=1)}
    data = {f"text-{j}": t for j, t in enumerate(texts, start=1)}
    response = requests.post(server.url + "/syte_test/embeddings", files=files, data=data, timeout=60)
    response.raise_for_status()
    return response.json()["similarity_matrix"]


def api_top_categories(server, image) -> list[str]:
    files = {"image": (image.name, image.read_bytes(), "image/jpeg")}
    response = requests.post(server.url + "/syte_test/wearable", files=files, timeout=60)
    response.raise_for_status()
    return response.json()["top_categories"]


def matrix_on(page) -> list[list[float]]:
    rows = page.locator("#compare-result table.matrix tbody tr")
    return [[float(v) for v in rows.nth(i).locator(".score").all_text_contents()] for i in range(rows.count())]


def categories_on(page) -> list[str]:
    return [name.strip() for name in page.locator("#wearable-result .category-name").all_text_contents()]


def bar_widths(page) -> list[float]:
    return page.locator("#wearable-result .bar > span").evaluate_all(
        "bars => bars.map(bar => bar.getBoundingClientRect().width)"
    )


def test_page_shows_the_model_and_the_test_model_banner(page, demo_server, screenshot):
    page.goto(demo_server.url + "/")
    assert "random-test-model/tiny" in page.locator("#model-chip").inner_text()
    assert page.locator("#test-model-banner").is_visible()
    for name in ("Embeddings API (browsable)", "Wearable API (browsable)", "API reference", "Admin"):
        assert page.get_by_role("contentinfo").get_by_role("link", name=name).is_visible()
    screenshot(page)
    page.get_by_role("contentinfo").get_by_role("link", name="API reference").click()
    assert page.get_by_role("heading", name="POST /syte_test/wearable").is_visible()
    screenshot(page, "api-reference")


def test_wearable_upload_shows_three_categories_with_bars(page, demo_server, screenshot):
    page.goto(demo_server.url + "/")
    page.set_input_files("#wearable-file", str(ASTRONAUT))  # choosing a file sends it
    page.locator("#wearable-result .category").nth(2).wait_for()
    assert categories_on(page) == api_top_categories(demo_server, ASTRONAUT)[:3]
    assert all(width > 0 for width in bar_widths(page))
    numbers = page.locator("#wearable-result .category-numbers").first.inner_text()
    assert re.fullmatch(r"\d+(\.\d)?% \u00b7 score -?\d+\.\d\d", numbers), numbers
    preview = page.get_by_role("img", name="Your photo: astronaut.jpg")
    assert preview.is_visible() and preview.evaluate("img => img.naturalWidth") > 0
    screenshot(page)


def test_wearable_explains_a_text_file_named_jpg(page, demo_server, screenshot, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("This is a text file, not a photo.\n")
    page.goto(demo_server.url + "/")
    page.set_input_files("#wearable-file", str(fake))
    error = page.locator("#wearable-result .message-error")
    error.wait_for()
    assert error.inner_text() == NOT_AN_IMAGE
    assert error.get_attribute("role") == "alert"
    screenshot(page)


def test_dropping_a_photo_on_the_wearable_panel_sends_it(page, demo_server, screenshot):
    page.goto(demo_server.url + "/")
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
            return transfer;
        }""",
        [CAT.name, base64.b64encode(CAT.read_bytes()).decode("ascii")],
    )
    page.dispatch_event("#wearable-form [data-dropzone]", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#wearable-form [data-dropzone]", "drop", {"dataTransfer": transfer})
    page.locator("#wearable-result .category").nth(2).wait_for()
    assert categories_on(page) == api_top_categories(demo_server, CAT)[:3]
    screenshot(page)


def test_compare_two_images_and_two_texts_matches_the_api(page, demo_server, screenshot):
    page.goto(demo_server.url + "/")
    page.set_input_files("#compare-files", [str(CAT), str(ROCKET)])
    assert page.locator("#compare-file-list li").count() == 2
    page.get_by_role("textbox", name="Texts").fill("\n".join(TEXTS))
    page.get_by_role("button", name="Compare").click()
    page.locator("#compare-result table.matrix").wait_for()
    shown = matrix_on(page)
    assert len(shown) == 2 and all(len(row) == 2 for row in shown)
    assert shown == api_matrix(demo_server, [CAT, ROCKET], TEXTS)
    headers = page.locator("#compare-result thead th").all_text_contents()
    assert headers[1:] == TEXTS
    best = page.locator("#compare-result .best-list li").all_inner_texts()
    assert [line.split("\u2192")[0].strip() for line in best] == ["chelsea.jpg", "rocket.jpg"]
    for line, row in zip(best, shown, strict=True):
        assert TEXTS[row.index(max(row))] in line
    screenshot(page)


def test_compare_asks_for_an_image_and_a_text(page, demo_server):
    page.goto(demo_server.url + "/")
    page.get_by_role("textbox", name="Texts").fill("a cat")
    page.get_by_role("button", name="Compare").click()
    assert (
        page.locator("#compare-result .message-error").inner_text() == "Add at least one image and one text to compare."
    )


def browsable_json(page) -> dict:
    text = page.locator(".response-info pre").inner_text()
    return json.loads(text[text.index("{") :])


def test_browsable_embeddings_form_posts_a_file_and_a_text(page, demo_server, screenshot):
    page.goto(demo_server.url + "/syte_test/embeddings")
    form = page.locator("#post-object-form form")
    assert form.locator("input[name=image][type=file]").count() == 1
    assert form.locator("input[name=text]").count() == 1
    screenshot(page, "form")
    form.locator("input[name=image]").set_input_files(str(CAT))
    form.locator("input[name=text]").fill(TEXTS[0])
    with page.expect_navigation():
        form.get_by_role("button", name="POST").click()
    assert "HTTP 200 OK" in page.locator(".response-info").inner_text()
    body = browsable_json(page)
    assert body["images_keys"] == ["image"] and body["texts_keys"] == ["text"]
    assert body["similarity_matrix"] == api_matrix(demo_server, [CAT], TEXTS[:1])
    screenshot(page, "answer")


def test_browsable_wearable_form_posts_a_photo(page, demo_server, screenshot):
    page.goto(demo_server.url + "/syte_test/wearable")
    form = page.locator("#post-object-form form")
    form.locator("input[name=image][type=file]").set_input_files(str(ASTRONAUT))
    with page.expect_navigation():
        form.get_by_role("button", name="POST").click()
    assert "HTTP 200 OK" in page.locator(".response-info").inner_text()
    body = browsable_json(page)
    assert body["top_categories"] == api_top_categories(demo_server, ASTRONAUT)
    screenshot(page)


def test_phone_screen_stacks_the_panels_without_sideways_scrolling(pages, demo_server, screenshot):
    page = pages.new(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    page.goto(demo_server.url + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    wearable, compare = page.locator("#wearable").bounding_box(), page.locator("#compare").bounding_box()
    assert compare["y"] >= wearable["y"] + wearable["height"]
    screenshot(page, "start")
    page.set_input_files("#wearable-file", str(CAT))
    page.locator("#wearable-result .category").nth(2).wait_for()
    page.set_input_files("#compare-files", [str(CAT), str(ROCKET)])
    page.get_by_role("textbox", name="Texts").fill("\n".join(TEXTS))
    page.get_by_role("button", name="Compare").click()
    page.locator("#compare-result table.matrix").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "answers")


def test_forms_work_without_javascript(pages, demo_server, screenshot, tmp_path):
    page = pages.new(java_script_enabled=False)
    page.goto(demo_server.url + "/")
    page.set_input_files("#wearable-file", str(ASTRONAUT))
    with page.expect_navigation():
        page.get_by_role("button", name="Find what it wears").click()
    assert categories_on(page) == api_top_categories(demo_server, ASTRONAUT)[:3]
    assert page.get_by_role("img", name="Your photo: astronaut.jpg").is_visible()
    screenshot(page, "wearable")

    page.set_input_files("#compare-files", [str(CAT), str(ROCKET)])
    page.get_by_role("textbox", name="Texts").fill("\n".join(TEXTS))
    with page.expect_navigation():
        page.get_by_role("button", name="Compare").click()
    assert matrix_on(page) == api_matrix(demo_server, [CAT, ROCKET], TEXTS)
    screenshot(page, "compare")

    fake = tmp_path / "notes.jpg"
    fake.write_text("not a photo")
    page.set_input_files("#wearable-file", str(fake))
    with page.expect_navigation():
        page.get_by_role("button", name="Find what it wears").click()
    assert page.locator("#wearable-result .message-error").inner_text() == NOT_AN_IMAGE
    screenshot(page, "error")


def test_every_control_has_a_label_and_the_keyboard_reaches_it(page, demo_server):
    page.goto(demo_server.url + "/")
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll("input:not([type=hidden]), textarea, select")]
            .filter(el => el.labels.length === 0).map(el => el.id || el.name)"""
    )
    assert unlabeled == []
    assert page.evaluate("[...document.images].every(img => img.hasAttribute('alt'))")
    reached = []
    for _ in range(20):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
    wanted = ["wearable-file", "Find what it wears", "compare-files", "compare-texts", "Compare"]
    positions = [reached.index(name) for name in wanted]
    assert positions == sorted(positions), reached
    assert reached[0] == "Skip to content"


def test_page_posts_with_a_csrf_token(page, demo_server):
    page.goto(demo_server.url + "/")
    tokens = page.locator("form input[name=csrfmiddlewaretoken]")
    assert tokens.count() == 2 and re.fullmatch(r"[A-Za-z0-9]{64}", tokens.first.get_attribute("value"))
    response = requests.post(demo_server.url + "/", data={"panel": "compare", "texts": "a cat"}, timeout=30)
    assert response.status_code == 403
