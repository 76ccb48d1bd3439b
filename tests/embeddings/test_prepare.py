"""Prepare, then load: prepare_model chooses, exports and self-checks once; workers only read the manifest."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from embeddings.runtime import loading
from embeddings.runtime import prepare as prepare_module
from embeddings.runtime.loading import ModelNotPrepared
from embeddings.runtime.prepare import PARITY_FLOOR, manifest_path, prepare, prepared_dir, read_manifest
from embeddings.runtime.state import Runtime
from tests.conftest import MODELS, runtime_settings


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("clipsite-prepared"))
    return folder


def test_prepare_chooses_onnx_on_the_cpu_checks_parity_and_writes_the_manifest(model_copy):
    settings = runtime_settings(model_copy)
    source, manifest = prepare(settings)
    assert manifest.towers["image"]["backend"] == manifest.towers["text"]["backend"] == "onnx"
    assert manifest.towers["image"]["dtype"] == "float32"
    assert manifest.parity["image"] >= 0.99999 and manifest.parity["text"] >= 0.99999 and manifest.faithful
    assert manifest.family == "clip" and manifest.dim == 64 and manifest.context == 77
    path = manifest_path(prepared_dir(source.model_dir, MODELS), settings)
    assert path.parent == model_copy / "model-clip" / "clipsite-prepared"
    on_disk = json.loads(path.read_text())
    assert on_disk["requested"] == {"runtime": "auto", "quantize": "none", "device": "cpu"}
    assert on_disk["towers"]["text"]["files"]["text"] == "text.onnx"


def test_a_second_prepare_reuses_the_manifest_and_the_export(model_copy, monkeypatch):
    settings = runtime_settings(model_copy)
    source, first = prepare(settings)
    folder = prepared_dir(source.model_dir, MODELS)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_work(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")

    monkeypatch.setattr(prepare_module, "_prepare", no_work)
    assert prepare(settings)[1] == first
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_a_worker_finds_nothing_prepared_and_names_prepare_model(model_copy):
    with pytest.raises(ModelNotPrepared, match="prepare_model"):
        Runtime().load(runtime_settings(model_copy))


def test_a_worker_never_exports_and_never_loads_torch_weights_for_onnx(model_copy, monkeypatch):
    settings = runtime_settings(model_copy)
    prepare(settings)

    def forbidden(*args, **kwargs):
        raise AssertionError("a worker exported, prepared or loaded the torch weights")

    monkeypatch.setattr(prepare_module, "_prepare", forbidden)
    monkeypatch.setattr("embeddings.runtime.state.load_model", forbidden)
    monkeypatch.setattr(loading, "fetch_model", forbidden)
    rt = Runtime()
    try:
        engine = rt.load(settings)
        assert engine.describe() == {"image": "onnx/float32", "text": "onnx/float32"}
        assert engine.embed_texts(["a photo of a cat"]).shape == (1, 64)
        assert engine.info.logit_scale == pytest.approx(float(__import__("numpy").exp(2.6592)), rel=1e-4)
    finally:
        rt.close()


def test_changed_weights_make_the_manifest_stale(model_copy):
    settings = runtime_settings(model_copy)
    source, _ = prepare(settings)
    weights = model_copy / "model-clip" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ModelNotPrepared, match="changed"):
        read_manifest(source, settings)
    assert prepare(settings)[1].faithful  # prepared again


def test_each_configuration_has_its_own_manifest(model_copy):
    onnx = prepare(runtime_settings(model_copy))[1]
    torch_ = prepare(runtime_settings(model_copy, runtime="torch"))[1]
    assert onnx.towers["image"]["backend"] == "onnx" and torch_.towers["image"]["backend"] == "torch"
    assert torch_.note == "CLIP_RUNTIME=torch"


def test_a_failed_export_falls_back_to_torch_and_says_why(model_copy, monkeypatch):
    from embeddings.runtime.backends import onnx

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter cannot trace this model")

    monkeypatch.setattr(onnx, "export_model", broken_export)
    manifest = prepare(runtime_settings(model_copy))[1]
    assert manifest.towers["image"]["backend"] == "torch" and "export failed" in manifest.note


def test_forced_int8_is_measured_and_flagged_when_below_the_floor(model_copy):
    manifest = prepare(runtime_settings(model_copy, runtime="onnx", quantize="int8"))[1]
    assert manifest.towers["text"] == {
        "backend": "onnx",
        "dtype": "int8",
        "files": {"image": "image.int8.onnx", "text": "text.int8.onnx"},
    }
    assert 0.99 < manifest.parity["image"] <= 1.0 and 0.99 < manifest.parity["text"] <= 1.0
    assert manifest.faithful == all(manifest.parity[t] >= PARITY_FLOOR[t] for t in PARITY_FLOOR)
    if not manifest.faithful:
        assert "BELOW THE PARITY FLOOR" in manifest.note


def test_two_processes_preparing_at_once_agree(model_copy):
    settings = runtime_settings(model_copy)
    results, failures = [], []

    def run():
        try:
            results.append(prepare(settings)[1])
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(results) == 3
    assert len({r.prepared_at for r in results}) == 1  # one prepared, the others found its manifest


def test_the_fingerprint_is_the_same_in_every_process(model_copy):
    """Workers are other processes (other hash seeds): they must see the manifest prepare_model wrote."""
    import subprocess
    import sys

    from embeddings.runtime.loading import resolve_model_source
    from embeddings.runtime.prepare import fingerprint

    code = (
        "import sys; from embeddings.runtime.loading import resolve_model_source; "
        "from embeddings.runtime.prepare import fingerprint; "
        "print(fingerprint(resolve_model_source(sys.argv[1], sys.argv[2])))"
    )
    here = fingerprint(resolve_model_source(str(model_copy), MODELS))
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "DJANGO_SETTINGS_MODULE": "tests.settings"}
        out = subprocess.run(
            [sys.executable, "-c", code, str(model_copy), str(MODELS)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == here
