"""Finding a model: the three ways of naming one, failures, and that resolving never downloads."""

from __future__ import annotations

import shutil

import pytest

from embeddings.runtime import loading, testmodel
from embeddings.runtime.loading import ModelLoadError, ModelNotPrepared, fetch, resolve_model_source


def test_the_original_layout_folder(tiny_model_dir, tmp_path):
    source = resolve_model_source(str(tiny_model_dir), tmp_path)
    assert source.kind == "layout" and source.model_dir == tiny_model_dir / "model-clip"
    assert source.test_model and "random" in source.name


def test_a_save_pretrained_folder(tmp_path, tiny_model_dir):
    folder = tmp_path / "flat"
    shutil.copytree(tiny_model_dir / "model-clip", folder)
    for f in (tiny_model_dir / "processor-clip").iterdir():
        shutil.copy(f, folder / f.name)
    source = resolve_model_source(str(folder), tmp_path)
    assert source.kind == "folder" and source.model_dir == source.processor_dir == folder


def test_a_hub_id_is_read_from_its_cache(tmp_path, tiny_model_dir):
    cache = loading.hub_cache_dir(tmp_path, "openai/clip-vit-base-patch32")
    shutil.copytree(tiny_model_dir, cache)
    (cache / "model-clip" / testmodel.MARKER).unlink()  # as if fetched: not marked as a test model
    source = resolve_model_source("openai/clip-vit-base-patch32", tmp_path)
    assert source.kind == "hub" and source.name == "openai/clip-vit-base-patch32" and not source.test_model


def test_resolving_a_hub_id_never_downloads_it(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("resolve_model_source tried to fetch")

    monkeypatch.setattr(loading, "fetch_model", no_download)
    with pytest.raises(ModelNotPrepared, match="prepare_model"):
        resolve_model_source("openai/clip-vit-base-patch32", tmp_path)


def test_unset_model_uses_the_layout_under_models_dir(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir / "model-clip", tmp_path / "model-clip")
    shutil.copytree(tiny_model_dir / "processor-clip", tmp_path / "processor-clip")
    source = resolve_model_source("", tmp_path)
    assert source.kind == "layout" and source.model_dir == tmp_path / "model-clip"


def test_unset_model_with_nothing_on_disk_is_not_prepared_until_fetch_builds_vit_b_32(tmp_path, monkeypatch):
    with pytest.raises(ModelNotPrepared, match="prepare_model"):
        resolve_model_source("", tmp_path)
    built, real_build = [], testmodel.build_test_model

    def small_build(preset, out, *, seed=0):  # building vit-b-32 itself is covered by the slow tests
        built.append(preset)
        return real_build("tiny", out, seed=seed)

    monkeypatch.setattr(testmodel, "build_test_model", small_build)
    source = fetch("", tmp_path)
    assert built == ["vit-b-32"] and source.kind == "fallback" and source.test_model and "random" in source.name
    assert fetch("", tmp_path).model_dir == source.model_dir and built == ["vit-b-32"]  # built once
    assert resolve_model_source("", tmp_path).model_dir == source.model_dir


@pytest.mark.parametrize("spec", ["/no/such/folder", "not a model id!", "../relative/missing"])
def test_bad_model_names_fail_clearly(tmp_path, spec):
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        resolve_model_source(spec, tmp_path)


def test_an_unreachable_hub_id_fails_to_fetch_without_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot fetch"):
        fetch("openai/clip-vit-base-patch32", tmp_path)
    assert not list((tmp_path / "hub").glob("openai--*"))  # no half-fetched folder left behind


def test_a_folder_without_a_model_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither config.json"):
        resolve_model_source(str(tmp_path / "empty"), tmp_path)


def test_a_model_that_is_not_clip_family_is_refused(tmp_path, tiny_model_dir):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(folder)
    source = resolve_model_source(str(folder), tmp_path)
    with pytest.raises(ModelLoadError, match="not a CLIP-family model"):
        loading.load_model(source)


def test_cuda_asked_for_and_absent_is_refused_clearly(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CLIP_DEVICE=cuda"):
        loading.resolve_device("cuda")
    assert loading.resolve_device("auto") == "cpu"
