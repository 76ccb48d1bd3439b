"""Shared fixtures: real random-weight CLIP models built by the project's own code, loaded once."""

from __future__ import annotations

import io
import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsite.config import RuntimeSettings, current
from embeddings.runtime.engine import Engine
from embeddings.runtime.prepare import prepare
from embeddings.runtime.state import runtime
from embeddings.runtime.testmodel import build_test_model

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(__file__).resolve().parent.parent / "embeddings" / "runtime" / "assets" / "photos"
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


def runtime_settings(model_dir: Path | str, **changes) -> RuntimeSettings:
    """The suite's runtime settings for ``model_dir`` (``backend="torch"`` etc. as changes)."""
    return replace(current().runtime, **({"model": str(model_dir), "models_dir": MODELS, "device": "cpu"} | changes))


def offered(backend: str, dtype: str) -> str | None:
    """Why this CPU does not offer ``backend``/``dtype`` to prepare_model (None: it does). float32 is
    always offered; bfloat16 where the CPU computes it natively, which is where it is fast."""
    from embeddings.runtime.prepare import candidates

    for b, d, skipped in candidates(runtime_settings("unused", backend="auto", dtype="auto"), "cpu"):
        if (b, d) == (backend, dtype):
            return skipped
    return "not a CPU candidate"


# Every (backend, dtype) prepare_model may choose on a CPU, int8 (asked for only) aside.
CPU_CONFIGS = [
    ("torch", "float32"),
    ("onnx", "float32"),
    ("openvino", "float32"),
    ("torch", "bfloat16"),
    ("openvino", "bfloat16"),
]


def cpu_config_params(configs=CPU_CONFIGS):
    """pytest params for ``configs``, each skipped (saying why) where this CPU does not offer it."""
    return [
        pytest.param(c, id=f"{c[0]}-{c[1]}", marks=pytest.mark.skipif(bool(offered(*c)), reason=str(offered(*c))))
        for c in configs
    ]


def load_runtime(model_dir: Path, backend: str = "auto", dtype: str = "auto") -> Engine:
    """The process runtime serving ``model_dir``, prepared (once) and loaded as a worker loads it."""
    settings = runtime_settings(model_dir, backend=backend, dtype=dtype)
    if runtime.ready and runtime.settings == settings:
        return runtime.engine()
    runtime.close()
    prepare(settings)
    return runtime.load(settings)


@pytest.fixture
def clip(tiny_model_dir) -> Engine:
    """The process runtime serving the tiny test model in float32 on the backend prepare_model measures
    fastest: tests compare its vectors with other float32 forwards at 0.99999 (bfloat16 has its own
    cases in the contract and parity suites)."""
    return load_runtime(tiny_model_dir, dtype="float32")


def override(settings, **sections) -> None:
    """Change fields of the frozen configuration for one test: ``override(settings, limits={"max_parts": 3})``.

    ``settings`` is pytest-django's fixture, which restores the configuration after the test.
    """
    config = settings.CLIPSITE
    for section, changes in sections.items():
        config = replace(config, **{section: replace(getattr(config, section), **changes)})
    settings.CLIPSITE = config


@pytest.fixture(scope="module", autouse=True)
def no_engine_thread_left_running():
    """Every engine a test module opens is closed by it: only the process runtime's may outlive it."""
    yield
    kept = runtime._engine._thread if runtime.ready else None
    left = [t for t in threading.enumerate() if t.name.startswith("clip-engine") and t is not kept and t.is_alive()]
    assert not left, f"engine threads left running: {left}"


@pytest.fixture(scope="session", autouse=True)
def close_the_runtime_at_the_end():
    yield
    runtime.close()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, dim) arrays: how separate computations of one vector are compared."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_same_vectors(got, want, *, cosine: float = 0.99999, norm_rtol: float = 1e-4) -> None:
    """Two computations of the same vectors agree: in direction (cosine) and, for raw projections, in length.

    Float sums depend on threads, batch shapes and the CPU, so separate forward passes are never compared
    bit for bit.
    """
    got, want = np.atleast_2d(np.asarray(got, np.float64)), np.atleast_2d(np.asarray(want, np.float64))
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(cosines(got, want) >= cosine), cosines(got, want)
    assert np.allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=norm_rtol)


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


# --- the PostgreSQL pass: the tests that touch the database ------------------------------------------
DATABASE_FIXTURES = {"db", "transactional_db", "django_db_setup", "admin_client", "admin_user", "django_user_model"}


def pytest_collection_modifyitems(config, items):
    """Mark ``database`` every test that touches the database (a database fixture or django_db), so
    ``scripts/with-postgres.sh python -m pytest -m database`` runs them all again on PostgreSQL; server
    tests that use the database carry the mark themselves."""
    for item in items:
        if item.get_closest_marker("django_db") or DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.database)


@pytest.fixture(autouse=True)
def fresh_counts():
    """Each test counts from zero: no rate-limit counts, failed key lookups or key verdicts of another
    test's (test_fuzz sends many bad keys from one address)."""
    from django.core.cache import caches

    from access import ratelimit, services

    def forget():
        caches["throttle"].clear()
        services._verdicts.clear()
        ratelimit._store_down_until = 0.0  # a test's failing store is not the next one's

    forget()
    yield
    forget()
