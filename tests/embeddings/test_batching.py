"""Batching across requests and fast preprocessing must not change a vector beyond float rounding."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from embeddings.runtime.batching import Batcher, QueueFull
from embeddings.runtime.encoder import ClipEncoder
from embeddings.runtime.preprocess import FastImagePreprocessor
from tests.conftest import gradient_image, image_bytes, multipart_body

TEXTS = ["a cat", "a photo of a very small dog sitting on a red sofa in the evening", "x", "two words"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def test_text_batch_padded_to_its_longest_equals_each_text_alone(clip):
    together, _ = clip.encode_texts(TEXTS)
    alone = np.concatenate([clip.encode_texts([t])[0] for t in TEXTS])
    assert np.all(cosines(together, alone) >= 0.99999)


def test_image_batch_equals_each_image_alone(clip):
    images = [gradient_image(300 + 10 * i, 200 + 7 * i, seed=i) for i in range(5)]
    together = clip.encode_images(images)
    alone = np.concatenate([clip.encode_images([im]) for im in images])
    assert np.all(cosines(together, alone) >= 0.99999)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(clip):
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(48)]
    expected = {t: clip.encode_texts([t])[0][0] for t in texts}
    before_batches, before_items = clip.batcher.batches_run, clip.batcher.items_run
    results, errors = {}, []

    def worker(text):
        try:
            results[text] = clip.encode_texts([text])[0][0]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for text in texts:
        assert float(cosines(results[text][None], expected[text][None])[0]) >= 0.99999
    batches = clip.batcher.batches_run - before_batches
    items = clip.batcher.items_run - before_items
    assert items == len(texts) and batches < items  # some requests shared a forward


def test_a_bad_item_fails_only_its_own_request():
    def forward(payloads):
        if "bad" in payloads:
            raise ValueError("boom")
        return np.array([[len(p)] for p in payloads], dtype=np.float32)

    batcher = Batcher({"text": forward}, max_batch=8, max_wait_ms=50)
    try:
        outcome = {}

        def call(payload):
            try:
                outcome[payload] = batcher.run("text", [payload])[0][0]
            except Exception as exc:  # noqa: BLE001
                outcome[payload] = exc

        threads = [threading.Thread(target=call, args=(p,)) for p in ("ok", "bad", "fine!")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcome["ok"] == 2 and outcome["fine!"] == 5
        assert isinstance(outcome["bad"], RuntimeError)
    finally:
        batcher.stop()


def test_a_full_queue_refuses_instead_of_piling_up():
    release = threading.Event()

    def slow(payloads):
        release.wait(5)
        return np.zeros((len(payloads), 1), dtype=np.float32)

    batcher = Batcher({"image": slow}, max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        threads = [threading.Thread(target=batcher.run, args=("image", [i])) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        with pytest.raises(QueueFull):
            batcher.run("image", [99])
    finally:
        release.set()
        for t in threads:
            t.join()
        batcher.stop()


def test_overloaded_server_answers_503(client, clip, monkeypatch):
    def full(*args, **kwargs):
        raise QueueFull("full")

    monkeypatch.setattr(clip.batcher, "run", full)
    response = client.post("/syte_test/embeddings", data={"t": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"


def test_fast_preprocessing_equals_the_stock_processor(clip):
    assert clip.fast is not None
    for size in ((640, 480), (480, 640), (225, 224), (1000, 333)):
        image = gradient_image(*size, seed=size[0])
        want = clip.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        assert np.max(np.abs(clip.fast(image) - want)) < 1e-5


def test_fast_preprocessing_handles_square_resize_like_siglip():
    from transformers import SiglipImageProcessorPil

    stock = SiglipImageProcessorPil(
        size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    fast = FastImagePreprocessor.from_processor(stock)
    assert fast is not None and fast.agrees_with(stock)


@pytest.mark.parametrize("size", [(1920, 1080), (4000, 3000)])
def test_large_jpegs_are_draft_decoded_and_keep_parity(client, clip, size):
    from embeddings.images import decode_image

    photo = Image.open("tests/data/photos/astronaut.jpg").convert("RGB").resize(size, Image.Resampling.BICUBIC)
    data = image_bytes(photo, "JPEG", quality=90)
    decoded = decode_image(data, draft_min_side=clip.draft_min_side)
    assert min(decoded.image.size) < min(size)  # libjpeg decoded at reduced scale
    assert min(decoded.image.size) >= 224  # never below the model's input side
    body, content_type = multipart_body([("img", data, "big.jpg")])
    got = np.array(
        client.generic("POST", "/syte_test/embeddings", body, content_type=content_type).json()["images_vectors"][0]
    )
    stock_inputs = clip.processor(images=[Image.open(__import__("io").BytesIO(data))], return_tensors="pt")
    with torch.inference_mode():
        out = clip.model.get_image_features(**stock_inputs)
    want = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()[0]
    assert float(got @ want / np.linalg.norm(want)) >= 0.9999


def test_siglip_family_texts_are_padded_to_their_fixed_length(tmp_path, tiny_model_dir):
    """SigLIP pools its last token: per-batch padding would change its vectors, so it is padded to 64."""
    from transformers import AutoProcessor, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=64,
            projection_size=32,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=224,
            patch_size=32,
        ),
    )
    model = SiglipModel(config).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir / "processor-clip")
    processor.tokenizer.model_max_length = 64
    encoder = ClipEncoder(model, processor, name="tiny-siglip")
    encoder.start_batching(max_batch=8, max_wait_ms=0, max_queue=64)
    try:
        got, _ = encoder.encode_texts(TEXTS)
        inputs = processor.tokenizer(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.get_text_features(**inputs)
        want = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
        assert np.all(cosines(got, want) >= 0.99999)
        longest = processor.tokenizer(TEXTS, padding="longest", return_tensors="pt")
        with torch.inference_mode():
            out = model.get_text_features(**longest)
        per_batch = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
        assert np.min(cosines(per_batch, want)) < 0.999  # the padding really matters for this family
    finally:
        encoder.batcher.stop()
