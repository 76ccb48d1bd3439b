"""The random-weight test models: real architectures, the real CLIP tokenizer, same seed same weights."""

from __future__ import annotations

import json

import numpy as np
from transformers import AutoModel, AutoTokenizer

from embeddings.runtime import testmodel


def test_tokenizer_is_the_real_clip_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "processor-clip")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("Hello, World!")["input_ids"] == [49406, 3306, 267, 1002, 256, 49407]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    testmodel.build_test_model("tiny", tmp_path / "again", seed=0)
    testmodel.build_test_model("tiny", tmp_path / "other", seed=1)
    first = AutoModel.from_pretrained(tiny_model_dir / "model-clip").state_dict()
    again = AutoModel.from_pretrained(tmp_path / "again" / "model-clip").state_dict()
    other = AutoModel.from_pretrained(tmp_path / "other" / "model-clip").state_dict()
    name = "text_projection.weight"
    assert np.array_equal(first[name].numpy(), again[name].numpy())
    assert not np.array_equal(first[name].numpy(), other[name].numpy())


def test_vit_b_32_preset_is_openai_clip_vit_base_patch32():
    config = testmodel.build_clip_config("vit-b-32")
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        768,
        12,
        12,
        32,
        224,
    )
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (512, 12, 8, 49408)
    assert config.projection_dim == 512 and v.hidden_act == t.hidden_act == "quick_gelu"
    l14 = testmodel.build_clip_config("vit-l-14")
    assert (l14.vision_config.hidden_size, l14.vision_config.num_hidden_layers, l14.vision_config.patch_size) == (
        1024,
        24,
        14,
    )
    assert l14.projection_dim == 768


def test_image_preprocessing_is_openais(tiny_model_dir):
    config = json.loads((tiny_model_dir / "processor-clip" / "processor_config.json").read_text())
    image = config.get("image_processor", config)
    assert image["size"] == {"shortest_edge": 224} and image["crop_size"] == {"height": 224, "width": 224}
    assert image["resample"] == 3
    assert image["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
