"""Every family, with its own tokenizer class, served by gunicorn through the start script: the
vectors are transformers' own, and the wearable answers with the family's own zero-shot recipe."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModel

from tests.conftest import cosines, gradient_image, image_bytes, multipart_body, photo_bytes
from tests.families import FAMILIES, ensure_family_model, reference_vectors
from tests.server import Server, raw_http, server_env
from tests.wearable.test_api import SEEDED as CATEGORIES

pytestmark = pytest.mark.server

TEXTS = ["a photo of a cat", "a person wearing a red hat and blue jeans", "一张猫的照片"]


def post(port: int, path: str, parts: list[tuple]) -> dict:
    body, content_type = multipart_body(parts)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    status, _, payload = raw_http(port, head.encode() + body)
    assert status == 200, payload
    return json.loads(payload)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_is_served_with_parity_and_its_own_wearable_recipe(tmp_path, family):
    folder = ensure_family_model(family)
    photo = photo_bytes("chelsea.jpg")
    synthetic = image_bytes(gradient_image(333, 250, seed=3))
    srv = Server(server_env(tmp_path, folder, WEARABLE_PROMPT_TEMPLATES="{}"), tmp_path / "server.log")
    try:
        srv.wait_ready()
        ready = srv.details()
        assert ready["family"] == json.loads((folder / "config.json").read_text())["model_type"]
        assert ready["faithful"] is True
        parts = [("image-1", photo, "cat.jpg"), ("image-2", synthetic, "g.png")]
        parts += [(f"text-{i}", t, None) for i, t in enumerate(TEXTS)]
        body = post(srv.port, "/syte_test/embeddings", parts)
        wearable = post(srv.port, "/syte_test/wearable?top_k=20", [("image", photo, "cat.jpg")])
        names = post(srv.port, "/syte_test/embeddings", [(f"c{i}", n, None) for i, n in enumerate(CATEGORIES)])
    finally:
        srv.stop()
    pictures = [Image.open(io.BytesIO(photo)), Image.open(io.BytesIO(synthetic))]
    want_images, want_texts = reference_vectors(folder, images=pictures, texts=TEXTS)
    assert np.all(cosines(body["images_vectors"], want_images) >= 0.999)
    assert np.all(cosines(body["texts_vectors"], want_texts) >= 0.9999)

    model = AutoModel.from_pretrained(folder)
    scale = float(model.logit_scale.detach().exp())
    cos = np.array(names["texts_vectors"]) @ np.array(body["images_vectors"][0])
    logits = scale * cos
    if hasattr(model, "logit_bias"):  # SigLIP: an independent sigmoid per category
        bias = float(model.logit_bias.detach().reshape(-1)[0])
        expected = 1 / (1 + np.exp(-(logits + bias)))
    else:  # CLIP's softmax over every category
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {s["category"]: s["probability"] for s in wearable["scores"]}
    assert sorted(got) == sorted(CATEGORIES)
    for name, probability in got.items():
        assert probability == pytest.approx(float(expected[CATEGORIES.index(name)]), abs=2e-4), name
    assert [s["score"] for s in wearable["scores"]] == sorted((s["score"] for s in wearable["scores"]), reverse=True)
