"""The GPU path, as far as a machine without one can test it: which device and dtypes are offered,
float16 through the backend contract (on the CPU, where torch computes it too), and a clear refusal
where CUDA is asked for and absent. The GPU's own figures come from running the parity tests and the
benchmark on one (README, "GPU")."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from clipsite.config import load
from embeddings.runtime import prepare as prepare_module
from embeddings.runtime.backends.torch import TorchBackend
from embeddings.runtime.loading import ModelLoadError, load_model, resolve_model_source
from embeddings.runtime.prepare import candidates, gpu_unavailable
from tests.conftest import ROOT, assert_same_vectors, runtime_settings
from tests.server import server_env


def test_float16_is_a_gpu_dtype_of_the_configuration():
    config, problems = load({"CLIP_DEVICE": "cuda", "CLIP_DTYPE": "float16"}, base_dir=ROOT)
    assert not problems and (config.runtime.device, config.runtime.dtype) == ("cuda", "float16")
    assert not load({"CLIP_DEVICE": "auto", "CLIP_DTYPE": "float16"}, base_dir=ROOT)[1]


def test_a_gpu_measures_torch_in_float32_float16_and_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    auto = candidates(runtime_settings("unused", backend="auto", dtype="auto"), "cuda")
    assert [(b, d) for b, d, _ in auto] == [("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16")]
    assert all(skipped is None for *_, skipped in auto)
    forced = candidates(runtime_settings("unused", backend="torch", dtype="float16"), "cuda")
    assert [(b, d) for b, d, _ in forced] == [("torch", "float16")]


def test_a_gpu_without_native_bfloat16_skips_it_saying_why(monkeypatch):
    """A Turing GPU: torch's check says yes counting emulation (float32 arithmetic), no without it."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert gpu_unavailable("float16") is None
    assert "Tesla T4 has no native bfloat16" in gpu_unavailable("bfloat16")


def test_the_cpu_never_measures_float16_and_refuses_it_clearly():
    auto = candidates(runtime_settings("unused", backend="auto", dtype="auto"), "cpu")
    assert "float16" not in {d for _, d, _ in auto}
    with pytest.raises(ModelLoadError, match="float16 runs on a GPU"):
        candidates(runtime_settings("unused", backend="auto", dtype="float16", device="auto"), "cpu")


def test_float16_weights_meet_the_backend_contract(tiny_model_dir):
    """The dtype handling a GPU run takes (pixels cast to the weights' dtype, float32 vectors back),
    exercised where torch computes float16 too: on the CPU."""
    source = resolve_model_source(str(tiny_model_dir), tiny_model_dir)
    reference = TorchBackend(load_model(source))
    half = TorchBackend(load_model(source, dtype="float16"))
    assert (half.name, half.dtype, half.device) == ("torch", "float16", "cpu")
    rng = np.random.default_rng(0)
    size = reference.model.config.vision_config.image_size
    pixels = rng.standard_normal((3, 3, size, size)).astype(np.float32)
    ids = np.array([[49406, 320, 1929, 49407], [49406, 320, 49407, 49407]], np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int64)
    for got, want in (
        (half.image_features(pixels), reference.image_features(pixels)),
        (half.text_features(ids, mask), reference.text_features(ids, mask)),
    ):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert_same_vectors(got, want, cosine=0.999, norm_rtol=0.02)


def test_prepare_model_with_cuda_absent_stops_with_a_clear_message(tmp_path, tiny_model_dir):
    env = {**os.environ, **server_env(tmp_path, tiny_model_dir), "CLIP_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "manage.py", "prepare_model"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "CLIP_DEVICE=cuda, but torch sees no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_gpu_manifest_records_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert prepare_module.gpu_features() == {"device": "cuda", "model": "NVIDIA H200", "capability": "9.0"}


def test_cpu_and_gpu_nodes_sharing_a_volume_keep_manifests_of_their_own(monkeypatch, tmp_path):
    from embeddings.runtime.prepare import manifest_path

    auto = runtime_settings("unused", device="auto")
    on_cpu = manifest_path(tmp_path, auto)
    assert on_cpu.name.startswith("manifest-auto-auto-auto-")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    on_h200 = manifest_path(tmp_path, auto)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    on_t4 = manifest_path(tmp_path, auto)
    assert len({on_cpu, on_h200, on_t4}) == 3
