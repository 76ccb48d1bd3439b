"""Shared fixtures: real random-weight CLIP models built by the project's own code, loaded once."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embeddings.runtime.state import RuntimeConfig, runtime
from embeddings.runtime.testmodel import build_test_model

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(__file__).resolve().parent / "data" / "photos"
MODELS = Path(os.environ.get("CLIPSITE_TEST_MODELS", ROOT / "var" / "test-models"))


def ensure_test_model(preset: str, seed: int = 0) -> Path:
    """Build (once; reused across runs) a random-weight model of ``preset`` in the original layout."""
    out = MODELS / f"{preset}-seed{seed}"
    if not (out / "model-clip" / "model.safetensors").exists():
        build_test_model(preset, out, seed=seed)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return ensure_test_model("tiny")


@pytest.fixture(scope="session")
def vitb32_model_dir() -> Path:
    return ensure_test_model("vit-b-32")


def load_runtime(model_dir: Path, backend: str = "torch"):
    config = RuntimeConfig(model=str(model_dir), models_dir=MODELS, device="cpu", backend=backend)
    if runtime.ready and runtime.config == config:
        return runtime.encoder()
    runtime.reset()
    return runtime.load(config)


@pytest.fixture
def clip(tiny_model_dir):
    """The process runtime serving the tiny test model."""
    return load_runtime(tiny_model_dir)


def photo_bytes(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def image_bytes(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def gradient_image(width: int = 320, height: int = 240, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A synthetic picture with structure (gradients and blocks), so resizing and crops matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 / max(width - 1, 1)).astype(np.uint8)
    g = (y * 255 / max(height - 1, 1)).astype(np.uint8)
    b = ((x // 16 + y // 16) % 2 * 200).astype(np.uint8)
    rgb = np.stack([r, g, b], axis=-1)
    rgb[rng.integers(0, height, 20), rng.integers(0, width, 20)] = 255
    return Image.fromarray(rgb, "RGB").convert(mode)


def multipart_body(parts: list[tuple], boundary: str = "clipsiteboundary") -> tuple[bytes, str]:
    """Encode ``(key, bytes_or_str, filename_or_None)`` parts by hand, for bodies a client lib won't make."""
    out = io.BytesIO()
    for key, value, filename in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{key}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"Content-Disposition: {disposition}\r\n".encode())
        if filename is not None:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n")
        out.write(value.encode() if isinstance(value, str) else value)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
