"""Prepare, then load: prepare_model chooses, exports and self-checks once; workers only read the manifest."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from embeddings.runtime import loading
from embeddings.runtime import prepare as prepare_module
from embeddings.runtime.cpu import int8_reduce_range
from embeddings.runtime.loading import ModelNotPrepared
from embeddings.runtime.prepare import CPU_CANDIDATES, PARITY_FLOOR, manifest_path, prepare, prepared_dir, read_manifest
from embeddings.runtime.state import Runtime
from tests.conftest import MODELS, runtime_settings


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("clipsite-prepared"))
    return folder


def test_prepare_measures_each_candidate_keeps_the_fastest_faithful_and_writes_the_manifest(model_copy):
    settings = runtime_settings(model_copy)
    source, manifest = prepare(settings)
    tried = {(c["backend"], c["dtype"]): c for c in manifest.candidates}
    assert set(tried) == {pair for pair in CPU_CANDIDATES if pair[1] != "int8"}  # int8 only when asked
    ran = [c for c in manifest.candidates if "ms_per_item" in c]
    assert {("torch", "float32"), ("onnx", "float32"), ("openvino", "float32")} <= {
        (c["backend"], c["dtype"]) for c in ran
    }
    for c in manifest.candidates:
        assert ("ms_per_item" in c) != ("skipped" in c or "error" in c), c
    for tower in ("image", "text"):
        faithful = [c for c in ran if c["parity"][tower] >= PARITY_FLOOR[tower]]
        fastest = min(faithful, key=lambda c: c["ms_per_item"][tower])
        chosen = manifest.towers[tower]
        assert (chosen["backend"], chosen["dtype"]) == (fastest["backend"], fastest["dtype"])
        assert manifest.parity[tower] == fastest["parity"][tower] >= PARITY_FLOOR[tower]
        assert f"{tower}: {chosen['backend']}/{chosen['dtype']}" in manifest.note
    assert tried[("torch", "float32")]["parity"] == {"image": pytest.approx(1.0), "text": pytest.approx(1.0)}
    assert manifest.faithful and manifest.family == "clip" and manifest.dim == 64 and manifest.context == 77
    assert set(manifest.cpu) >= {"model", "amx", "native_bf16", "flags"}
    path = manifest_path(prepared_dir(source.model_dir, MODELS), settings)
    assert path.parent == model_copy / "model-clip" / "clipsite-prepared"
    on_disk = json.loads(path.read_text())
    assert on_disk["requested"] == {"backend": "auto", "dtype": "auto", "device": "cpu"}
    assert on_disk["candidates"] == manifest.candidates


def test_the_choice_follows_the_timings_and_never_takes_an_unfaithful_candidate(model_copy, monkeypatch):
    """The timings decide (made up here, in a fixed order); the parity floor is never traded for speed."""
    order = {("openvino", "float32"): 1.0, ("onnx", "float32"): 2.0, ("torch", "float32"): 3.0}

    def timed(run, inputs, items):
        backend = run.__self__
        return order.get((backend.name, backend.dtype), 0.5)  # bfloat16: the fastest of all

    monkeypatch.setattr(prepare_module, "_seconds_per_item", timed)
    monkeypatch.setattr(prepare_module, "PARITY_FLOOR", {"image": 0.999, "text": 0.9999999})
    manifest = prepare(runtime_settings(model_copy))[1]
    bf16 = [c for c in manifest.candidates if c["dtype"] == "bfloat16" and "parity" in c]
    assert manifest.towers["text"]["backend"] == "openvino" and manifest.towers["text"]["dtype"] == "float32"
    if bf16 and all(c["parity"]["image"] >= 0.999 for c in bf16):
        assert manifest.towers["image"]["dtype"] == "bfloat16"
    assert manifest.faithful


def test_a_forced_choice_below_the_floor_still_serves_and_says_so_loudly(model_copy, monkeypatch, admin_client):
    from embeddings.runtime.state import runtime

    monkeypatch.setattr(prepare_module, "PARITY_FLOOR", {"image": 1.5, "text": 1.5})  # nothing reaches it
    settings = runtime_settings(model_copy, backend="onnx", dtype="float32")
    manifest = prepare(settings)[1]
    assert not manifest.faithful and "FORCED BY CLIP_BACKEND=onnx CLIP_DTYPE=float32" in manifest.note
    runtime.close()
    try:
        runtime.load(settings)
        body = admin_client.get("/readyz?verbose=1").json()  # the details: a staff login
        assert body["ready"] and body["faithful"] is False and body["backend"]["image"] == "onnx/float32"
        assert 0.9999 < body["parity"]["image"] <= 1.0 and "BELOW THE PARITY FLOOR" in body["why"]
    finally:
        runtime.close()


def test_auto_falls_back_to_the_float32_reference_when_nothing_else_is_faithful(model_copy, monkeypatch):
    monkeypatch.setattr(prepare_module, "PARITY_FLOOR", {"image": 1.5, "text": 1.5})
    manifest = prepare(runtime_settings(model_copy))[1]
    assert manifest.towers["image"] == manifest.towers["text"] == {"backend": "torch", "dtype": "float32"}


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


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_a_worker_never_exports_and_never_loads_torch_weights_for_onnx(model_copy, monkeypatch, backend):
    settings = runtime_settings(model_copy, backend=backend, dtype="float32")
    prepare(settings)

    def forbidden(*args, **kwargs):
        raise AssertionError("a worker exported, prepared or loaded the torch weights")

    monkeypatch.setattr(prepare_module, "_prepare", forbidden)
    monkeypatch.setattr("embeddings.runtime.state.load_model", forbidden)
    monkeypatch.setattr(loading, "fetch_model", forbidden)
    rt = Runtime()
    try:
        engine = rt.load(settings)
        assert engine.describe() == {"image": f"{backend}/float32", "text": f"{backend}/float32"}
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
    onnx = prepare(runtime_settings(model_copy, backend="onnx", dtype="float32"))[1]
    torch_ = prepare(runtime_settings(model_copy, backend="torch", dtype="float32"))[1]
    assert onnx.towers["image"]["backend"] == "onnx" and torch_.towers["image"]["backend"] == "torch"
    assert [(c["backend"], c["dtype"]) for c in torch_.candidates] == [("torch", "float32")]
    assert "(CLIP_BACKEND=torch CLIP_DTYPE=float32)" in torch_.note


def test_a_failed_export_falls_back_to_torch_and_says_why(model_copy, monkeypatch):
    from embeddings.runtime.backends import onnx

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter cannot trace this model")

    monkeypatch.setattr(onnx, "export_model", broken_export)
    manifest = prepare(runtime_settings(model_copy, dtype="float32"))[1]
    assert manifest.towers["image"]["backend"] == manifest.towers["text"]["backend"] == "torch"
    failed = {c["backend"]: c["error"] for c in manifest.candidates if "error" in c}
    assert failed == {"onnx": "RuntimeError: exporter cannot trace this model", "openvino": failed.get("openvino")}
    assert "exporter cannot trace" in failed["openvino"] and manifest.faithful


def test_forced_int8_is_measured_and_flagged_when_below_the_floor(model_copy):
    manifest = prepare(runtime_settings(model_copy, backend="onnx", dtype="int8"))[1]
    seven_bit = int8_reduce_range()  # no VNNI here: the weights keep to 7 bits
    suffix = ".int8-7bit.onnx" if seven_bit else ".int8.onnx"
    assert manifest.towers["text"] == {
        "backend": "onnx",
        "dtype": "int8",
        "files": {"image": f"image{suffix}", "text": f"text{suffix}"},
    }
    assert manifest.candidates[0]["weights"].startswith("7-bit" if seven_bit else "8-bit")
    assert 0 < manifest.parity["image"] <= 1.0 and 0 < manifest.parity["text"] <= 1.0
    if not seven_bit:  # VNNI: what int8 is measured to give on these models
        assert 0.99 < manifest.parity["image"] and 0.99 < manifest.parity["text"]
    assert manifest.faithful == all(manifest.parity[t] >= PARITY_FLOOR[t] for t in PARITY_FLOOR)
    if not manifest.faithful:
        assert "BELOW THE PARITY FLOOR" in manifest.note


def test_int8_without_vnni_keeps_its_weights_to_7_bits_in_files_of_their_own(model_copy, monkeypatch):
    # A CPU without VNNI, on any CPU: the 7-bit files sit beside the 8-bit ones (one volume, two kinds of node).
    eight = prepare(runtime_settings(model_copy, backend="onnx", dtype="int8"))[1] if not int8_reduce_range() else None
    from embeddings.runtime import cpu

    avx2_only = {**cpu.cpu_features(), "flags": ["avx2"], "vnni": False, "native_bf16": False, "amx": False}
    monkeypatch.setattr(cpu, "cpu_features", lambda: avx2_only)
    monkeypatch.setattr(prepare_module, "cpu_features", lambda: avx2_only)  # its manifest: another CPU's
    source, manifest = prepare(runtime_settings(model_copy, backend="onnx", dtype="int8"))
    assert manifest.towers["image"]["files"] == {"image": "image.int8-7bit.onnx", "text": "text.int8-7bit.onnx"}
    assert manifest.candidates[0]["weights"].startswith("7-bit")
    folder = prepared_dir(source.model_dir, MODELS)
    assert (folder / "image.int8-7bit.onnx").exists()
    if eight is not None:
        assert (folder / "image.int8.onnx").exists()
        # 7-bit weights on a CPU that has VNNI: one bit less, still close to float32
        assert manifest.parity["image"] > 0.99 and manifest.parity["text"] > 0.99


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


def test_a_manifest_made_on_another_cpu_is_prepared_again(model_copy):
    """A model volume moved to a machine without AMX must not keep the choice AMX made fastest."""
    settings = runtime_settings(model_copy)
    source, manifest = prepare(settings)
    path = manifest_path(prepared_dir(source.model_dir, MODELS), settings)
    moved = json.loads(path.read_text())
    moved["cpu"] = moved["cpu"] | {"model": "Some Other CPU", "flags": ["amx_bf16", "avx512_bf16"]}
    path.write_text(json.dumps(moved))
    with pytest.raises(ModelNotPrepared, match="another CPU"):
        read_manifest(source, settings)
    again = prepare(settings)[1]
    assert again.cpu == manifest.cpu and again.prepared_at > manifest.prepared_at


def test_openvino_is_imported_with_its_telemetry_declined(tmp_path):
    """Importing openvino would send a usage event; the backend declines first where nobody chose."""
    import subprocess
    import sys

    code = "from embeddings.runtime.backends.openvino import load_openvino; load_openvino()"
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "intel" / "openvino_telemetry").read_text().strip() == "0"
    (tmp_path / "intel" / "openvino_telemetry").write_text("1")  # an explicit choice is kept
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "intel" / "openvino_telemetry").read_text().strip() == "1"
