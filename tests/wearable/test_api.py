"""The wearable endpoint over Django's test client: shape, top_k, scores, the cache, and every error."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from embeddings.images import decode_image
from embeddings.services import l2_normalize
from tests.conftest import (
    assert_same_vectors,
    cosines,
    gradient_image,
    image_bytes,
    multipart_body,
    override,
    photo_bytes,
)
from tests.wearable.conftest import WEARABLE, post_wearable, upload
from wearable.models import Category, CategoryEmbedding, Prediction
from wearable.services import category_cache

pytestmark = pytest.mark.django_db

SEEDED = [
    "t-shirt",
    "shirt",
    "blouse",
    "sweater",
    "hoodie",
    "jacket",
    "coat",
    "dress",
    "skirt",
    "jeans",
    "trousers",
    "shorts",
    "sneakers",
    "boots",
    "sandals",
    "high heels",
    "hat",
    "sunglasses",
    "handbag",
    "watch",
]


@pytest.fixture
def jpeg() -> bytes:
    return photo_bytes("chelsea.jpg")


def post_raw(client, parts: list[tuple], query: str = "", **extra):
    body, content_type = multipart_body(parts)
    return client.generic("POST", WEARABLE + query, body, content_type=content_type, **extra)


def error_of(response) -> dict:
    return response.json()["error"]


def assert_same_scores(got: list[dict], want: list[dict]) -> None:
    """Two answers computed by separate forward passes: equal up to float rounding and the 2/4 decimals shown."""
    assert {s["category"] for s in got} == {s["category"] for s in want}
    by_name = {s["category"]: s for s in want}
    for entry in got:
        assert entry["score"] == pytest.approx(by_name[entry["category"]]["score"], abs=0.011)
        assert entry["probability"] == pytest.approx(by_name[entry["category"]]["probability"], abs=2e-4)


def test_the_data_migration_seeds_the_20_wearables_enabled_in_order():
    categories = list(Category.objects.order_by("display_order"))
    assert [c.name for c in categories] == SEEDED
    assert all(c.enabled and c.prompts == "" for c in categories)


def test_response_shape_with_the_top_3_by_default(client, clip, jpeg):
    response = post_wearable(client, jpeg, headers={"request_id": "w-1"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"request_id", "model", "top_categories", "scores"}
    assert body["request_id"] == response["request_id"] == "w-1"
    assert body["model"] == clip.name
    assert len(body["top_categories"]) == 3 and set(body["top_categories"]) <= set(SEEDED)
    assert [s["category"] for s in body["scores"]] == body["top_categories"]
    for entry in body["scores"]:
        assert set(entry) == {"category", "score", "probability"}
        assert -100 <= entry["score"] <= 100 and 0 <= entry["probability"] <= 1
    scores = [s["score"] for s in body["scores"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_top_k_asks_for_that_many(client, clip, jpeg, top_k):
    body = post_wearable(client, jpeg, query=f"?top_k={top_k}").json()
    assert len(body["top_categories"]) == len(body["scores"]) == top_k
    if top_k == 20:
        assert sorted(body["top_categories"]) == sorted(SEEDED)
        # Probabilities are a softmax over all enabled categories: all of them sum to 1.
        assert sum(s["probability"] for s in body["scores"]) == pytest.approx(1.0, abs=20 * 5e-5)


@pytest.mark.parametrize("value", ["0", "21", "-1", "2.5", "three", "", "1e1", "99999999999"])
def test_top_k_out_of_range_or_not_a_number_is_400_never_clamped(client, clip, jpeg, value):
    response = post_wearable(client, jpeg, query=f"?top_k={value}")
    assert response.status_code == 400, response.content
    assert error_of(response)["code"] == "invalid_parameter" and error_of(response)["key"] == "top_k"
    assert not Prediction.objects.exists()


def test_top_k_range_follows_the_enabled_categories(client, clip, jpeg):
    Category.objects.exclude(name__in=["jeans", "hat"]).update(enabled=False)
    body = post_wearable(client, jpeg).json()
    assert sorted(body["top_categories"]) == ["hat", "jeans"]  # the default adapts to a small table
    assert post_wearable(client, jpeg, query="?top_k=2").status_code == 200
    response = post_wearable(client, jpeg, query="?top_k=3")
    assert response.status_code == 400 and "1 to 2" in error_of(response)["message"]


def test_with_the_template_alone_scores_equal_the_embeddings_endpoint(client, clip, jpeg, settings):
    override(settings, wearable={"prompt_templates": tuple(["{}"])})
    body = post_wearable(client, jpeg, query="?top_k=20").json()
    parts = [("image", jpeg, "photo.jpg")] + [(f"text-{i}", name, None) for i, name in enumerate(SEEDED)]
    body_bytes, content_type = multipart_body(parts)
    embeddings = client.generic("POST", "/syte_test/embeddings", body_bytes, content_type=content_type).json()
    image = np.array(embeddings["images_vectors"][0])
    expected = {
        name: 100 * float(image @ np.array(vec)) for name, vec in zip(SEEDED, embeddings["texts_vectors"], strict=True)
    }
    assert len(body["scores"]) == 20
    for entry in body["scores"]:
        assert entry["score"] == pytest.approx(expected[entry["category"]], abs=0.01), entry
        assert entry["score"] == pytest.approx(
            embeddings["similarity_matrix"][0][SEEDED.index(entry["category"])], abs=0.01
        )
    # probability: softmax of the model's logit scale x cosine, over every enabled category
    cosines = np.array([expected[name] / 100 for name in SEEDED])
    logits = clip.info.logit_scale * cosines
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    for entry in body["scores"]:
        assert entry["probability"] == pytest.approx(softmax[SEEDED.index(entry["category"])], abs=1e-4)


def test_a_category_vector_is_the_normalised_mean_of_its_prompts(client, clip, jpeg, settings):
    templates = ["a photo of a {}.", "a {} on a person."]
    override(settings, wearable={"prompt_templates": tuple(templates)})
    Category.objects.filter(name="hat").update(prompts="a straw hat\na baseball cap")
    Category.objects.exclude(name__in=["hat", "jeans"]).update(enabled=False)
    body = post_wearable(client, jpeg, query="?top_k=2").json()
    image = l2_normalize(clip.embed_images([_photo(jpeg)]))[0]
    for name, prompts in (
        ("hat", ["a straw hat", "a baseball cap"]),
        ("jeans", [t.format("jeans") for t in templates]),
    ):
        raw = clip.embed_texts(prompts)
        vector = l2_normalize(l2_normalize(raw).mean(axis=0))
        score = next(s["score"] for s in body["scores"] if s["category"] == name)
        assert score == pytest.approx(100 * float(vector @ image), abs=0.011)
    stored = set(CategoryEmbedding.objects.filter(category__name="hat").values_list("prompt", flat=True))
    assert stored == {"a straw hat", "a baseball cap"}


def _photo(data: bytes):
    return decode_image(data).image


def test_ties_are_broken_by_display_order_then_name(client, clip, jpeg, settings):
    override(
        settings, wearable={"prompt_templates": tuple(["a photo of clothing."])}
    )  # one text for all: every score ties
    Category.objects.filter(name="watch").update(display_order=1)
    body = post_wearable(client, jpeg, query="?top_k=4").json()
    assert len({s["score"] for s in body["scores"]}) == 1
    assert body["top_categories"] == ["watch", "t-shirt", "shirt", "blouse"]


def test_a_warm_request_never_runs_the_text_encoder(client, clip, jpeg, monkeypatch, django_assert_num_queries):
    assert post_wearable(client, jpeg).status_code == 200  # warms this process's cache

    def no_text_encoder(texts):
        raise AssertionError(f"the text encoder ran during a warm wearable request: {texts[:3]}")

    image_passes = []
    embed = clip.embed

    def counting(*, images=(), texts=(), **kwargs):
        if texts:
            no_text_encoder(texts)
        image_passes.append(len(images))
        return embed(images=images, texts=texts, **kwargs)

    monkeypatch.setattr(clip, "embed", counting)
    # One small query (is the cache current?) and one insert (the recorded answer).
    with django_assert_num_queries(2):
        response = post_wearable(client, photo_bytes("astronaut.jpg"))
    assert response.status_code == 200, response.content
    assert image_passes == [1]


def test_a_cold_process_reads_stored_vectors_instead_of_encoding(client, clip, jpeg, monkeypatch):
    first = post_wearable(client, jpeg, query="?top_k=20").json()
    assert CategoryEmbedding.objects.filter(model_name=clip.name).count() == 20 * 3
    category_cache.clear()  # another process, or a restart: memory empty, rows in the database

    def no_text_encoder(texts):
        raise AssertionError("stored vectors were computed again")

    monkeypatch.setattr(clip, "embed_texts", no_text_encoder)
    assert_same_scores(post_wearable(client, jpeg, query="?top_k=20").json()["scores"], first["scores"])


def test_missing_vectors_are_computed_in_one_batch(client, clip, jpeg, monkeypatch):
    calls = []
    embed_texts = clip.embed_texts
    monkeypatch.setattr(clip, "embed_texts", lambda texts: calls.append(list(texts)) or embed_texts(texts))
    post_wearable(client, jpeg)
    assert len(calls) == 1 and len(calls[0]) == 60
    Category.objects.filter(name="hat").update(prompts="a cowboy hat")  # a shell edit: updated_at untouched
    post_wearable(client, jpeg)
    assert calls[1:] == [["a cowboy hat"]]


def test_vectors_of_another_model_are_never_used(client, clip, jpeg, settings):
    override(settings, wearable={"prompt_templates": tuple(["{}"])})
    expected = post_wearable(client, jpeg, query="?top_k=20").json()["scores"]
    # The rows an earlier CLIP_MODEL left: same categories and prompts, other vectors.
    rows = list(CategoryEmbedding.objects.filter(model_name=clip.name))
    CategoryEmbedding.objects.all().delete()
    rng = np.random.default_rng(0)
    CategoryEmbedding.objects.bulk_create(
        CategoryEmbedding(
            category_id=r.category_id,
            model_name="old-model",
            prompt=r.prompt,
            vector=rng.standard_normal(clip.dim).astype("<f4").tobytes(),
        )
        for r in rows
    )
    category_cache.clear()
    assert_same_scores(post_wearable(client, jpeg, query="?top_k=20").json()["scores"], expected)
    assert CategoryEmbedding.objects.filter(model_name=clip.name).count() == 20
    assert CategoryEmbedding.objects.filter(model_name="old-model").count() == 20


def test_the_in_memory_cache_is_keyed_by_model_name(clip):
    class Renamed:  # the same weights under another name: what the cache sees when CLIP_MODEL changes
        name = "another-model"

        def __getattr__(self, attr):
            return getattr(clip, attr)

    first = category_cache.matrix(clip)
    other = category_cache.matrix(Renamed())
    assert first.model_name == clip.name and other.model_name == "another-model"
    assert CategoryEmbedding.objects.filter(model_name="another-model").count() == 60
    assert category_cache.matrix(clip) is not other


def test_each_answer_is_recorded_without_the_image(client, clip, jpeg):
    body = post_wearable(client, jpeg, headers={"request_id": "rec-1"}).json()
    prediction = Prediction.objects.get()
    assert prediction.request_id == "rec-1" and prediction.model_name == clip.name
    assert prediction.top_categories == body["top_categories"] and prediction.scores == body["scores"]
    assert prediction.image_sha256 == hashlib.sha256(jpeg).hexdigest()
    assert prediction.image is None and prediction.created_at is not None
    assert prediction.answer_was_wrong is None


def test_the_image_is_kept_when_the_setting_asks(client, clip, jpeg, settings):
    override(settings, wearable={"store_images": True})
    post_wearable(client, jpeg)
    assert bytes(Prediction.objects.get().image) == jpeg


# --- errors --------------------------------------------------------------------------------------
def test_no_image_is_400(client, clip):
    response = post_raw(client, [], headers={"request_id": "e-1"})
    assert response.status_code == 400
    assert response.json() == {
        "request_id": "e-1",
        "error": {"code": "no_image", "message": error_of(response)["message"], "key": None},
    }


def test_only_text_is_400_no_image(client, clip):
    response = post_raw(client, [("text", "a photo of jeans", None)])
    assert response.status_code == 400 and error_of(response)["code"] == "no_image"
    assert error_of(response)["key"] == "text"


def test_two_images_are_400(client, clip, jpeg):
    response = post_raw(client, [("a", jpeg, "a.jpg"), ("b", image_bytes(gradient_image()), "b.png")])
    assert response.status_code == 400
    assert error_of(response)["code"] == "too_many_images" and error_of(response)["key"] == "b"


def test_a_text_part_beside_the_image_is_400(client, clip, jpeg):
    response = post_raw(client, [("image", jpeg, "a.jpg"), ("caption", "jeans", None)])
    assert response.status_code == 400
    assert error_of(response)["code"] == "unexpected_text" and error_of(response)["key"] == "caption"
    assert not Prediction.objects.exists()


def test_an_image_that_does_not_decode_is_400_like_embeddings(client, clip):
    response = post_raw(client, [("image", b"not an image", "a.jpg")])
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_image" and error_of(response)["key"] == "image"


def test_image_limits_are_those_of_embeddings(client, clip, settings):
    override(settings, limits={"max_image_pixels": 1000})
    response = post_wearable(client, image_bytes(gradient_image(100, 100)))
    assert response.status_code == 413 and error_of(response)["code"] == "image_too_large"


def test_a_body_that_is_not_multipart_is_415(client, clip):
    response = client.post(WEARABLE, data=b"{}", content_type="application/json")
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"


def test_no_enabled_category_is_503_saying_to_enable_some_in_admin(client, clip, jpeg):
    Category.objects.update(enabled=False)
    response = post_wearable(client, jpeg, headers={"request_id": "e-503"})
    assert response.status_code == 503
    assert error_of(response)["code"] == "no_categories" and "admin" in error_of(response)["message"]
    assert response.json()["request_id"] == "e-503"


def test_any_key_and_image_format_are_accepted(client, clip):
    png = image_bytes(gradient_image(64, 48, mode="RGBA"))
    response = client.post(WEARABLE, data={"whatever-key": upload(png, "x.png")})
    assert response.status_code == 200, response.content


def test_doubled_slash_reaches_the_wearable_view(client, clip, jpeg):
    response = client.post(WEARABLE, data={"image": upload(jpeg)}, PATH_INFO="//syte_test/wearable")
    assert response.status_code == 200, response.content


def test_a_large_jpeg_gets_the_same_vector_from_both_endpoints(client, clip, monkeypatch):
    """One upload, one decoding (libjpeg's draft included) and one vector, whichever endpoint it reaches."""
    from embeddings import services

    photo = Image.open(io.BytesIO(photo_bytes("astronaut.jpg"))).convert("RGB")
    data = image_bytes(photo.resize((2000, 1500), Image.Resampling.BICUBIC), "JPEG", quality=90)
    decoded_sizes, inputs = [], []
    decode, embed = services.decode_image, clip.embed
    monkeypatch.setattr(
        services, "decode_image", lambda *a, **k: decoded_sizes.append(decode(*a, **k).image.size) or decode(*a, **k)
    )

    def recording(*, images=(), texts=(), **kwargs):
        out = embed(images=images, texts=texts, **kwargs)
        inputs.extend(
            (np.asarray(image).copy(), vector.copy()) for image, vector in zip(images, out.images, strict=True)
        )
        return out

    monkeypatch.setattr(clip, "embed", recording)
    assert post_raw(client, [("image", data, "big.jpg")]).status_code == 200
    body, content_type = multipart_body([("image", data, "big.jpg")])
    response = client.generic("POST", "/syte_test/embeddings", body, content_type=content_type)
    assert response.status_code == 200
    assert decoded_sizes == [(500, 375), (500, 375)]  # drafted by libjpeg to 1/4, on both endpoints
    (wearable_pixels, wearable_vector), (embeddings_pixels, embeddings_vector) = inputs
    assert np.array_equal(wearable_pixels, embeddings_pixels)  # the same model input
    assert_same_vectors(wearable_vector, embeddings_vector)
    served = np.array(response.json()["images_vectors"][0])
    assert float(cosines(served, wearable_vector)[0]) >= 0.99999


def test_categories_are_ranked_by_their_true_cosine_not_the_rounded_score():
    from wearable.services import CategoryMatrix, rank_categories

    image = np.zeros(4)
    image[0] = 1.0
    # cosines 0.30001 and 0.30004: both shown as 30.0, the second truly closer; display order favours the first
    vectors = np.array([[0.30001, np.sqrt(1 - 0.30001**2), 0, 0], [0.30004, 0, np.sqrt(1 - 0.30004**2), 0]])
    matrix = CategoryMatrix(model_name="m", stamp=(), names=["first", "second"], orders=[0, 1], vectors=vectors)
    ranked = rank_categories(matrix=matrix, image_vector=image, logit_scale=100.0, logit_bias=None, top_k=2)
    assert [r["category"] for r in ranked] == ["second", "first"]
    assert ranked[0]["score"] == ranked[1]["score"] == 30.0
    assert ranked[0]["probability"] > ranked[1]["probability"]


def test_siglip_probabilities_are_independent_sigmoids_clip_ones_a_softmax():
    from wearable.services import category_probabilities

    cosine = np.array([0.1, 0.2, 0.05])
    softmax = category_probabilities(cosine, logit_scale=10.0, logit_bias=None)
    assert softmax.sum() == pytest.approx(1.0)
    sigmoid = category_probabilities(cosine, logit_scale=10.0, logit_bias=-2.0)
    assert np.allclose(sigmoid, 1 / (1 + np.exp(-(10 * cosine - 2))))
    assert sigmoid.sum() != pytest.approx(1.0)
