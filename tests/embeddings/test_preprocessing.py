"""Preprocessing: the fast image path equals the stock processor, drafts keep parity, and texts are
tokenised, cut and padded exactly as each family's own processor does."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from embeddings.images import decode_image
from embeddings.runtime.preprocessing import FastImagePreprocessor, Preprocessing
from tests.conftest import cosines, gradient_image, image_bytes, multipart_body
from tests.families import FAMILIES, ensure_family_model, text_context

TEXTS = ["a cat", "a photo of a very small dog sitting on a red sofa in the evening", "x", "two words"]
LONG = " ".join(["photograph of a hat"] * 40)


def test_fast_preprocessing_equals_the_stock_processor(clip):
    pre = clip.preprocessing
    assert pre.fast is not None
    for size in ((640, 480), (480, 640), (225, 224), (1000, 333)):
        image = gradient_image(*size, seed=size[0])
        want = pre.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        assert np.max(np.abs(pre.image(image) - want)) < 1e-5


def test_fast_preprocessing_handles_square_resize_like_siglip():
    from transformers import SiglipImageProcessorPil

    stock = SiglipImageProcessorPil(
        size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    fast = FastImagePreprocessor.from_processor(stock)
    assert fast is not None and fast.agrees_with(stock)


@pytest.mark.parametrize("size", [(1920, 1080), (4000, 3000)])
def test_large_jpegs_are_draft_decoded_and_keep_parity(client, clip, tiny_model_dir, size):
    photo = (
        Image.open("embeddings/runtime/assets/photos/astronaut.jpg")
        .convert("RGB")
        .resize(size, Image.Resampling.BICUBIC)
    )
    data = image_bytes(photo, "JPEG", quality=90)
    decoded = decode_image(data, draft_min_side=clip.draft_min_side)
    assert min(decoded.image.size) < min(size)  # libjpeg decoded at reduced scale
    assert min(decoded.image.size) >= 224  # never below the model's input side
    body, content_type = multipart_body([("img", data, "big.jpg")])
    got = np.array(
        client.generic("POST", "/syte_test/embeddings", body, content_type=content_type).json()["images_vectors"][0]
    )
    folder = tiny_model_dir
    model = AutoModel.from_pretrained(folder / "model-clip").eval()
    stock_inputs = AutoProcessor.from_pretrained(folder / "processor-clip")(
        images=[Image.open(io.BytesIO(data))], return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.get_image_features(**stock_inputs)
    want = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()[0]
    assert float(cosines(got, want)[0]) >= 0.9999


def family_preprocessing(family: str):
    folder = ensure_family_model(family)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    return Preprocessing(processor, family=model.config.model_type, context=text_context(model.config)), processor


@pytest.mark.parametrize("family", FAMILIES)
def test_texts_are_tokenised_cut_and_padded_as_the_familys_processor_does(family):
    pre, processor = family_preprocessing(family)
    texts = TEXTS + [LONG, "一张猫的照片"]
    tokens = pre.tokenize(texts)
    ids, mask = pre.pad(tokens)
    if pre.fixed_length:  # SigLIP and SigLIP 2: padded to 64, no mask, as transformers' zero-shot pipeline
        want = processor.tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="np")
    else:
        want = processor.tokenizer(texts, padding=True, truncation=True, max_length=pre.max_tokens, return_tensors="np")
    assert np.array_equal(ids, want["input_ids"])
    if "attention_mask" in want:
        assert mask is not None and np.array_equal(mask, want["attention_mask"])
    else:
        assert mask is None
    assert [t.truncated for t in tokens] == [False] * 4 + [
        len(processor.tokenizer(LONG)["input_ids"]) > pre.max_tokens,
        False,
    ]


def test_siglip_family_texts_are_padded_to_their_fixed_length_because_it_matters():
    """SigLIP pools its last token: per-batch padding would change its vectors, so it is padded to 64."""
    folder = ensure_family_model("siglip")
    pre, processor = family_preprocessing("siglip")
    model = AutoModel.from_pretrained(folder).eval()
    assert pre.fixed_length == 64 and not pre.uses_mask
    ids, _ = pre.pad(pre.tokenize(TEXTS))
    longest = processor.tokenizer(TEXTS, padding="longest", return_tensors="pt")

    def features(**inputs):
        with torch.inference_mode():
            out = model.get_text_features(**inputs)
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()

    fixed = features(input_ids=torch.from_numpy(ids))
    per_batch = features(**longest)
    assert np.min(cosines(per_batch, fixed)) < 0.999  # the padding really matters for this family


def test_a_naflex_processor_is_refused_clearly():
    from transformers import Siglip2ImageProcessor

    from embeddings.runtime.preprocessing import UnsupportedProcessor

    class Processor:
        image_processor = Siglip2ImageProcessor(max_num_patches=64, patch_size=16)
        tokenizer = None

    with pytest.raises(UnsupportedProcessor, match="NaFlex"):
        Preprocessing(Processor(), family="siglip2", context=64)
