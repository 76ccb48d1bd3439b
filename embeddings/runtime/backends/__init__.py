"""The backend contract: what every inference engine (PyTorch, ONNX Runtime, ...) offers the engine.

A backend runs one model's two towers on arrays the preprocessing made and returns float32 vectors,
the model's raw projections. It knows nothing of requests, queues or tokenizers. Which backend serves
a model is chosen once, by ``prepare_model`` (embeddings/runtime/prepare.py), and recorded in the
model's manifest; workers open what the manifest names (``open_backend``). The contract test suite
(tests/embeddings/test_backends.py) runs the same cases against every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

TOWERS = ("image", "text")


@runtime_checkable
class Backend(Protocol):
    name: str  # "torch", "onnx", "openvino"
    dtype: str  # what it really computes in: "float32", "bfloat16", "float16" (GPU), "int8"
    device: str  # "cpu", "cuda"

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) float32 pixels -> (n, dim) float32 projections."""

    def text_features(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """(n, length) int64 token ids and their attention mask (None: the model takes none) -> (n, dim)."""

    def close(self) -> None:
        """Let the weights and threads go; the backend is not used again."""


def open_backend(choice: dict, *, model=None, prepared_dir: Path, threads: dict[str, int]) -> Backend:
    """The backend a manifest's ``choice`` names. ``model(dtype, weights)``: a loader of the torch model."""
    files = {tower: prepared_dir / name for tower, name in choice.get("files", {}).items()}
    if choice["backend"] == "torch":
        from embeddings.runtime.backends.torch import TorchBackend

        return TorchBackend(model(choice["dtype"], files.get("weights")), threads=threads)
    if choice["backend"] == "onnx":
        from embeddings.runtime.backends.onnx import OnnxBackend

        return OnnxBackend(files, threads=threads, dtype=choice["dtype"])
    if choice["backend"] == "openvino":
        from embeddings.runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(files, threads=threads, dtype=choice["dtype"], vocabulary=choice.get("vocabulary"))
    raise ValueError(f"unknown backend {choice['backend']!r}")
