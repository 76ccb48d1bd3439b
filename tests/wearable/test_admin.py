"""Django admin, logged in as staff: category edits reach the next answer; predictions filter and export."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from tests.conftest import override, photo_bytes
from tests.wearable.conftest import FEEDBACK, post_wearable
from wearable.admin import _csv_cell
from wearable.models import Category, CategoryEmbedding, Prediction

pytestmark = pytest.mark.django_db

CATEGORIES = "/admin/wearable/category/"
PREDICTIONS = "/admin/wearable/prediction/"


@pytest.fixture
def jpeg() -> bytes:
    return photo_bytes("chelsea.jpg")


def message_list(response) -> list[str]:
    """The texts of the admin's messages (not the inline form errors)."""
    html = response.content.decode()
    block = re.search(r'<ul class="messagelist">(.*?)</ul>', html, re.S)
    return (
        [re.sub(r"<[^>]+>", "", m).strip() for m in re.findall(r"<li[^>]*>(.*?)</li>", block.group(1), re.S)]
        if block
        else []
    )


def change_form_data(category: Category, **changes) -> dict:
    data = {
        "name": category.name,
        "display_order": category.display_order,
        "prompts": category.prompts,
        "_save": "Save",
    }
    if category.enabled:
        data["enabled"] = "on"
    data.update(changes)
    if data.get("enabled") is False:
        del data["enabled"]
    return data


def test_changelist_has_search_and_the_enabled_filter(admin_client, clip):
    Category.objects.filter(name="hat").update(enabled=False)
    html = admin_client.get(CATEGORIES, {"q": "shirt"}).content.decode()
    assert ">t-shirt<" in html and ">shirt<" in html and ">jeans<" not in html
    html = admin_client.get(CATEGORIES, {"enabled__exact": "0"}).content.decode()
    assert ">hat<" in html and ">jeans<" not in html


def test_each_row_says_whether_its_vector_is_cached_for_the_model_in_use(admin_client, client, clip, jpeg, monkeypatch):
    html = admin_client.get(CATEGORIES).content.decode()
    assert f"Model in use: {clip.name}" in html
    assert html.count("no (computed on first use)") == 20
    post_wearable(client, jpeg)
    Category.objects.filter(name="hat").update(prompts="a felt hat")
    html = admin_client.get(CATEGORIES).content.decode()
    assert html.count("no (computed on first use)") == 1 and html.count(">yes<") == 19
    monkeypatch.setattr("wearable.admin.model_in_use", lambda: None)
    html = admin_client.get(CATEGORIES).content.decode()
    assert html.count("model not loaded") >= 20


def test_an_edit_in_the_change_form_changes_the_next_answer(admin_client, client, clip, jpeg):
    before = post_wearable(client, jpeg, query="?top_k=20").json()
    top = Category.objects.get(name=before["top_categories"][0])
    response = admin_client.post(f"{CATEGORIES}{top.pk}/change/", change_form_data(top, name="denim overalls"))
    assert response.status_code == 302, message_list(response)
    after = post_wearable(client, jpeg, query="?top_k=20").json()
    assert "denim overalls" in after["top_categories"] and top.name not in after["top_categories"]
    # The admin's save stored the new prompts' vectors for the model in use and dropped the old ones.
    stored = set(CategoryEmbedding.objects.filter(category=top, model_name=clip.name).values_list("prompt", flat=True))
    assert stored == set(Category.objects.get(pk=top.pk).prompt_texts())

    other = Category.objects.get(name=after["top_categories"][1])
    admin_client.post(f"{CATEGORIES}{other.pk}/change/", change_form_data(other, enabled=False))
    response = post_wearable(client, jpeg, query="?top_k=20")
    assert response.status_code == 400  # 19 enabled now
    assert other.name not in post_wearable(client, jpeg, query="?top_k=19").json()["top_categories"]


def test_own_prompts_from_the_change_form_are_used(admin_client, client, clip, jpeg):
    hat = Category.objects.get(name="hat")
    admin_client.post(f"{CATEGORIES}{hat.pk}/change/", change_form_data(hat, prompts="a straw {}\n\n a cap "))
    hat.refresh_from_db()
    assert hat.prompts == "a straw {}\na cap" and hat.prompt_texts() == ["a straw hat", "a cap"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [({"name": "   "}, "Name: This field is required."), ({"name": "JEANS"}, "exists")],
)
def test_validation_errors_are_shown_as_messages(admin_client, clip, changes, expected):
    hat = Category.objects.get(name="hat")
    response = admin_client.post(f"{CATEGORIES}{hat.pk}/change/", change_form_data(hat, **changes))
    assert response.status_code == 200
    assert any(expected in m for m in message_list(response)), message_list(response)
    assert Category.objects.get(pk=hat.pk).name == "hat"


