"""The backend contract suite: the same cases against every backend (and dtype) on every family.

A backend must give transformers' own vectors, the same rows in a batch as alone, float32 arrays of
the model's width, and raise (never return garbage) on an input it cannot compute, which the engine
then fails alone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from embeddings.runtime.backends import Backend
from embeddings.runtime.cpu import int8_reduce_range
from embeddings.runtime.engine import InferenceFailed
from embeddings.runtime.prepare import prepare
from embeddings.runtime.preprocessing import Tokens
from embeddings.runtime.state import open_engine
from tests.conftest import (
    CPU_CONFIGS,
    assert_same_vectors,
    cosines,
    gradient_image,
    offered,
    photo_bytes,
    runtime_settings,
)
from tests.families import FAMILIES, ensure_family_model, reference_vectors

TEXTS = [
    "a photo of a cat",
    "a man riding a motorcycle down a long empty road at sunset",
    "coffee",
    "一张猫的照片",
    " ".join(["photograph"] * 45),
]
CONFIGS = {f"{b}-{d}": (b, d) for b, d in CPU_CONFIGS} | {"onnx-int8": ("onnx", "int8")}
# The core promise for float32 and bfloat16; int8 is an opt-in trade, held to what it measures on these models.
FLOORS = {name: (0.999, 0.9999) for name in CONFIGS} | {"onnx-int8": (0.99, 0.99)}
# Every family on every backend and dtype this CPU offers (bfloat16 where it computes it natively).
OFFERED = [c for c in CONFIGS if c != "onnx-int8" and not offered(*CONFIGS[c])]
CASES = [pytest.param((f, c), id=f"{f}-{c}") for f in FAMILIES for c in OFFERED]
# int8's 0.99 holds where the CPU has VNNI; elsewhere its kernels saturate, the weights keep to 7 bits,
# and prepare_model measures and flags what that gives (tests/embeddings/test_prepare.py).
CASES += [
    pytest.param(
        ("clip", "onnx-int8"),
        id="clip-onnx-int8",
        marks=pytest.mark.skipif(int8_reduce_range(), reason="no VNNI: int8 is measured and flagged, not promised"),
    )
]


def images():
    import io

    from PIL import Image

    photos = [Image.open(io.BytesIO(photo_bytes(n))).convert("RGB") for n in ("chelsea.jpg", "coffee.jpg")]
    return photos + [gradient_image(300, 200, seed=1)]


@pytest.fixture(scope="module")
def engines():
    opened = {}

    def get(family: str, config: str):
        if (family, config) not in opened:
            backend, dtype = CONFIGS[config]
            settings = runtime_settings(ensure_family_model(family), backend=backend, dtype=dtype)
            prepare(settings)
            opened[(family, config)] = open_engine(replace(settings, max_wait_ms=0))[0]
        return opened[(family, config)]

    yield get
    for engine in opened.values():
        engine.close()


@pytest.fixture(params=CASES)
def case(request, engines):
    family, config = request.param
    return family, config, engines(family, config)


def test_it_is_the_backend_it_says(case):
    family, config, engine = case
    backend = engine.backends["image"]
    assert isinstance(backend, Backend)
    assert (backend.name, backend.dtype, backend.device) == (*CONFIGS[config], "cpu")


def test_parity_with_transformers_pipeline(case):
    family, config, engine = case
    want_images, want_texts = reference_vectors(ensure_family_model(family), images=images(), texts=TEXTS)
    out = engine.embed(images=images(), texts=TEXTS)
    image_floor, text_floor = FLOORS[config]
    assert np.all(cosines(out.images, want_images) >= image_floor), cosines(out.images, want_images)
    assert np.all(cosines(out.texts, want_texts) >= text_floor), cosines(out.texts, want_texts)


def test_a_batch_equals_its_items_alone(case):
    _, config, engine = case
    # Dynamic int8 quantises activations with the range of the whole batch: its rows move a little with
    # their batch mates. float32 rows move only by float rounding, bfloat16 ones by bfloat16's (2^-8).
    cosine, norm_rtol = {"int8": (0.999, 2e-2), "bfloat16": (0.9999, 5e-3)}.get(CONFIGS[config][1], (0.99999, 1e-4))
    pre = engine.preprocessing
    pixels = np.stack([pre.image(i) for i in images()])
    backend = engine.backends["image"]
    together = backend.image_features(pixels)
    alone = np.concatenate([backend.image_features(pixels[i : i + 1]) for i in range(len(pixels))])
    assert_same_vectors(together, alone, cosine=cosine, norm_rtol=norm_rtol)
    tokens = pre.tokenize(TEXTS)
    text_backend = engine.backends["text"]
    together = text_backend.text_features(*pre.pad(tokens))
    alone = np.concatenate([text_backend.text_features(*pre.pad([t])) for t in tokens])
    assert_same_vectors(together, alone, cosine=cosine, norm_rtol=norm_rtol)


def test_shapes_and_dtypes(case):
    _, _, engine = case
    pre = engine.preprocessing
    for n in (1, 3):
        rows = engine.backends["image"].image_features(np.stack([pre.image(i) for i in images()[:n]]))
        assert rows.dtype == np.float32 and rows.shape == (n, engine.dim)
        rows = engine.backends["text"].text_features(*pre.pad(pre.tokenize(TEXTS[:n])))
        assert rows.dtype == np.float32 and rows.shape == (n, engine.dim) and np.all(np.isfinite(rows))


def test_an_input_it_cannot_compute_raises_and_fails_alone(case):
    _, _, engine = case
    pre = engine.preprocessing
    good = pre.tokenize(["a photo of a cat"])[0]
    vocabulary = len(pre.tokenizer)
    bad = Tokens([good.ids[0], vocabulary + 1000, good.ids[-1]], False)  # no such token: no row to look up
    with pytest.raises(Exception):  # noqa: B017 - whatever the engine raises, it raises
        engine.backends["text"].text_features(*pre.pad([bad]))
    with pytest.raises(InferenceFailed):
        engine._run([], [bad], None)
    assert_same_vectors(engine._run([], [good], None).texts, engine.embed_texts(["a photo of a cat"]))
