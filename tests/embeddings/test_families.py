"""The family builders: each folder loads as its hub checkpoint does, with that family's own tokenizer."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from tests.conftest import gradient_image
from tests.families import FAMILIES, build_family_model, ensure_family_model, reference_vectors

# family -> (model class, tokenizer class, image processor class, embedding size)
LOADS_AS = {
    "clip": ("CLIPModel", "CLIPTokenizer", "CLIPImageProcessorPil", 64),
    "siglip": ("SiglipModel", "SiglipTokenizer", "SiglipImageProcessorPil", 32),
    "siglip2": ("SiglipModel", "GemmaTokenizer", "SiglipImageProcessorPil", 32),
    "chinese_clip": ("ChineseCLIPModel", "BertTokenizer", "ChineseCLIPImageProcessorPil", 32),
    "altclip": ("AltCLIPModel", "XLMRobertaTokenizer", "CLIPImageProcessorPil", 32),
}

# family -> (first id or None where nothing is prepended, last id, padding id), as the hub tokenizers frame text.
FRAMES = {
    "clip": (49406, 49407, 49407),  # <|startoftext|> ... <|endoftext|>, which also pads
    "siglip": (None, 1, 1),  # ... </s>, which also pads; no <s>
    "siglip2": (None, 1, 0),  # ... <eos>; no <bos>; <pad> is 0
    "chinese_clip": (2, 3, 0),  # [CLS] ... [SEP], [PAD] 0
    "altclip": (0, 2, 1),  # <s> ... </s>, <pad> 1
}

TEXTS = ["a photo of a cat", "a person wearing a red hat and blue jeans", "一张猫的照片"]
SAMPLES = TEXTS + ["A Photo Of The Dog, number 7.", "3 bicycles on the beach in 1999"]

by_family = pytest.mark.parametrize("family", FAMILIES)


@functools.cache
def loaded(family: str):
    folder = ensure_family_model(family)
    return folder, AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def token_ids(processor, texts: list[str]) -> list[list[int]]:
    return [processor.tokenizer(text)["input_ids"] for text in texts]


@by_family
def test_family_folder_loads_with_the_familys_own_classes(family):
    _, model, processor = loaded(family)
    model_class, tokenizer_class, image_processor_class, _ = LOADS_AS[family]
    assert type(model).__name__ == model_class
    assert type(processor.tokenizer).__name__ == tokenizer_class
    assert type(processor.image_processor).__name__ == image_processor_class
    assert len(processor.tokenizer) == model.config.text_config.vocab_size


@by_family
def test_family_tokenizer_frames_text_as_the_hub_tokenizer_does(family):
    _, _, processor = loaded(family)
    tokenizer = processor.tokenizer
    first, last, pad = FRAMES[family]
    ids = tokenizer("a photo of a cat")["input_ids"]
    assert ids[-1] == last
    assert last not in ids[:-1]
    if first is None:
        assert ids[0] not in tokenizer.all_special_ids
    else:
        assert ids[0] == first
    assert tokenizer.unk_token_id not in ids or family == "clip"  # CLIP's unk is its end token
    assert tokenizer.pad_token_id == pad
    short = tokenizer("a cat")["input_ids"]
    padded = tokenizer(["a cat", "a photo of a cat"], padding="longest")["input_ids"][0]
    assert padded[: len(short)] == short  # padding goes on the right
    assert set(padded[len(short) :]) == {pad}


@pytest.mark.parametrize("family", ["siglip2", "chinese_clip", "altclip"])
def test_multilingual_family_tokenizes_chinese_without_unknowns(family):
    _, _, processor = loaded(family)
    ids = processor.tokenizer("一张猫的照片")["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids
    assert len(ids) > 2


@by_family
def test_reference_vectors_are_finite_unit_vectors(family):
    folder, _, _ = loaded(family)
    dim = LOADS_AS[family][3]
    images = [gradient_image(), gradient_image(200, 300, seed=1)]
    image_vectors, text_vectors = reference_vectors(folder, images=images, texts=TEXTS)
    for vectors, n in ((image_vectors, 2), (text_vectors, 3)):
        assert vectors.shape == (n, dim)
        assert vectors.dtype == np.float32
        assert np.isfinite(vectors).all()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(text_vectors[0], text_vectors[1], atol=1e-3)
    assert not np.allclose(image_vectors[0], image_vectors[1], atol=1e-3)


@by_family
def test_reference_text_vector_does_not_depend_on_its_batch(family):
    folder, _, _ = loaded(family)
    image = [gradient_image()]
    _, batch = reference_vectors(folder, images=image, texts=TEXTS)
    _, alone = reference_vectors(folder, images=image, texts=TEXTS[:1])
    np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)


@by_family
def test_same_seed_builds_the_same_model_and_tokenizer(family, tmp_path):
    cached, _, processor = loaded(family)
    again = build_family_model(family, tmp_path / "again", seed=0)
    other = build_family_model(family, tmp_path / "other", seed=1)
    weights = load_file(cached / "model.safetensors")
    same = load_file(again / "model.safetensors")
    different = load_file(other / "model.safetensors")
    assert weights.keys() == same.keys()
    assert all(weights[k].equal(same[k]) for k in weights)
    assert not all(weights[k].equal(different[k]) for k in weights)
    assert token_ids(AutoProcessor.from_pretrained(again), SAMPLES) == token_ids(processor, SAMPLES)


def test_clip_family_is_the_tiny_preset_in_one_folder(tiny_model_dir):
    folder, _, _ = loaded("clip")
    family = load_file(folder / "model.safetensors")
    preset = load_file(tiny_model_dir / "model-clip" / "model.safetensors")
    assert family.keys() == preset.keys()
    assert all(family[k].equal(preset[k]) for k in family)
    assert not (folder / "clipsite_test_model.json").exists()  # tests decide what is marked


def test_ensure_family_model_reuses_the_built_folder():
    folder = ensure_family_model("siglip")
    built_at = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_family_model("siglip") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == built_at
    assert not list(folder.parent.glob(f".{folder.name}-*"))  # no half-built sibling left behind


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_family_model("blip", tmp_path)