def test_a_prompt_over_the_word_limit_is_refused(admin_client, clip, settings):
    override(settings, limits={"max_text_words": 3})
    hat = Category.objects.get(name="hat")
    response = admin_client.post(f"{CATEGORIES}{hat.pk}/change/", change_form_data(hat, prompts="a b c d e"))
    assert response.status_code == 200 and any("the limit is 3" in m for m in message_list(response))


def test_a_category_added_in_admin_is_ranked(admin_client, client, clip, jpeg):
    response = admin_client.post(
        f"{CATEGORIES}add/", {"name": "scarf", "enabled": "on", "display_order": 5, "prompts": "", "_save": "Save"}
    )
    assert response.status_code == 302, message_list(response)
    assert "scarf" in post_wearable(client, jpeg, query="?top_k=21").json()["top_categories"]


def test_enable_and_disable_actions(admin_client, client, clip, jpeg):
    post_wearable(client, jpeg)  # warm
    keep = {"jeans", "hat", "watch"}
    ids = list(Category.objects.exclude(name__in=keep).values_list("pk", flat=True))
    response = admin_client.post(
        CATEGORIES, {"action": "disable_categories", "_selected_action": ids, "index": 0}, follow=True
    )
    assert "Disabled 17 categories." in message_list(response)
    assert set(post_wearable(client, jpeg).json()["top_categories"]) == keep
    response = admin_client.post(
        CATEGORIES, {"action": "enable_categories", "_selected_action": ids[:1], "index": 0}, follow=True
    )
    assert "Enabled 1 category." in message_list(response)
    assert len(post_wearable(client, jpeg, query="?top_k=4").json()["top_categories"]) == 4


def test_list_editable_order_and_enabled_are_seen_on_the_next_answer(admin_client, client, clip, jpeg, settings):
    override(
        settings, wearable={"prompt_templates": tuple(["a photo of clothing."])}
    )  # every score ties: order decides
    assert post_wearable(client, jpeg, query="?top_k=1").json()["top_categories"] == ["t-shirt"]
    categories = list(Category.objects.order_by("display_order", "name"))
    data = {
        "form-TOTAL_FORMS": len(categories),
        "form-INITIAL_FORMS": len(categories),
        "form-MIN_NUM_FORMS": 0,
        "form-MAX_NUM_FORMS": 1000,
        "_save": "Save",
    }
    for i, c in enumerate(categories):
        data[f"form-{i}-id"] = c.pk
        data[f"form-{i}-display_order"] = 1 if c.name == "watch" else c.display_order
        if c.name != "shirt":
            data[f"form-{i}-enabled"] = "on"
    response = admin_client.post(CATEGORIES, data)
    assert response.status_code == 302
    body = post_wearable(client, jpeg, query="?top_k=3").json()
    assert body["top_categories"] == ["watch", "t-shirt", "blouse"]


def test_list_editable_errors_are_shown_as_messages(admin_client, clip):
    hat = Category.objects.get(name="hat")
    data = {
        "form-TOTAL_FORMS": 1,
        "form-INITIAL_FORMS": 1,
        "form-MIN_NUM_FORMS": 0,
        "form-MAX_NUM_FORMS": 1000,
        "form-0-id": hat.pk,
        "form-0-display_order": "-5",
        "form-0-enabled": "on",
        "_save": "Save",
    }
    response = admin_client.post(CATEGORIES, data)
    assert response.status_code == 200
    assert any(m.lower().startswith("hat: display order") for m in message_list(response)), message_list(response)


# --- predictions and their feedback ------------------------------------------------------------------
@pytest.fixture
def answered(client, clip, jpeg) -> dict[str, dict]:
    """Three answers: one judged right, one judged wrong, one without feedback."""
    answers = {}
    for rid in ("right-1", "wrong-1", "none-1"):
        answers[rid] = post_wearable(client, jpeg, headers={"request_id": rid}).json()
    top = answers["right-1"]["top_categories"][0]
    other = next(c for c in ("hat", "watch") if c != answers["wrong-1"]["top_categories"][0])
    for rid, categories in (("right-1", [top, "hat"]), ("wrong-1", [other])):
        response = client.post(FEEDBACK, {"request_id": rid, "categories": categories}, content_type="application/json")
        assert response.status_code == 201
    return answers


