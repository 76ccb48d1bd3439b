"""The runtime: test models, the tokenizer, the three ways of naming a model, failures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoModel, AutoTokenizer

from embeddings.runtime import loading, testmodel
from embeddings.runtime.state import Runtime, RuntimeConfig
from tests.conftest import MODELS


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


def _load(spec: str, models_dir) -> Runtime:
    rt = Runtime()
    rt.load(RuntimeConfig(model=spec, models_dir=models_dir, device="cpu"))
    return rt


def test_loads_the_original_layout_folder(tiny_model_dir):
    rt = _load(str(tiny_model_dir), MODELS)
    assert rt.ready and rt.encoder().is_test_model and "random" in rt.encoder().name


def test_loads_a_save_pretrained_folder(tmp_path, tiny_model_dir):
    folder = tmp_path / "flat"
    shutil.copytree(tiny_model_dir / "model-clip", folder)
    for f in (tiny_model_dir / "processor-clip").iterdir():
        shutil.copy(f, folder / f.name)
    rt = _load(str(folder), tmp_path)
    assert rt.encoder().dim == 64


def test_loads_a_hub_id_from_its_cache_without_network(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = loading.hub_cache_dir(tmp_path, "openai/clip-vit-base-patch32")
    shutil.copytree(tiny_model_dir, cache)
    (cache / "model-clip" / testmodel.MARKER).unlink()  # as if fetched: not marked as a test model
    rt = _load("openai/clip-vit-base-patch32", tmp_path)
    assert rt.encoder().name == "openai/clip-vit-base-patch32"
    assert not rt.encoder().is_test_model


def test_unset_model_uses_the_layout_under_models_dir(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir / "model-clip", tmp_path / "model-clip")
    shutil.copytree(tiny_model_dir / "processor-clip", tmp_path / "processor-clip")
    source = loading.resolve_model_source("", tmp_path)
    assert source.kind == "layout" and source.model_dir == tmp_path / "model-clip"


def test_unset_model_with_nothing_on_disk_builds_a_vit_b_32_test_model(tmp_path, monkeypatch):
    built, real_build = [], testmodel.build_test_model

    def fake_build(preset, out, *, seed=0):  # building vit-b-32 is covered by the slow tests
        built.append(preset)
        return real_build("tiny", out, seed=seed)

    monkeypatch.setattr(testmodel, "build_test_model", fake_build)
    source = loading.resolve_model_source("", tmp_path)
    assert built == ["vit-b-32"] and source.kind == "fallback" and source.test_model
    assert "random" in source.name
    assert loading.resolve_model_source("", tmp_path).model_dir == source.model_dir  # built once


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/folder", "neither an existing folder"),
        ("not a model id!", "neither an existing folder"),
    ],
)
def test_bad_model_names_fail_clearly(tmp_path, spec, message):
    with pytest.raises(loading.ModelLoadError, match=message):
        _load(spec, tmp_path)


def test_unreachable_hub_id_fails_without_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(loading.ModelLoadError, match="cannot fetch"):
        _load("openai/clip-vit-base-patch32", tmp_path)


def test_folder_without_a_model_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(loading.ModelLoadError, match="neither config.json"):
        _load(str(tmp_path / "empty"), tmp_path)


def test_a_model_that_is_not_clip_family_is_refused(tmp_path, tiny_model_dir):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(folder)
    for f in (tiny_model_dir / "processor-clip").iterdir():
        shutil.copy(f, folder / f.name)
    with pytest.raises(loading.ModelLoadError, match="not a CLIP-family model"):
        _load(str(folder), tmp_path)


def test_load_is_idempotent(tiny_model_dir):
    rt = Runtime()
    config = RuntimeConfig(model=str(tiny_model_dir), models_dir=MODELS, device="cpu")
    assert rt.load(config) is rt.load(config)
