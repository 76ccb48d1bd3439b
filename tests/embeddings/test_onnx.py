"""The opt-in ONNX Runtime path (CLIP_RUNTIME=onnx, CLIP_QUANTIZE=int8): exported once, cached, accurate."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from embeddings.runtime.state import Runtime, RuntimeConfig
from tests.conftest import MODELS, gradient_image, photo_bytes

TEXTS = ["a photo of a cat", "a man riding a motorcycle down a long empty road at sunset", "coffee", "ok"]


def cosines(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def load(folder, quantize):
    rt = Runtime()
    rt.load(RuntimeConfig(model=str(folder), models_dir=MODELS, device="cpu", backend="onnx", quantize=quantize))
    return rt.encoder()


def images():
    import io

    from PIL import Image

    photos = [Image.open(io.BytesIO(photo_bytes(n))).convert("RGB") for n in ("chelsea.jpg", "coffee.jpg")]
    return photos + [gradient_image(300, 200, seed=1)]


@pytest.mark.parametrize("quantize, image_floor, text_floor", [("none", 0.99999, 0.99999), ("int8", 0.999, 0.998)])
def test_onnx_vectors_match_float32_torch(clip, model_copy, quantize, image_floor, text_floor):
    encoder = load(model_copy, quantize)
    try:
        assert encoder.backend.name == ("onnx-int8" if quantize == "int8" else "onnx")
        assert encoder.model is None  # the torch weights were let go
        got_t, _ = encoder.encode_texts(TEXTS)
        want_t, _ = clip.encode_texts(TEXTS)
        assert np.all(cosines(got_t, want_t) >= text_floor), cosines(got_t, want_t)
        alone = np.concatenate([encoder.encode_texts([t])[0] for t in TEXTS])  # other sequence lengths
        assert np.all(cosines(alone, want_t) >= text_floor)
        got_i, want_i = encoder.encode_images(images()), clip.encode_images(images())
        assert np.all(cosines(got_i, want_i) >= image_floor), cosines(got_i, want_i)
    finally:
        encoder.batcher.stop()


def test_onnx_export_is_cached_next_to_the_model(model_copy):
    load(model_copy, "int8").batcher.stop()
    cached = model_copy / "model-clip" / "onnx-cache"
    files = {p.name: p.stat().st_mtime_ns for p in cached.glob("*.onnx")}
    assert {"image.int8.onnx", "text.int8.onnx"} <= set(files)
    load(model_copy, "int8").batcher.stop()
    assert {p.name: p.stat().st_mtime_ns for p in cached.glob("*.onnx")} == files  # not exported again


def test_a_cached_export_is_served_without_loading_the_torch_weights(model_copy, monkeypatch):
    from embeddings.runtime import loading

    load(model_copy, "none").batcher.stop()  # exports (or finds) the float32 files

    def no_weights(*args, **kwargs):
        raise AssertionError("the torch weights were loaded although the ONNX export is cached")

    monkeypatch.setattr(loading, "load_model", no_weights)
    monkeypatch.setattr("embeddings.runtime.state.load_model", no_weights)
    encoder = load(model_copy, "none")
    try:
        assert encoder.backend.name == "onnx"
        from embeddings.runtime.loading import read_logit_scale

        assert encoder.logit_scale == pytest.approx(read_logit_scale(model_copy / "model-clip"))
        assert encoder.logit_scale == pytest.approx(float(np.exp(2.6592)), rel=1e-4)
        vectors, _ = encoder.encode_texts(TEXTS)
        assert vectors.shape == (len(TEXTS), encoder.dim)
    finally:
        encoder.batcher.stop()
