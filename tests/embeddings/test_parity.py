"""The core promise: the service's vectors are transformers' own pipeline's, on real and synthetic images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoModel, AutoProcessor

from tests.conftest import cpu_config_params, gradient_image, image_bytes, load_runtime, multipart_body, photo_bytes

TEXTS = [
    "a photo of a cat",
    "An astronaut in a white space suit, holding a flag.",
    "coffee",
    "Zwei Hunde spielen im Schnee 🐕",
    " ".join(["supercalifragilisticexpialidocious"] * 40),  # under the word limit, over the 77-token context
]


def reference(model_dir):
    """transformers' own pipeline: AutoProcessor, get_*_features, L2 normalisation."""
    model = AutoModel.from_pretrained(model_dir / "model-clip").eval()
    processor = AutoProcessor.from_pretrained(model_dir / "processor-clip")

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def images(pils):
        with torch.inference_mode():
            v = features(model.get_image_features(**processor(images=pils, return_tensors="pt"))).numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def texts(strings):
        inputs = processor(text=strings, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            v = features(model.get_text_features(**inputs)).numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return images, texts


def exif_rotated_jpeg(image: Image.Image, orientation: int) -> bytes:
    """Store the picture as a camera would: pixels turned, and an EXIF tag saying how to undo it."""
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = image.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())


def inputs_and_expected_pils():
    """(name, uploaded bytes, the upright RGB picture transformers is given)."""
    cases = []
    for name in ("chelsea.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg", "motorcycle_left.jpg"):
        data = photo_bytes(name)
        cases.append((name, data, Image.open(io.BytesIO(data))))
    synthetic = gradient_image(333, 250, seed=3)
    cases.append(("synthetic.png", image_bytes(synthetic), synthetic))
    cases.append(("synthetic.jpg", image_bytes(synthetic, "JPEG", quality=90), None))
    rgba = gradient_image(300, 260, seed=4).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    cases.append(("rgba.png", image_bytes(rgba), rgba))
    grey = gradient_image(280, 300, seed=5).convert("L")
    cases.append(("grey.png", image_bytes(grey), grey))
    photo = Image.open(io.BytesIO(photo_bytes("chelsea.jpg"))).convert("RGB")
    for orientation in (3, 6, 8):
        data = exif_rotated_jpeg(photo, orientation)
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        cases.append((f"exif{orientation}.jpg", data, upright))
    return [(n, d, p if p is not None else Image.open(io.BytesIO(d))) for n, d, p in cases]


def check_parity(client, model_dir, config):
    backend, dtype = config
    assert load_runtime(model_dir, backend, dtype).describe() == {
        "image": f"{backend}/{dtype}",
        "text": f"{backend}/{dtype}",
    }
    ref_images, ref_texts = reference(model_dir)
    cases = inputs_and_expected_pils()
    parts = [(f"img{i}", data, name) for i, (name, data, _) in enumerate(cases)]
    parts += [(f"txt{i}", text, None) for i, text in enumerate(TEXTS)]
    body, content_type = multipart_body(parts)
    response = client.generic("POST", "/syte_test/embeddings", body, content_type=content_type)
    assert response.status_code == 200, response.content
    result = response.json()
    got_images, got_texts = np.array(result["images_vectors"]), np.array(result["texts_vectors"])
    want_images, want_texts = ref_images([p for _, _, p in cases]), ref_texts(TEXTS)
    image_cos = np.sum(got_images * want_images, axis=1)
    text_cos = np.sum(got_texts * want_texts, axis=1)
    for (name, _, _), cos in zip(cases, image_cos, strict=True):
        assert cos >= 0.999, (name, cos)
    assert np.all(text_cos >= 0.9999), text_cos
    assert result["truncated"] == [f"txt{len(TEXTS) - 1}"]
    # the EXIF cases must differ from the stored (unrotated) pixels' vector: orientation really applied
    stored = ref_images([Image.open(io.BytesIO(cases[-2][1])).convert("RGB")])[0]
    assert float(stored @ got_images[-2]) < float(want_images[-2] @ got_images[-2])


@pytest.mark.parametrize("config", cpu_config_params())
def test_parity_with_transformers_on_tiny(client, tiny_model_dir, config):
    check_parity(client, tiny_model_dir, config)


@pytest.mark.slow
@pytest.mark.parametrize("config", cpu_config_params())
def test_parity_with_transformers_on_vit_b_32(client, vitb32_model_dir, config):
    check_parity(client, vitb32_model_dir, config)
