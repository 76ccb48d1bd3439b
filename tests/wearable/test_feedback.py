"""POST /syte_test/feedback: JSON or form bodies, stored against the latest answer with that request_id."""

from __future__ import annotations

import pytest

from tests.conftest import multipart_body, override, photo_bytes
from tests.wearable.conftest import FEEDBACK, post_wearable
from wearable.models import Category, Feedback, Prediction

pytestmark = pytest.mark.django_db


@pytest.fixture
def answer(client, clip) -> dict:
    response = post_wearable(client, photo_bytes("chelsea.jpg"), headers={"request_id": "answer-1"})
    assert response.status_code == 200, response.content
    return response.json()


def post_json(client, body, **extra):
    return client.post(FEEDBACK, data=body, content_type="application/json", **extra)


def error_of(response) -> dict:
    return response.json()["error"]


def test_json_feedback_is_stored_and_answered_with_201(client, answer):
    top = answer["top_categories"][0]
    response = post_json(client, {"request_id": "answer-1", "categories": [top, "hat"]}, headers={"request_id": "fb-1"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["request_id"] == response["request_id"] == "fb-1"
    assert body["prediction_request_id"] == "answer-1"
    assert body["categories"] == list(dict.fromkeys([top, "hat"]))
    assert body["top_categories"] == answer["top_categories"]
    assert body["answer_was_wrong"] is False
    feedback = Feedback.objects.get()
    assert feedback.prediction.request_id == "answer-1" and feedback.categories == body["categories"]
    assert Prediction.objects.get().answer_was_wrong is False


def test_the_answer_was_wrong_when_its_top_1_is_not_among_the_right_ones(client, answer):
    other = next(c for c in ("hat", "watch") if c != answer["top_categories"][0])
    body = post_json(client, {"request_id": "answer-1", "categories": [other]}).json()
    assert body["answer_was_wrong"] is True
    assert Prediction.objects.get().answer_was_wrong is True


def test_form_feedback_with_categories_repeated(client, answer):
    response = client.post(FEEDBACK, data={"request_id": "answer-1", "categories": ["jeans", "hat"]})
    assert response.status_code == 201, response.content
    assert Feedback.objects.get().categories == ["jeans", "hat"]


def test_urlencoded_feedback(client, answer):
    response = client.post(
        FEEDBACK,
        data="request_id=answer-1&categories=jeans&categories=high+heels",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 201, response.content
    assert response.json()["categories"] == ["jeans", "high heels"]


def test_multipart_feedback_with_categories_repeated(client, answer):
    body, content_type = multipart_body(
        [("request_id", "answer-1", None), ("categories", "coat", None), ("categories", "boots", None)]
    )
    response = client.generic("POST", FEEDBACK, body, content_type=content_type)
    assert response.status_code == 201, response.content
    assert response.json()["categories"] == ["coat", "boots"]


def test_names_match_in_any_case_and_are_stored_as_in_the_table(client, answer):
    body = post_json(client, {"request_id": "answer-1", "categories": ["JEANS", " High  Heels ", "jeans"]}).json()
    assert body["categories"] == ["jeans", "high heels"]


def test_a_repeated_request_id_refers_to_the_latest_answer(client, answer):
    post_wearable(client, photo_bytes("astronaut.jpg"), headers={"request_id": "answer-1"})
    latest = Prediction.objects.filter(request_id="answer-1").order_by("-id").first()
    post_json(client, {"request_id": "answer-1", "categories": ["hat"]})
    assert Feedback.objects.get().prediction == latest


def test_unknown_request_id_is_404(client, answer):
    response = post_json(client, {"request_id": "never-seen", "categories": ["hat"]}, headers={"request_id": "fb-9"})
    assert response.status_code == 404
    assert response.json()["request_id"] == "fb-9"
    assert error_of(response)["code"] == "unknown_request_id" and error_of(response)["key"] == "request_id"


def test_an_embeddings_request_id_is_404(client, answer):
    body, content_type = multipart_body([("text", "a hat", None)])
    response = client.generic(
        "POST", "/syte_test/embeddings", body, content_type=content_type, headers={"request_id": "emb-1"}
    )
    assert response.status_code == 200
    response = post_json(client, {"request_id": "emb-1", "categories": ["hat"]})
    assert response.status_code == 404 and error_of(response)["code"] == "unknown_request_id"


def test_a_category_not_in_the_table_is_400(client, answer):
    response = post_json(client, {"request_id": "answer-1", "categories": ["hat", "spacesuit"]})
    assert response.status_code == 400
    assert error_of(response)["code"] == "unknown_category" and error_of(response)["key"] == "spacesuit"
    assert not Feedback.objects.exists()


def test_a_disabled_category_is_still_in_the_table(client, answer):
    Category.objects.filter(name="watch").update(enabled=False)
    assert post_json(client, {"request_id": "answer-1", "categories": ["watch"]}).status_code == 201


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"categories": ["hat"]}, "request_id"),
        ({"request_id": 1, "categories": ["hat"]}, "request_id"),
        ({"request_id": "  ", "categories": ["hat"]}, "request_id"),
        ({"request_id": "answer-1"}, "categories"),
        ({"request_id": "answer-1", "categories": "hat"}, "categories"),
        ({"request_id": "answer-1", "categories": [1, 2]}, "categories"),
        (["answer-1", "hat"], None),
    ],
)
def test_missing_or_ill_typed_fields_are_400(client, answer, body, key):
    response = post_json(client, body)
    assert response.status_code == 400, response.content
    assert error_of(response)["code"] == "invalid_feedback" and error_of(response)["key"] == key


def test_a_form_without_categories_is_400(client, answer):
    response = client.post(FEEDBACK, data={"request_id": "answer-1"})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_feedback"


def test_an_empty_list_says_nothing_in_the_table_is_right(client, answer):
    body = post_json(client, {"request_id": "answer-1", "categories": []}).json()
    assert body["categories"] == [] and body["answer_was_wrong"] is True


def test_malformed_json_is_400_in_the_api_shape(client, answer):
    response = client.post(FEEDBACK, data=b"{not json", content_type="application/json")
    assert response.status_code == 400 and error_of(response)["code"] == "malformed_request"


def test_the_latest_feedback_decides_whether_the_answer_was_wrong(client, answer):
    top = answer["top_categories"][0]
    other = next(c for c in ("hat", "watch") if c != top)
    post_json(client, {"request_id": "answer-1", "categories": [other]})
    post_json(client, {"request_id": "answer-1", "categories": [top]})
    assert Feedback.objects.count() == 2
    assert Prediction.objects.get().answer_was_wrong is False


def test_deeply_nested_feedback_json_is_a_400_not_a_500(client):
    body = "[" * 20_000 + "]" * 20_000  # far deeper than any parser should recurse, under the JSON size limit
    response = client.post("/syte_test/feedback", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_request"


def test_feedback_over_the_request_limit_is_refused_before_it_is_read(client, settings):
    override(settings, limits={"max_request_bytes": 1000})
    response = client.post(
        "/syte_test/feedback", data={"request_id": "x", "pad": "y" * 2000}, content_type="application/json"
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
