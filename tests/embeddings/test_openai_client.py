"""The official ``openai`` Python client, pointed at a live server through ``base_url``: a text, an image
and a mixed list come back as the server's own vectors; its errors become the SDK's exceptions."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import requests

from tests.conftest import assert_same_vectors, photo_bytes
from tests.server import serving

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir):
    with serving(tmp_path_factory.mktemp("openai-client"), tiny_model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(live) -> openai.OpenAI:
    # The SDK insists on a key; where the server requires none, any placeholder is taken as none.
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-unused", max_retries=0, timeout=60)


def data_url(name: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(photo_bytes(name)).decode()


def served_vectors(live, parts: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The same inputs through the multipart endpoint of the same server."""
    files = {k: (None, v) if isinstance(v, str) else v for k, v in parts.items()}  # texts: parts without a filename
    answer = requests.post(f"{live.url}/syte_test/embeddings", files=files, timeout=60).json()
    return {k: np.array(v, np.float32) for k, v in answer["vectors"].items()}


def vectors_of(answer) -> np.ndarray:
    return np.array([item.embedding for item in sorted(answer.data, key=lambda d: d.index)], np.float32)


def test_the_sdk_lists_the_served_model(sdk):
    (model,) = sdk.models.list().data
    assert model.id and sdk.models.retrieve(model.id).id == model.id


def test_the_sdk_gets_a_texts_vector(sdk, live):
    model = sdk.models.list().data[0].id
    answer = sdk.embeddings.create(model=model, input="a photo of a cat")  # the SDK asks for base64 itself
    assert answer.model == model and answer.usage.prompt_tokens > 0
    want = served_vectors(live, {"t": "a photo of a cat"})["t"]
    assert_same_vectors(vectors_of(answer), want[None])


def test_the_sdk_gets_an_images_vector(sdk, live):
    model = sdk.models.list().data[0].id
    answer = sdk.embeddings.create(model=model, input=[data_url("chelsea.jpg")], encoding_format="float")
    want = served_vectors(live, {"i": ("chelsea.jpg", photo_bytes("chelsea.jpg"), "image/jpeg")})["i"]
    assert_same_vectors(vectors_of(answer), want[None])


def test_the_sdk_gets_a_mixed_list_in_order(sdk, live):
    model = sdk.models.list().data[0].id
    inputs = ["a rocket", data_url("rocket.jpg"), "a cup of coffee", data_url("coffee.jpg")]
    answer = sdk.embeddings.create(model=model, input=inputs)
    assert [d.index for d in answer.data] == [0, 1, 2, 3]
    want = served_vectors(
        live,
        {
            "a": "a rocket",
            "b": ("rocket.jpg", photo_bytes("rocket.jpg"), "image/jpeg"),
            "c": "a cup of coffee",
            "d": ("coffee.jpg", photo_bytes("coffee.jpg"), "image/jpeg"),
        },
    )
    assert_same_vectors(vectors_of(answer), np.stack([want[k] for k in "abcd"]))


def test_the_sdk_raises_its_own_errors_with_our_codes(sdk):
    model = sdk.models.list().data[0].id
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.embeddings.create(model="text-embedding-3-small", input="a cat")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as shortened:
        sdk.embeddings.create(model=model, input="a cat", dimensions=8)
    assert shortened.value.code == "dimensions_unsupported" and "dimensions" in shortened.value.message