def test_predictions_list_their_feedback_and_filter_by_wrong_answers(admin_client, answered):
    html = admin_client.get(PREDICTIONS).content.decode()
    assert all(rid in html for rid in answered)
    html = admin_client.get(PREDICTIONS, {"answer_was_wrong": "yes"}).content.decode()
    assert "wrong-1" in html and "right-1" not in html and "none-1" not in html
    html = admin_client.get(PREDICTIONS, {"answer_was_wrong": "no"}).content.decode()
    assert "right-1" in html and "wrong-1" not in html and "none-1" not in html
    html = admin_client.get(PREDICTIONS, {"answer_was_wrong": "none"}).content.decode()
    assert "none-1" in html and "right-1" not in html


def test_prediction_change_page_shows_its_feedback(admin_client, answered):
    prediction = Prediction.objects.get(request_id="wrong-1")
    html = admin_client.get(f"{PREDICTIONS}{prediction.pk}/change/").content.decode()
    assert "wrong-1" in html and "Feedback" in html


def _export(admin_client, action: str):
    ids = list(Prediction.objects.values_list("pk", flat=True))
    response = admin_client.post(PREDICTIONS, {"action": action, "_selected_action": ids, "index": 0})
    assert response.status_code == 200
    return response


def test_export_as_csv_with_feedback(admin_client, answered):
    response = _export(admin_client, "export_csv")
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = {r["request_id"]: r for r in csv.DictReader(io.StringIO(response.content.decode()))}
    assert set(rows) == set(answered)
    assert json.loads(rows["wrong-1"]["top_categories"]) == answered["wrong-1"]["top_categories"]
    assert rows["wrong-1"]["answer_was_wrong"] == "true" and rows["right-1"]["answer_was_wrong"] == "false"
    assert rows["none-1"]["answer_was_wrong"] == "" and rows["none-1"]["feedback_categories"] == ""
    assert "hat" in json.loads(rows["right-1"]["feedback_categories"])
    assert len(rows["right-1"]["image_sha256"]) == 64


def test_export_as_json_lines_with_feedback(admin_client, answered):
    response = _export(admin_client, "export_jsonl")
    assert response["Content-Type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in response.content.decode().splitlines()]
    by_id = {r["request_id"]: r for r in records}
    assert set(by_id) == set(answered)
    assert by_id["wrong-1"]["scores"] == answered["wrong-1"]["scores"]
    assert by_id["wrong-1"]["answer_was_wrong"] is True and len(by_id["wrong-1"]["feedback"]) == 1
    assert by_id["none-1"]["feedback"] == [] and by_id["none-1"]["answer_was_wrong"] is None


FORMULA = '=HYPERLINK("http://evil","x")'


def test_csv_export_neutralises_formulas_and_json_lines_keeps_the_raw_ids(admin_client, client, clip, jpeg):
    for rid in (FORMULA, "-1", "@SUM(A1)", "+1"):
        assert post_wearable(client, jpeg, headers={"request_id": rid}).status_code == 200
    reader = csv.reader(io.StringIO(_export(admin_client, "export_csv").content.decode()))
    header, *rows = list(reader)
    by_id = {row[header.index("request_id")]: dict(zip(header, row, strict=True)) for row in rows}
    assert set(by_id) == {"'" + FORMULA, "'-1", "'@SUM(A1)", "'+1"}
    scores = by_id["'" + FORMULA]["scores"]  # JSON text, whose numbers may be negative, stays as it is
    assert scores.startswith("[") and json.loads(scores) == Prediction.objects.get(request_id=FORMULA).scores
    records = [json.loads(line) for line in _export(admin_client, "export_jsonl").content.decode().splitlines()]
    assert {r["request_id"] for r in records} == {FORMULA, "-1", "@SUM(A1)", "+1"}


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=1+1", "'=1+1"),
        ("-1", "'-1"),
        ("\tcmd", "'\tcmd"),
        ("\r=1", "'\r=1"),
        ("a=1", "a=1"),
        (-3.5, -3.5),  # a number is no formula
        (["-1"], '["-1"]'),
        ({"score": -1}, '{"score": -1}'),
        (True, "true"),
        (None, ""),
    ],
)
def test_csv_cells_starting_like_a_formula_are_quoted_and_numbers_and_json_are_not(value, cell):
    assert _csv_cell(value) == cell
